"""Resuming a run exactly where it stopped, and the life cycle of a run folder.

`checkpoints/last.pt` holds everything the rest of the run depends on: the twin (with
its quantizers' step sizes and flags), optimizer, scheduler, epoch, step and batch, the
random states (torch, CUDA, numpy, python, the train loader's generator and the
schedule's generator) and the identity of the FP partner it was trained against. It is
loaded with `weights_only=True`, so everything in it is a tensor or a plain container.

Re-running a command finds its run folder (named from the command) and:
- returns the existing metrics when the run already finished (a re-run sweep skips it),
- resumes from `last.pt` otherwise (`resume=true`, the default),
- with `resume=false`, moves the earlier checkpoints, tb/ and metrics.json to
  `previous/<time>/` and starts over: nothing is deleted,
- with `resume=best`, resumes from `best.pt` instead (the way on when last.pt is torn):
  from the end of the epoch best.pt was saved at, with that epoch's random states, so the
  later epochs are trained again exactly as the run first trained them; last.pt is moved
  to `previous/<time>/checkpoints/` first. Meant for once: re-run without it afterwards.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf

from bqat import dist
from bqat.engine import FitState, UnreadableCheckpoint, atomic_save, load_checkpoint, loader_generator_state
from bqat.errors import UserError
from bqat.partner import load_state_dict_into

log = logging.getLogger("bqat")

RUN_FILES = ("checkpoints", "tb", "metrics.json")  # what `resume=false` sets aside
# Resuming continues the computation last.pt holds, so every config key must have the value
# it had there: deny by default, so a key added to bqat later is checked without being named
# here. A key only one side has (a checkpoint of an older or newer bqat) is not compared.
# These keys alone may differ, each for the reason given (README, "Interrupted runs").
MAY_DIFFER = {
    "resume": "how the command treats the run folder, not what the run computes",
    "run_name": "the run folder's name",
    "trainer.epochs": "train longer or stop sooner; the learning-rate schedule follows the new value (RunCheckpoint.restore)",
    "trainer.progress": "progress bars only",
    "trainer.log_every_n_steps": "how often TensorBoard is written, not what is trained",
    "trainer.device": "where it runs: the same formulas, other float rounding (auto picks per machine)",
    "trainer.compile": "speed: the same formulas compiled, other float rounding",
    "trainer.compile_backend": "speed, as trainer.compile",
    "trainer.compile_mode": "speed, as trainer.compile",
    "trainer.channels_last": "speed: memory layout, other float rounding",
    "quant.compile": "speed: the same fake-quant cores compiled",
    "schedule.batch_paths": "speed: the paths through a partner block as one batch (eval mode: the same values, other float rounding)",
    "data.root": "where the data lives",
    "data.cache_dir": "where decoded images are cached",
    "data.download": "whether a missing CIFAR release may be fetched",
    "data.num_workers": "loader processes (streamed: the same augmentation, drawn in other workers) or decoding threads",
    # The partner is checked by a fingerprint of its weights (check_compatible), which is
    # stricter than the recipe that produced them: a moved checkpoint or cache is fine.
    "partner.checkpoint": "partner identity: checked by weight fingerprint",
    "partner.cache_dir": "partner identity: checked by weight fingerprint",
    "partner.epochs": "partner identity: checked by weight fingerprint",
    "partner.lr": "partner identity: checked by weight fingerprint",
    "partner.weight_decay": "partner identity: checked by weight fingerprint",
}


# --- run folder -----------------------------------------------------------------


def prepare_run_dir(run_dir: Path, cfg) -> dict | None:
    """Before building anything: the finished run's metrics (skip it), or None (train)."""
    if not cfg.resume:
        set_aside(run_dir)
        return None
    return finished_metrics(run_dir, cfg)


def finished_metrics(run_dir: Path, cfg) -> dict | None:
    path = Path(run_dir) / "metrics.json"
    if not path.is_file():
        return None
    try:
        metrics = json.loads(path.read_text())
    except (OSError, ValueError):
        return None  # a torn or foreign file: train (and rewrite it)
    if metrics.get("epoch") != cfg.trainer.epochs:
        return None
    log.info(f"already finished: {path} (epoch {metrics['epoch']}); resume=false trains it again")
    return metrics


def set_aside(run_dir: Path, names=RUN_FILES, why: str = "resume=false") -> Path | None:
    """Move an earlier run's checkpoints, tb/ and metrics.json (or `names`) to previous/<time>/."""
    run_dir = Path(run_dir)
    present = [name for name in names if (run_dir / name).exists()]
    if not present:
        return None
    dest = run_dir / "previous" / time.strftime("%Y%m%d-%H%M%S")
    n = 1
    while dest.exists():  # two restarts within one second
        dest = dest.with_name(f"{dest.name.split('.')[0]}.{n}")
        n += 1
    for name in present:
        (dest / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(run_dir / name), str(dest / name))  # a rename within the folder
    log.info(f"{why}: moved the earlier run's {', '.join(present)} to {dest}")
    return dest


# --- random states -----------------------------------------------------------------


def rng_state(loader_rng: torch.Tensor | None, schedule: torch.Generator) -> dict:
    """Every random stream of a run, as tensors and plain lists (weights_only-loadable)."""
    _, keys, pos, has_gauss, gauss = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else [],
        "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos), "has_gauss": int(has_gauss), "gauss": float(gauss)},
        "python": [version, list(internal), gauss_next],
        "loader": loader_rng,
        "schedule": schedule.get_state(),
    }


def set_rng_state(state: dict, loader, schedule: torch.Generator) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])
    np_state = state["numpy"]
    np.random.set_state(("MT19937", np_state["keys"].numpy().astype(np.uint32), np_state["pos"], np_state["has_gauss"], np_state["gauss"]))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    if state["loader"] is not None and isinstance(getattr(loader, "generator", None), torch.Generator):
        loader.generator.set_state(state["loader"])
    schedule.set_state(state["schedule"])


# --- partner identity and config ---------------------------------------------------


def fingerprint(model: torch.nn.Module) -> str:
    """A digest of every weight and buffer: the same partner gives the same string."""
    h = hashlib.sha1()
    for name, tensor in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def flatten(tree, prefix: str = "") -> dict:
    if isinstance(tree, dict):
        out = {}
        for key, value in tree.items():
            out.update(flatten(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: tree}


def with_layer_list(groups: dict) -> dict:
    """`bits.layers` as one ordered list of [glob, widths] ([] when absent): the globs apply in
    order (the last match wins), and flattening them into keys would lose that order and let a
    glob that only one side has pass unnoticed."""
    bits = dict(groups.get("bits") or {})
    bits["layers"] = [[k, v] for k, v in (bits.get("layers") or {}).items()]
    return {**groups, "bits": bits}


def config_differences(saved: dict, cfg) -> list[str]:
    """`key: saved -> now` for every config key both have, outside MAY_DIFFER, whose values differ."""
    old = flatten(with_layer_list(saved))
    new = flatten(with_layer_list(OmegaConf.to_container(cfg, resolve=True)))
    # Keys only one side has come from a newer or older bqat, not from the command.
    keys = sorted((set(old) & set(new)) - set(MAY_DIFFER))
    return [f"{k}: {old[k]!r} -> {new[k]!r}" for k in keys if old[k] != new[k]]


# --- the run's checkpoint ----------------------------------------------------------


class RunCheckpoint:
    """checkpoints/{last,best}.pt of one twin run: what they hold, writing and resuming."""

    def __init__(self, run_dir: Path, cfg, hybrid, optimizer, scheduler, loader, partner_source: str):
        self.dir = Path(run_dir) / "checkpoints"
        self.last = self.dir / "last.pt"
        self.cfg, self.hybrid, self.optimizer, self.scheduler, self.loader = cfg, hybrid, optimizer, scheduler, loader
        self.partner = {"source": str(partner_source), "fingerprint": fingerprint(hybrid.partner)}
        self.resumed_from_epoch: int | None = None

    def state_dict(self, state: FitState) -> dict:
        # Mid-epoch, the loader restarts the epoch from its state at the epoch's start and
        # replays `batch` batches; at an epoch boundary its current state starts the next.
        loader_rng = state.loader_rng if state.batch else loader_generator_state(self.loader)
        return {
            "twin": self.hybrid.twin.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "epoch": state.epoch,
            "step": state.step,
            "batch": state.batch,
            "best_top1": state.best_top1,
            "train_seconds": state.train_seconds,
            "last_val": state.last_val,
            "first_step_loss": state.first_step_loss,
            "rng": rng_state(loader_rng, self.hybrid.generator),
            "partner": self.partner,
            "config": OmegaConf.to_container(self.cfg, resolve=True),
        }

    def save(self, state: FitState, best: bool = False) -> Path:
        ckpt = self.state_dict(state)
        hint = " (it resumes from the last checkpoint)"
        if best:  # first: should last.pt then fail, the re-run trains this epoch again and rewrites both
            atomic_save(ckpt, self.dir / "best.pt", hint)
        atomic_save(ckpt, self.last, hint)
        return self.last

    def restore(self) -> FitState:
        """The state to continue from: last.pt's (best.pt's with resume=best) when resuming, else a fresh one."""
        from_best = str(self.cfg.resume) == "best"
        source = self.dir / "best.pt" if from_best else self.last
        if not self.cfg.resume or not (source.is_file() or from_best):
            return FitState()
        try:
            ckpt = load_checkpoint(source)
        except UnreadableCheckpoint as err:
            raise UserError(self.unreadable_message(source, err.reason)) from None
        except UserError as err:
            if from_best:
                raise UserError(f"resume=best: {err}; use resume=false to set this run's files aside and start over") from None
            raise
        self.check_compatible(ckpt, source)
        load_state_dict_into(self.hybrid.twin, ckpt["twin"], f"checkpoint {source}", hint="use resume=false to start over")
        schedule_now = self.scheduler.state_dict()  # built for this run's trainer.epochs
        try:
            self.optimizer.load_state_dict(ckpt["optimizer"])
            self.scheduler.load_state_dict(ckpt["scheduler"])
        except (KeyError, ValueError, RuntimeError) as err:
            raise UserError(f"cannot resume from {source}: its optimizer/scheduler state does not fit ({err}); use resume=false to start over") from err
        self.follow_new_epochs(ckpt, schedule_now)
        if "rng" in ckpt:
            set_rng_state(ckpt["rng"], self.loader, self.hybrid.generator)
        else:
            log.warning(f"{source} holds no random states: the resumed run will not repeat the uninterrupted one exactly")
        state = FitState(ckpt["epoch"], ckpt["step"], ckpt.get("batch", 0), ckpt["best_top1"], dict(ckpt.get("last_val", {})), ckpt.get("train_seconds", 0.0),
                          first_step_loss=ckpt.get("first_step_loss"))
        self.resumed_from_epoch = state.epoch
        within = f", batch {state.batch} of epoch {state.epoch + 1}" if state.batch else ""
        log.info(f"resuming from {source} at epoch {state.epoch}, step {state.step}{within}")
        if from_best:
            if dist.is_main():  # last.pt is about to be overwritten by epochs trained again: keep it
                set_aside(self.dir.parent, ("checkpoints/last.pt",), why="resume=best")
            log.info(f"resume=best: the epochs after epoch {state.epoch} are trained again from best.pt's state; "
                     "re-run without resume=best from now on")
        return state

    def unreadable_message(self, path: Path, reason: str) -> str:
        """Which file, why, and the ways on (resume=best only when best.pt itself reads back)."""
        ways = "resume=false sets this run's files aside (to previous/) and starts over"
        best = self.dir / "best.pt"
        if path != best and best.is_file():
            try:
                epoch = load_checkpoint(best).get("epoch")
                ways += f"; resume=best resumes from {best} (intact, saved at the end of epoch {epoch}) and trains the later epochs again"
            except UserError:
                ways += f" ({best} is unreadable too)"
        return f"cannot resume from {path}: {reason}; {ways}"

    def follow_new_epochs(self, ckpt: dict, schedule_now: dict) -> None:
        """With another trainer.epochs, keep the schedule built for it, not the checkpoint's.

        A timm scheduler's state is its configuration (horizon included; the step is passed
        on every update), so the checkpoint's would end the cosine at the old epoch count and
        train every later epoch at its final lr.
        """
        before = flatten(ckpt.get("config") or {}).get("trainer.epochs")
        now = OmegaConf.select(self.cfg, "trainer.epochs")
        if before is None or now is None or before == now:
            return
        self.scheduler.load_state_dict(schedule_now)
        log.info(f"trainer.epochs {before} -> {now}: the learning-rate schedule now runs over {now} epochs")

    def check_compatible(self, ckpt: dict, path: Path | None = None) -> None:
        path = path or self.last
        if not isinstance(ckpt, dict) or not {"twin", "optimizer", "scheduler", "epoch", "step"} <= set(ckpt):
            raise UserError(f"{path} is not a bqat run checkpoint; use resume=false to start over (the file is kept)")
        diffs = config_differences(ckpt.get("config") or {}, self.cfg)
        if diffs:
            shown = "; ".join(diffs[:3]) + (" ..." if len(diffs) > 3 else "")
            raise UserError(f"{path} was trained with another config ({shown}); use resume=false to start over (the old run is kept) or another hydra.run.dir")
        saved = ckpt.get("partner")
        if saved is None:
            log.warning(f"{path} does not record its partner; cannot check it is {self.partner['source']}")
        elif saved["fingerprint"] != self.partner["fingerprint"]:
            raise UserError(
                f"{path} was trained against partner {saved['source']} (fingerprint {saved['fingerprint']}), "
                f"but this run's partner {self.partner['source']} has different weights ({self.partner['fingerprint']}); "
                "restore that partner (partner.checkpoint=...) or start over with resume=false"
            )
