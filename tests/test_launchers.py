"""Hydra's official launcher plugins: joblib (parallel local sweeps) and submitit (SLURM)."""

import json

from conftest import ROOT, run_cli

TINY = ["trainer.epochs=1", "partner.epochs=1", "trainer.limit_train_batches=1", "trainer.limit_val_batches=1",
        "trainer.progress=false", "trainer.device=cpu"]


def test_submitit_slurm_sweep_composes():
    proc = run_cli(["-m", "hydra/launcher=submitit_slurm", "bits=2,4", "--cfg", "hydra"], cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "_target_: hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher" in proc.stdout
    assert "timeout_min:" in proc.stdout and "partition:" in proc.stdout
    assert "sweep:" in proc.stdout and "outputs/multirun" in proc.stdout


def test_joblib_sweep_runs_both_cells(tmp_path):
    sweep = tmp_path / "multirun"
    proc = run_cli(["-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "bits=2,4", *TINY,
                    f"hydra.sweep.dir={sweep}", f"partner.cache_dir={tmp_path / 'partners'}"], cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Joblib.Parallel" in proc.stdout + proc.stderr  # the joblib launcher ran the sweep
    metrics = [json.loads(p.read_text()) for p in sorted(sweep.glob("*/metrics.json"))]
    assert sorted(m["bits_w"] for m in metrics) == [2, 4]
    assert all(m["epoch"] == 1 and 0 <= m["top1"] <= 100 for m in metrics)
    assert len({m["partner_source"] for m in metrics}) == 1  # one partner, trained once under the cache lock
