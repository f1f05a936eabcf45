"""The train/eval loop, checkpoints and logging, shared by the FP partner and the twin.

A *task* (bqat.task) is an nn.Module with `training_step(x, y) -> (loss, logs)`, `evaluate(x) ->
{name: logits}` and a `progress` attribute (fraction of training done). `fit` runs
epochs with rich progress bars, steps timm's scheduler per update, logs to TensorBoard
and calls `on_epoch_end` (where the caller checkpoints). No update from a non-finite
loss is applied (bqat.guard: decided on the device with a fused optimizer, reported at
the next log step); every step checks whether a stop signal arrived (bqat.preempt): then
it calls `on_stop` (the caller saves) and raises `Preempted`. Between log steps a step
reads nothing back from the device, so a compiled (CUDA-graph) step never waits for it.
Every file is written atomically (`atomic_write`): a kill, a second Ctrl-C or a full disk
leaves the old one.
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
from bqat.guard import BadStep, UpdateGuard

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
                accel: Accel | None = None, distributed: bool = False, clip_grad: float | None = None,
                guard: UpdateGuard | None = None) -> bool:
    """One epoch (the rest of it, when resuming mid-epoch). True when a stop signal ended it early."""
    task.train()
    accel = accel or Accel(cfg, device)
    guard = guard or UpdateGuard(optimizer, device)
    n = num_batches(loader, cfg.limit_train_batches)
    log_every = max(1, int(cfg.log_every_n_steps))
    done_before = state.batch  # resumed mid-epoch: replay the loader past these batches
    state.loader_rng = loader_generator_state(loader)
    first_loss = None  # the first update's loss, read at the next log step (no sync at step 1)
    clock = accel.clock  # set while the first compiled steps are being timed

    def read_back(mean_over_ranks: bool) -> None:
        """What the steps since the last log step left on the device: a refused update, the first loss."""
        nonlocal first_loss
        bad = guard.check()
        if bad is not None:
            raise diverged(bad)
        if first_loss is not None:
            first = {"loss": float(first_loss)}
            state.first_step_loss = (dist.mean_across_ranks(first) if mean_over_ranks else first)["loss"]
            first_loss = None

    for i, (x, y) in enumerate(loader):
        if i >= n:
            break
        if i < done_before:
            if progress is not None:
                progress.advance(bar)
            continue
        x, y = accel.to_device(x, y)
        task.progress = (state.epoch + i / n) / epochs
        if clock is not None:
            clock.begin()
        loss, logs = train_step(task, x, y, guard, step=state.step + 1, epoch=state.epoch + 1, accel=accel, clip_grad=clip_grad)
        state.step += 1
        state.batch = i + 1
        scheduler.step_update(num_updates=state.step)
        if state.first_step_loss is None and first_loss is None:
            first_loss = loss.detach()
        if clock is not None:
            clock.step_done(state.step)
        if state.step % log_every == 0 or i == n - 1:
            read_back(distributed)  # every rank reaches the same log steps
            values = {k: float(v) for k, v in logs.items()}
            if distributed:  # log the means over ranks
                values = dist.mean_across_ranks(values)
            if writer is not None:
                for k, v in values.items():
                    writer.add_scalar(f"train/{k}", v, state.step)
                writer.add_scalar("train/lr", optimizer.param_groups[0]["lr"], state.step)
            if progress is not None:
                progress.update(bar, info=f"loss {values['loss']:.3f}")
            if clock is not None and (cost := clock.report(state.step, accel.compiling)) is not None:
                accel.compile_cost_s, accel.clock, clock = cost, None, None
        if progress is not None:
            progress.advance(bar)
        if preempt.requested(distributed):  # under DDP the ranks agree: all stop after this step
            read_back(False)  # nothing refused may be saved
            return True
    return False


def train_step(task, x, y, guard: UpdateGuard, *, step: int, epoch: int, accel: Accel, clip_grad: float | None = None):
    """One update of `task` on (x, y): forward and loss (autocast), backward, clipping, and the
    optimizer step through `guard` (a non-finite loss or gradient norm is never applied).
    `step`/`epoch` (1-based) name the update in a DivergedError. Returns (loss, logs).

    Nothing here reads a value back from the device unless the guard works on the host."""
    accel.step_begin()
    with accel.autocast():
        loss, logs = task.training_step(x, y)
    bad = guard.before_update(loss, logs, step, epoch)
    if bad is not None:
        raise diverged(bad)
    guard.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    guard.update(clip_gradients(guard.optimizer, clip_grad))
    return loss, logs


def clip_gradients(optimizer, max_norm) -> torch.Tensor | None:
    """Scale the gradients of every parameter the optimizer updates to a global L2 norm of at
    most `max_norm` (`trainer.clip_grad`, the twin's; None: no clipping). Under DDP the
    gradients are already averaged over ranks, so every rank clips alike. Returns the norm
    before clipping (a device tensor; None without clipping).

    Why: a low-bit depthwise twin's first updates see gradient norms of 1e4-1e7 (a BatchNorm
    channel of zero batch variance amplifies its gradient, README "Models and blocks") where
    a ResNet's are 1-15; one such update wrecks the weights before anything can adapt."""
    if max_norm is None:
        return None
    params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    return torch.nn.utils.clip_grad_norm_(params, float(max_norm))


def diverged(bad: BadStep) -> DivergedError:
    """The error for a refused update: a non-finite loss, naming the terms (ce/lp, ce/<path>, kd)
    that are not finite, or non-finite gradients of a finite loss."""
    if bad.what == "gradient":
        what = f"non-finite gradients at step {bad.step} (epoch {bad.epoch}) of a finite loss"
    else:
        terms = [k for k, v in bad.logs.items() if k != "loss" and not math.isfinite(float(v))]
        where = ", ".join(terms) if terms else "the weighted sum (every term is finite: check the loss.* weights)"
        what = f"non-finite loss at step {bad.step} (epoch {bad.epoch}) in {where}"
    return DivergedError(
        f"{what}; the step was not applied and the last checkpoint written before it is kept; "
        "lower optim.optimizer.lr or raise the bit-width"
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
        accel.step_begin()
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
        metric: str = "lp", desc: str = "train", on_epoch_start: Callable[[int], None] | None = None,
        on_epoch_end: Callable[[FitState, bool], None] | None = None,
        on_stop: Callable[[FitState], Path] | None = None, accel: Accel | None = None, distributed: bool = False,
        clip_grad: float | None = None) -> FitState:
    """Train `task` until `epochs` epochs are done (continuing from `state` when resuming).

    `on_epoch_start(epoch)` (0-based) runs before each epoch's training, a resumed one's too.
    On a stop signal: `on_stop(state)` saves (returns the path written), then Preempted is raised.

    `distributed`: `task` is a bqat.dist.DistributedTask; logs and evaluation are reduced
    over ranks (every rank must call fit).

    `clip_grad`: max global gradient norm per update (None: no clipping).
    """
    state = state or FitState()
    accel = accel or Accel(cfg, device)
    guard = UpdateGuard(optimizer, device)
    log.info(f"{desc}: finite-loss guard {guard.kind}")
    n_train = num_batches(data.train, cfg.limit_train_batches)
    # Stop signals wait for the end of the current step (bqat.preempt).
    with preempt.deferred(), make_progress(bool(cfg.progress) and dist.is_main()) as progress:
        overall = progress.add_task(f"{desc} epochs", total=epochs, completed=state.epoch, info="")
        for epoch in range(state.epoch, epochs):
            if on_epoch_start is not None:
                on_epoch_start(epoch)
            bar = progress.add_task(f"{desc} {epoch + 1}/{epochs}", total=n_train, info="")
            start = time.perf_counter()
            stopped = train_epoch(task, data.train, optimizer, scheduler, state, epochs=epochs, cfg=cfg, device=device, writer=writer, progress=progress, bar=bar,
                                  accel=accel, distributed=distributed, clip_grad=clip_grad, guard=guard)
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
