"""DoReFa-Net (Zhou et al. 2016): tanh-normalised weights, activations clipped to [0, 1]."""

import torch

from bqat.quant.base import Quantizer
from bqat.quant.functional import DOREFA_ACT, DOREFA_WEIGHT, dorefa_act, dorefa_weight
from bqat.quant.registry import register_quantizer


@register_quantizer("dorefa")
class DoReFa(Quantizer):
    """No learned quantizer parameters; a fixed grid of 2^b levels (L = 2^b - 1 steps).

    Weights (eq. 9): w_q = 2 * quantize_b(tanh(w) / (2 max|tanh(w)|) + 1/2) - 1, values
    in [-1, 1] whatever the scale of w (BatchNorm after the conv absorbs the scale); the
    max is per output channel with `quant.per_channel=true`.
    Activations (sec. 2.6): a_q = quantize_b(clip(a, 0, 1)). An input with negative values
    in its first batch (not after a ReLU) uses the weight grid on clip(a, -1, 1) instead.

    The normalised grid in export terms, x_q = scale * (code - zero_point), code in [0, L]:
    weights and signed activations scale = 2/L, zero_point = L/2 (a half-integer: the
    grid is symmetric and has no zero level); unsigned activations scale = 1/L,
    zero_point = 0. `scale` is the grid step in the quantized tensor's own units; it does
    not depend on the data.
    """

    def __init__(self, bits, kind, per_channel=False, channels=1, **kwargs):
        super().__init__(bits, kind, per_channel, channels, **kwargs)

    @property
    def levels(self) -> int:
        return 2**self.bits - 1

    @property
    def symmetric(self) -> bool:
        """On the [-1, 1] grid of eq. 9 (weights, and activations with negative values)."""
        return self.kind == "weight" or self.signed

    @property
    def qn(self) -> int:
        return 0

    @property
    def qp(self) -> int:
        return self.levels

    def init_params(self, x):
        pass  # nothing learned; only the activation's signedness is read from the first batch

    def fake_quant(self, x):
        if self.kind == "weight":
            return dorefa_weight(x, self.levels, self.per_channel, core=self.core(DOREFA_WEIGHT))
        return dorefa_act(x, self.levels, self.signed, core=self.core(DOREFA_ACT))

    def extra_repr(self):
        grid = "[-1, 1]" if self.symmetric else "[0, 1]"
        return f"bits={self.bits}, kind={self.kind}, per_channel={self.per_channel}, grid={grid}"

    def scale_zero_point(self):
        shape = (self.channels,) if self.per_channel else ()  # one (equal) entry per channel
        if self.symmetric:
            return torch.full(shape, 2.0 / self.levels), torch.full(shape, self.levels / 2.0)
        return torch.full(shape, 1.0 / self.levels), torch.zeros(shape)
