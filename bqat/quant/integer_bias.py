"""`twin.integer_bias`: the twin computes its biases as an integer backend does.

bqat-export folds each BatchNorm that follows a quantized conv into that conv
(bqat.export.fold). Per output channel o, with the conv's integer accumulator acc_o,
a_o = gamma_o / sqrt(var_o + eps) and the folded bias B_o = beta_o + a_o * (b_o - mean_o):
    y_o = a_o * s_x * s_w * acc_o + B_o.
onnxruntime's QLinearConv adds the bias inside the accumulator, as an int32 on the grid
g_o = s_x * s_w * a_o / m (m: the stretch of the int8 weight codes, at most `stretch_limit`;
bqat.export.onnx_qdq), so the integer graph computes the twin with each B_o rounded to g_o.
That rounding is at most half a step of g, yet in a deep low-bit net the codes it flips
propagate to the logits (README, "Exporting a run": 8 of 1,767 images change class on a
resnet18 W4A4 run).

With this option the twin computes the rounding itself (`IntegerBias`, a forward hook):
- in eval mode (every validation, best.pt's choice, bqat-export) each such BatchNorm computes
  a * x + round(B / g) * g from its running statistics: the folded form, with the bias the
  integer graph will hold, so the val top-1 is the integer graph's and the export rounds
  nothing the twin did not. Training is unchanged: in train mode BatchNorm normalises with
  batch statistics, whose eval-time form was never what the twin trained on either;
- with `twin.integer_bias_epochs=N` (`freeze`), the last N epochs train in that form too, the
  running statistics frozen: the twin trains on the function it is deployed as (the
  rounding passes the gradient straight through: B is what gamma and beta learn).
A quantized Linear's own bias (QGemm rounds it to s_x * s_w / m) gets the same treatment.
bqat-export bakes the shift into the stored bias (`bias_shifts`), so the packed file and the
ONNX hold the rounded bias and the int32 codes come out exact.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from bqat.errors import UserError
from bqat.models.graph import TraceError, conv_bn_pairs
from bqat.quant.modules import QConv2d, QLinear

log = logging.getLogger("bqat")

INT16_MAX = 2**15 - 1
# Plain BatchNorm only: the hook replaces the module's output, which in timm's BatchNormAct2d
# is already past its activation.
PLAIN_BATCHNORM = (nn.BatchNorm2d, nn.SyncBatchNorm)


def stretch_limit(qn: int, qp: int, zero_point: float = 0.0, input_hi: int = 255) -> int:
    """The largest m by which a weight grid's codes [qn, qp] (and zero point) can be multiplied
    and stay in their 8-bit container (int8 if qn < 0, else uint8), with a pair of products
    within int16 for inputs up to `input_hi` (x86 kernels without VNNI sum pairs in int16)."""
    z = abs(float(zero_point))
    limits = [min(128, INT16_MAX // (2 * max(input_hi, 1))) // max(abs(qn), abs(qp), 1)]
    if qn < 0:
        limits += [128 // abs(qn), 127 // max(qp, 1)]
    else:
        limits += [255 // max(qp, 1)]
    if z:
        limits.append(int(127 // z))
    return max(1, min(limits))


def _integer_zero_point(z: torch.Tensor) -> bool:
    return bool(torch.equal(z, torch.round(z)))


class IntegerBias:
    """The forward hook of one quantized layer's bias (see the module docstring).

    `layer`: the QConv2d or QLinear whose quantizers set the accumulator grid; `bn`: the
    BatchNorm after the conv (None: the layer's own bias). Active in eval mode, and in train
    mode while `frozen`. Holds no state of its own: checkpoints and resume are unchanged."""

    def __init__(self, layer: nn.Module, bn: nn.Module | None):
        self.layer, self.bn, self.frozen = layer, bn, False
        self.momentum = None if bn is None else bn.momentum

    def grid(self, like: torch.Tensor) -> torch.Tensor | None:
        """g per output channel: input scale * weight scale / stretch (times a for a BatchNorm's
        bias, a passed as `like`'s scale); None where the backend keeps this bias in float."""
        wq, aq = self.layer.weight_quantizer, self.layer.input_quantizer
        s_w, z_w = (torch.as_tensor(t) for t in wq.scale_zero_point())
        s_x, z_x = (torch.as_tensor(t) for t in aq.scale_zero_point())
        if not (_integer_zero_point(z_x) and _integer_zero_point(z_w)):
            return None  # a fractional zero point: bqat-export keeps this layer's bias float
        m = stretch_limit(wq.qn, wq.qp, float(z_w.abs().max()), aq.qp - aq.qn)
        step = s_x.detach().to(like.dtype) * s_w.detach().to(like.dtype).reshape(-1) / m
        return torch.broadcast_to(step, like.shape) * like

    def folded(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(a, B) of the BatchNorm from its running statistics: its output is a * x + B."""
        bn, conv_bias = self.bn, self.layer.bias
        a = torch.rsqrt(bn.running_var + bn.eps)
        if bn.weight is not None:
            a = a * bn.weight
        b = -bn.running_mean if conv_bias is None else conv_bias - bn.running_mean
        return a, a * b + (0.0 if bn.bias is None else bn.bias)

    def _shift(self, a: torch.Tensor | None, bias: torch.Tensor) -> torch.Tensor | None:
        """round(B / g) * g - B per output channel for the bias B (and the BatchNorm's a), detached."""
        with torch.no_grad():
            g = self.grid(torch.ones_like(bias) if a is None else a.detach())
            if g is None:
                return None
            bias = bias.detach()
            safe = torch.where(g == 0, torch.ones_like(g), g)
            # The integer k = round(B / g) in float32 whatever the twin's dtype: a twin run in
            # float64 (bqat-export's Float64Check) then holds the same biases as the float32
            # one whose k the export stores (B / g can reach 1e4, where the two would differ
            # at a rounding tie now and then).
            k = torch.round(bias.float() / safe.float()).to(bias.dtype)
            return torch.where(g == 0, torch.zeros_like(bias), k * safe - bias)

    def shift(self) -> torch.Tensor | None:
        """round(B / g) * g - B per output channel, detached (None: no integer bias here)."""
        return self._shift(None, self.layer.bias) if self.bn is None else self._shift(*self.folded())

    def __call__(self, module: nn.Module, args, output):
        if module.training and not self.frozen:
            return None  # ordinary training: batch statistics, the float bias
        if self.bn is None:
            delta = self._shift(None, self.layer.bias)
            return None if delta is None else output + delta
        a, bias = self.folded()
        delta = self._shift(a, bias)
        if delta is None:
            return None
        shape = (1, -1) + (1,) * (args[0].dim() - 2)
        # The folded form, whatever the BatchNorm computed: running statistics in train mode too.
        return args[0] * a.reshape(shape) + (bias + delta).reshape(shape)


def hooks(twin: nn.Module) -> list[IntegerBias]:
    return [h for m in twin.modules() for h in m._forward_hooks.values() if isinstance(h, IntegerBias)]


def attach_integer_bias(twin: nn.Module, enabled=True) -> int:
    """`twin.integer_bias` (false: nothing): hook IntegerBias onto every plain BatchNorm that
    directly follows a quantized conv (read from the traced graph, as the export folds) and
    onto every quantized Linear with a bias. A model torch.fx cannot trace gets no hook on its
    BatchNorms, with a warning (bqat-export then rounds their biases). Returns how many were hooked."""
    if not check_enabled(enabled):
        return 0
    try:
        pairs = conv_bn_pairs(twin)
    except TraceError as err:
        log.warning(f"twin.integer_bias: torch.fx cannot read the model's conv -> BatchNorm pairs ({err}); "
                    "their biases stay float in the twin, and bqat-export rounds them")
        pairs = []
    quantized = lambda m: isinstance(m, (QConv2d, QLinear)) and m.weight_quantizer is not None and m.input_quantizer is not None  # noqa: E731
    hooked, skipped = 0, []
    for conv, bn in pairs:
        layer, norm = twin.get_submodule(conv), twin.get_submodule(bn)
        if not quantized(layer):
            continue
        if type(norm) not in PLAIN_BATCHNORM or norm.running_var is None:
            skipped.append(bn)
            continue
        norm.register_forward_hook(IntegerBias(layer, norm), prepend=True)  # before an output grid's hook
        hooked += 1
    for _, layer in twin.named_modules():
        if isinstance(layer, QLinear) and quantized(layer) and layer.bias is not None:
            layer.register_forward_hook(IntegerBias(layer, None), prepend=True)
            hooked += 1
    if skipped:
        log.warning(f"twin.integer_bias: {len(skipped)} BatchNorms of another type keep a float bias "
                    f"(e.g. {skipped[0]}); bqat-export rounds theirs")
    if hooked:
        log.info(f"twin: {hooked} biases on the integer accumulator grid in evaluation (twin.integer_bias)")
    return hooked


def check_enabled(value) -> bool:
    """`twin.integer_bias`, checked: true or false."""
    if not isinstance(value, bool):
        raise UserError(f"twin.integer_bias must be true or false, got {value!r}")
    return value


def frozen_epochs(recipe) -> int:
    """`twin.integer_bias_epochs` of a run's `twin` config, checked with `twin.integer_bias`: the
    last epochs that train in the folded form (0 without twin.integer_bias)."""
    check_enabled(recipe.get("integer_bias", False))
    epochs = recipe.get("integer_bias_epochs") or 0
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 0:
        raise UserError(f"twin.integer_bias_epochs must be a whole number of epochs >= 0 (0: off), got {epochs!r}")
    if epochs and not recipe.get("integer_bias", False):
        raise UserError("twin.integer_bias_epochs trains the twin with its integer biases, which needs twin.integer_bias=true")
    return epochs


def freeze(twin: nn.Module, frozen: bool) -> None:
    """Train the hooked layers in their folded form (True: running statistics frozen, the
    integer bias) or as ordinary layers (False). bqat-train calls it at every epoch's start."""
    for h in hooks(twin):
        h.frozen = frozen
        if h.bn is not None:  # momentum 0: train mode leaves the running statistics as they are
            h.bn.momentum = 0.0 if frozen else h.momentum


def bias_shifts(twin: nn.Module) -> dict[str, torch.Tensor]:
    """Module name (the BatchNorm, or the Linear) -> the shift its hook adds to the bias, for
    bqat-export to store the bias as the twin computes it."""
    names = {id(m): n for n, m in twin.named_modules()}
    shifts = {}
    for h in hooks(twin):
        delta = h.shift()
        if delta is not None:
            shifts[names[id(h.bn if h.bn is not None else h.layer)]] = delta.detach()
    return shifts
