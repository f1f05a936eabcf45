"""scripts/gpu_bench.sh / gpu_bench.py: the plan it runs on a GPU, and its code path on CPU.

A CUDA machine runs the real thing (README, "Benchmark"); here the plan and the JSON are checked,
and one compiled configuration runs on CPU (aot_eager: no code generation)."""

import importlib.util
import json
import subprocess

from conftest import ROOT


def load_gpu_bench():
    spec = importlib.util.spec_from_file_location("gpu_bench", ROOT / "scripts" / "gpu_bench.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_shell_command_plans_18_epochs_and_needs_the_data_root(tmp_path):
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_bench.sh"), "data.root=/data/cifar10", str(tmp_path / "g.json"), "--dry-run"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    planned = json.loads(proc.stdout)
    assert "data.root=/data/cifar10" in planned["overrides"] and "data.in_memory=true" in planned["overrides"]
    configs = [(c["mode"], c["precision"], c["method"]) for c in planned["configurations"]]
    assert len(set(configs)) == 18  # 3 methods x 3 modes x 2 precisions
    assert configs[:6] == [("eager", "fp32", m) for m in ("fp", "lsq", "prefix")] + [("reduce-overhead", "fp32", m) for m in ("fp", "lsq", "prefix")]
    missing = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_bench.sh")], capture_output=True, text=True, timeout=60)
    assert missing.returncode != 0 and "usage: scripts/gpu_bench.sh DATA_ROOT" in missing.stderr


def test_its_configurations_run_the_engine_loop_on_cpu_and_write_the_json(tmp_path):
    """The prefix twin eager, and the FP network compiled for reduce-overhead (aot_eager: the
    compile path without code generation; compiled blocks are tested in test_speed.py)."""
    gpu_bench = load_gpu_bench()
    common = ["--device", "cpu", "--data", "digits", "--precisions", "fp32", "trainer.compile_backend=aot_eager", "data.batch_size=16",
              "data.image_size=8", "trainer.log_every_n_steps=1"]
    runs = {}
    for method, mode, steps, warmup in (("prefix", "eager", 1, 0), ("fp", "reduce-overhead", 2, 1)):
        out = tmp_path / f"{method}.json"
        gpu_bench.main(["--methods", method, "--modes", mode, "--out", str(out), "--limit-train-batches", str(steps),
                        "--warmup-steps", str(warmup), *common])
        written = json.loads(out.read_text())
        assert [(r["method"], r["mode"]) for r in written["results"]] == [(method, mode)] and "error" not in written["results"][0], written
        runs[method] = written["results"][0]
    for r in runs.values():
        assert r["epoch_s"] > 0 and r["guard"].startswith("on the device") and r["syncs_per_step"] is None  # counted on CUDA
    assert (runs["prefix"]["steps"], runs["fp"]["steps"]) == (1, 2)
    assert runs["prefix"]["compile_cost_s"] is None and runs["fp"]["compile_cost_s"] is not None
    assert written["environment"]["device_type"] == "cpu" and written["batch"] == 16
    summary = gpu_bench.summary([{"method": "fp", "mode": "eager", "precision": "fp32", "epoch_s": 2.0},
                                 {"method": "prefix", "mode": "eager", "precision": "fp32", "epoch_s": 3.9},
                                 {"method": "lsq", "mode": "eager", "precision": "fp32", "epoch_s": 3.0},
                                 {"method": "prefix", "mode": "compiled", "precision": "bf16", "skipped": "time budget"}])
    assert summary == {"eager/fp32": {"prefix_over_fp": 1.95, "meets_goal": True, "lsq_over_fp": 1.5}}
