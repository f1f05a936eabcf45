import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
CONF = ROOT / "conf"

torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture
def compose_cfg():
    """Compose conf/train.yaml with overrides, as bqat-train would (without running)."""
    from hydra import compose, initialize_config_dir

    import bqat.config  # noqa: F401  (resolvers)

    def _compose(*overrides):
        with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            return compose(config_name="train", overrides=list(overrides))

    return _compose


def run_cli(args, cwd, timeout=600, env_extra=None, module="bqat.train"):
    """Run the entry point in a subprocess (as a user would); returns CompletedProcess."""
    import subprocess

    # The tree under test comes first, whatever cwd is: a git worktree beside the clone that
    # installed the venv (editable) still tests its own code.
    path = os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])
    env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=path, **(env_extra or {}))
    return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)
