"""bqat-train as a user runs it: files written, sweeps sharing one cached partner."""

import json

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from conftest import ROOT, run_cli

FAST = ["trainer.epochs=2", "partner.epochs=1", "trainer.limit_train_batches=3", "trainer.limit_val_batches=2", "trainer.progress=false"]

METRIC_KEYS = {"top1", "best_top1", "epoch", "model", "quant", "schedule", "bits_w", "bits_a", "first_last",
               "resumed_from_epoch", "world_size", "wall_seconds", "partner_top1", "mixed_top1"}


def test_short_run_writes_metrics_checkpoints_and_tensorboard(tmp_path):
    run_dir = tmp_path / "run"
    proc = run_cli([*FAST, f"hydra.run.dir={run_dir}", f"partner.cache_dir={tmp_path / 'partners'}"], cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert METRIC_KEYS <= set(metrics)
    assert metrics["epoch"] == 2 and metrics["bits_w"] == 2 and metrics["schedule"] == "prefix"
    assert metrics["first_last"] == "8" and metrics["resumed_from_epoch"] is None
    assert metrics["twin_residual_bits"] == 8  # twin.residual_bits=auto on a ResNet: 8-bit residual grids
    assert len(metrics["mixed_top1"]) == 2  # resnet20: 3 blocks -> 2 mixed paths
    assert 0 <= metrics["top1"] <= 100
    # compile=auto by default: a 6-step run stays eager, and says why
    assert metrics["compile"] is False and metrics["quant_compile"] is False and metrics["compile_cost_s"] is None
    assert "compile: trainer.compile off (auto: 6 planned updates" in (run_dir / "train.log").read_text()

    ckpt = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)
    assert ckpt["epoch"] == 2 and {"twin", "optimizer", "scheduler", "config"} <= set(ckpt)
    assert any(k.endswith("weight_quantizer.step") for k in ckpt["twin"])
    assert (run_dir / "checkpoints" / "best.pt").is_file()
    assert (run_dir / ".hydra" / "config.yaml").is_file() and (run_dir / "train.log").stat().st_size > 0

    events = EventAccumulator(str(run_dir / "tb"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/loss", "train/ce/lp", "train/lr", "val/top1_lp", "val/top1_mixed_1", "partner/top1"} <= tags
    assert any(t.startswith("step_size/") for t in tags)


def test_sweep_over_bits_shares_one_cached_partner_and_a_rerun_skips_finished_runs(tmp_path):
    partners = tmp_path / "partners"
    sweep = ["-m", "bits=2,4", *FAST, "trainer.epochs=1", f"hydra.sweep.dir={tmp_path / 'multirun'}", f"partner.cache_dir={partners}"]
    proc = run_cli(sweep, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = sorted((tmp_path / "multirun").glob("*/metrics.json"))
    assert len(runs) == 2
    metrics = [json.loads(p.read_text()) for p in runs]
    assert sorted(m["bits_w"] for m in metrics) == [2, 4]
    assert len({m["partner_source"] for m in metrics}) == 1
    assert len(list(partners.glob("*.pt"))) == 1
    assert metrics[0]["partner_top1"] == metrics[1]["partner_top1"]

    written = {p: p.read_text() for p in runs}
    again = run_cli(sweep, cwd=ROOT)
    assert again.returncode == 0, again.stderr[-3000:]
    for path, text in written.items():
        assert path.read_text() == text
        assert "already finished" in (path.parent / "train.log").read_text()
    assert not (path.parent / "previous").exists()


def test_numeric_bits_overrides_are_quoted_for_hydra():
    from bqat.config import quote_numeric_groups

    assert quote_numeric_groups(["bits=2", "-m", "bits=2,3,4", "bits.w=3", "seed=2"]) == [
        "bits='2'", "-m", "bits='2','3','4'", "bits.w=3", "seed=2"]


def test_every_bits_option_composes(compose_cfg):
    for b in (2, 3, 4, 8):
        cfg = compose_cfg(f"bits='{b}'")
        assert (cfg.bits.w, cfg.bits.a, cfg.bits.first_last) == (b, b, 8)


def test_every_quantizer_trains_under_prefix_per_tensor_and_per_channel(tmp_path):
    """`bqat-train quant=<q> quant.per_channel=<true|false> bits=2 schedule=prefix` for all five
    quantizers and both settings, as one Hydra sweep sharing one cached partner."""
    from omegaconf import OmegaConf

    quants = ["lsq", "lsqplus", "pact", "dorefa", "ewgs"]
    partners = tmp_path / "partners"
    proc = run_cli(["-m", f"quant={','.join(quants)}", "quant.per_channel=true,false", "bits=2", "schedule=prefix",
                    "trainer.epochs=1", "partner.epochs=1", "trainer.limit_train_batches=1", "trainer.limit_val_batches=1",
                    "data.batch_size=16", "trainer.progress=false", f"hydra.sweep.dir={tmp_path / 'multirun'}",
                    f"partner.cache_dir={partners}"], cwd=ROOT, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = sorted((tmp_path / "multirun").glob("*/metrics.json"))
    seen = set()
    for path in runs:
        metrics = json.loads(path.read_text())
        cfg = OmegaConf.load(path.parent / ".hydra" / "config.yaml")
        name, per_channel = cfg.quant.name, cfg.quant.per_channel
        seen.add((name, per_channel))
        assert metrics["quant"] == name and metrics["schedule"] == "prefix" and metrics["epoch"] == 1
        assert (metrics["bits_w"], metrics["bits_a"], metrics["first_last"]) == (2, 2, "8")
        assert 0 <= metrics["top1"] <= 100 and len(metrics["mixed_top1"]) == 2
        twin = torch.load(path.parent / "checkpoints" / "last.pt", weights_only=True)["twin"]
        layer = "layer1.0.conv1"  # 16 output channels
        if name in ("lsq", "lsqplus", "ewgs"):
            assert twin[f"{layer}.weight_quantizer.step"].shape == ((16,) if per_channel else ()), (name, per_channel)
        assert (f"{layer}.input_quantizer.offset" in twin) == (name == "lsqplus")
        assert (f"{layer}.input_quantizer.alpha" in twin) == (name == "pact")
        if name == "pact" and not per_channel:  # the alpha regulariser is part of the logged loss
            events = EventAccumulator(str(path.parent / "tb"))
            events.Reload()
            assert "train/reg/quant" in events.Tags()["scalars"]
    assert seen == {(q, pc) for q in quants for pc in (True, False)}
    assert len(list(partners.glob("*.pt"))) == 1


def test_weight_and_activation_bits_are_set_apart(compose_cfg):
    from bqat.config import validate
    from bqat.errors import UserError

    assert [(c.bits.w, c.bits.a) for c in (compose_cfg("bits=w2a4"), compose_cfg("bits=w4a8"))] == [(2, 4), (4, 8)]
    cfg = compose_cfg("bits.w=2", "bits.a=4", "bits.first_last=fp")
    assert (cfg.bits.w, cfg.bits.a, cfg.bits.first_last) == (2, 4, "fp")
    validate(cfg)
    with pytest.raises(UserError, match="bits.w must be an integer from 2 to 8"):
        validate(compose_cfg("bits.w=1"))
