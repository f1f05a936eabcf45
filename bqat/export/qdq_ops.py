"""Two torch ops that export as ONNX QuantizeLinear / DequantizeLinear in the layout onnxruntime fuses.

onnxruntime turns DequantizeLinear -> Conv -> QuantizeLinear (and -> Gemm) into one integer
operator (QLinearConv, QGemm) when (onnxruntime/core/optimizer/qdq_transformer/
selectors_actions/qdq_selectors.cc):
- every input of the op comes from a DequantizeLinear: the activation, the weight (a
  constant int8 or uint8 tensor) and the bias (a constant int32 tensor, scale = input scale
  times weight scale, zero point 0);
- the activation and the output QuantizeLinear have the same type (uint8 in, uint8 out:
  the fast u8 x s8 kernels on x86, VNNI's vpdpbusd); only a Relu or a Clip that the
  QuantizeLinear makes redundant may sit in between;
- per-channel weight scales run along the output-channel axis 0.
ONNX has no 2- or 3-bit type, so a low-bit grid lives in an 8-bit container, and its
narrower range is an integer Clip *after* the QuantizeLinear (uint8 -> uint8): a float Clip
in front of it would stand between the op and its QuantizeLinear and stop the fusion.

Both ops compute in PyTorch what onnxruntime computes (round half to even, then the zero
point, then the clip), so the export can be checked against its own PyTorch forward.
"""

from __future__ import annotations

import torch


def _axis_shape(like: torch.Tensor, scale: torch.Tensor, axis: int) -> tuple[int, ...]:
    shape = [1] * like.dim()
    if scale.dim():
        shape[axis] = -1
    return tuple(shape)


class DequantizeConst(torch.autograd.Function):
    """(codes - zero_point) * scale for a constant integer tensor; exports as DequantizeLinear."""

    @staticmethod
    def forward(ctx, codes, scale, zero_point, axis: int):
        shape = _axis_shape(codes, scale, axis)
        return (codes.float() - zero_point.float().reshape(shape)) * scale.reshape(shape)

    @staticmethod
    def symbolic(g, codes, scale, zero_point, axis: int):
        return g.op("DequantizeLinear", codes, scale, zero_point, axis_i=axis)


class QuantizeDequantize(torch.autograd.Function):
    """x on a uint8 grid: u = clip(round(x / scale) + zero_point, lo, hi), back as (u - zero_point) * scale.

    Exports as QuantizeLinear -> [Clip(uint8) when [lo, hi] is narrower than 0..255] -> DequantizeLinear."""

    @staticmethod
    def forward(ctx, x, scale, zero_point, lo: int, hi: int):
        u = torch.clamp(torch.round(x / scale) + zero_point.float(), lo, hi)
        return (u - zero_point.float()) * scale

    @staticmethod
    def symbolic(g, x, scale, zero_point, lo: int, hi: int):
        u = g.op("QuantizeLinear", x, scale, zero_point)
        if (lo, hi) != (0, 255):
            bounds = [g.op("Constant", value_t=torch.tensor(v, dtype=torch.uint8)) for v in (lo, hi)]
            u = g.op("Clip", u, *bounds)
        return g.op("DequantizeLinear", u, scale, zero_point)
