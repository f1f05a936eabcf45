"""PACT: parameterized clipping activation (Choi et al. 2018), DoReFa weights as in the paper."""

import torch
from torch import nn

from bqat.errors import UserError
from bqat.quant.dorefa import DoReFa
from bqat.quant.functional import PACT as PACT_CORE
from bqat.quant.functional import pact_fake_quant
from bqat.quant.registry import register_quantizer


@register_quantizer("pact")
class PACT(DoReFa):
    """Activations: y = clip(x, 0, alpha), y_q = round(y * L / alpha) * alpha / L, L = 2^b - 1,
    with one learned clip alpha per layer (eq. 1-3), started large (`quant.alpha_init`, 10)
    and L2-regularised as in the paper: each activation quantizer adds
    `quant.alpha_decay / 2 * alpha^2` to the training loss, i.e. weight decay of strength
    alpha_decay on alpha (default 5e-4, bqat's weight decay). The optimizer's own weight
    decay skips scalar parameters, alpha included.

    Weights: DoReFa's tanh-normalised quantizer (the paper's choice), see `DoReFa`.

    Inputs with negative values in their first batch (not after a ReLU; not in the paper)
    clip to [-alpha, alpha] on a symmetric grid of 2^(b-1) - 1 steps each side.
    Export: scale = alpha / qp, zero_point = 0.
    """

    def __init__(self, bits, kind, per_channel=False, channels=1, alpha_init: float = 10.0, alpha_decay: float = 5e-4, **kwargs):
        super().__init__(bits, kind, per_channel, channels, **kwargs)
        if alpha_init <= 0 or alpha_decay < 0:
            raise UserError(f"quant.alpha_init must be > 0 and quant.alpha_decay >= 0, got {alpha_init} and {alpha_decay}")
        self.alpha_decay = float(alpha_decay)
        self.alpha = nn.Parameter(torch.tensor(float(alpha_init))) if kind == "act" else None

    @property
    def qn(self) -> int:
        if self.kind == "act" and self.signed:
            return -self.qp
        return super().qn

    @property
    def qp(self) -> int:
        if self.kind == "act" and self.signed:
            return 2 ** (self.bits - 1) - 1
        return super().qp

    def fake_quant(self, x):
        if self.kind == "weight":
            return super().fake_quant(x)
        return pact_fake_quant(x, self.bounded(self.alpha), self.qp, self.signed, core=self.core(PACT_CORE))

    def scales(self):
        return [self.alpha] if self.alpha is not None else []

    def scale_zero_point(self):
        if self.kind == "weight":
            return super().scale_zero_point()
        return self.alpha.detach() / self.qp, torch.tensor(0.0)

    def regularizer(self):
        if self.alpha is None or self.alpha_decay == 0:
            return None
        return 0.5 * self.alpha_decay * self.alpha.pow(2)

    def extra_repr(self):
        return f"{super().extra_repr()}, alpha_decay={self.alpha_decay}"
