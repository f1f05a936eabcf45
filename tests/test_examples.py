"""examples/ run (a smoke run each: two batches of 16, one epoch), in this process to share the imports."""

import importlib.util
import math

import pytest

from conftest import ROOT

SMOKE = ["--batches", "2", "--epochs", "1", "--batch-size", "16"]


def run_example(name: str) -> dict:
    spec = importlib.util.spec_from_file_location(f"example_{name}", ROOT / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main(SMOKE)


@pytest.mark.parametrize("name, needs", [("plain_loop", None), ("brevitas_twin", "brevitas"), ("lightning_module", "lightning")])
def test_example_trains_the_twin_with_its_mixed_paths(name, needs, tmp_path, monkeypatch):
    if needs:
        pytest.importorskip(needs)
    monkeypatch.chdir(tmp_path)  # whatever a trainer writes stays out of the tree
    result = run_example(name)
    if name == "lightning_module":
        assert {"train/loss", "train/ce/lp", "train/ce/qfff", "train/kd", "val/top1_lp", "val/top1_mixed_3"} <= set(result)
        assert math.isfinite(result["train/loss"]) and 0 <= result["val/top1_lp"] <= 100
        return
    assert len(result["losses"]) == 2 and all(math.isfinite(v) for v in result["losses"])
    assert {"ce/lp", "loss"} <= set(result["logs"]) and any(k.startswith("ce/q") for k in result["logs"])
    assert 0 <= result["twin_top1"] <= 100 and 0 <= result["fp_top1"] <= 100
