"""The quantizer base class: integer grid, data-dependent initialisation, export hooks."""

from __future__ import annotations

import torch
from torch import nn

from bqat import dist
from bqat.quant.functional import Core, compiled, compute_dtype

# A learned step size (LSQ's s, LSQ+'s s, PACT's alpha) must stay positive: at s <= 0 the
# grid flips or x / s divides by zero. Low-bit depthwise twins (MobileNet, EfficientNet)
# see gradients of 1e4-1e8 on a step in their first updates (README, "Models and blocks"),
# which drive it negative in one SGD update and the loss to NaN in the next. So every such
# parameter lives in [floor, inf): `keep_scales_positive` projects it back onto the floor
# after each optimizer step (projected gradient descent), and the forward reads it through
# a straight-through floor (`StraightThroughFloor`: value max(s, floor), gradient passed to s
# unchanged). The gradient must pass: torch's clamp_min sends 0 at the bound, so a step the
# projection put exactly on the floor would never move again; with the straight-through
# floor it gets the gradient of a step of size `floor` and grows as soon as the loss wants
# a larger one. floor = SCALE_FLOOR * its initial value, i.e. far below any step a trained
# layer uses.
SCALE_FLOOR = 1e-3
# Floor of a quantizer restored from a checkpoint written before floors existed.
LEGACY_FLOOR = 1e-8


class StraightThroughFloor(torch.autograd.Function):
    """y = max(s, floor); dy/ds = 1 everywhere, on and below the floor too (see SCALE_FLOOR)."""

    @staticmethod
    def forward(ctx, scale: torch.Tensor, floor: float) -> torch.Tensor:
        return scale.clamp_min(floor)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None


class Quantizer(nn.Module):
    """Fake-quantizes a weight or activation tensor onto an integer grid [qn, qp].

    Every quantizer is built as `Cls(bits, kind, per_channel=False, channels=1, **extras)`;
    `extras` are the other keys of conf/quant/<name>.yaml (make_twin passes them on).

    kind: "weight" (always signed) or "act" (signedness decided from the first batch:
    unsigned after a ReLU, signed when the input has negative values).
    per_channel: one step per output channel (weights only; dim 0).
    compile: run the quantizer's pure core (bqat.quant.functional) through torch.compile
    (True); False or "auto" run eager ("auto" is `quant.compile`'s default, which bqat-train
    resolves to True or False from the run's length before building the twin, bqat.accel).
    Subclasses implement `init_params(x)`, `fake_quant(x)` and `scale_zero_point()`, and
    may add a `regularizer()` term to the training loss.
    """

    def __init__(self, bits: int, kind: str, per_channel: bool = False, channels: int = 1, compile: bool | str = False):
        super().__init__()
        if kind not in ("weight", "act"):
            raise ValueError(f"kind must be 'weight' or 'act', got {kind!r}")
        self.bits = int(bits)
        self.kind = kind
        self.per_channel = bool(per_channel) and kind == "weight"
        self.channels = channels if self.per_channel else 1
        self.signed = kind == "weight"
        self.initialized = False
        self.floor = LEGACY_FLOOR  # set from the initial scales by `initialize`
        # Not `self.compile`: that name is nn.Module.compile().
        self.use_compile = compile is True

    # Plain Python flags travel in the state dict as extra state, so a checkpoint
    # restores them and the forward pass needs no device sync to read them.
    def get_extra_state(self):
        return {"signed": self.signed, "initialized": self.initialized, "floor": self.floor}

    def set_extra_state(self, state):
        self.signed = bool(state["signed"])
        self.initialized = bool(state["initialized"])
        self.floor = float(state.get("floor", LEGACY_FLOOR))

    @property
    def qn(self) -> int:
        return -(2 ** (self.bits - 1)) if self.signed else 0

    @property
    def qp(self) -> int:
        return 2 ** (self.bits - 1) - 1 if self.signed else 2**self.bits - 1

    def param_shape(self, x: torch.Tensor) -> tuple[int, ...]:
        """Shape of a per-tensor () or per-channel (C, 1, ..., 1) parameter for x."""
        return (x.shape[0],) + (1,) * (x.dim() - 1) if self.per_channel else ()

    def reduce_dims(self, x: torch.Tensor) -> tuple[int, ...]:
        """Dimensions a statistic is taken over: all but dim 0 per-channel, all otherwise."""
        return tuple(range(1, x.dim())) if self.per_channel else tuple(range(x.dim()))

    def group_size(self, x: torch.Tensor) -> int:
        """N of the LSQ gradient scale: elements sharing one step (per example for activations)."""
        if self.kind == "act":
            return x[0].numel()
        return x[0].numel() if self.per_channel else x.numel()

    def core(self, core: Core) -> Core:
        """A pure forward/backward pair of bqat.quant.functional, compiled when `quant.compile` is (or resolved to) true."""
        return compiled(core) if self.use_compile else core

    @torch.no_grad()
    def initialize(self, x: torch.Tensor) -> None:
        # Under DDP every rank sees a different slice of the first batch; the ranks agree
        # on the grid (signed if any saw a negative value) and average what init_params
        # set, so all start from the same step sizes (no-ops in a single process).
        x = x.to(compute_dtype(x.dtype))  # statistics in float32 even from a bf16 batch
        if self.kind == "act":
            self.signed = dist.any_across_ranks(bool(x.min() < 0), device=x.device)
        self.init_params(x)
        dist.average_across_ranks([*self.parameters(), *self.buffers()])
        self.floor = scale_floor(self.scales())
        self.initialized = True

    def bounded(self, scale: torch.Tensor) -> torch.Tensor:
        """`scale` as the forward pass uses it: never below the floor, differentiable on it (see SCALE_FLOOR)."""
        return StraightThroughFloor.apply(scale, self.floor)

    @torch.no_grad()
    def project_(self) -> None:
        """Put every learned scale that an update drove below the floor back onto it."""
        for p in self.scales():
            p.clamp_(min=self.floor)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.initialized:
            self.initialize(x.detach())
        return self.fake_quant(x)

    # --- subclass API ---
    def scales(self) -> list[torch.Tensor]:
        """The learned parameters that must stay positive (step sizes, clipping values)."""
        return []

    def init_params(self, x: torch.Tensor) -> None:
        raise NotImplementedError

    def fake_quant(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def scale_zero_point(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(scale, zero_point) with x_q = scale * (code - zero_point), code an integer in [qn, qp].

        Per-channel weight quantizers return (C,)-shaped tensors, others 0-d tensors.
        """
        raise NotImplementedError

    def regularizer(self) -> torch.Tensor | None:
        """A term this quantizer adds to the training loss (PACT's L2 on alpha), or None."""
        return None

    def extra_repr(self) -> str:
        return f"bits={self.bits}, kind={self.kind}, per_channel={self.per_channel}, signed={self.signed}"


def quantizer_regularization(model: nn.Module) -> torch.Tensor | None:
    """Sum of every quantizer's `regularizer()` in `model`, or None when none has one."""
    terms = [r for m in model.modules() if isinstance(m, Quantizer) and (r := m.regularizer()) is not None]
    return torch.stack(terms).sum() if terms else None


def scale_floor(scales: list[torch.Tensor]) -> float:
    """SCALE_FLOOR times the mean initial scale (LEGACY_FLOOR when there is none)."""
    if not scales:
        return LEGACY_FLOOR
    mean = torch.cat([p.detach().abs().flatten() for p in scales]).mean()
    return max(SCALE_FLOOR * float(mean), LEGACY_FLOOR)


def keep_scales_positive(optimizer: torch.optim.Optimizer, model: nn.Module):
    """After every `optimizer.step()`, project the quantizers' scales of `model` onto [floor, inf).

    Returns the hook handle (`.remove()` undoes it).
    """
    quantizers = [m for m in model.modules() if isinstance(m, Quantizer) and m.scales()]

    def project(*_):
        for q in quantizers:
            q.project_()

    return optimizer.register_step_post_hook(project)
