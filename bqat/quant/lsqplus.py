"""LSQ+: learnable offsets and better initialisation (Bhalgat et al., CVPR-W 2020)."""

import torch
from torch import nn

from bqat.quant.functional import LSQPLUS, lsqplus_fake_quant
from bqat.quant.lsq import LSQ
from bqat.quant.registry import register_quantizer

# MSE initialisation of activations (eq. 9): the clipping range [lo, hi] with the least
# quantization MSE on the first batch, searched on a coarse grid (lo up from min(x) by up to
# half the range, hi down from max(x) to 5% of it), then REFINE times on a finer grid (a
# quarter of the cell) around the best point, until the resolution (about 1e-4 of the range)
# is far below any difference that matters.
# The MSE of a candidate is exact, computed from prefix sums over the sorted sample (one
# binary search per grid level), so the search costs little more than one sort.
# The sample is all elements, or MSE_SAMPLE of them drawn uniformly at random when the
# batch is larger. A fixed stride would not do: for power-of-two shapes it lines up with
# H*W and picks the same border column of every map, where zero padding lives. The draw
# uses its own generator seeded with MSE_SEED, so the same batch always gives the same
# (s, beta) and the run's random streams are not consumed; under DDP every rank samples
# its own slice of the batch and Quantizer.initialize averages the results.
MSE_SAMPLE = 2**18
MSE_SEED = 0
COARSE = 12
FINE = 9
REFINE = 6


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


class SortedSample:
    """A 1-D sample, sorted, with prefix sums of x and x^2 (float64): the MSE of any grid in O(levels log n)."""

    def __init__(self, v: torch.Tensor):
        self.v = v.detach().to("cpu", torch.float64).sort().values
        zero = torch.zeros(1, dtype=torch.float64)
        self.p1 = torch.cat([zero, self.v.cumsum(0)])
        self.p2 = torch.cat([zero, (self.v * self.v).cumsum(0)])

    def range_mse(self, lo: torch.Tensor, hi: torch.Tensor, qn: int, qp: int) -> torch.Tensor:
        """MSE of the quantizer with clipping range [lo_i, hi_i] (s = (hi - lo) / (qp - qn), beta = lo - qn s), for every i."""
        s = ((hi - lo) / (qp - qn)).clamp_min(1e-8)[:, None]
        beta = lo[:, None] - qn * s
        codes = torch.arange(qn, qp + 1, dtype=torch.float64)
        levels = codes * s + beta  # (C, L): every grid value
        # x rounds to level j when it lies in [edge_{j-1}, edge_j); clamping sends the tails to the end levels
        edges = torch.searchsorted(self.v, (codes[:-1] + 0.5) * s + beta)
        n = self.v.numel()
        bounds = torch.cat([torch.zeros_like(edges[:, :1]), edges, torch.full_like(edges[:, :1], n)], dim=1)
        count = (bounds[:, 1:] - bounds[:, :-1]).to(torch.float64)
        s1 = self.p1[bounds[:, 1:]] - self.p1[bounds[:, :-1]]
        s2 = self.p2[bounds[:, 1:]] - self.p2[bounds[:, :-1]]
        return (s2 - 2 * levels * s1 + levels * levels * count).sum(dim=1) / n


def sample(v: torch.Tensor, n: int) -> torch.Tensor:
    """n elements of the 1-D v drawn uniformly with replacement (seeded: MSE_SEED), or v itself when it has at most n."""
    if v.numel() <= n:
        return v
    gen = torch.Generator(device=v.device).manual_seed(MSE_SEED)
    return v[torch.randint(v.numel(), (n,), generator=gen, device=v.device)]


@torch.no_grad()
def mse_init(x: torch.Tensor, qn: int, qp: int) -> tuple[float, float]:
    """(s, beta) of the clipping range whose quantizer has the least MSE on x (LSQ+ eq. 8-9)."""
    data = SortedSample(sample(x.flatten(), MSE_SAMPLE))
    lo0, hi0 = float(data.v[0]), float(data.v[-1])
    span = max(hi0 - lo0, 1e-8)
    lo_step, hi_step = 0.5 * span / (COARSE - 1), 0.95 * span / (COARSE - 1)
    los = lo0 + torch.arange(COARSE, dtype=torch.float64) * lo_step
    his = hi0 - torch.arange(COARSE, dtype=torch.float64) * hi_step
    for _ in range(1 + REFINE):  # coarse grid, then finer grids around the best point
        lo, hi = (t.flatten() for t in torch.meshgrid(los, his, indexing="ij"))
        keep = hi > lo + 1e-6 * span
        lo, hi = lo[keep], hi[keep]
        i = int(data.range_mse(lo, hi, qn, qp).argmin())
        best_lo, best_hi = float(lo[i]), float(hi[i])
        los = best_lo + torch.linspace(-lo_step, lo_step, FINE, dtype=torch.float64)
        his = best_hi + torch.linspace(-hi_step, hi_step, FINE, dtype=torch.float64)
        lo_step, hi_step = lo_step / (FINE // 2), hi_step / (FINE // 2)
    s = max((best_hi - best_lo) / (qp - qn), 1e-8)
    return s, best_lo - qn * s
