"""model.onnx: the twin as an ONNX QDQ graph that onnxruntime runs on integer kernels.

`integer_view` turns the rebuilt twin (FixedQuantizers, BatchNorm folded) into the layout
onnxruntime's graph optimiser fuses into QLinearConv / QGemm (qdq_ops.py says which):
- each quantized input activation: QuantizeLinear -> Clip(uint8, the low-bit range) ->
  DequantizeLinear, in a uint8 container (FixedQuantizer.uint8_container);
- each quantized weight: a constant int8 tensor (uint8 for an unsigned grid) -> one
  DequantizeLinear, per output channel along axis 0 where the grid is per channel (a folded
  BatchNorm makes it so);
- the bias: a constant int32 tensor on the accumulator's grid (input scale times weight
  scale) -> DequantizeLinear. This is the one rounding the integer graph adds to the
  twin: at most half an accumulator step per output channel, which the codes' stretch
  below makes small.
- an output grid (twin.residual_bits) right after the conv, so DequantizeLinear -> Conv ->
  QuantizeLinear forms on the convs that end a residual branch.

Weight codes are stored stretched by an integer m, the scale divided by m: the same weights,
and an accumulator grid m times finer for the int32 bias. m is at most what the int8
container allows (64 for 2-bit codes [-2, 1] -> [-128, 64], 16 for 4-bit, 1 for 8-bit)
while a pair of u8 x s8 products stays within int16 (x86 kernels without VNNI sum pairs in
int16 with saturation; with 8-bit inputs, |code * m| <= 64). Where the layer has an int32
bias, m is chosen per output channel to put its bias closest to the grid (bias_multipliers:
about ten times closer than the largest m alone; the weight scale then carries a float32
rounding of 1e-7); elsewhere m is the largest power of two, which changes no weight bit.

`float_view` is the same network in float32 (the dequantized weights, no quantizers): the
baseline of the latency comparison. Both come from torch.onnx's TorchScript exporter
(`dynamo=False`), which exports the autograd Functions of qdq_ops through their symbolic.
"""

from __future__ import annotations

import copy
import math
import warnings
from collections import Counter
from functools import partial
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
import torch.nn.functional as F
from timm.layers.conv2d_same import conv2d_same
from torch import nn

from bqat.export.fixed import FixedQuantizer
from bqat.export.qdq_ops import DequantizeConst
from bqat.export.weights import quantized_layers
from bqat.quant.integer_bias import stretch_limit as codes_stretch_limit
from bqat.quant.modules import QConv2d, QConv2dSame, QLinear, attach_output_quantizer, detach_output_quantizer

DEFAULT_OPSET = 13
INT32_MAX = 2**31 - 1


def stretch_limit(grid: FixedQuantizer, input_hi: int = 255) -> int:
    """The largest m by which this weight grid's codes (and zero point) can be multiplied and
    stay in their 8-bit container, with a pair of products within int16 for inputs up to `input_hi`
    (bqat.quant.integer_bias.stretch_limit: the twin's integer bias uses the same m)."""
    return codes_stretch_limit(grid.qn, grid.qp, float(grid.zero_point.abs().max()), input_hi)


def bias_multipliers(bias: torch.Tensor, step: torch.Tensor, limit: int) -> torch.Tensor:
    """Per output channel, the stretch m in [1, limit] that puts `bias` closest to the accumulator
    grid step / m (step: input scale times weight scale, per channel): the int32 bias then misses
    the float one by |t m - round(t m)| / m steps, t = bias / step. The largest m wins a tie."""
    t = (bias.double() / step.double()).reshape(-1, 1)
    m = torch.arange(limit, 0, -1, dtype=torch.float64)
    miss = (t * m - torch.round(t * m)).abs() / m
    return m[torch.argmin(miss, dim=1)]


def integer_weight(grid: FixedQuantizer, weight: torch.Tensor, stretch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(codes * stretch, scale / stretch, zero point * stretch): `weight` as an int8 (uint8 for an
    unsigned grid) tensor; `stretch` is one integer or one per output channel."""
    dtype = torch.int8 if grid.qn < 0 else torch.uint8
    stretch = torch.as_tensor(stretch, dtype=torch.float64)
    per_channel = stretch.dim() > 0
    shape = (-1,) + (1,) * (weight.dim() - 1) if per_channel else ()
    scale, zero_point = grid.scale.double(), grid.zero_point.double()
    if per_channel:
        scale, zero_point = torch.broadcast_to(scale.reshape(-1), stretch.shape), torch.broadcast_to(zero_point.reshape(-1), stretch.shape)
    codes = (grid.codes(weight).double() * stretch.reshape(shape)).to(dtype)
    return codes, (scale / stretch).float(), (zero_point * stretch).to(dtype)


def power_of_two_floor(m: int) -> int:
    return 1 << (max(m, 1).bit_length() - 1)


def integer_bias(bias: torch.Tensor, input_grid: FixedQuantizer, weight_scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(int32 codes, scale) of `bias` on the accumulator grid input scale * weight scale, or None
    if that does not fit int32."""
    scale = torch.broadcast_to((input_grid.scale * weight_scale).float().reshape(-1), bias.shape)
    codes = torch.round(bias.double() / scale.double())
    if not bool(codes.abs().max() <= INT32_MAX):
        return None
    return codes.to(torch.int32), scale.contiguous()


def used_taps(size: int, kernel: int, stride: int, pad: int, dilation: int) -> tuple[int, int] | None:
    """(first, last) kernel tap along one axis that ever reads an input pixel rather than
    padding, when dropping the others leaves a conv that needs no padding at all; else None.

    A 3x3 conv (padding 1) on a 1x1 input only ever uses its centre tap: onnxruntime's
    float kernels skip the padding taps, its integer convolution computes all nine. On
    a 32x32 input the last stage of an ImageNet ResNet runs at 1x1 (or 2x2, stride 2)."""
    out = (size + 2 * pad - dilation * (kernel - 1) - 1) // stride + 1
    used = [i for i in range(kernel) if any(0 <= o * stride - pad + i * dilation < size for o in range(out))]
    if not used or len(used) == kernel:
        return None
    first, last = used[0], used[-1]
    if first * dilation != pad or (out - 1) * stride - pad + last * dilation > size - 1:
        return None
    return first, last


def _crop(layer: nn.Module, input_size) -> tuple[slice, slice] | None:
    """The kernel window a conv on `input_size` (H, W) really uses (`used_taps`), or None."""
    if input_size is None or type(layer) is not QConv2d or layer.padding_mode != "zeros" or isinstance(layer.padding, str):
        return None
    taps = [used_taps(n, k, s, p, d) for n, k, s, p, d in zip(input_size, layer.kernel_size, layer.stride, layer.padding, layer.dilation)]
    if all(t is None for t in taps):
        return None
    if any(t is None and p for t, p in zip(taps, layer.padding)):
        return None  # one axis croppable, the other still padded: keep the conv as it is
    return tuple(slice(t[0], t[1] + 1) if t else slice(None) for t in taps)


def _op(layer: nn.Module, cropped: bool):
    """The layer's computation as a function of (input, weight, bias)."""
    if isinstance(layer, QLinear):
        return F.linear
    if isinstance(layer, QConv2dSame):
        return partial(conv2d_same, stride=layer.stride, padding=layer.padding, dilation=layer.dilation, groups=layer.groups)
    if cropped:
        return partial(F.conv2d, stride=layer.stride, padding=0, dilation=layer.dilation, groups=layer.groups)
    return layer._conv_forward  # padding mode, stride, dilation, groups of the conv itself


class IntegerLayer(nn.Module):
    """A quantized conv or linear laid out for onnxruntime's integer operators (module docstring).

    `mode` says how onnxruntime will run it:
    - "integer": dequantized input, int8 weight and int32 bias, for QLinearConv / QGemm. Its
      forward is the twin's function with the bias rounded to the accumulator grid.
    - "float_output": the same, but the bias stays float: the layer's output goes on in
      float (into a residual add, say), so onnxruntime cannot fuse it anyway.
    - "float_weight": "float_output" with the dequantized weight as a float constant. The
      weight behind a DequantizeLinear is recomputed on every run (onnxruntime does not
      fold DequantizeLinear) and keeps the conv out of the pre-packed, blocked (NCHWc)
      float kernels: such a conv measured about 2x slower than in model_fp32.onnx. But a
      float weight is one onnxruntime's WeightBiasQuantization pass may quantize on its
      own wherever its fusions leave DequantizeLinear -> Conv -> QuantizeLinear (a conv
      with an unfolded BatchNorm): the export checks that it did not (run.py).
    - "float": no Q/DQ at all: the input grid as float ops (round, clip), the float weight
      and bias. onnxruntime cannot fuse it, nor quantize its weight or bias itself (its
      WeightBiasQuantization / BiasQuantization passes do that wherever a conv reads
      dequantized inputs): the twin's function, exactly.
    `input_size` (H, W), when given, lets a conv drop the kernel taps that only ever read
    padding (`used_taps`): the same outputs for that input size, the one model.onnx takes."""

    MODES = ("integer", "float_output", "float_weight", "float")

    def __init__(self, layer: nn.Module, input_size: tuple[int, int] | None = None, mode: str = "integer"):
        super().__init__()
        if mode not in self.MODES:
            raise ValueError(f"mode must be one of {self.MODES}, got {mode!r}")
        self.input_quantizer = layer.input_quantizer
        self.float_input = mode == "float"
        window = _crop(layer, input_size)
        self._op = _op(layer, cropped=window is not None)
        wq, aq = layer.weight_quantizer, layer.input_quantizer
        bias = layer.bias.detach() if layer.bias is not None else None
        self.integer = mode in ("integer", "float_output") and isinstance(wq, FixedQuantizer) and torch.equal(wq.zero_point, torch.round(wq.zero_point))
        on_grid = (mode == "integer" and self.integer and bias is not None and isinstance(aq, FixedQuantizer)
                   and not aq.uint8_container()[2])
        if self.integer:
            limit = stretch_limit(wq, aq.uint8_container()[1] if isinstance(aq, FixedQuantizer) else 255)
            if on_grid:  # per channel, the stretch that best fits the bias to the accumulator grid
                step = aq.scale.double() * torch.broadcast_to(wq.scale.double().reshape(-1), bias.shape)
                stretch = bias_multipliers(bias, step, limit)
            else:  # a power of two: the same float weights, exactly
                stretch = power_of_two_floor(limit)
            codes, scale, zero_point = integer_weight(wq, layer.weight.detach(), stretch)
            if window is not None:
                codes = codes[(slice(None), slice(None), *window)].contiguous()
            self.register_buffer("weight_codes", codes)
            self.register_buffer("weight_scale", scale)
            self.register_buffer("weight_zero_point", zero_point)
        else:
            self._op = _op(layer, cropped=False)  # a float weight keeps its full kernel
            self.register_buffer("weight", layer.quantized_weight().detach().clone())
        bias_codes = integer_bias(bias, aq, self.weight_scale) if on_grid else None
        self.integer_bias = bias_codes is not None
        if bias_codes is not None:
            self.register_buffer("bias_codes", bias_codes[0])
            self.register_buffer("bias_scale", bias_codes[1])
            self.register_buffer("bias_zero_point", torch.zeros_like(bias_codes[0]))
        else:
            self.register_buffer("bias", None if bias is None else bias.clone())

    def forward(self, x):
        if self.input_quantizer is not None and self.float_input:
            x = self.input_quantizer.dequantize(self.input_quantizer.codes(x))  # plain ops, no Q/DQ
        elif self.input_quantizer is not None:
            x = self.input_quantizer(x)
        if self.integer:
            w = DequantizeConst.apply(self.weight_codes, self.weight_scale, self.weight_zero_point, 0)
        else:
            w = self.weight
        if self.integer_bias:
            b = DequantizeConst.apply(self.bias_codes, self.bias_scale, self.bias_zero_point, 0)
        else:
            b = self.bias
        return self._op(x, w, b)


@torch.no_grad()
def input_sizes(model: nn.Module, example: torch.Tensor) -> dict[str, tuple[int, ...]]:
    """The spatial size of each quantized layer's input on `example`."""
    sizes, hooks = {}, []

    def keep(name):
        def hook(_module, args):  # returns None: the inputs are left unchanged
            sizes.setdefault(name, tuple(args[0].shape[2:]))
        return hook

    for name, layer in quantized_layers(model):
        hooks.append(layer.register_forward_pre_hook(keep(name)))
    try:
        model.eval()(example)
    finally:
        for h in hooks:
            h.remove()
    return sizes


@torch.no_grad()
def bias_errors(view: nn.Module, twin: nn.Module) -> dict[str, float]:
    """Layer name -> the largest |int32 bias - float bias| of each IntegerLayer of `view` that has
    one (`twin`: the rebuilt twin the view was made from)."""
    errors = {}
    for name, layer in view.named_modules():
        if isinstance(layer, IntegerLayer) and layer.integer_bias:
            exact = twin.get_submodule(name).bias.double()
            errors[name] = float((layer.bias_codes.double() * layer.bias_scale.double() - exact).abs().max())
    return errors


def integer_view(twin: nn.Module, example: torch.Tensor | None = None, float_output=(), in_float=(),
                 float_weight: bool = False) -> nn.Module:
    """A copy of the rebuilt twin whose quantized layers are IntegerLayers (for model.onnx).

    With `example` (an input of the exported size) convs drop their padding-only taps. The
    layers named in `float_output` and `in_float` (True: all) get those IntegerLayer modes
    ("float_weight" instead of "float_output" with `float_weight`); the others are "integer"."""
    view = copy.deepcopy(twin).eval()
    sizes = input_sizes(view, example) if example is not None else {}

    def mode(name):
        if in_float is True or name in in_float:
            return "float"
        if float_output is True or name in float_output:
            return "float_weight" if float_weight else "float_output"
        return "integer"

    for name, layer in quantized_layers(view):
        new = IntegerLayer(layer, sizes.get(name), mode=mode(name))
        out = detach_output_quantizer(layer)
        if out is not None:
            attach_output_quantizer(new, out)
        view.set_submodule(name, new)
    return view


def float_view(twin: nn.Module) -> nn.Module:
    """A copy of the rebuilt twin in float32: dequantized weights, no quantizers (for model_fp32.onnx)."""
    view = copy.deepcopy(twin).eval()
    for _, layer in quantized_layers(view):
        with torch.no_grad():
            layer.weight.copy_(layer.quantized_weight())
        layer.weight_quantizer = layer.input_quantizer = None
    for module in view.modules():
        detach_output_quantizer(module)
    return view


def export_onnx(model: nn.Module, path: str | Path, example: torch.Tensor, opset: int = DEFAULT_OPSET) -> onnx.ModelProto:
    """Write `model` to `path` with a dynamic batch size; returns the checked model."""
    model.eval()
    with warnings.catch_warnings():
        # The legacy exporter announces its deprecation and the tracer notes that the
        # grids' Python constants are frozen into the graph, which is what we want.
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", module=r"torch\.onnx")
        torch.onnx.export(model, (example,), str(path), dynamo=False, opset_version=opset, input_names=["input"],
                          output_names=["logits"], dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
    onnx_model = onnx.load(str(path))
    onnx.checker.check_model(onnx_model)
    return onnx_model


def op_counts(model: onnx.ModelProto) -> Counter:
    return Counter(node.op_type for node in model.graph.node)


def session(path: str | Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def run(sess: ort.InferenceSession, x: torch.Tensor) -> torch.Tensor:
    """Logits of the ONNX model for batch `x`."""
    (logits,) = sess.run(["logits"], {"input": np.ascontiguousarray(x.detach().cpu().numpy(), dtype=np.float32)})
    return torch.from_numpy(logits)
