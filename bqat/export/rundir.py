"""Which checkpoint of a run dir to export; refuses folders that are not finished bqat runs.

Only pathlib here, so `bqat-export` answers a wrong path at once, before loading torch.
"""

from __future__ import annotations

from pathlib import Path

from bqat.errors import UserError


def checkpoint_path(run_dir: str | Path, which: str = "last") -> Path:
    """RUN_DIR/checkpoints/<which>.pt, after checking that RUN_DIR is a finished bqat-train run."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"run dir not found: {run_dir}; pass the folder bqat-train wrote (outputs/runs/<run>)")
    if not (run_dir / ".hydra" / "config.yaml").is_file():
        raise UserError(f"{run_dir} is not a bqat run dir (no .hydra/config.yaml); pass the folder bqat-train wrote")
    ckpt = run_dir / "checkpoints" / f"{which}.pt"
    if not ckpt.is_file() or not (run_dir / "metrics.json").is_file():
        missing = "metrics.json" if ckpt.is_file() else f"checkpoints/{which}.pt"
        raise UserError(f"run {run_dir} is unfinished (no {missing}); finish it first: re-running its bqat-train command resumes it")
    return ckpt
