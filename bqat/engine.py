"""The train/eval loop, checkpoints and logging, shared by the FP partner and the twin.

A *task* (bqat.task) is an nn.Module with `training_step(x, y) -> (loss, logs)`, `evaluate(x) ->
{name: logits}` and a `progress` attribute (fraction of training done). `fit` runs
epochs with rich progress bars, steps timm's scheduler per update, logs to TensorBoard
and calls `on_epoch_end` (where the caller checkpoints). Every step checks the loss is
finite (before the update) and whether a stop signal arrived (bqat.preempt): then it
calls `on_stop` (the caller saves) and raises `Preempted`. Every file is written
atomically (`atomic_write`): a kill, a second Ctrl-C or a full disk leaves the old one.
"""

from __future__ import annotations

import logging
import math
import os
import pickle
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from bqat import dist, preempt
from bqat.accel import Accel
from bqat.errors import UserError, WriteError

log = logging.getLogger("bqat")


class DivergedError(UserError):
    """The loss became NaN or infinite."""


@dataclass
class FitState:
    epoch: int = 0  # epochs completed
    step: int = 0  # optimizer updates done
    batch: int = 0  # batches of the current epoch done; non-zero only when stopped mid-epoch
    best_top1: float = float("-inf")
    last_val: dict = field(default_factory=dict)
    train_seconds: float = 0.0
    first_step_loss: float | None = None  # loss of the first update, averaged over ranks
    # The train loader's generator at the start of the current epoch: a run resumed
    # mid-epoch replays the epoch's shuffle and augmentation from it (bqat.resume).
    loader_rng: torch.Tensor | None = None


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"trainer.device={name} but no CUDA device is available; use trainer.device=cpu")
    return torch.device(name)


def num_batches(loader, limit) -> int:
    return len(loader) if limit is None else min(len(loader), int(limit))


def make_progress(enabled: bool) -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        disable=not enabled,
        transient=False,
    )


def loader_generator_state(loader) -> torch.Tensor | None:
    generator = getattr(loader, "generator", None)
    return generator.get_state() if isinstance(generator, torch.Generator) else None


def train_epoch(task, loader, optimizer, scheduler, state: FitState, *, epochs: int, cfg, device, writer=None, progress=None, bar=None,
                accel: Accel | None = None, distributed: bool = False, clip_grad: float | None = None) -> bool:
    """One epoch (the rest of it, when resuming mid-epoch). True when a stop signal ended it early."""
    task.train()
    accel = accel or Accel(cfg, device)
    n = num_batches(loader, cfg.limit_train_batches)
    log_every = max(1, int(cfg.log_every_n_steps))
    done_before = state.batch  # resumed mid-epoch: replay the loader past these batches
    state.loader_rng = loader_generator_state(loader)
    for i, (x, y) in enumerate(loader):
        if i >= n:
            break
        if i < done_before:
            if progress is not None:
                progress.advance(bar)
            continue
        x, y = accel.to_device(x, y)
        task.progress = (state.epoch + i / n) / epochs
        with accel.autocast():
            loss, logs = task.training_step(x, y)
        # One isfinite per step (a single sync); only a bad loss pays to find the term.
        if not torch.isfinite(loss.detach()):
            raise diverged(logs, state)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        clip_gradients(optimizer, clip_grad)
        optimizer.step()
        state.step += 1
        state.batch = i + 1
        scheduler.step_update(num_updates=state.step)
        if state.first_step_loss is None:
            first = {"loss": float(loss.detach())}
            state.first_step_loss = (dist.mean_across_ranks(first) if distributed else first)["loss"]
        if state.step % log_every == 0 or i == n - 1:
            values = {k: float(v) for k, v in logs.items()}
            if distributed:  # every rank reaches the same steps: log the means over ranks
                values = dist.mean_across_ranks(values)
            if writer is not None:
                for k, v in values.items():
                    writer.add_scalar(f"train/{k}", v, state.step)
                writer.add_scalar("train/lr", optimizer.param_groups[0]["lr"], state.step)
            if progress is not None:
                progress.update(bar, info=f"loss {values['loss']:.3f}")
        if progress is not None:
            progress.advance(bar)
        if preempt.requested(distributed):
            return True
    return False


def clip_gradients(optimizer, max_norm) -> None:
    """Scale the gradients of every parameter the optimizer updates to a global L2 norm of at
    most `max_norm` (`trainer.clip_grad`, the twin's; None: no clipping). Under DDP the
    gradients are already averaged over ranks, so every rank clips alike.

    Why: a low-bit depthwise twin's first updates see gradient norms of 1e4-1e7 (a BatchNorm
    channel of zero batch variance amplifies its gradient, README "Models and blocks") where
    a ResNet's are 1-15; one such update wrecks the weights before anything can adapt."""
    if max_norm is None:
        return
    params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    torch.nn.utils.clip_grad_norm_(params, float(max_norm))


def diverged(logs: dict, state: FitState) -> DivergedError:
    """The error for a non-finite loss, naming the terms (ce/lp, ce/<path>, kd) that are not finite."""
    bad = [k for k, v in logs.items() if k != "loss" and not math.isfinite(float(v))]
    where = ", ".join(bad) if bad else "the weighted sum (every term is finite: check the loss.* weights)"
    return DivergedError(
        f"non-finite loss at step {state.step + 1} (epoch {state.epoch + 1}) in {where}; the step was not applied "
        "and the last checkpoint written before it is kept; lower optim.optimizer.lr or raise the bit-width"
    )


def stop(state: FitState, desc: str, on_stop: Callable[[FitState], Path] | None) -> preempt.Preempted:
    """Save through `on_stop` (when the caller can) and describe where the run stopped."""
    signum = preempt.requested()
    saved = on_stop(state) if on_stop is not None else None
    where = f"{desc} stopped by {preempt.signal_name(signum)} after step {state.step} (epoch {state.epoch + (1 if state.batch else 0)})"
    if saved is not None:
        return preempt.Preempted(signum, f"{where}; saved {saved}; re-run the same command to resume")
    return preempt.Preempted(signum, f"{where}; nothing saved at this stage; re-run the same command to start it again")


@torch.no_grad()
def evaluate(task, loader, *, limit=None, device, accel: Accel | None = None, distributed: bool = False) -> dict[str, float]:
    """Top-1 (percent) of every output of `task.evaluate`, over the first `limit` batches
    (of every rank, counts summed over ranks when `distributed`)."""
    task.eval()
    accel = accel or Accel({}, device)
    correct: dict[str, torch.Tensor] = {}
    total = 0
    for i, (x, y) in enumerate(loader):
        if limit is not None and i >= int(limit):
            break
        x, y = accel.to_device(x, y)
        with accel.autocast():
            outputs = task.evaluate(x)
        for name, logits in outputs.items():
            correct[name] = correct.get(name, 0) + (logits.argmax(1) == y).sum()
        total += len(y)
    counts = {name: float(c) for name, c in correct.items()} | {"": float(total)}
    if distributed:
        counts = dist.sum_across_ranks(counts)
    total = counts.pop("")
    return {name: 100.0 * c / max(total, 1) for name, c in counts.items()}


def fit(task, data, optimizer, scheduler, *, epochs: int, cfg, device, state: FitState | None = None, writer=None,
        metric: str = "lp", desc: str = "train", on_epoch_end: Callable[[FitState, bool], None] | None = None,
        on_stop: Callable[[FitState], Path] | None = None, accel: Accel | None = None, distributed: bool = False,
        clip_grad: float | None = None) -> FitState:
    """Train `task` until `epochs` epochs are done (continuing from `state` when resuming).

    On a stop signal: `on_stop(state)` saves (returns the path written), then Preempted is raised.

    `distributed`: `task` is a bqat.dist.DistributedTask; logs and evaluation are reduced
    over ranks (every rank must call fit).

    `clip_grad`: max global gradient norm per update (None: no clipping).
    """
    state = state or FitState()
    accel = accel or Accel(cfg, device)
    n_train = num_batches(data.train, cfg.limit_train_batches)
    # Stop signals wait for the end of the current step (bqat.preempt).
    with preempt.deferred(), make_progress(bool(cfg.progress) and dist.is_main()) as progress:
        overall = progress.add_task(f"{desc} epochs", total=epochs, completed=state.epoch, info="")
        for epoch in range(state.epoch, epochs):
            bar = progress.add_task(f"{desc} {epoch + 1}/{epochs}", total=n_train, info="")
            start = time.perf_counter()
            stopped = train_epoch(task, data.train, optimizer, scheduler, state, epochs=epochs, cfg=cfg, device=device, writer=writer, progress=progress, bar=bar,
                                  accel=accel, distributed=distributed, clip_grad=clip_grad)
            epoch_seconds = time.perf_counter() - start
            state.train_seconds += epoch_seconds
            if stopped:
                raise stop(state, desc, on_stop)
            scheduler.step(epoch + 1)
            state.epoch = epoch + 1
            state.batch = 0
            state.last_val = evaluate(task, data.val, limit=cfg.limit_val_batches, device=device, accel=accel, distributed=distributed)
            top1 = state.last_val[metric]
            improved = top1 > state.best_top1
            state.best_top1 = max(state.best_top1, top1)
            if writer is not None:
                for name, value in state.last_val.items():
                    writer.add_scalar(f"val/top1_{name}", value, state.epoch)
            summary = "  ".join(f"{k} {v:.2f}" for k, v in state.last_val.items())
            log.info(f"{desc} epoch {state.epoch}/{epochs} ({epoch_seconds:.1f} s training): val top-1 {summary}")
            progress.update(overall, advance=1, info=f"{metric} top-1 {top1:.2f}")
            progress.remove_task(bar)
            if on_epoch_end is not None:
                on_epoch_end(state, improved)
            if preempt.requested(distributed):  # arrived during evaluation
                raise stop(state, desc, on_stop)
    return state


def atomic_write(path: str | Path, write: Callable, hint: str = "") -> None:
    """`write(f)` into a temporary file beside `path`, flush it to disk, then rename it over `path`.

    Readers see the old file or the new one, never a torn one, whatever stops the process
    (kill -9, a second Ctrl-C, a full disk). A failing write (no space, quota, I/O error)
    raises WriteError: one line naming `path` and the error; the old file stays as it was.
    `hint` ends that line (say what else can be done, e.g. another cache folder).
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            with open(tmp, "wb") as f:
                write(f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)  # one system call: the old file or the new one, nothing between
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        # Make the rename itself durable (a crash right after must not bring the old name back).
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError as err:
        raise WriteError(path, err, hint) from None
    except RuntimeError as err:  # torch's writer can wrap the OSError of a failed write
        if isinstance(err.__context__, OSError):
            raise WriteError(path, err.__context__, hint) from None
        raise


def atomic_save(obj, path: str | Path, hint: str = "") -> None:
    """torch.save through `atomic_write`."""
    atomic_write(path, lambda f: torch.save(obj, f), hint)


def atomic_write_text(path: str | Path, text: str, hint: str = "") -> None:
    """A text file (metrics.json) through `atomic_write`."""
    atomic_write(path, lambda f: f.write(text.encode()), hint)


class UnreadableCheckpoint(UserError):
    """A checkpoint file that cannot be read back (torn, empty, not a checkpoint); `reason` says why."""

    def __init__(self, path: Path, reason: str):
        super().__init__(f"cannot load checkpoint {path}: {reason}")
        self.path, self.reason = path, reason


def load_checkpoint(path: str | Path) -> dict:
    """torch.load with weights_only=True: a file carrying a pickled payload is refused."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(err))
        what = f"it would run {found.group(1)}" if found else "it holds pickled objects"
        raise UserError(f"cannot load checkpoint {path}: not a plain weights file ({what}); refused without running it. "
                        "If you trust its source, re-save only its tensors (a state_dict)") from err
    except Exception as err:  # noqa: BLE001 - any other failure is the file's fault (torn, not a checkpoint)
        raise UnreadableCheckpoint(path, unreadable_reason(path, err)) from err


def unreadable_reason(path: Path, err: Exception) -> str:
    """Why torch could not read `path`, in a few whole words (torch's own text is a paragraph)."""
    size = path.stat().st_size if path.exists() else 0
    if size == 0:
        return "the file is empty (0 bytes)"
    text = " ".join(str(err).split())
    if "central directory" in text or isinstance(err, EOFError):
        return f"the file is truncated or corrupt ({size} bytes; not a complete torch archive)"
    first = re.split(r"(?<=[.!?])\s", text, maxsplit=1)[0] if text else ""  # a whole sentence, never cut
    return f"not a readable checkpoint ({type(err).__name__}{': ' + first if first else ''})"
