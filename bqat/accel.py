"""Speed knobs of a run: torch.compile of the blocks, bf16 autocast, channels-last.

`trainer.compile` compiles every block of the twin and of the partner on its own
(`compile_blocks`). Paths are strings over {'q', 'f'} evaluated block by block through a
prefix memo (bqat.replace), so per-block graphs serve every path of every schedule with
no recompiles when the sampled path changes, and the LP prefix is still computed once.
Compiling the twin whole measured no faster on CPU (README, "Speed"), and would need one
graph per suffix for the mixed paths.

`trainer.compile=auto` and `quant.compile=auto` (the defaults) compile only where it pays:
when the run plans enough optimizer updates to amortise compiling (`AUTO_MIN_STEPS`) and a
compiler works on the device (`compiler_works`, probed once); otherwise eager, with one log
line saying why. `FirstSteps` logs what compiling cost (the first step against later ones).
With `trainer.compile_mode=reduce-overhead` the compiled blocks replay as CUDA graphs; the
engine marks each step's start (`Accel.step_begin`).

`trainer.precision=bf16` runs forward passes under torch.autocast (bf16 matmuls and
convolutions, fp32 weights and optimizer); backward follows autocast's dtypes.
`trainer.channels_last` (auto: on CUDA) stores models and batches NHWC, the layout cuDNN's
tensor-core convolutions want.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import time

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
        self.compiling: str | None = None  # what runs compiled ("trainer.compile", ...), for the log
        self.cudagraphs = False  # compiled blocks replay as CUDA graphs (compile_mode reduce-overhead)
        self.compile_cost_s: float | None = None  # set once the first compiled steps were timed
        self.clock: FirstSteps | None = None  # times the first compiled steps (engine)

    def use_compiled(self, what: str, mode: str | None = None) -> None:
        """Record that `what` runs compiled (with torch.compile `mode`): the engine then times the
        first steps and, for CUDA-graph modes on CUDA, marks every step's start."""
        self.compiling, self.clock = what, FirstSteps()
        self.cudagraphs = self.device.type == "cuda" and mode in ("reduce-overhead", "max-autotune")

    def step_begin(self) -> None:
        """Called before every training step and evaluation batch. Under CUDA graphs it tells
        torch a new iteration begins, so the previous step's graph outputs may be overwritten."""
        if self.cudagraphs:
            torch.compiler.cudagraph_mark_step_begin()

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


def compile_settings(trainer_cfg) -> tuple[bool | str, str, str | None]:
    """(setting, backend, mode) from trainer.compile (true | false | auto) / compile_backend / compile_mode."""
    setting = trainer_cfg.get("compile", "auto")
    check_compile_setting(setting, "trainer.compile")
    backend = str(trainer_cfg.get("compile_backend", "inductor"))
    mode = trainer_cfg.get("compile_mode")
    return setting, backend, (None if mode in (None, "default") else str(mode))


def check_compile_setting(setting, key: str) -> None:
    if not isinstance(setting, bool) and setting != "auto":
        raise UserError(f"{key} must be true, false or auto, got {setting!r}")


# `auto` compiles when a run plans at least this many optimizer updates (all epochs), per
# what is compiled and device type. Break-even = compile seconds / (eager step - compiled
# step); `make bench --cold-cache` reports it as `compile_break_even_steps`. Measured on the
# 2-core Intel Xeon (AVX-512) with nothing else running, ResNet-20 batch 128 W2A2, a fresh
# inductor cache (README "Benchmark"):
#   quant, cpu:    compiling the quantizer cores cost 10 s and saved ~340 ms of LSQ's eager
#                  step: break-even after 28 updates. 2,000 keeps a margin of 70x (slower
#                  compilers, other models) and keeps the tests' short runs eager, unprobed.
#   trainer, cpu:  compiling every block cost 94 s; against eager that pays after 224
#                  updates, but against compiled quantizer cores alone (what auto picks
#                  otherwise) it saves only 44 ms (LSQ) / 60 ms (prefix) a step: break-even
#                  after about 2,100 / 1,600 updates. 20,000 is about 10x that: a 10-epoch
#                  CIFAR-10 run (3,900 updates) stays at quant.compile only, the paper's 300
#                  epochs (117,000) compile everything.
#   cuda:          PROVISIONAL, not measured (no GPU run yet): compiling takes about a
#                  minute and saves milliseconds per step on launch-bound small CNNs, so
#                  thousands of steps. Compiled blocks include their quantizers, so
#                  quant.compile only matters without trainer.compile.
AUTO_MIN_STEPS = {
    ("quant", "cpu"): 2_000,
    ("trainer", "cpu"): 20_000,
    ("quant", "cuda"): 5_000,
    ("trainer", "cuda"): 5_000,
}


def auto_compile(setting, what: str, planned_steps: int, device: torch.device, backend: str = "inductor") -> tuple[bool, str]:
    """Whether `what` ("trainer" | "quant") runs compiled, and why, for `<what>.compile=setting`.

    true / false are taken as given. auto: compiled when the run plans at least
    AUTO_MIN_STEPS updates on this device type and `compiler_works` (probed only then, so
    short runs and tests never pay for the probe)."""
    check_compile_setting(setting, f"{what}.compile")
    if isinstance(setting, bool):
        return setting, f"{what}.compile={str(setting).lower()}"
    need = AUTO_MIN_STEPS.get((what, device.type))
    if need is None:
        return False, f"auto: no rule for {device.type} devices"
    if planned_steps < need:
        return False, f"auto: {planned_steps} planned updates, fewer than the {need} that amortise compiling on {device.type}"
    works, why = compiler_works(backend, device.type)
    if not works:
        return False, f"auto: {planned_steps} planned updates, but torch.compile({backend}) does not work on {device.type}: {why}"
    return True, f"auto: {planned_steps} planned updates, at least the {need} that amortise compiling on {device.type}"


@functools.cache
def compiler_works(backend: str, device_type: str) -> tuple[bool, str]:
    """(works, why not): compile and run a tiny function with `backend` on `device_type`, once per process.

    Inductor needs a working C++ compiler on CPU and Triton on CUDA; a failure here becomes
    one log line and an eager run instead of an error minutes into training."""
    def probe(x):
        return torch.sin(x) * 2 + 1

    try:
        x = torch.linspace(0, 1, 16, device=device_type)
        out = torch.compile(probe, backend=backend, dynamic=False, fullgraph=True)(x)
        if not torch.allclose(out, probe(x)):
            return False, "the probe computed a wrong value"
    except Exception as err:  # noqa: BLE001 - any failure means: do not compile
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        return False, f"{type(err).__name__}: {first[:200]}"
    return True, ""


class FirstSteps:
    """Times the first compiled steps of a process against the later ones, to log what compiling cost."""

    def __init__(self):
        self.start: float | None = None
        self.first_s: float | None = None  # seconds of the first step (compiling included)
        self.first_end = 0.0
        self.first_step = 0

    def begin(self) -> None:
        """Before a step: starts the clock at the first one."""
        if self.start is None:
            self.start = time.perf_counter()

    def step_done(self, step: int) -> None:
        if self.first_s is None:
            self.first_end = time.perf_counter()
            self.first_s, self.first_step = self.first_end - self.start, step

    def report(self, step: int, what: str) -> float | None:
        """At a log step (the device has caught up): log and return the compile cost in seconds,
        or None while no step after the first has run."""
        if self.first_s is None or step <= self.first_step:
            return None
        later = (time.perf_counter() - self.first_end) / (step - self.first_step)
        cost = max(self.first_s - later, 0.0)
        log.info(f"compile ({what}): first step {self.first_s:.1f} s, later steps {1000 * later:.1f} ms each: "
                 f"compiling cost about {cost:.1f} s")
        return cost
