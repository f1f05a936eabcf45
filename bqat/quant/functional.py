"""Fake-quantization arithmetic shared by the quantizers.

Each function is pure tensor code so it can be wrapped by torch.compile as a whole.
Straight-through estimators are written with the detach trick in the form
`value.detach() + (t - t.detach())`: the second term is exactly zero in the forward pass
(so forward values are bit-exact) and carries t's gradient in the backward pass.
"""

import torch


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """round(x) in the forward pass, identity gradient in the backward pass."""
    return x.detach().round() + (x - x.detach())


def grad_scale(x: torch.Tensor, g: float) -> torch.Tensor:
    """x in the forward pass, gradient multiplied by g in the backward pass (LSQ eq. 4)."""
    y = x * g
    return x.detach() + (y - y.detach())


def lsq_fake_quant(x: torch.Tensor, step: torch.Tensor, g: float, qn: int, qp: int) -> torch.Tensor:
    """LSQ (Esser et al. 2020, eq. 1-3): s * round(clamp(x / s, Qn, Qp)), step gradient scaled by g."""
    s = grad_scale(step, g)
    return round_ste(torch.clamp(x / s, qn, qp)) * s
