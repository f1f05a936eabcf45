"""Bit-packing of integer codes: n codes of `bits` bits each in ceil(n * bits / 8) bytes.

A code c on the grid [qn, qp] is stored as the unsigned offset c - qn (so signed and
unsigned grids pack alike), its `bits` bits least significant first, codes one after
another in one little-endian bit stream. Any width from 1 to 8 works; 3-bit codes
straddle byte boundaries. numpy's packbits/unpackbits do the bit shuffling.
"""

from __future__ import annotations

import numpy as np
import torch


def packed_size(count: int, bits: int) -> int:
    """Bytes taken by `count` codes of `bits` bits."""
    return -(-count * bits // 8)


def _check_bits(bits: int) -> None:
    if not 1 <= bits <= 8:
        raise ValueError(f"codes are packed at 1 to 8 bits, got {bits}")


def pack_codes(codes: torch.Tensor, bits: int, qn: int) -> torch.Tensor:
    """Flatten integer `codes` (each in [qn, qn + 2**bits - 1]) into a uint8 buffer."""
    _check_bits(bits)
    offset = codes.detach().cpu().reshape(-1).to(torch.int64) - qn
    if offset.numel() and (offset.min() < 0 or offset.max() >= 2**bits):
        lo, hi = int(codes.min()), int(codes.max())
        raise ValueError(f"codes span [{lo}, {hi}], outside the {bits}-bit grid starting at {qn}")
    planes = (offset[:, None] >> torch.arange(bits)) & 1  # (n, bits), least significant bit first
    packed = np.packbits(planes.to(torch.uint8).numpy().reshape(-1), bitorder="little")
    return torch.from_numpy(packed)


def unpack_codes(buffer: torch.Tensor, bits: int, qn: int, count: int) -> torch.Tensor:
    """The `count` int64 codes stored in `buffer` by `pack_codes(codes, bits, qn)`."""
    _check_bits(bits)
    if buffer.dtype != torch.uint8 or buffer.numel() != packed_size(count, bits):
        raise ValueError(f"expected {packed_size(count, bits)} uint8 bytes for {count} {bits}-bit codes, got {buffer.numel()} {buffer.dtype}")
    planes = np.unpackbits(buffer.numpy(), count=count * bits, bitorder="little").reshape(count, bits)
    offset = (torch.from_numpy(planes).to(torch.int64) << torch.arange(bits)).sum(1)
    return offset + qn
