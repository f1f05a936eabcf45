"""The frozen form of a trained quantizer: the fixed grid x_q = scale * (code - zero_point).

Every bqat quantizer reports its grid through `scale_zero_point()` (codes in [qn, qp]);
once training is over, that grid is all inference needs, whatever rule (LSQ, LSQ+, PACT,
DoReFa, EWGS) learned it. `FixedQuantizer` computes the grid with plain tensor ops (for
LSQ this is bit-exact: round and clamp commute on an integer range).

Inside `torch.onnx.export` an activation grid becomes QuantizeLinear -> Clip -> DequantizeLinear
in a uint8 container (qdq_ops); weights are exported by `onnx_qdq`'s integer layers.

`freeze` reads a trained quantizer and `check_on_grid` verifies that what it actually
outputs lies on the grid it reports, so a quantizer that breaks the contract stops the
export with one clear line instead of producing a model that silently differs.
"""

from __future__ import annotations

import torch
from torch import nn

from bqat.errors import UserError
from bqat.export.qdq_ops import QuantizeDequantize
from bqat.quant.base import Quantizer

# Outputs further than this many steps from the reported grid break the contract.
GRID_TOLERANCE = 1e-3
# Fraction of activations allowed to land on another code than the frozen grid gives them
# (a quantizer that divides where another multiplies can flip exact ties; LSQ flips none).
ACT_MISMATCH_TOLERANCE = 1e-3


class FixedQuantizer(Quantizer):
    """A quantizer with a frozen grid: scale and zero point are buffers, codes span [qn, qp]."""

    def __init__(self, bits: int, kind: str, qn: int, qp: int, scale: torch.Tensor, zero_point: torch.Tensor, per_channel: bool = False):
        scale = scale.detach().float().reshape(-1).clone()
        super().__init__(bits, kind, per_channel=per_channel, channels=scale.numel())
        self._qn, self._qp = int(qn), int(qp)
        self.signed = self._qn < 0
        self.initialized = True
        zero_point = torch.broadcast_to(zero_point.detach().float().reshape(-1), scale.shape).clone()
        if not self.per_channel:
            scale, zero_point = scale.reshape(()), zero_point.reshape(())
        self.register_buffer("scale", scale)
        self.register_buffer("zero_point", zero_point)

    @property
    def qn(self) -> int:
        return self._qn

    @property
    def qp(self) -> int:
        return self._qp

    # No extra state: the grid's integers come from the constructor, and torch.onnx's
    # tracer accepts only tensors in a state dict.
    get_extra_state = nn.Module.get_extra_state
    set_extra_state = nn.Module.set_extra_state

    def scale_zero_point(self):
        return self.scale, self.zero_point

    def describe(self) -> dict:
        """The grid's integer description, as written to the packed file's metadata."""
        return {"bits": self.bits, "kind": self.kind, "qn": self.qn, "qp": self.qp, "per_channel": self.per_channel}

    def _grid(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        shape = self.param_shape(x)
        return self.scale.reshape(shape), self.zero_point.reshape(shape)

    def codes(self, x: torch.Tensor) -> torch.Tensor:
        s, z = self._grid(x)
        return torch.clamp(torch.round(x / s + z), self.qn, self.qp)

    def dequantize(self, codes: torch.Tensor) -> torch.Tensor:
        s, z = self._grid(codes)
        return (codes.to(s.dtype) - z) * s  # float32, or float64 for a twin in float64

    def fake_quant(self, x: torch.Tensor) -> torch.Tensor:
        if torch.onnx.is_in_onnx_export() and self.kind == "act":
            return self._qdq(x)
        return self.dequantize(self.codes(x))

    def uint8_container(self) -> tuple[int, int, float]:
        """How this activation grid sits in a uint8 ONNX tensor: (zero point, highest code, shift).

        A code c in [qn, qp] is stored as u = c - qn, so signed and unsigned grids alike are
        uint8 (what onnxruntime's integer convs take on x86), with zero point round(z) - qn.
        A zero point that is not an integer leaves its fraction as a float shift of the input
        (x + shift on the container's grid, minus shift after it).
        """
        s, z = float(self.scale), float(self.zero_point)
        z_int = round(z) if abs(z - round(z)) < 1e-6 else 0
        zu = z_int - self.qn
        if not 0 <= zu <= 255:  # cannot happen for an 8-bit grid with its zero point in range
            z_int, zu = 0, -self.qn
        return zu, self.qp - self.qn, (z - z_int) * s

    def _qdq(self, x: torch.Tensor) -> torch.Tensor:
        """The same grid as QuantizeLinear -> Clip(uint8) -> DequantizeLinear (qdq_ops).

        The grid's numbers are read as Python values, so they enter the graph as constants
        rather than as ops on buffers.
        """
        zu, hi, shift = self.uint8_container()
        scale = torch.tensor(float(self.scale))
        y = x + shift if shift else x
        y = QuantizeDequantize.apply(y, scale, torch.tensor(zu, dtype=torch.uint8), 0, hi)
        return y - shift if shift else y


def freeze(quantizer: Quantizer | None, where: str) -> FixedQuantizer | None:
    """The fixed grid of a trained quantizer (None stays None: that tensor is not quantized)."""
    if quantizer is None:
        return None
    kind = type(quantizer).__name__
    if not getattr(quantizer, "initialized", True):
        raise UserError(f"cannot export {where}: its {kind} quantizer never saw data; export a run that trained at least one step")
    try:
        scale, zero_point = quantizer.scale_zero_point()
    except NotImplementedError:
        raise UserError(f"cannot export {where}: quantizer {kind} does not implement scale_zero_point(); "
                        "bqat-export needs x_q = scale * (code - zero_point) from every quantizer") from None
    scale = torch.as_tensor(scale).detach().float().cpu().reshape(-1)
    zero_point = torch.as_tensor(zero_point).detach().float().cpu().reshape(-1)
    channels = quantizer.channels if quantizer.per_channel else 1
    if scale.numel() != channels or zero_point.numel() not in (1, channels):
        raise UserError(f"cannot export {where}: quantizer {kind} reports {scale.numel()} scales and {zero_point.numel()} "
                        f"zero points for {channels} channel(s); scale_zero_point() must give one per channel")
    if not (torch.isfinite(scale).all() and (scale > 0).all() and torch.isfinite(zero_point).all()):
        raise UserError(f"cannot export {where}: quantizer {kind} has a non-positive or non-finite scale or zero point")
    qn, qp, bits = int(quantizer.qn), int(quantizer.qp), int(quantizer.bits)
    if not (qn < qp and qp - qn < 2**bits and -128 <= qn and qp <= (127 if qn < 0 else 255)):
        raise UserError(f"cannot export {where}: quantizer {kind} has codes [{qn}, {qp}], which is not a {bits}-bit grid "
                        "in an int8/uint8 container")
    return FixedQuantizer(bits, quantizer.kind, qn, qp, scale, zero_point, per_channel=quantizer.per_channel)


def off_grid(fixed: FixedQuantizer, values: torch.Tensor) -> torch.Tensor:
    """Per element: True where `values` is not scale * (code - zero_point) for a code in [qn, qp]."""
    s, z = fixed._grid(values)
    steps = values / s + z
    codes = torch.round(steps)
    return ((steps - codes).abs() > GRID_TOLERANCE) | (codes < fixed.qn) | (codes > fixed.qp)


def check_on_grid(fixed: FixedQuantizer, quantizer: Quantizer, inputs: torch.Tensor, outputs: torch.Tensor, where: str) -> None:
    """Stop unless the trained quantizer's `outputs` for `inputs` are the frozen grid's."""
    kind = type(quantizer).__name__
    bad = off_grid(fixed, outputs)
    if bool(bad.any()):
        raise UserError(f"cannot export {where}: quantizer {kind} outputs values off the grid scale * (code - zero_point), "
                        f"code in [{fixed.qn}, {fixed.qp}], that its scale_zero_point() reports ({int(bad.sum())} of {bad.numel()})")
    mismatch = (fixed.codes(inputs) != fixed.codes(outputs)).float().mean().item() if fixed.kind == "act" else 0.0
    if mismatch > ACT_MISMATCH_TOLERANCE:
        raise UserError(f"cannot export {where}: quantizer {kind} maps {100 * mismatch:.2f}% of its inputs to other codes than "
                        "round(x / scale + zero_point) clipped to [qn, qp]; its scale_zero_point() does not describe it")
