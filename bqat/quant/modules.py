"""Quantized Conv2d / Linear: the float layer plus optional weight and input quantizers.

As in torchao's FakeQuantizedLinear, `from_float` shares the float layer's weight tensor,
so a twin built from a model starts with exactly its weights.

`QUANT_MODULES` maps each float layer type to its quantized version; only these exact
types are swapped. timm's own subclasses are listed where their forward is known:
`timm.layers.Linear` is nn.Linear outside TorchScript, and `Conv2dSame` pads the input
TensorFlow-style before the conv (tf_efficientnet, tf_mobilenetv3, ...), which
`QConv2dSame` keeps. Any other subclass (StdConv2d, ScaledStdConv2d: weight
standardisation in forward) stays float in the twin, and make_twin logs it.

Under bf16 autocast (`trainer.precision=bf16`) the quantizers compute in float32 and hand
the conv/linear float32 values exactly on their grids (bqat.quant.functional); the
conv/linear itself runs in bf16, and autocast casts those values to bf16 on the way in
(relative error at most 2^-9: bf16 cannot hold code * scale for most scales). The codes,
the step gradients and what export reads are exact; only the bf16 matmul sees the rounding.
"""

from __future__ import annotations

import timm.layers
import torch.nn.functional as F
from timm.layers.conv2d_same import Conv2dSame, conv2d_same
from torch import nn


class _QuantMixin:
    weight_quantizer: nn.Module | None
    input_quantizer: nn.Module | None

    def _attach(self, weight_quantizer, input_quantizer):
        self.weight_quantizer = weight_quantizer
        self.input_quantizer = input_quantizer

    def quantized_input(self, x):
        return x if self.input_quantizer is None else self.input_quantizer(x)

    def quantized_weight(self):
        return self.weight if self.weight_quantizer is None else self.weight_quantizer(self.weight)


def _adopt(cls, layer: nn.Module, weight_quantizer, input_quantizer):
    """A `cls` instance with `layer`'s attributes and the very same parameter tensors."""
    q = cls.__new__(cls)
    q.__dict__.update(layer.__dict__)
    q._parameters = dict(layer._parameters)  # same weight/bias tensor objects
    q._buffers = dict(layer._buffers)
    q._modules = {}
    q._attach(weight_quantizer, input_quantizer)
    return q


class QConv2d(_QuantMixin, nn.Conv2d):
    @classmethod
    def from_float(cls, conv: nn.Conv2d, weight_quantizer, input_quantizer) -> "QConv2d":
        return _adopt(cls, conv, weight_quantizer, input_quantizer)

    def forward(self, x):
        return self._conv_forward(self.quantized_input(x), self.quantized_weight(), self.bias)


class QLinear(_QuantMixin, nn.Linear):
    @classmethod
    def from_float(cls, linear: nn.Linear, weight_quantizer, input_quantizer) -> "QLinear":
        return _adopt(cls, linear, weight_quantizer, input_quantizer)

    def forward(self, x):
        return F.linear(self.quantized_input(x), self.quantized_weight(), self.bias)


class QConv2dSame(QConv2d):
    """timm's Conv2dSame (dynamic TF 'SAME' padding) with quantized input and weight.

    The input is quantized before padding: the zero padding is on every grid."""

    def forward(self, x):
        return conv2d_same(self.quantized_input(x), self.quantized_weight(), self.bias, self.stride, self.padding, self.dilation, self.groups)


def _quantize_output(module: nn.Module, _inputs, output):
    return module.output_quantizer(output)


def attach_output_quantizer(module: nn.Module, quantizer: nn.Module) -> None:
    """From now on `module`'s output passes through `quantizer` (a forward hook).

    The quantizer is registered as the child `output_quantizer`, so its step is in the state
    dict and among the parameters the optimizer trains. A hook rather than a subclass keeps
    the module's type (and its state-dict keys), so it works on any layer, BatchNorm or
    SyncBatchNorm alike (twin.residual_bits, bqat.quant.twin)."""
    if getattr(module, "output_quantizer", None) is not None:
        raise ValueError(f"{type(module).__name__} already has an output quantizer")
    module.output_quantizer = quantizer
    module.register_forward_hook(_quantize_output)


def detach_output_quantizer(module: nn.Module) -> nn.Module | None:
    """Undo `attach_output_quantizer`; returns the quantizer (None if there was none)."""
    quantizer = getattr(module, "output_quantizer", None)
    if quantizer is None:
        return None
    for key, hook in list(module._forward_hooks.items()):
        if hook is _quantize_output:
            del module._forward_hooks[key]
    del module.output_quantizer
    return quantizer


def output_quantizer(module: nn.Module) -> nn.Module | None:
    return getattr(module, "output_quantizer", None)


QUANT_MODULES = {
    nn.Conv2d: QConv2d,
    nn.Linear: QLinear,
    timm.layers.Linear: QLinear,
    Conv2dSame: QConv2dSame,
}
