"""Speed knobs of a run: torch.compile of the blocks, bf16 autocast, channels-last.

`trainer.compile` compiles every block of the twin and of the partner on its own
(`compile_blocks`). Paths are strings over {'q', 'f'} evaluated block by block through a
prefix memo (bqat.replace), so per-block graphs serve every path of every schedule with
no recompiles when the sampled path changes, and the LP prefix is still computed once.
Compiling the twin whole measured no faster on CPU (README, "Speed"), and would need one
graph per suffix for the mixed paths.

`trainer.precision=bf16` runs forward passes under torch.autocast (bf16 matmuls and
convolutions, fp32 weights and optimizer); backward follows autocast's dtypes.
`trainer.channels_last` (auto: on CUDA) stores models and batches NHWC, the layout cuDNN's
tensor-core convolutions want.
"""

from __future__ import annotations

import contextlib
import logging

import torch
from torch import nn

from bqat.errors import UserError

log = logging.getLogger("bqat")

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16}

# Every block of the twin and of the partner is a separate graph, and each can be seen in a
# few variants (train / eval, grad / no-grad input, a smaller last batch): more than
# dynamo's default of 8 recompiles of one code object (all blocks share Block.__call__).
RECOMPILE_LIMIT = 128


class Accel:
    """Per-run device placement, autocast and memory format, from the `trainer` config."""

    def __init__(self, trainer_cfg, device: torch.device):
        self.device = device
        precision = str(trainer_cfg.get("precision", "fp32"))
        if precision not in PRECISIONS:
            raise UserError(f"trainer.precision={precision!r}; choose fp32 or bf16")
        self.dtype = PRECISIONS[precision]
        if self.dtype is not None and device.type == "cpu" and not cpu_has_native_bf16():
            log.warning("trainer.precision=bf16 on a CPU without native bf16 (AVX512-BF16/AMX): it works but is emulated and slow")
        channels_last = trainer_cfg.get("channels_last", "auto")
        if str(channels_last) == "auto":
            channels_last = device.type == "cuda"
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format

    def to_device(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A batch on the run's device (asynchronously from pinned memory on CUDA), in its layout."""
        x = x.to(self.device, non_blocking=True, memory_format=self.memory_format) if x.dim() == 4 else x.to(self.device, non_blocking=True)
        return x, y.to(self.device, non_blocking=True)

    def prepare(self, module: nn.Module) -> nn.Module:
        """Move a model to the device and memory format (in place, returns it)."""
        module.to(self.device)
        if self.memory_format is torch.channels_last:
            module.to(memory_format=torch.channels_last)
        return module

    def autocast(self):
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)


def cpu_has_native_bf16() -> bool:
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def raise_recompile_limit(limit: int = RECOMPILE_LIMIT) -> None:
    config = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit"):  # the name changed across torch versions
        if hasattr(config, name):
            setattr(config, name, max(getattr(config, name), limit))


def compile_blocks(hybrid, backend: str = "inductor", mode: str | None = None) -> None:
    """Replace `hybrid.runners` (what run_paths calls per block) with compiled blocks.

    The blocks keep their parameters: compiled graphs read the twin's and the partner's
    tensors in place, so optimizer, checkpoints and DDP see the same modules as eager.
    """
    raise_recompile_limit()
    # dynamic=False: the blocks share one code object (Block.__call__), so without it dynamo
    # would read block 2's input shape as a *change* of block 1's and recompile every block
    # for symbolic shapes (slower code, and inductor fails on LSQ's shape-dependent scale).
    hybrid.runners = {
        kind: [torch.compile(block, backend=backend, mode=mode, dynamic=False) for block in blocks]
        for kind, blocks in (("q", hybrid.lp_blocks), ("f", hybrid.fp_blocks))
    }


def compile_settings(trainer_cfg) -> tuple[bool, str, str | None]:
    """(enabled, backend, mode) from trainer.compile / compile_backend / compile_mode."""
    enabled = trainer_cfg.get("compile", False)
    if not isinstance(enabled, bool):
        raise UserError(f"trainer.compile must be true or false, got {enabled!r}")
    backend = str(trainer_cfg.get("compile_backend", "inductor"))
    mode = trainer_cfg.get("compile_mode")
    return enabled, backend, (None if mode in (None, "default") else str(mode))
