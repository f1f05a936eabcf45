"""Per-layer precision (bits.layers), model size and BOPs, and bqat-sensitivity.

Resuming is tested in-process (RunCheckpoint, as bqat-train resumes); the end-to-end part
shares one short CLI run of resnet20 on 8x8 digits with three widths in one network (layer1
at W4A4, layer3's inputs at 3 bits, the classifier's weights float); export and sensitivity
run in-process on its folder.
"""

import csv
import importlib.util
import json
import sys
from types import SimpleNamespace

import pytest
import timm
import timm.scheduler
import torch
from omegaconf import OmegaConf
from safetensors import safe_open
from torch import nn

from bqat.config import unquote_layer_globs
from bqat.data import TensorLoader
from bqat.engine import fit
from bqat.errors import UserError
from bqat.export.pack import unpack_codes
from bqat.export.run import export_run
import bqat.models  # noqa: F401  (resnet20)
from bqat.quant import QConv2d, QLinear, make_twin, twin_from_config
from bqat.quant.lsq import LSQ
from bqat.quant.mixed import layer_patterns
from bqat.quant.size import layer_macs, model_size
from bqat.quant.twin import layer_widths
from bqat.models import default_boundaries
from bqat.replace import BlockReplacement
from bqat.resume import RunCheckpoint, config_differences
from bqat.sensitivity import main as sensitivity_main
from bqat.sensitivity import raised, sensitivity
from conftest import ROOT, run_cli

LSQ_CFG = OmegaConf.create({"name": "lsq", "per_channel": False})


class TinyNet(nn.Module):
    """stem conv -> BN -> depthwise conv -> pointwise conv (with bias) -> pool -> fc, on 3x4x4 inputs."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1, bias=False)  # 108 weights
        self.bn = nn.BatchNorm2d(4)  # 8 parameters
        self.dw = nn.Conv2d(4, 4, 3, padding=1, groups=4, bias=False)  # 36 weights
        self.pw = nn.Conv2d(4, 8, 1)  # 32 weights + 8 biases
        self.fc = nn.Linear(8, 10)  # 80 weights + 10 biases

    def forward(self, x):
        x = self.pw(self.dw(torch.relu(self.bn(self.stem(x)))))
        return self.fc(x.mean((2, 3)))


def bits(layers=None, **kw):
    return OmegaConf.create({"w": 2, "a": 2, "first_last": 8, "depthwise": 8, **kw, **({"layers": layers} if layers else {})})


# --- globs ---------------------------------------------------------------------------------


def test_globs_apply_after_first_last_and_depthwise_and_the_last_match_wins():
    net = TinyNet()
    assert layer_widths(net, bits()) == {"stem": (8, 8), "dw": (8, 8), "pw": (2, 2), "fc": (8, 8)}
    # "*" re-widths the edge (first_last) and depthwise layers too; "p?" sets only a; "pw" last.
    widths = layer_widths(net, bits({"*": {"w": 3}, "p?": {"a": 4}, "pw": {"w": "fp"}}))
    assert widths == {"stem": (3, 8), "dw": (3, 8), "pw": (None, 4), "fc": (3, 8)}
    # Order decides: the same globs the other way round leave pw's weights at 3 bits.
    assert layer_widths(net, bits({"pw": {"w": "fp"}, "p?": {"a": 4}, "*": {"w": 3}}))["pw"] == (3, 4)
    # `*` matches dots, and the policy's float layers can be brought back onto a grid.
    r20 = timm.create_model("resnet20", num_classes=10)
    widths = layer_widths(r20, bits({"layer2.*": {"w": 4, "a": 4}, "layer2.?.conv2": {"a": 8}, "fc": {"w": 6}}, first_last="fp"))
    assert widths["layer2.0.conv1"] == (4, 4) and widths["layer2.2.conv2"] == (4, 8) and widths["layer3.0.conv1"] == (2, 2)
    assert widths["conv1"] == (None, None) and widths["fc"] == (6, None)

    twin = make_twin(net, LSQ_CFG, bits({"*": {"w": 3}, "p?": {"a": 4}, "pw": {"w": "fp"}, "fc": {"w": "fp", "a": "fp"}}))
    assert isinstance(twin.stem, QConv2d) and twin.stem.weight_quantizer.bits == 3 and twin.stem.input_quantizer.bits == 8
    assert twin.pw.weight_quantizer is None and twin.pw.input_quantizer.bits == 4
    assert type(twin.fc) is nn.Linear  # both float: the layer stays a float layer
    twin(torch.randn(2, 3, 4, 4))


def test_a_glob_matching_nothing_and_bad_values_fail_in_one_line():
    net = TinyNet()
    with pytest.raises(UserError, match=r"pattern 'layer4\.\*' matches no quantizable layer of TinyNet; its layers are named stem, dw, pw, fc") as err:
        layer_widths(net, bits({"pw": {"w": 4}, "layer4.*": {"w": 4}}))
    assert "\n" not in str(err.value)
    for layers, message in [
        ({"pw": {"w": 9}}, r"bits.layers\['pw'\].w must be an integer from 2 to 8 or fp, got 9"),
        ({"pw": {"w": "4"}}, r"bits.layers\['pw'\].w must be an integer from 2 to 8 or fp, got '4'"),
        ({"pw": {"b": 4}}, r"bits.layers\['pw'\] has unknown key 'b'"),
        ({"pw": 4}, r"bits.layers\['pw'\] must be a mapping such as \{w: 4, a: 4\}"),
        (["pw"], r"bits.layers must map module-name globs"),
    ]:
        with pytest.raises(UserError, match=message):
            layer_patterns(OmegaConf.create({"layers": layers}))
    with pytest.raises(UserError, match=r"sets neither w nor a"):
        layer_patterns({"layers": {"pw": {}}})


def test_shell_spelling_with_quoted_globs_composes(compose_cfg):
    argv = unquote_layer_globs(['+bits.layers={"layer1.*": {w: 4, a: 4}, \'fc\': {w: "fp"}}', "bits.w=3"])
    assert argv == ['+bits.layers={layer1.*: {w: 4, a: 4}, fc: {w: "fp"}}', "bits.w=3"]
    cfg = compose_cfg(*argv)
    assert [(p, s) for p, s in layer_patterns(cfg.bits)] == [("layer1.*", {"w": 4, "a": 4}), ("fc", {"w": None})]
    example = compose_cfg("bits=r18_mixed_example", "model=resnet18")
    assert list(example.bits.layers) == ["layer1.*", "layer4.*", "layer4.*.downsample.0"]


def test_resume_accepts_the_same_bits_layers_and_refuses_another():
    def saved(layers):
        return {"bits": {"w": 2, "a": 2, **({"layers": layers} if layers is not None else {})}}

    def now(layers):
        return OmegaConf.create(saved(layers))

    a = {"layer1.*": {"w": 4}, "fc": {"w": 8}}
    assert config_differences(saved(a), now(dict(a))) == []
    assert config_differences(saved(None), now(None)) == []  # also a checkpoint from before bits.layers
    for other in ({"layer2.*": {"w": 4}, "fc": {"w": 8}}, {"fc": {"w": 8}, "layer1.*": {"w": 4}}, {"layer1.*": {"w": 4}}, None):
        diffs = config_differences(saved(a), now(other))
        assert len(diffs) == 1 and diffs[0].startswith("bits.layers: [['layer1.*'"), other
    assert config_differences(saved(None), now(a))[0].startswith("bits.layers: [] -> [['layer1.*'")


# --- size and BOPs ---------------------------------------------------------------------------


def test_weight_bits_and_bops_equal_hand_counts():
    net = TinyNet()
    twin = make_twin(net, LSQ_CFG, bits({"pw": {"w": 4}, "fc": {"a": "fp"}}))  # stem 8/8, dw 8/8, pw 4/2, fc 8/fp
    macs = layer_macs(net, (3, 4, 4))
    # per output element: in_channels / groups x kernel area (Linear: in_features)
    assert macs == {"stem": 16 * 4 * 27, "dw": 16 * 4 * 9, "pw": 16 * 8 * 4, "fc": 10 * 8}
    size = model_size(twin, macs)
    weight_bits = (108 * 8 + 8 * 32      # stem at 8 bits, BatchNorm weight and bias at 32
                   + 36 * 8              # depthwise at 8 (bits.depthwise)
                   + 32 * 4 + 8 * 32     # pointwise at 4, its bias at 32
                   + 80 * 8 + 10 * 32)   # fc at 8 (first_last), its bias at 32
    assert size["weight_bits"] == weight_bits == 2752
    assert size["avg_weight_bits"] == pytest.approx(2752 / 282)
    assert size["bops"] == 1728 * 8 * 8 + 576 * 8 * 8 + 512 * 4 * 2 + 80 * 8 * 32
    assert size["fp32_bops"] == (1728 + 576 + 512 + 80) * 32 * 32
    float_size = model_size(net, macs)  # the FP network: everything at 32
    assert float_size["weight_bits"] == 282 * 32 and float_size["bops"] == float_size["fp32_bops"]


def test_raising_a_quantizer_keeps_its_grid_points_and_is_undone():
    q = LSQ(2, "act")
    x = torch.rand(1000) * 4
    q(x)  # initialise
    coarse = q(x).detach()
    step = q.step.detach().clone()
    with raised([q], 8):
        assert q.bits == 8 and torch.allclose(q.step, step / 64)
        assert torch.allclose(q(coarse), coarse, atol=1e-6)  # every 2-bit level is an 8-bit level
        assert len(q(x).unique()) > 50
    assert q.bits == 2 and torch.equal(q.step.detach(), step) and torch.equal(q(x), coarse)


# --- training and resuming with several widths (in-process) -----------------------------------

TRAINER = OmegaConf.create({"limit_train_batches": 2, "limit_val_batches": 1, "log_every_n_steps": 1, "progress": False})
TWO_WIDTHS = {"layer1.*": {"w": 4, "a": 4}, "layer3.*": {"w": 3}}


def mixed_hybrid(run_dir, layers):
    """A resnet20 block-replacement run on 8x8 random images, as train.py builds it, with `layers`."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(32, 3, 8, 8, generator=g), torch.randint(0, 10, (32,), generator=g)
    data = SimpleNamespace(train=TensorLoader(x, y, 8, shuffle=True, drop_last=True), val=TensorLoader(x[:16], y[:16], 8))
    fp = timm.create_model("resnet20", num_classes=10).eval()
    cfg = OmegaConf.create({"resume": True, "seed": 0, "bits": bits(layers)})
    twin = make_twin(fp, LSQ_CFG, cfg.bits)
    loss = OmegaConf.create({"w_mix": 1.0, "w_mix_decay": "constant", "w_kd": 0.0, "T": 1.0, "w_mp_kd": 0.0})
    hybrid = BlockReplacement(twin, fp, default_boundaries(fp), OmegaConf.create({"name": "prefix"}), loss)
    with torch.no_grad():
        hybrid.twin.train()(x[:8])  # quantizer initialisation, as train.py does
    optimizer = torch.optim.SGD(hybrid.twin.parameters(), lr=0.05, momentum=0.9)
    scheduler, _ = timm.scheduler.create_scheduler_v2(optimizer, sched="cosine", num_epochs=2, step_on_epochs=False, updates_per_epoch=2)
    ckpt = RunCheckpoint(run_dir, cfg, hybrid, optimizer, scheduler, data.train, "partner.pt")
    return SimpleNamespace(hybrid=hybrid, data=data, optimizer=optimizer, scheduler=scheduler, ckpt=ckpt)


def run_fit(run, epochs, state=None):
    return fit(run.hybrid, run.data, run.optimizer, run.scheduler, epochs=epochs, cfg=TRAINER, device=torch.device("cpu"),
               state=state, on_epoch_end=lambda s, improved: run.ckpt.save(s, best=improved))


def weight_codes(m):
    """The integer codes of a trained layer's weights on its own LSQ grid."""
    q = m.weight_quantizer
    return (q(m.weight) / q.step).detach().round()


def test_a_twin_with_two_widths_trains_and_resumes_with_each_layer_on_its_own_grid(tmp_path):
    run = mixed_hybrid(tmp_path, TWO_WIDTHS)
    run_fit(run, epochs=1)
    resumed = mixed_hybrid(tmp_path, dict(TWO_WIDTHS))  # a fresh process: rebuilt, then restored
    state = resumed.ckpt.restore()
    assert state.epoch == 1 and resumed.ckpt.resumed_from_epoch == 1
    run_fit(resumed, epochs=2, state=state)
    twin = resumed.hybrid.twin
    for name, m in twin.named_modules():
        if isinstance(m, QConv2d) and name != "conv1":
            w, a = {"layer1": (4, 4), "layer2": (2, 2), "layer3": (3, 2)}[name.split(".")[0]]
            assert (m.weight_quantizer.bits, m.input_quantizer.bits) == (w, a), name
            codes = weight_codes(m)
            assert codes.min() >= -(2 ** (w - 1)) and codes.max() <= 2 ** (w - 1) - 1, name
            assert len(codes.unique()) > 2 ** (w - 1), name  # uses more levels than a narrower grid has
    with pytest.raises(UserError, match=r"another config \(bits\.layers: \[\['layer1\.\*'.* -> \[\['layer1\.\*', \{'w': 4, 'a': 4\}\]\]\)"):
        mixed_hybrid(tmp_path, {"layer1.*": {"w": 4, "a": 4}}).ckpt.restore()


# --- a CLI run with three widths, exported, and its sensitivity ---------------------------------

LAYERS = '+bits.layers={"layer1.*": {w: 4, a: 4}, "layer3.*": {a: 3}, "fc": {w: fp}}'
WIDTHS = {"layer1": (4, 4), "layer2": (2, 2), "layer3": (2, 3)}


def expected_widths(name):
    if name == "conv1":
        return (8, 8)
    if name == "fc":
        return (None, 8)
    return WIDTHS[name.split(".")[0]]


@pytest.fixture(scope="module")
def mixed_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("mixed")
    run_dir = tmp / "run"
    args = [LAYERS, "data.image_size=8", "partner.epochs=1", "trainer.limit_train_batches=2", "trainer.limit_val_batches=2",
            "trainer.progress=false", f"hydra.run.dir={run_dir}", "partner.cache_dir=partners"]  # relative to cwd
    proc = run_cli(["trainer.epochs=1", *args], cwd=tmp)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir


def test_a_cli_run_with_three_widths_trains_and_reports_its_size(mixed_run):
    metrics = json.loads((mixed_run / "metrics.json").read_text())
    assert metrics["epoch"] == 1
    assert metrics["bits_layers"] == {"layer1.*": {"w": 4, "a": 4}, "layer3.*": {"a": 3}, "fc": {"w": "fp"}}
    ckpt = torch.load(mixed_run / "checkpoints" / "last.pt", weights_only=True)
    twin = twin_from_config(timm.create_model("resnet20", num_classes=10), OmegaConf.create(ckpt["config"]))  # as training built it
    twin.load_state_dict(ckpt["twin"])
    for name, m in twin.named_modules():
        if isinstance(m, (QConv2d, QLinear)):
            w, a = expected_widths(name)
            assert (None if m.weight_quantizer is None else m.weight_quantizer.bits, m.input_quantizer.bits) == (w, a), name
    # weight_bits: every weight at its layer's width, biases / BatchNorm / the float fc weight at 32
    expected = 0
    for name, p in twin.named_parameters():
        layer, _, kind = name.rpartition(".")
        if "quantizer" in layer:
            continue  # step sizes are not counted
        quantized = kind == "weight" and isinstance(twin.get_submodule(layer), (QConv2d, QLinear))
        expected += p.numel() * ((expected_widths(layer)[0] or 32) if quantized else 32)
    assert metrics["weight_bits"] == expected
    assert metrics["fp32_bops"] > metrics["bops"] > 0 and 2 < metrics["avg_weight_bits"] < 32


def test_export_packs_each_layer_at_its_own_width(mixed_run):
    # A twin trained two steps has near-tied logits, which the integer graph's int32 biases swap
    # (README, "Exporting a run"): with --bias-tolerance 0 every conv keeps the twin's exact bias.
    report = export_run(mixed_run, limit_val_batches=1, latency_runs=0, bias_tolerance=0.0)
    # BatchNorm folded into the per-channel scales: equal to float rounding.
    assert report["rebuilt_max_abs_logit_diff"] <= 1e-4 and report["rebuilt_fp64_within_tolerance"] == 1.0
    assert report["agreement"] >= 0.98 and report["max_abs_logit_diff"] <= 1e-3
    with safe_open(str(mixed_run / "export" / "weights.safetensors"), framework="pt") as f:
        layout = json.loads(f.metadata()["layers"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    grids = {n for n, spec in layout.items() if set(spec) == {"output"}}  # twin.residual_bits=auto: 8-bit residual grids
    assert len(grids) == 19 and all(layout[n]["output"]["bits"] == 8 for n in grids)
    layout = {n: spec for n, spec in layout.items() if n not in grids}
    assert len(layout) == 20 and "weight" not in layout["fc"]  # every conv and the fc, whose weights stay float
    for name, spec in layout.items():
        w, a = expected_widths(name)
        assert spec["input"]["bits"] == a, name
        if w is None:
            continue
        assert spec["weight"]["bits"] == w, name
        count = int(torch.Size(spec["weight"]["shape"]).numel())
        codes = unpack_codes(tensors[f"{name}.weight.codes"], w, spec["weight"]["qn"], count)
        assert codes.min() >= -(2 ** (w - 1)) and codes.max() <= 2 ** (w - 1) - 1, name
        if w == 4:
            assert len(codes.unique()) > 4, name  # really on the 4-bit grid, not the 2-bit one


def test_sensitivity_writes_json_png_and_one_entry_per_block(mixed_run, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # elsewhere than the run's cwd: the relative partner path is read from there
    result = sensitivity(mixed_run, limit_val_batches=2, progress=False)
    saved = json.loads((mixed_run / "sensitivity.json").read_text())
    assert saved["ranking"] == result["ranking"] and sorted(saved["ranking"]) == [1, 2, 3]
    assert (mixed_run / "sensitivity.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    blocks = saved["blocks"]
    assert [b["block"] for b in blocks] == [1, 2, 3] and blocks[2]["modules"][-1] == "(head)"
    # The paths are the ones training evaluated: the same top-1 on the same batches.
    metrics = json.loads((mixed_run / "metrics.json").read_text())
    assert saved["lp_top1"] == pytest.approx(metrics["top1"]) and saved["fp_top1"] == pytest.approx(metrics["partner_top1"])
    assert [b["prefix_top1"] for b in blocks[:2]] == pytest.approx(metrics["mixed_top1"])
    for b in blocks:
        assert b["single_cost"] == pytest.approx(saved["fp_top1"] - b["single_top1"])
        assert b["raised_gain"] == pytest.approx(b["raised_top1"] - saved["lp_top1"])
        assert b["cost"] == pytest.approx((b["single_cost"] + b["prefix_cost"] + b["raised_gain"]) / 3)
    assert sum(b["prefix_cost"] for b in blocks) == pytest.approx(saved["fp_top1"] - saved["lp_top1"])
    assert blocks[0]["weight_params"] == 16 * 3 * 9 + 6 * 16 * 16 * 9  # conv1 + layer1's six convs

    with pytest.raises(SystemExit) as exit_info:
        sensitivity_main([str(mixed_run / "checkpoints")])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1
    assert err.startswith("bqat-sensitivity: error:") and "not a bqat run dir" in err


def test_python_m_bqat_sensitivity_on_an_unfinished_run_prints_one_line(tmp_path, monkeypatch, capsys):
    """`python -m bqat.sensitivity RUN_DIR` (run in-process with runpy: the same __main__ path)."""
    import runpy

    (tmp_path / ".hydra").mkdir()
    (tmp_path / ".hydra" / "config.yaml").write_text("{}\n")
    monkeypatch.setattr("sys.argv", ["bqat.sensitivity", str(tmp_path)])
    monkeypatch.delitem(sys.modules, "bqat.sensitivity")  # run_module executes it afresh as __main__
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_module("bqat.sensitivity", run_name="__main__")
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1 and "unfinished (no checkpoints/last.pt)" in err


# --- scripts/report.py: top-1 against size -----------------------------------------------------


def test_report_plots_top1_against_size_when_runs_differ_in_size(tmp_path):
    spec = importlib.util.spec_from_file_location("bqat_report_script", ROOT / "scripts" / "report.py")
    report = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(report)
    base = {"best_top1": None, "epoch": 2, "model": "resnet20", "quant": "lsq", "schedule": "prefix", "bits_w": 2, "bits_a": 2,
            "first_last": "8", "partner_top1": 98.0, "seed": 0, "data": "digits", "loss": {"w_kd": 0.0}}
    runs = {"uniform": {"top1": 90.0, "weight_bits": 600_000, "avg_weight_bits": 2.2, "bits_layers": None},
            "mixed": {"top1": 93.0, "weight_bits": 700_000, "avg_weight_bits": 2.6, "bits_layers": {"layer1.*": {"w": 4}}},
            "w4": {"top1": 95.0, "weight_bits": 1_100_000, "avg_weight_bits": 4.1, "bits_layers": None, "bits_w": 4, "bits_a": 4}}
    for name, fields in runs.items():
        (tmp_path / "runs" / name).mkdir(parents=True)
        (tmp_path / "runs" / name / "metrics.json").write_text(json.dumps({**base, **fields}))
    folder = report.report([tmp_path / "runs"], "mix", tmp_path / "out")
    assert (folder / "top1_vs_size.png").read_bytes()[:4] == b"\x89PNG" and (folder / "top1_vs_bits.png").is_file()
    with open(folder / "results.csv") as f:
        rows = {r["top1"]: r for r in csv.DictReader(f)}
    assert len(rows) == 3 and rows["93.00"]["weight_bits"] == "700000"  # the mix is its own row, not averaged with W2A2
    assert "W2A2 + bits.layers (2.60 b/weight)" in (folder / "results.md").read_text()
    (tmp_path / "runs" / "mixed" / "metrics.json").unlink()
    (tmp_path / "runs" / "w4" / "metrics.json").unlink()
    assert not (report.report([tmp_path / "runs"], "one", tmp_path / "out") / "top1_vs_size.png").exists()
