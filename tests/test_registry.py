"""One registry serves quantizers, schedules and datasets: same decorator, same one-line error."""

import warnings

import pytest
from omegaconf import OmegaConf

from bqat.data import DATASETS, build_data
from bqat.errors import UserError
from bqat.quant import QUANTIZERS, get_quantizer
from bqat.registry import Registry
from bqat.replace import SCHEDULES, build_schedule


@pytest.mark.parametrize("lookup, line", [
    (lambda: get_quantizer("lsqq"), "unknown quantizer 'lsqq' (did you mean lsq?); choose one of: dorefa, ewgs, lsq, lsqplus, none, pact (quant=<name>)"),
    (lambda: build_schedule(OmegaConf.create({"name": "prefx"})), "unknown schedule 'prefx' (did you mean prefix?); choose one of: none, prefix, sampled, single (schedule=<name>)"),
    (lambda: build_data(OmegaConf.create({"name": "digit"})), "unknown dataset 'digit' (did you mean digits?); choose one of: cifar10, cifar100, digits, imagefolder, imagenet (data=<name>)"),
])
def test_an_unknown_name_is_one_line_listing_the_choices(lookup, line):
    with pytest.raises(UserError) as err:
        lookup()
    assert str(err.value) == line


def test_register_fills_the_table_and_warns_on_a_second_registration():
    table = Registry("schedule")

    @table.register("mine")
    class Mine:
        pass

    assert table["mine"] is Mine and Mine.registered_name == "mine" and "mine" in table.choices()
    with pytest.warns(UserWarning, match="registered twice"):
        table.register("mine")(type("Other", (), {}))
    assert table["mine"].__name__ == "Other"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert {"lsq", "none"} <= set(QUANTIZERS.choices()) and "prefix" in SCHEDULES and "digits" in DATASETS
