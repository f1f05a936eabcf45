"""scripts/report.py on hand-made metrics.json files: grouping, seeds, deltas, published numbers."""

import csv
import json
import subprocess
import sys

import pytest

from conftest import ROOT

REPORT = ROOT / "scripts" / "report.py"


def write_run(root, name, **fields):
    """One run folder holding a metrics.json with the keys bqat-train writes (DESIGN.md)."""
    metrics = {
        "top1": 50.0, "best_top1": None, "epoch": 10, "model": "resnet20", "quant": "lsq", "schedule": "none",
        "bits_w": 2, "bits_a": 2, "first_last": "8", "resumed_from_epoch": None, "world_size": 1,
        "wall_seconds": 100.0, "train_seconds": 80.0, "partner_top1": 98.0, "mixed_top1": [], "seed": 0,
        "data": "digits", "loss": {"w_mix": 1.0, "w_mix_decay": "constant", "w_kd": 0.0, "T": 1.0, "w_mp_kd": 0.0},
    }
    metrics.update(fields)
    if metrics["best_top1"] is None:
        metrics["best_top1"] = metrics["top1"]
    folder = root / name
    folder.mkdir(parents=True)
    (folder / "metrics.json").write_text(json.dumps(metrics))
    return folder


def run_report(*args):
    return subprocess.run([sys.executable, str(REPORT), *map(str, args)], capture_output=True, text=True, timeout=300)


def read_rows(folder):
    with open(folder / "results.csv") as f:
        return list(csv.DictReader(f))


def test_report_aggregates_seeds_computes_deltas_and_finds_published_numbers(tmp_path):
    runs = tmp_path / "runs"
    # digits ResNet-20, W4A4: two seeds per schedule; W2A2: one seed each.
    write_run(runs, "w4-none-s0", bits_w=4, bits_a=4, top1=90.0, seed=0, wall_seconds=10.0)
    write_run(runs, "w4-none-s1", bits_w=4, bits_a=4, top1=92.0, seed=1, wall_seconds=30.0)
    write_run(runs, "w4-prefix-s0", bits_w=4, bits_a=4, schedule="prefix", top1=93.0, seed=0)
    write_run(runs, "w4-prefix-s1", bits_w=4, bits_a=4, schedule="prefix", top1=95.0, seed=1)
    write_run(runs, "w2-none", top1=50.0)
    write_run(runs, "w2-prefix", schedule="prefix", top1=55.5)
    # Same bits, other cells: distillation, FP first/last layers, more epochs. None has a baseline.
    write_run(runs, "w2-prefix-kd", schedule="prefix", top1=57.0, loss={"w_kd": 1.0})
    write_run(runs, "w2-prefix-fp", schedule="prefix", first_last="fp", top1=60.0)
    write_run(runs, "w2-prefix-20ep", schedule="prefix", epoch=20, top1=61.0)
    # Published neighbours: LSQ's ImageNet ResNet-18 and APoT's CIFAR-10 ResNet-20 checkpoints.
    write_run(runs, "in-r18-w2-prefix", data="imagenet", model="resnet18", schedule="prefix", top1=66.0, partner_top1=69.8)
    write_run(runs, "c10-r20-w4-none", data="cifar10", bits_w=4, bits_a=4, top1=91.0, partner_top1=92.0)
    (runs / "broken").mkdir()
    (runs / "broken" / "metrics.json").write_text("{not json")

    proc = run_report(runs, "--name", "t", "--out", tmp_path / "reports")
    assert proc.returncode == 0, proc.stderr
    assert "skipping" in proc.stderr and "broken" in proc.stderr  # named, not fatal
    out = tmp_path / "reports" / "t"
    rows = read_rows(out)
    assert len(rows) == 9

    def row(**want):
        found = [r for r in rows if all(r[k] == str(v) for k, v in want.items())]
        assert len(found) == 1, (want, found)
        return found[0]

    base4 = row(data="digits", bits_w=4, schedule="none")
    assert (base4["n_seeds"], base4["seeds"], base4["top1"], base4["top1_std"]) == ("2", "0,1", "91.00", "1.41")
    assert base4["top1_by_seed"] == "s0:90.00;s1:92.00"
    assert base4["delta_vs_none"] == "" and base4["wall_s"] == "20.0" and base4["fp_top1"] == "98.00"
    br4 = row(data="digits", bits_w=4, schedule="prefix")
    assert (br4["method"], br4["top1"], br4["delta_vs_none"]) == ("lsq+prefix", "94.00", "3.00")
    br2 = row(data="digits", bits_w=2, schedule="prefix", first_last=8, epochs=10, w_kd="0.00")
    assert (br2["top1"], br2["delta_vs_none"], br2["n_seeds"]) == ("55.50", "5.50", "1")
    for cell in (dict(w_kd="1.00"), dict(first_last="fp"), dict(epochs=20)):
        assert row(data="digits", bits_w=2, **cell)["delta_vs_none"] == ""  # no plain-QAT cell to compare with
    assert row(data="digits", w_kd="1.00")["method"] == "lsq+prefix+kd1"

    imagenet = row(data="imagenet")  # LSQ's number wins over APoT's for an LSQ row
    assert (imagenet["published_top1"], imagenet["published_method"], imagenet["published_source"]) == ("67.60", "LSQ", "lsq")
    cifar = row(data="cifar10")
    assert (cifar["published_top1"], cifar["published_fp_top1"], cifar["published_method"]) == ("92.45", "92.96", "APoT")
    assert all(r["published_top1"] == "" for r in rows if r["data"] == "digits")

    # Grouped by network, widest bits first, the plain-QAT row above its block-replacement row.
    digits10 = [(r["bits_w"], r["schedule"]) for r in rows if r["data"] == "digits" and r["epochs"] == "10"
                and r["first_last"] == "8" and r["w_kd"] == "0.00"]
    assert digits10 == [("4", "none"), ("4", "prefix"), ("2", "none"), ("2", "prefix")]

    md = (out / "results.md").read_text()
    assert "| digits | resnet20 | W4A4 | 8 | lsq+prefix | 10 | — | 0,1 | 98.00 | 94.00 ± 1.41 | +3.00 |" in md
    assert "67.60 (LSQ) [" in md and "92.45 (APoT, FP 92.96) [" in md
    assert "Esser et al." in md and "APoT_Quantization" in md  # sources cited under the table
    png = (out / "top1_vs_bits.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def test_report_without_runs_is_one_clear_error(tmp_path):
    (tmp_path / "empty").mkdir()
    proc = run_report(tmp_path / "empty", "--name", "t", "--out", tmp_path / "reports")
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("report: error: no finished run") and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "reports").exists()


@pytest.mark.parametrize("bad", ["unknown source", "missing folder"])
def test_report_rejects_bad_inputs_in_one_line(tmp_path, bad):
    runs = tmp_path / "runs"
    write_run(runs, "r")
    args = [runs, "--name", "t", "--out", tmp_path / "reports"]
    if bad == "unknown source":
        published = tmp_path / "published.yaml"
        published.write_text("sources: {a: {cite: x}}\nresults:\n  - {source: b, method: M, quant: lsq, schedule: none, "
                             "data: digits, model: resnet20, bits_w: 2, bits_a: 2, first_last: 8, top1: 1.0, fp_top1: null}\n")
        args += ["--published", published]
    else:
        args[0] = tmp_path / "nowhere"
    proc = run_report(*args)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert ("'b'" if bad == "unknown source" else "nowhere") in proc.stderr


def test_report_keys_rows_by_loss_settings_and_lr(tmp_path):
    """An objective ablation: one row per loss variant and lr; mixed-path keys do not split plain-QAT rows;
    each block-replacement row is compared with plain QAT at the same lr and partner distillation."""
    runs = tmp_path / "runs"
    ce = {"w_mix": 1.0, "w_mix_decay": "constant", "w_kd": 0.0, "T": 4.0, "w_mp_kd": 0.0, "mp_teacher_grad": True,
          "path_weights": "uniform"}  # T and mp_teacher_grad act on nothing here
    write_run(runs, "none-lr1", lr=0.01, top1=70.0, loss=ce)
    write_run(runs, "none-lr1-geo", lr=0.01, top1=70.0, seed=1, loss=dict(ce, path_weights="geometric"))  # no mixed path: same cell
    write_run(runs, "none-lr4", lr=0.04, top1=60.0, loss=ce)
    write_run(runs, "br-lr1", schedule="prefix", lr=0.01, top1=72.0, loss=ce)
    write_run(runs, "br-lr1-kd", schedule="prefix", lr=0.01, top1=73.0, loss=dict(ce, w_kd=1.0, T=2.0))
    write_run(runs, "br-lr1-mpkd", schedule="prefix", lr=0.01, top1=74.0,
              loss=dict(ce, w_kd=1.0, T=2.0, w_mp_kd=1.0, mp_teacher_grad=False))
    write_run(runs, "br-lr1-geo", schedule="prefix", lr=0.01, top1=75.0,
              loss=dict(ce, w_kd=1.0, T=2.0, w_mp_kd=1.0, mp_teacher_grad=False, path_weights="geometric"))
    write_run(runs, "br-lr4", schedule="prefix", lr=0.04, top1=71.0, loss=ce)
    proc = run_report(runs, "--name", "t", "--out", tmp_path / "reports")
    assert proc.returncode == 0, proc.stderr
    rows = {(r["method"], r["lr"]): r for r in read_rows(tmp_path / "reports" / "t")}
    assert set(rows) == {("lsq", "0.01"), ("lsq", "0.04"), ("lsq+prefix", "0.01"), ("lsq+prefix+kd1@T2", "0.01"),
                         ("lsq+prefix+kd1+mpkd1@T2", "0.01"), ("lsq+prefix+kd1+mpkd1@T2+geo", "0.01"), ("lsq+prefix", "0.04")}
    assert rows[("lsq", "0.01")]["n_seeds"] == "2"
    assert rows[("lsq+prefix", "0.01")]["delta_vs_none"] == "2.00"  # vs plain LSQ at lr 0.01, not 0.04
    assert rows[("lsq+prefix", "0.04")]["delta_vs_none"] == "11.00"
    assert rows[("lsq+prefix+kd1@T2", "0.01")]["delta_vs_none"] == ""  # no plain LSQ with the same distillation


def test_report_keeps_twins_with_residual_grids_apart(tmp_path):
    """A twin trained with twin.residual_bits is another network: its own row, named +res8, compared
    with plain QAT on the same twin; runs from before the key existed read as the paper's twin."""
    runs = tmp_path / "runs"
    write_run(runs, "none", top1=70.0)
    write_run(runs, "none-res8", top1=69.0, twin_residual_bits=8)
    write_run(runs, "br", schedule="prefix", top1=72.0, twin_residual_bits=None)
    write_run(runs, "br-res8", schedule="prefix", top1=75.0, twin_residual_bits=8)
    proc = run_report(runs, "--name", "t", "--out", tmp_path / "reports")
    assert proc.returncode == 0, proc.stderr
    rows = {r["method"]: r for r in read_rows(tmp_path / "reports" / "t")}
    assert set(rows) == {"lsq", "lsq+res8", "lsq+prefix", "lsq+prefix+res8"}
    assert all(r["n_seeds"] == "1" for r in rows.values()) and rows["lsq+prefix+res8"]["residual_bits"] == "8"
    assert rows["lsq+prefix"]["delta_vs_none"] == "2.00" and rows["lsq+prefix+res8"]["delta_vs_none"] == "6.00"


def test_report_keeps_twins_with_integer_biases_apart(tmp_path):
    runs = tmp_path / "runs"
    write_run(runs, "br", schedule="prefix", top1=72.0)  # before the key: float biases
    write_run(runs, "br-ib", schedule="prefix", top1=72.5, twin_integer_bias=True, twin_integer_bias_epochs=0)
    write_run(runs, "br-ib1", schedule="prefix", top1=71.0, twin_integer_bias=True, twin_integer_bias_epochs=1)
    write_run(runs, "br-first", schedule="prefix", top1=71.5, seed=1, twin_integer_bias_epochs=1)  # the option's first version
    proc = run_report(runs, "--name", "t", "--out", tmp_path / "reports")
    assert proc.returncode == 0, proc.stderr
    rows = {r["method"]: r for r in read_rows(tmp_path / "reports" / "t")}
    assert set(rows) == {"lsq+prefix", "lsq+prefix+ib", "lsq+prefix+ib1"}
    assert rows["lsq+prefix+ib1"]["n_seeds"] == "2" and rows["lsq+prefix+ib"]["integer_bias"] == "ib"
