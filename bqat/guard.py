"""The finite-loss guard: no update from a non-finite loss (or gradient norm) is ever applied.

Two ways to enforce it, chosen from the optimizer:

- On the device (torch's fused optimizers: SGD, Adam, AdamW with `fused=True`, bqat's
  default `optim.optimizer.fused=true`). Each step folds "this loss (and the clipped
  gradients' norm) is not finite" into one sticky flag on the device, and the optimizer
  reads it as `found_inf` (the hook torch's GradScaler uses): a flagged update is skipped
  inside the fused kernel, momentum included. Once a step was bad every later update is
  skipped too, so the weights stay exactly those before the first bad step. Nothing waits
  for the device: the flag is read at the next log step (`check`), which names the first
  bad step as the engine always did. A CUDA-graph step needs exactly this.
- On the host (any other optimizer): one `isfinite` read per step, before the update (a
  device sync per step).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class BadStep:
    """The first refused update: its number (1-based), epoch (1-based), logs, and what was not finite."""

    step: int
    epoch: int
    logs: dict
    what: str  # "loss" | "gradient"


def not_finite(x: torch.Tensor) -> torch.Tensor:
    """x is not finite: x - x is 0 exactly when x is finite (inf - inf and NaN - NaN are NaN).
    Two small kernels, where isfinite decomposes into more."""
    return (x - x).ne(0)


def skips_on_device(optimizer: torch.optim.Optimizer) -> bool:
    """Whether `optimizer.step()` honours `found_inf` (torch's fused optimizers) in every group."""
    return bool(getattr(optimizer, "_step_supports_amp_scaling", False)) and all(g.get("fused") for g in optimizer.param_groups)


class UpdateGuard:
    """Wraps `optimizer.step()` so that no non-finite loss or gradient norm reaches the weights."""

    def __init__(self, optimizer: torch.optim.Optimizer, device: torch.device):
        self.optimizer = optimizer
        self.device = torch.device(device)
        self.on_device = skips_on_device(optimizer)
        self.skip = torch.zeros((), dtype=torch.bool, device=self.device)  # true from the first bad step on (sticky)
        # (step, epoch, loss, loss + gradient norm, logs) of each update since the last check
        self.pending: list[tuple[int, int, torch.Tensor, torch.Tensor | None, dict]] = []

    @property
    def kind(self) -> str:
        return "on the device (fused optimizer, no sync per step)" if self.on_device else "on the host (one sync per step)"

    def before_update(self, loss: torch.Tensor, logs: dict, step: int, epoch: int) -> BadStep | None:
        """Called with the step's loss before backward. On the host: the bad step itself, or None.
        On the device: always None (the step is remembered until `check`)."""
        if not self.on_device:
            return BadStep(step, epoch, logs, "loss") if not torch.isfinite(loss.detach()) else None
        self.pending.append((step, epoch, loss.detach(), None, logs))
        return None

    def update(self, grad_norm: torch.Tensor | None = None) -> None:
        """`optimizer.step()`, skipped on the device when this or an earlier step was bad.

        `grad_norm`: the gradients' global norm (from clipping), checked too when given."""
        if not self.on_device:
            self.optimizer.step()
            return
        step, epoch, loss, _, logs = self.pending[-1]
        value = loss if grad_norm is None else loss + grad_norm.detach()  # non-finite when either is
        self.pending[-1] = (step, epoch, loss, value, logs)
        self.skip.logical_or_(not_finite(value))
        opt = self.optimizer
        opt.grad_scale, opt.found_inf = None, self.skip.float()  # the fused kernels skip when found_inf == 1
        try:
            opt.step()
        finally:
            del opt.grad_scale, opt.found_inf

    def check(self) -> BadStep | None:
        """The first bad step since the last check, or None: one device read (call it at log steps)."""
        pending, self.pending = self.pending, []
        if not pending:
            return None
        bad = torch.stack([not_finite(value) for _, _, _, value, _ in pending]).tolist()  # the updates' own rule
        if not any(bad):
            return None
        step, epoch, loss, _, logs = pending[bad.index(True)]
        return BadStep(step, epoch, logs, "loss" if not bool(torch.isfinite(loss)) else "gradient")
