"""Two ways to turn images into batches.

- In memory (`memory_loaders`): the whole split is one uint8 tensor on the training
  device; each batch is indexed, randomly cropped and flipped, converted and normalised
  with tensor ops (airbench's habit), so an epoch is never bound by image decoding.
- Streamed (`StreamLoader`): a torch DataLoader with worker processes, pinned memory and
  persistent workers applies per-image transforms (torchvision's or timm's); for data
  that does not fit in memory, such as ImageNet.

Both start unsharded and serve one data-parallel rank after `shard(rank, world_size)`
(TensorLoader: a slice of every global batch; StreamLoader: rank::world_size of each
epoch's permutation), keep the validation order
fixed, and restart their random stream with `reseed(seed)`.
"""

from __future__ import annotations

import os
import random
from contextlib import contextmanager
from typing import Callable, Iterator

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler, get_worker_info

from bqat.data.base import TensorLoader, random_crop_flip, train_drop_last
from bqat.errors import UserError
from bqat.preempt import leave_signals_to_the_main_process


def normalizer(mean, std, device) -> Callable[[torch.Tensor], torch.Tensor]:
    """uint8 NCHW in 0..255 -> float32 (x/255 - mean) / std, as torchvision's ToTensor + Normalize."""
    scale = torch.tensor(std, dtype=torch.float32, device=device).view(1, -1, 1, 1) * 255.0
    shift = torch.tensor(mean, dtype=torch.float32, device=device).view(1, -1, 1, 1) * 255.0
    return lambda x: (x.float() - shift) / scale


def memory_loaders(train_x, train_y, val_x, val_y, *, cfg, pad, seed, device) -> tuple[TensorLoader, TensorLoader]:
    """Train/val TensorLoaders over uint8 tensors moved to `device` once.

    Training batches get a `pad`-pixel zero-padded random crop and a horizontal flip (on
    uint8, so the padding is black as in torchvision's RandomCrop), then normalisation
    with `cfg.mean`/`cfg.std`; validation batches only the normalisation, in a fixed order.
    """
    device = torch.device(device or "cpu")
    normalize = normalizer(cfg.mean, cfg.std, device)

    def augment(x, g):
        return random_crop_flip(x, pad, flip=True, generator=g)

    common = dict(transform=normalize, seed=seed)
    train = TensorLoader(train_x.to(device), train_y.to(device), cfg.batch_size, shuffle=True, drop_last=train_drop_last(cfg),
                         augment=augment, **common)
    val = TensorLoader(val_x.to(device), val_y.to(device), cfg.batch_size, **common)
    return train, val


class ShardSampler(Sampler):
    """One epoch of keys: a fresh permutation from `generator` (or 0..n-1), then rank::world_size.

    When shuffling, each key is (index, seed): the seed of that image's augmentation this
    epoch, drawn from `generator` too. The whole epoch, crops included, is then a function
    of the generator's state alone: not of num_workers, nor of which worker gets which
    image, nor of what persistent workers did before (partner training, a resumed run).
    """

    def __init__(self, n: int, shuffle: bool, generator: torch.Generator, rank: int = 0, world_size: int = 1):
        self.n, self.shuffle, self.generator = n, shuffle, generator
        self.rank, self.world_size = rank, world_size

    def __iter__(self) -> Iterator:
        if not self.shuffle:
            return iter(range(self.rank, self.n, self.world_size))
        idx = torch.randperm(self.n, generator=self.generator)[self.rank :: self.world_size].tolist()
        base = int(torch.randint(0, 2**62, (1,), generator=self.generator))
        return iter([(i, base + i) for i in idx])

    def __len__(self) -> int:
        return (self.n + self.world_size - 1 - self.rank) // self.world_size


def stream_pair(train: Dataset, val: Dataset, *, cfg, seed, device) -> tuple["StreamLoader", "StreamLoader"]:
    """Train (shuffled, last partial batch dropped unless data.drop_last=false) and val StreamLoaders at
    `cfg.batch_size`, with `cfg.num_workers` workers and pinned memory when training on CUDA."""
    pin = torch.device(device or "cpu").type == "cuda"
    common = dict(seed=seed, num_workers=stream_workers(cfg), pin_memory=pin)
    return (StreamLoader(train, cfg.batch_size, shuffle=True, drop_last=train_drop_last(cfg), **common),
            StreamLoader(val, cfg.batch_size, **common))


def stream_workers(cfg) -> int:
    """data.num_workers, capped at the cores this process may use: more only adds contention."""
    return min(int(cfg.num_workers), len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)


class StreamLoader:
    """A torch DataLoader with workers, pinned memory and persistent workers, plus `reseed`.

    Shuffling and augmentation come from `generator` (see ShardSampler), so `reseed` and
    restoring `generator`'s state (bqat.resume) replay an epoch exactly.
    """

    def __init__(self, dataset: Dataset, batch_size: int, *, shuffle=False, drop_last=False, seed=0,
                 num_workers=0, pin_memory=False):
        if batch_size < 1:
            raise UserError(f"data.batch_size must be at least 1, got {batch_size}")
        self.batch_size, self.drop_last = batch_size, drop_last
        self.generator = torch.Generator().manual_seed(seed)
        self.sampler = ShardSampler(len(dataset), shuffle, self.generator)
        self.loader = DataLoader(
            dataset, batch_size=batch_size, sampler=self.sampler, drop_last=drop_last, num_workers=int(num_workers),
            pin_memory=bool(pin_memory), persistent_workers=int(num_workers) > 0,
            generator=torch.Generator().manual_seed(0),  # workers' base seed: unused, and keeps torch's global RNG untouched
            worker_init_fn=leave_signals_to_the_main_process,  # Ctrl-C reaches the workers too; the main process stops them
        )

    def reseed(self, seed: int) -> None:
        self.generator.manual_seed(seed)

    def shard(self, rank: int, world_size: int) -> None:
        """Serve rank `rank` of `world_size` data-parallel processes from now on."""
        self.sampler.rank, self.sampler.world_size = rank, world_size

    def __len__(self) -> int:
        n = len(self.sampler)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        try:
            yield from self.loader
        except UserError as err:
            # A worker's UserError comes back wrapped in its traceback; keep the one line.
            raise UserError(str(err).strip().splitlines()[-1].removeprefix(f"{UserError.__module__}.UserError: ")) from None


class ImageDataset(Dataset):
    """(image, label) from a list of files or from an in-memory uint8 array, through `transform`."""

    def __init__(self, labels: torch.Tensor, transform: Callable, *, paths: list[str] | None = None, pixels=None, read=None):
        self.labels, self.transform = labels, transform
        self.paths, self.pixels, self.read = paths, pixels, read

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, key):
        i, seed = key if isinstance(key, tuple) else (key, None)
        img = self.read(self.paths[i]) if self.paths is not None else Image.fromarray(self.pixels[i])
        if seed is None:
            return self.transform(img), int(self.labels[i])
        with seeded(seed):
            return self.transform(img), int(self.labels[i])


@contextmanager
def seeded(seed: int):
    """Seed the global RNGs that torchvision's and timm's transforms draw from (torch, random).

    In a worker process they are the worker's own; in the main process (num_workers=0)
    they are the training's, so their state is put back afterwards.
    """
    main = get_worker_info() is None
    saved = (torch.get_rng_state(), random.getstate()) if main else None
    torch.manual_seed(seed)
    random.seed(seed)
    try:
        yield
    finally:
        if saved is not None:
            torch.set_rng_state(saved[0])
            random.setstate(saved[1])
