"""twin.integer_bias_epochs: the twin's biases on the integer accumulator grid (bqat.quant.integer_bias)."""

import copy
import json

import pytest
import torch
from torch import nn

from bqat.config import validate
from bqat.errors import UserError
from bqat.models import build_model
from bqat.quant import make_twin, twin_from_config
from bqat.quant.integer_bias import IntegerBias, attach_integer_bias, bias_shifts, freeze, hooks, stretch_limit


@pytest.fixture
def twin(compose_cfg):
    """resnet20 LSQ W4A4 with integer biases, quantizers initialised, BatchNorms far from identity."""
    cfg = compose_cfg("bits='4'", "twin.residual_bits=null")
    fp = build_model(cfg.model, 10, in_chans=3)
    twin = make_twin(fp, cfg.quant, cfg.bits)
    assert attach_integer_bias(twin) == 20  # 19 conv -> BatchNorm pairs and fc
    torch.manual_seed(0)
    with torch.no_grad():
        twin.train()(torch.randn(8, 3, 16, 16))
        for m in twin.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_()
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(-1.5, 1.5)  # negative gammas too: the grid step is negative there
                m.bias.normal_()
    return twin


def test_stretch_limit_is_what_the_int8_container_holds():
    assert stretch_limit(-2, 1, input_hi=3) == 64  # 2-bit codes [-2, 1] -> [-128, 64]
    assert stretch_limit(-8, 7, input_hi=15) == 16  # 4-bit
    assert stretch_limit(-128, 127, input_hi=255) == 1  # 8-bit codes cannot stretch
    assert stretch_limit(-8, 7, input_hi=255) == 8  # 8-bit inputs: a pair of products stays in int16


def test_eval_twin_computes_its_batchnorms_folded_with_the_bias_on_the_accumulator_grid(twin):
    seen = {}

    def keep(name):
        def hook(module, args, output):  # after IntegerBias (it is prepended): the output as the twin computes it
            seen[name] = (args[0].detach().clone(), output.detach().clone())  # before an in-place ReLU
        return hook

    for name, m in twin.named_modules():
        if isinstance(m, nn.BatchNorm2d):
            m.register_forward_hook(keep(name))
    twin.eval()(torch.randn(4, 3, 16, 16))
    by_bn = {h.bn: h for h in hooks(twin) if h.bn is not None}
    assert len(by_bn) == len(seen) == 19
    for name, (x, y) in seen.items():
        bn = twin.get_submodule(name)
        h = by_bn[bn]
        a, bias = h.folded()
        g = h.grid(a)
        plain = nn.functional.batch_norm(x, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps)
        shift = (y - plain).mean(dim=(0, 2, 3))
        assert torch.allclose(y - plain, shift.reshape(1, -1, 1, 1).expand_as(y), atol=1e-5), name
        rounded = (bias + shift) / g  # the bias the twin computes, in steps of the accumulator grid
        assert torch.allclose(rounded, torch.round(rounded), atol=1e-3), name
        assert bool((shift.abs() <= g.abs() / 2 + 1e-6).all()), name
        assert bool((shift != 0).any()), name  # the float bias was off the grid: something was rounded
    fc = twin.get_submodule("fc")
    assert set(bias_shifts(twin)) == set(seen) | {"fc"}
    step = fc.input_quantizer.scale_zero_point()[0] * fc.weight_quantizer.scale_zero_point()[0] / stretch_limit(-128, 127, input_hi=255)
    on_grid = (fc.bias + bias_shifts(twin)["fc"]) / step
    assert torch.allclose(on_grid, torch.round(on_grid), atol=1e-3)


def test_frozen_training_computes_the_eval_function_keeps_statistics_and_trains_gamma_beta(twin):
    x = torch.randn(4, 3, 16, 16)
    evaluated = twin.eval()(x).detach()
    plain = copy.deepcopy(twin)
    for m in plain.modules():
        m._forward_hooks.clear()
    freeze(twin, True)
    stats = {n: b.clone() for n, b in twin.named_buffers() if "running" in n}
    out = twin.train()(x)
    assert torch.equal(out.detach(), evaluated)  # the folded form in train mode: no batch statistics
    assert all(torch.equal(b, stats[n]) for n, b in twin.named_buffers() if "running" in n)
    out.square().mean().backward()
    bn = twin.get_submodule("layer1.0.bn1")
    assert bn.weight.grad is not None and bn.weight.grad.abs().sum() > 0 and bn.bias.grad.abs().sum() > 0

    freeze(twin, False)  # before the last epochs: ordinary training, momentum as it was
    assert all(h.bn.momentum == 0.1 for h in hooks(twin) if h.bn is not None)
    torch.manual_seed(1)
    ordinary = twin.train()(x)
    assert torch.allclose(ordinary, plain.train()(x), atol=1e-5)
    assert not torch.allclose(ordinary, out, atol=1e-3)


def test_on_by_default_off_in_the_paper_tables_and_bad_values_fail_in_one_line(compose_cfg):
    cfg = compose_cfg()
    assert cfg.twin.integer_bias is True and cfg.twin.integer_bias_epochs == 0
    fp = build_model(cfg.model, 10, in_chans=3)
    assert len(hooks(twin_from_config(fp, cfg))) == 20
    paper = compose_cfg("experiment=cifar10_resnet20")
    assert paper.twin.integer_bias is False and not hooks(twin_from_config(fp, paper))
    for key, bad in (("integer_bias_epochs", "-1"), ("integer_bias_epochs", "true"), ("integer_bias_epochs", "0.5"), ("integer_bias", "2")):
        with pytest.raises(UserError, match=f"twin.{key} must be"):
            validate(compose_cfg(f"twin.{key}={bad}"))
    with pytest.raises(UserError, match="needs twin.integer_bias=true"):
        validate(compose_cfg("twin.integer_bias=false", "twin.integer_bias_epochs=1"))


def test_a_hook_without_an_integer_zero_point_leaves_the_bias_float():
    layer = make_twin(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)), {"name": "lsqplus"}, 4)
    layer.train()(torch.randn(2, 3, 8, 8) - 0.3)  # LSQ+ activations: a learned, fractional zero point
    conv = layer[0]
    with torch.no_grad():
        conv.input_quantizer.offset.fill_(-0.123)
    assert IntegerBias(conv, layer[1]).shift() is None


def test_bqat_train_freezes_the_last_epochs_and_bqat_export_computes_the_trained_twin(tmp_path):
    from conftest import ROOT, run_cli

    run_dir = tmp_path / "run"
    fast = ["trainer.limit_train_batches=3", "trainer.limit_val_batches=2", "trainer.progress=false", "partner.epochs=1",
            "bits='4'", "data.image_size=16", "twin.integer_bias_epochs=1", f"hydra.run.dir={run_dir}", f"partner.cache_dir={tmp_path / 'p'}"]
    proc = run_cli([*fast, "trainer.epochs=2"], cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = (run_dir / "train.log").read_text()
    assert "twin epoch 2: BatchNorm statistics frozen, biases on the integer grid" in log and "twin epoch 1: BatchNorm" not in log
    assert json.loads((run_dir / "metrics.json").read_text())["twin_integer_bias_epochs"] == 1
    before = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)["twin"]

    proc = run_cli([*fast, "trainer.epochs=3"], cwd=ROOT)  # resumed: epoch 3 is now the frozen one
    assert proc.returncode == 0, proc.stderr[-3000:]
    after = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)["twin"]
    stats = [k for k in after if k.endswith(("running_mean", "running_var"))]
    assert len(stats) == 38 and all(torch.equal(before[k], after[k]) for k in stats)  # frozen statistics
    assert not torch.equal(before["layer1.0.bn1.weight"], after["layer1.0.bn1.weight"])  # gamma still trains

    proc = run_cli([str(run_dir), "--latency-runs", "0"], cwd=ROOT, module="bqat.export")
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((run_dir / "export" / "report.json").read_text())
    assert report["integer_ops"] == report["quantized_ops"] == 20 and report["float_layers"] == {}  # the 8-bit stem too
    assert report["agreement"] == 1.0 and report["max_abs_logit_diff"] < 1e-4
