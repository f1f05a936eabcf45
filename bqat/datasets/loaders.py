"""Two ways to turn images into batches.

- In memory (`memory_loaders`): the whole split is one uint8 tensor on the training
  device; each batch is indexed, randomly cropped and flipped, converted and normalised
  with tensor ops (airbench's habit), so an epoch is never bound by image decoding.
- Streamed (`StreamLoader`): a torch DataLoader with worker processes, pinned memory and
  persistent workers applies per-image transforms (torchvision's or timm's); for data
  that does not fit in memory, such as ImageNet.

Both shard each epoch by `rank`/`world_size` the way `TensorLoader` does, keep the
validation order fixed, and restart their random stream with `reseed(seed)`.
"""

from __future__ import annotations

import os
from typing import Callable, Iterator

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler

from bqat.data import TensorLoader, random_crop_flip
from bqat.errors import UserError


def normalizer(mean, std, device) -> Callable[[torch.Tensor], torch.Tensor]:
    """uint8 NCHW in 0..255 -> float32 (x/255 - mean) / std, as torchvision's ToTensor + Normalize."""
    scale = torch.tensor(std, dtype=torch.float32, device=device).view(1, -1, 1, 1) * 255.0
    shift = torch.tensor(mean, dtype=torch.float32, device=device).view(1, -1, 1, 1) * 255.0
    return lambda x: (x.float() - shift) / scale


def memory_loaders(train_x, train_y, val_x, val_y, *, cfg, pad, seed, rank, world_size, device) -> tuple[TensorLoader, TensorLoader]:
    """Train/val TensorLoaders over uint8 tensors moved to `device` once.

    Training batches get a `pad`-pixel zero-padded random crop and a horizontal flip (on
    uint8, so the padding is black as in torchvision's RandomCrop), then normalisation
    with `cfg.mean`/`cfg.std`; validation batches only the normalisation, in file order.
    """
    device = torch.device(device or "cpu")
    normalize = normalizer(cfg.mean, cfg.std, device)

    def augment(x, g):
        return random_crop_flip(x, pad, flip=True, generator=g)

    common = dict(transform=normalize, seed=seed, rank=rank, world_size=world_size)
    train = TensorLoader(train_x.to(device), train_y.to(device), cfg.batch_size, shuffle=True, drop_last=True, augment=augment, **common)
    val = TensorLoader(val_x.to(device), val_y.to(device), cfg.batch_size, **common)
    return train, val


class ShardSampler(Sampler[int]):
    """Indices of one epoch: a fresh permutation from `generator` (or 0..n-1), then rank::world_size."""

    def __init__(self, n: int, shuffle: bool, generator: torch.Generator, rank: int = 0, world_size: int = 1):
        self.n, self.shuffle, self.generator = n, shuffle, generator
        self.rank, self.world_size = rank, world_size

    def __iter__(self) -> Iterator[int]:
        idx = torch.randperm(self.n, generator=self.generator) if self.shuffle else torch.arange(self.n)
        return iter(idx[self.rank :: self.world_size].tolist())

    def __len__(self) -> int:
        return (self.n + self.world_size - 1 - self.rank) // self.world_size


def stream_workers(cfg) -> int:
    """data.num_workers, capped at the cores this process may use: more only adds contention."""
    return min(int(cfg.num_workers), len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)


class StreamLoader:
    """A torch DataLoader with workers, pinned memory and persistent workers, plus `reseed`.

    The sampler and the workers' seeds come from one generator, so a run is reproducible
    for a given `num_workers`. `reseed` restarts the workers too: their random state then
    depends only on the seed, not on what the loader did before (e.g. partner training).
    """

    def __init__(self, dataset: Dataset, batch_size: int, *, shuffle=False, drop_last=False, seed=0, rank=0, world_size=1,
                 num_workers=0, pin_memory=False):
        if batch_size < 1:
            raise UserError(f"data.batch_size must be at least 1, got {batch_size}")
        self.dataset, self.batch_size, self.drop_last = dataset, batch_size, drop_last
        self.num_workers, self.pin_memory = int(num_workers), bool(pin_memory)
        self.generator = torch.Generator().manual_seed(seed)
        self.sampler = ShardSampler(len(dataset), shuffle, self.generator, rank, world_size)
        self._loader: DataLoader | None = None

    def reseed(self, seed: int) -> None:
        self.generator.manual_seed(seed)
        self._loader = None  # drops the persistent workers; the next epoch starts fresh ones

    def __len__(self) -> int:
        n = len(self.sampler)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def _make(self) -> DataLoader:
        return DataLoader(
            self.dataset, batch_size=self.batch_size, sampler=self.sampler, drop_last=self.drop_last,
            num_workers=self.num_workers, pin_memory=self.pin_memory, persistent_workers=self.num_workers > 0,
            generator=self.generator,
        )

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if self._loader is None:
            self._loader = self._make()
        try:
            yield from self._loader
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

    def __getitem__(self, i: int):
        img = self.read(self.paths[i]) if self.paths is not None else Image.fromarray(self.pixels[i])
        return self.transform(img), int(self.labels[i])
