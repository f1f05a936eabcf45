"""LSQ: Learned Step Size Quantization (Esser et al., ICLR 2020)."""

import math

import torch
from torch import nn

from bqat.quant.base import Quantizer
from bqat.quant.functional import LSQ as LSQ_CORE
from bqat.quant.functional import lsq_fake_quant
from bqat.quant.registry import register_quantizer


@register_quantizer("lsq")
class LSQ(Quantizer):
    """x_q = s * round(clamp(x/s, Qn, Qp)); s learned with gradient scale g = 1/sqrt(N*Qp)."""

    def __init__(self, bits, kind, per_channel=False, channels=1, **kwargs):
        super().__init__(bits, kind, per_channel, channels, **kwargs)
        shape = (channels,) if self.per_channel else ()
        self.step = nn.Parameter(torch.ones(shape))

    def init_params(self, x):
        # Paper, sec. 2.1: s = 2 * mean(|v|) / sqrt(Qp).
        s = 2 * x.abs().mean(dim=self.reduce_dims(x)) / math.sqrt(self.qp)
        self.step.data.copy_(s.clamp_min(1e-8).reshape(self.step.shape))

    def scales(self):
        return [self.step]

    def grad_factor(self, x) -> float:
        """g = 1/sqrt(N * Qp) (LSQ sec. 2.2)."""
        return 1.0 / math.sqrt(self.group_size(x) * self.qp)

    def fake_quant(self, x):
        step = self.bounded(self.step).reshape(self.param_shape(x))
        return lsq_fake_quant(x, step, self.grad_factor(x), self.qn, self.qp, core=self.core(LSQ_CORE))

    def scale_zero_point(self):
        return self.step.detach(), torch.zeros_like(self.step.detach())
