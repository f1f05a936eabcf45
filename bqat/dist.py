"""Data-parallel training with torchrun: `torchrun --nproc_per_node=N -m bqat.train ...`.

torchrun starts N copies of the entry point with RANK / WORLD_SIZE / LOCAL_RANK set.
Every rank composes the same config (the run folder is named by the overrides) and builds
the same models from the same seed; then:

- rank 0 alone writes: Hydra's .hydra/ and train.log (other ranks run with Hydra's
  logging and output folder off), TensorBoard, checkpoints and metrics.json; the run folder
  of rank 0 is broadcast, so every rank reads the same checkpoints when resuming;
- the FP partner is trained (or loaded) by rank 0 first, then read from its cache by the
  others, so it is trained once and on the whole dataset;
- each rank reads its slice of every global batch (TensorLoader.shard), DDP averages
  gradients, and BatchNorm of the twin is synchronised (on CPU by `CPUSyncBatchNorm`,
  torch's SyncBatchNorm being CUDA-only), so N ranks train like one process with an N
  times larger batch;
- quantizer initialisation is averaged over ranks (`Quantizer.initialize` calls
  `average_across_ranks`), so every rank starts from the same step sizes;
- evaluation counts and logged losses are summed / averaged over ranks.

Every helper is a no-op in a single process.
"""

from __future__ import annotations

import contextlib
import os
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from bqat.errors import UserError

# Ranks other than 0 wait in a barrier while rank 0 trains the FP partner: allow for it.
TIMEOUT = timedelta(hours=3)

_cpu_group = None  # a gloo process group for small CPU-side agreements (set by `setup`)


def launched_world_size() -> int:
    """WORLD_SIZE set by torchrun (1 when started directly)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def launched_rank() -> int:
    return int(os.environ.get("RANK", "0"))


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    """True on rank 0 (and in a single process): the one that logs and writes files."""
    return rank() == 0


def rank_overrides(argv: list[str]) -> list[str]:
    """Hydra overrides for ranks > 0: no .hydra/ folder and no logging of their own."""
    if launched_world_size() > 1 and launched_rank() > 0:
        return [*argv, "hydra.output_subdir=null", "hydra/job_logging=disabled", "hydra/hydra_logging=disabled"]
    return argv


def setup(device: torch.device) -> torch.device:
    """Join the torchrun process group (gloo on CPU, NCCL on CUDA); returns this rank's device."""
    if launched_world_size() <= 1:
        return device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=TIMEOUT)
    global _cpu_group
    # Control flags (a stop signal) travel over gloo, on the CPU: agreeing on them every step
    # must not wait for the GPU's queue (the NCCL group's tensors live on the device).
    _cpu_group = dist.new_group(backend="gloo") if dist.get_backend() == "nccl" else dist.group.WORLD
    return device


def teardown() -> None:
    global _cpu_group
    _cpu_group = None
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def agree_run_dir(run_dir: Path) -> Path:
    """Rank 0's run folder on every rank (they differ only if hydra.run.dir holds a timestamp)."""
    if not is_distributed():
        return run_dir
    chosen = [str(run_dir)]
    dist.broadcast_object_list(chosen, src=0)
    chosen_dir = Path(chosen[0])
    if chosen_dir.resolve() != run_dir.resolve():
        with contextlib.suppress(OSError):
            run_dir.rmdir()  # the empty folder Hydra made for this rank
    return chosen_dir


@contextlib.contextmanager
def rank_zero_first():
    """Rank 0 runs the block first (e.g. trains and caches the partner), then the others."""
    if is_distributed() and not is_main():
        dist.barrier()
    yield
    if is_distributed() and is_main():
        dist.barrier()


def from_rank_zero(obj):
    """Rank 0's `obj` (picklable) on every rank; `obj` itself in a single process."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier() -> None:
    if is_distributed():
        dist.barrier()


# --- reductions -------------------------------------------------------------------------

@torch.no_grad()
def average_across_ranks(tensors) -> None:
    """Replace each floating-point tensor by its mean over ranks (in place)."""
    if not is_distributed():
        return
    for t in tensors:
        if t.is_floating_point():
            dist.all_reduce(t.data, op=dist.ReduceOp.SUM)
            t.data.div_(world_size())


def any_across_ranks(flag: bool, device=None) -> bool:
    """True if `flag` is true on any rank."""
    if not is_distributed():
        return bool(flag)
    t = torch.tensor([int(bool(flag))], device=device or default_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def stop_signal_across_ranks(signum: int | None) -> int | None:
    """The stop signal any rank received (the largest number if several), or None.

    A blocking all-reduce of one integer on the CPU (gloo): it does not wait for the GPU."""
    if not is_distributed():
        return signum
    t = torch.tensor([signum or 0], dtype=torch.int32)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=_cpu_group)
    return int(t.item()) or None


def mean_across_ranks(values: dict[str, float]) -> dict[str, float]:
    """Each value averaged over ranks (every rank must pass the same keys)."""
    if not is_distributed() or not values:
        return values
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=default_device())
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return {k: v / world_size() for k, v in zip(keys, t.tolist())}


def sum_across_ranks(counts: dict[str, float]) -> dict[str, float]:
    """Each count summed over ranks; a key missing on some rank counts 0 there."""
    if not is_distributed():
        return counts
    gathered: list = [None] * world_size()
    dist.all_gather_object(gathered, sorted(counts))
    keys = sorted(set().union(*gathered))
    t = torch.tensor([float(counts.get(k, 0.0)) for k in keys], dtype=torch.float64, device=default_device())
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return dict(zip(keys, t.tolist()))


def default_device() -> torch.device:
    """Where collectives' tensors live: the current CUDA device under NCCL, else CPU."""
    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


# --- synchronised BatchNorm -------------------------------------------------------------

class CPUSyncBatchNorm(nn.BatchNorm2d):
    """BatchNorm2d normalising with the statistics of the global batch (all ranks).

    torch.nn.SyncBatchNorm runs on GPUs only; this is the same computation for gloo: a
    two-pass mean / variance whose all-reduces are autograd-aware, so gradients flow back
    to every rank's inputs exactly as in one process. Eval mode is plain BatchNorm2d.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and is_distributed()):
            return super().forward(x)
        dims = (0, 2, 3)
        count = _all_reduce_sum(torch.full((1,), float(x.numel() // x.shape[1]), dtype=x.dtype, device=x.device))
        mean = _all_reduce_sum(x.sum(dims)) / count
        centered = x - mean[None, :, None, None]
        var = _all_reduce_sum(centered.square().sum(dims)) / count  # biased, as used to normalise
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                momentum = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
                self.running_mean.lerp_(mean.detach(), momentum)
                self.running_var.lerp_(var.detach() * count / (count - 1).clamp_min(1), momentum)
        y = centered * torch.rsqrt(var + self.eps)[None, :, None, None]
        if self.affine:
            y = y * self.weight[None, :, None, None] + self.bias[None, :, None, None]
        return y


def _all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum over ranks, differentiable (its backward sums the gradients over ranks)."""
    from torch.distributed import _functional_collectives as fc

    return fc.wait_tensor(fc.all_reduce(t, "sum", dist.group.WORLD))


def convert_sync_batchnorm(module: nn.Module, device: torch.device) -> nn.Module:
    """Synchronise the BatchNorm layers of `module` across ranks (timm's converter on CUDA)."""
    if device.type == "cuda":
        from timm.layers import convert_sync_batchnorm as timm_convert

        return timm_convert(module)
    return _swap_bn(module)


def _swap_bn(module: nn.Module) -> nn.Module:
    if type(module) is nn.BatchNorm2d:
        sync = CPUSyncBatchNorm(module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats)
        sync.load_state_dict(module.state_dict())
        sync.train(module.training)
        if module.affine:  # keep the very same parameter tensors
            sync.weight, sync.bias = module.weight, module.bias
        return sync
    for name, child in module.named_children():
        new = _swap_bn(child)
        if new is not child:
            setattr(module, name, new)
    return module


# --- DDP wrapper ------------------------------------------------------------------------

class _Step(nn.Module):
    """DDP synchronises the gradients of what its forward computed: the training step."""

    def __init__(self, task: nn.Module):
        super().__init__()
        self.task = task

    def forward(self, x, y):
        return self.task.training_step(x, y)


class DistributedTask(nn.Module):
    """A task (bqat.task: BlockReplacement, PartnerTask) whose training steps go through DDP.

    Only parameters that require gradients (the twin's) are synchronised; the frozen
    partner is not. Evaluation runs the plain task; `bqat.engine.evaluate` sums the
    counts over ranks.
    """

    def __init__(self, task: nn.Module, device: torch.device):
        super().__init__()
        self.task = task
        ids = [device.index] if device.type == "cuda" else None
        # Kept out of the module tree: state dicts stay the task's own.
        object.__setattr__(self, "ddp", nn.parallel.DistributedDataParallel(_Step(task), device_ids=ids))

    @property
    def progress(self) -> float:
        return self.task.progress

    @progress.setter
    def progress(self, value: float) -> None:
        self.task.progress = value

    def training_step(self, x, y):
        return self.ddp(x, y)

    def evaluate(self, x):
        return self.task.evaluate(x)


def check_launch(hydra_mode_multirun: bool) -> None:
    if launched_world_size() > 1 and hydra_mode_multirun:
        raise UserError("torchrun with a Hydra sweep (-m) is not supported; run one torchrun per run, "
                        "or sweep with hydra/launcher=submitit_slurm")

