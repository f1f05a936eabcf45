"""Fake-quantization arithmetic shared by the quantizers.

Each function is pure tensor code so it can be wrapped by torch.compile as a whole.
Straight-through estimators are written with the detach trick: the forward value is
the quantized one, the backward pass sees the identity (or a scaled identity).
"""

import torch


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """round(x) in the forward pass, identity gradient in the backward pass."""
    return (x.round() - x).detach() + x


def grad_scale(x: torch.Tensor, g: float) -> torch.Tensor:
    """x in the forward pass, gradient multiplied by g in the backward pass (LSQ eq. 4)."""
    y = x * g
    return (x - y).detach() + y


def lsq_fake_quant(x: torch.Tensor, step: torch.Tensor, g: float, qn: int, qp: int) -> torch.Tensor:
    """LSQ (Esser et al. 2020, eq. 1-3): s * round(clamp(x / s, Qn, Qp)), step gradient scaled by g."""
    s = grad_scale(step, g)
    return round_ste(torch.clamp(x / s, qn, qp)) * s
