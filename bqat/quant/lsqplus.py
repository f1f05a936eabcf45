"""LSQ+: learnable offsets and better initialisation (Bhalgat et al., CVPR-W 2020)."""

import torch
from torch import nn

from bqat.quant.functional import LSQPLUS, lsqplus_fake_quant
from bqat.quant.lsq import LSQ
from bqat.quant.registry import register_quantizer

# MSE initialisation of activations: the clipping range [lo, hi] is searched on a sample
# of the first batch (MSE_SAMPLE elements at a fixed stride), first on a coarse grid
# (lo up from min(x) by up to half the range, hi down from max(x) to 5% of it), then on a
# fine grid one coarse cell around the best.
MSE_SAMPLE = 8192
COARSE = 12
FINE = 9


@register_quantizer("lsqplus")
class LSQPlus(LSQ):
    """Activations: x_q = s * round(clamp((x - beta)/s, 0, 2^b - 1)) + beta, s and beta learned.

    The grid is always unsigned and the learned offset beta places it, so negative
    activations (no ReLU, Swish, ...) cost no sign bit. Weights are symmetric (beta = 0,
    signed grid) and differ from LSQ only in the initialisation. Both use LSQ's gradient
    scale g for s and beta.

    Initialisation (paper sec. 3.3): weights s = max(|mu - 3 sigma|, |mu + 3 sigma|) / 2^(b-1)
    (eq. 7, per channel when per-channel); activations (s, beta) = argmin ||x_q - x||^2 over the
    first batch (eq. 9), solved by a grid search over clipping ranges that starts at the
    min/max initialisation (eq. 8).

    Export: zero_point = -beta / s (not an integer in general).
    """

    def __init__(self, bits, kind, per_channel=False, channels=1, **kwargs):
        super().__init__(bits, kind, per_channel, channels, **kwargs)
        self.offset = nn.Parameter(torch.zeros(())) if kind == "act" else None

    def init_params(self, x):
        if self.kind == "weight":
            dims = self.reduce_dims(x)
            mu, sigma = x.mean(dim=dims), x.std(dim=dims)
            s = torch.maximum((mu - 3 * sigma).abs(), (mu + 3 * sigma).abs()) / 2 ** (self.bits - 1)
            self.step.data.copy_(s.clamp_min(1e-8).reshape(self.step.shape))
            return
        self.signed = False  # asymmetric: the offset, not a sign bit, covers negative values
        s, beta = mse_init(x, self.qn, self.qp)
        self.step.data.fill_(s)
        self.offset.data.fill_(beta)

    def fake_quant(self, x):
        if self.kind == "weight":
            return super().fake_quant(x)
        return lsqplus_fake_quant(x, self.bounded(self.step), self.offset, self.grad_factor(x), self.qn, self.qp, core=self.core(LSQPLUS))

    def scale_zero_point(self):
        if self.kind == "weight":
            return super().scale_zero_point()
        s = self.step.detach()
        return s, -self.offset.detach() / s


def _range_mse(v: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, qn: int, qp: int) -> torch.Tensor:
    """MSE on v of the quantizer with clipping range [lo_i, hi_i], for every candidate i."""
    s = ((hi - lo) / (qp - qn)).clamp_min(1e-8)[:, None]
    beta = lo[:, None] - qn * s
    xq = torch.clamp(torch.round((v[None] - beta) / s), qn, qp) * s + beta
    return (xq - v[None]).pow(2).mean(dim=1)


@torch.no_grad()
def mse_init(x: torch.Tensor, qn: int, qp: int) -> tuple[float, float]:
    """(s, beta) of the clipping range whose quantizer has the least MSE on x (LSQ+ eq. 8-9)."""
    v = x.flatten().float()
    v = v[:: max(1, v.numel() // MSE_SAMPLE)]
    lo0, hi0 = float(v.min()), float(v.max())
    span = max(hi0 - lo0, 1e-8)
    lo_step, hi_step = 0.5 * span / (COARSE - 1), 0.95 * span / (COARSE - 1)
    los = lo0 + torch.arange(COARSE) * lo_step
    his = hi0 - torch.arange(COARSE) * hi_step
    for _ in range(2):  # coarse grid, then a fine grid around its best cell
        lo, hi = (t.flatten() for t in torch.meshgrid(los, his, indexing="ij"))
        keep = hi > lo + 1e-6 * span
        lo, hi = lo[keep], hi[keep]
        i = int(_range_mse(v, lo, hi, qn, qp).argmin())
        best_lo, best_hi = float(lo[i]), float(hi[i])
        los = best_lo + torch.linspace(-lo_step, lo_step, FINE)
        his = best_hi + torch.linspace(-hi_step, hi_step, FINE)
        lo_step, hi_step = lo_step / (FINE // 2), hi_step / (FINE // 2)
    s = max((best_hi - best_lo) / (qp - qn), 1e-8)
    return s, best_lo - qn * s
