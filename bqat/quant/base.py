"""The quantizer base class: integer grid, data-dependent initialisation, export hooks."""

from __future__ import annotations

import torch
from torch import nn

from bqat import dist


class Quantizer(nn.Module):
    """Fake-quantizes a weight or activation tensor onto an integer grid [qn, qp].

    kind: "weight" (always signed) or "act" (signedness decided from the first batch:
    unsigned after a ReLU, signed when the input has negative values).
    per_channel: one step per output channel (weights only; dim 0).
    Subclasses implement `init_params(x)` and `fake_quant(x)`.
    """

    def __init__(self, bits: int, kind: str, per_channel: bool = False, channels: int = 1):
        super().__init__()
        if kind not in ("weight", "act"):
            raise ValueError(f"kind must be 'weight' or 'act', got {kind!r}")
        self.bits = int(bits)
        self.kind = kind
        self.per_channel = bool(per_channel) and kind == "weight"
        self.channels = channels if self.per_channel else 1
        self.signed = kind == "weight"
        self.initialized = False

    # Plain Python flags travel in the state dict as extra state, so a checkpoint
    # restores them and the forward pass needs no device sync to read them.
    def get_extra_state(self):
        return {"signed": self.signed, "initialized": self.initialized}

    def set_extra_state(self, state):
        self.signed = bool(state["signed"])
        self.initialized = bool(state["initialized"])

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

    @torch.no_grad()
    def initialize(self, x: torch.Tensor) -> None:
        # Under DDP every rank sees a different slice of the first batch; the ranks agree
        # on the grid (signed if any saw a negative value) and average what init_params
        # set, so all start from the same step sizes (no-ops in a single process).
        if self.kind == "act":
            self.signed = dist.any_across_ranks(bool(x.min() < 0), device=x.device)
        self.init_params(x)
        dist.average_across_ranks([*self.parameters(), *self.buffers()])
        self.initialized = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.initialized:
            self.initialize(x.detach())
        return self.fake_quant(x)

    # --- subclass API ---
    def init_params(self, x: torch.Tensor) -> None:
        raise NotImplementedError

    def fake_quant(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def scale_zero_point(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(scale, zero_point) with x_q = scale * (code - zero_point), code in [qn, qp]."""
        raise NotImplementedError

    def extra_repr(self) -> str:
        return f"bits={self.bits}, kind={self.kind}, per_channel={self.per_channel}, signed={self.signed}"
