"""`pip install` without a clone: the wheel carries conf/, and bqat-train runs from any directory."""

import json
import os
import shutil
import subprocess
import sys

import pytest

from conftest import ROOT

# What an sdist or a git checkout holds: the wheel is built from these alone.
SOURCES = ["pyproject.toml", "setup.py", "README.md", "bqat", "conf"]


@pytest.mark.slow
def test_wheel_installs_a_bqat_train_that_runs_outside_the_clone(tmp_path):
    src, target, elsewhere = tmp_path / "src", tmp_path / "site", tmp_path / "elsewhere"
    src.mkdir()
    for name in SOURCES:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(ROOT / name, src / name)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp_path / "dist"), str(src)],
                   check=True, capture_output=True)
    (wheel,) = (tmp_path / "dist").glob("bqat-*.whl")
    subprocess.run([*pip, "install", "--no-deps", "--no-index", "--target", str(target), str(wheel)], check=True, capture_output=True)

    elsewhere.mkdir()
    # The installed copy, not the clone: no PYTHONPATH to the tree, and the installed package first.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"PYTHONPATH": str(target), "PYTHONUNBUFFERED": "1"}
    where = subprocess.run([sys.executable, "-c", "import bqat.config; print(bqat.config.CONF_DIR)"], cwd=elsewhere, env=env,
                           capture_output=True, text=True, check=True)
    assert where.stdout.strip() == str(target / "bqat" / "conf")
    run = subprocess.run([str(target / "bin" / "bqat-train"), "trainer.epochs=1", "partner.epochs=1", "trainer.limit_train_batches=2"],
                         cwd=elsewhere, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    (metrics,) = (elsewhere / "outputs" / "runs").glob("*/metrics.json")
    assert json.loads(metrics.read_text())["epoch"] == 1
