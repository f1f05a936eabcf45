"""The train/eval loop, checkpoints and logging, shared by the FP partner and the twin.

A *task* is an nn.Module with `training_step(x, y) -> (loss, logs)`, `evaluate(x) ->
{name: logits}` and a `progress` attribute (fraction of training done). `fit` runs
epochs with rich progress bars, steps timm's scheduler per update, logs to TensorBoard
and calls `on_epoch_end` (where the caller checkpoints).
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from bqat import dist
from bqat.accel import Accel
from bqat.errors import UserError

log = logging.getLogger("bqat")


class DivergedError(UserError):
    """The loss became NaN or infinite."""


@dataclass
class FitState:
    epoch: int = 0  # epochs completed
    step: int = 0  # optimizer updates done
    best_top1: float = float("-inf")
    last_val: dict = field(default_factory=dict)
    train_seconds: float = 0.0
    first_step_loss: float | None = None  # loss of the first update, averaged over ranks


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


def train_epoch(task, loader, optimizer, scheduler, state: FitState, *, epochs: int, cfg, device, writer=None, progress=None, bar=None,
                accel: Accel | None = None, distributed: bool = False) -> None:
    task.train()
    accel = accel or Accel(cfg, device)
    n = num_batches(loader, cfg.limit_train_batches)
    log_every = max(1, int(cfg.log_every_n_steps))
    for i, (x, y) in enumerate(loader):
        if i >= n:
            break
        x, y = accel.to_device(x, y)
        task.progress = (state.epoch + i / n) / epochs
        with accel.autocast():
            loss, logs = task.training_step(x, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        state.step += 1
        scheduler.step_update(num_updates=state.step)
        if state.first_step_loss is None:
            first = {"loss": float(loss.detach())}
            state.first_step_loss = (dist.mean_across_ranks(first) if distributed else first)["loss"]
        if state.step % log_every == 0 or i == n - 1:
            values = {k: float(v) for k, v in logs.items()}
            if distributed:  # every rank reaches the same steps: log the means over ranks
                values = dist.mean_across_ranks(values)
            check_finite(values, state)
            if writer is not None:
                for k, v in values.items():
                    writer.add_scalar(f"train/{k}", v, state.step)
                writer.add_scalar("train/lr", optimizer.param_groups[0]["lr"], state.step)
            if progress is not None:
                progress.update(bar, info=f"loss {values['loss']:.3f}")
        if progress is not None:
            progress.advance(bar)


def check_finite(values: dict[str, float], state: FitState) -> None:
    bad = [k for k, v in values.items() if not torch.isfinite(torch.tensor(v))]
    if bad:
        raise DivergedError(
            f"non-finite loss at step {state.step} (epoch {state.epoch + 1}) in {', '.join(bad)}; "
            "lower optim.optimizer.lr or raise the bit-width; the last good checkpoint is kept"
        )


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
        accel: Accel | None = None, distributed: bool = False) -> FitState:
    """Train `task` until `epochs` epochs are done (continuing from `state` when resuming).

    `distributed`: `task` is a bqat.dist.DistributedTask; logs and evaluation are reduced
    over ranks (every rank must call fit).
    """
    state = state or FitState()
    accel = accel or Accel(cfg, device)
    n_train = num_batches(data.train, cfg.limit_train_batches)
    with make_progress(bool(cfg.progress) and dist.is_main()) as progress:
        overall = progress.add_task(f"{desc} epochs", total=epochs, completed=state.epoch, info="")
        for epoch in range(state.epoch, epochs):
            bar = progress.add_task(f"{desc} {epoch + 1}/{epochs}", total=n_train, info="")
            start = time.perf_counter()
            train_epoch(task, data.train, optimizer, scheduler, state, epochs=epochs, cfg=cfg, device=device, writer=writer, progress=progress, bar=bar,
                        accel=accel, distributed=distributed)
            state.train_seconds += time.perf_counter() - start
            scheduler.step(epoch + 1)
            state.epoch = epoch + 1
            state.last_val = evaluate(task, data.val, limit=cfg.limit_val_batches, device=device, accel=accel, distributed=distributed)
            top1 = state.last_val[metric]
            improved = top1 > state.best_top1
            state.best_top1 = max(state.best_top1, top1)
            if writer is not None:
                for name, value in state.last_val.items():
                    writer.add_scalar(f"val/top1_{name}", value, state.epoch)
            summary = "  ".join(f"{k} {v:.2f}" for k, v in state.last_val.items())
            log.info(f"{desc} epoch {state.epoch}/{epochs}: val top-1 {summary}")
            progress.update(overall, advance=1, info=f"{metric} top-1 {top1:.2f}")
            progress.remove_task(bar)
            if on_epoch_end is not None:
                on_epoch_end(state, improved)
    return state


def atomic_save(obj, path: str | Path) -> None:
    """torch.save to a temporary file, flush it to disk, then rename over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_checkpoint(path: str | Path) -> dict:
    """torch.load with weights_only=True: a file carrying a pickled payload is refused."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unpickling failure is the file's fault
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"cannot load checkpoint {path}: not a plain weights file ({first})") from err
