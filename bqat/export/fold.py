"""BatchNorm folded into the quantized conv before it: the same integer codes on per-channel scales.

The twin quantizes a conv's weight, then normalises: with the weight grid w = s * (c - z),
    y_o = gamma_o * (conv(x, w)_o + b_o - mu_o) / sqrt(var_o + eps) + beta_o.
A convolution is linear in its weight, so with a_o = gamma_o / sqrt(var_o + eps)
    y_o = conv(x, a_o * s * (c - z))_o + beta_o + a_o * (b_o - mu_o):
the codes c and zero point z stay as they are, the step becomes a_o * s per output channel
(a per-tensor step turns into per-channel scales; negative where gamma_o is) and the conv
gets the bias. That is the same function up to float rounding: README ("Exporting a run")
states the tolerance. The fold is computed in float64 and rounded once to float32.

Which BatchNorm belongs to which conv comes from the traced graph (bqat.models.graph):
only a BatchNorm whose one input is the conv's output, read by nothing else, is folded.
"""

from __future__ import annotations

import torch
from timm.layers import BatchNormAct2d
from torch import nn

from bqat.export.fixed import FixedQuantizer


def can_fold(bn: nn.Module) -> bool:
    """Inference BatchNorm uses running statistics; one without them normalises by the batch."""
    return bn.running_mean is not None and bn.running_var is not None


@torch.no_grad()
def fold_batchnorm(grid: FixedQuantizer, conv_bias: torch.Tensor | None, bn: nn.Module,
                   shift: torch.Tensor | None = None) -> tuple[FixedQuantizer, torch.Tensor]:
    """The folded weight grid (same bits and codes, per-channel scales) and the conv's new bias,
    plus `shift` (a twin built with twin.integer_bias: what it adds to put the bias on the int32 grid)."""
    var, mean = bn.running_var.double(), bn.running_mean.double()
    a = torch.rsqrt(var + bn.eps)
    if bn.weight is not None:
        a = a * bn.weight.double()
    channels = a.numel()
    scale = torch.broadcast_to(grid.scale.double().reshape(-1), (channels,)) * a
    zero_point = torch.broadcast_to(grid.zero_point.reshape(-1), (channels,))
    bias = -mean if conv_bias is None else conv_bias.double() - mean
    bias = a * bias + (0.0 if bn.bias is None else bn.bias.double())
    if shift is not None:
        bias = bias + shift.double().cpu()
    folded = FixedQuantizer(grid.bits, grid.kind, grid.qn, grid.qp, scale.float(), zero_point, per_channel=True)
    return folded, bias.float()


def remainder(bn: nn.Module) -> nn.Module:
    """What is left of `bn` once folded: nothing, or timm BatchNormAct2d's dropout and activation."""
    if isinstance(bn, BatchNormAct2d):
        return nn.Sequential(bn.drop, bn.act)
    return nn.Identity()
