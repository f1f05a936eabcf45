"""EWGS: element-wise gradient scaling (Lee, Kim and Ham, CVPR 2021) on an LSQ quantizer."""

from bqat.errors import UserError
from bqat.quant.functional import EWGS as EWGS_CORE
from bqat.quant.functional import ewgs_fake_quant
from bqat.quant.lsq import LSQ
from bqat.quant.registry import register_quantizer


@register_quantizer("ewgs")
class EWGS(LSQ):
    """LSQ's forward, step size and initialisation; the round's gradient is scaled per element.

    Backward of the discretizer (paper eq. 5): g_xn = g_xq * (1 + delta * sign(g_xq) * (x_n - x_q)),
    x_n - x_q the rounding error on the quantizer's [0, 1] normalised range. delta is a fixed
    hyperparameter (`quant.delta`, 1e-3 as in the authors' fixed-factor runs); the paper's
    Hessian-based update of delta is not implemented. delta = 0 is exactly LSQ.
    """

    def __init__(self, bits, kind, per_channel=False, channels=1, delta: float = 1e-3, **kwargs):
        super().__init__(bits, kind, per_channel, channels, **kwargs)
        if delta < 0:
            raise UserError(f"quant.delta must be >= 0 (0 is plain LSQ), got {delta}")
        self.delta = float(delta)

    def fake_quant(self, x):
        step = self.bounded(self.step).reshape(self.param_shape(x))
        return ewgs_fake_quant(x, step, self.grad_factor(x), self.qn, self.qp, self.delta, core=self.core(EWGS_CORE))

    def extra_repr(self):
        return f"{super().extra_repr()}, delta={self.delta}"
