"""What every dataset module builds on: the `Data` it returns, the in-memory `TensorLoader`,
batched augmentation, a stratified split, and the dataset registry.

Small datasets live in memory as tensors and are batched and augmented with tensor ops
(airbench's habit): an epoch is never bound by image decoding. A dataset is a function
`(cfg, seed, device) -> Data` registered by name with `@register_dataset("name")`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import torch
import torch.nn.functional as F

from bqat.errors import UserError
from bqat.registry import Registry

DATASETS = Registry("data")
register_dataset = DATASETS.register


def host_to(t: torch.Tensor, device) -> torch.Tensor:
    """A small CPU tensor (batch indices, random draws) on `device` without a host sync.

    A plain copy to CUDA from pageable memory waits for the GPU to finish its queued work,
    which would stall the training loop every batch; from pinned memory it is only queued.
    """
    if torch.device(device).type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


def random_crop_flip(x: torch.Tensor, pad: int, flip: bool, generator: torch.Generator) -> torch.Tensor:
    """Per-image random translation by up to `pad` pixels (zero fill), optional h-flip; batched.

    Two gathers (rows, then columns with the flip folded in): about twice as fast on CPU
    as one 4-D advanced index, and any dtype (uint8 included) works.
    """
    b, c, h, w = x.shape
    dev = x.device
    rows = torch.arange(h, device=dev).expand(b, h)
    cols = torch.arange(w, device=dev).expand(b, w)
    if pad:
        rows = rows + host_to(torch.randint(0, 2 * pad + 1, (b,), generator=generator), dev)[:, None]
        cols = cols + host_to(torch.randint(0, 2 * pad + 1, (b,), generator=generator), dev)[:, None]
        x = F.pad(x, (pad, pad, pad, pad))
    if flip:
        mirrored = host_to(torch.rand(b, generator=generator) < 0.5, dev)[:, None]
        cols = torch.where(mirrored, cols.flip(1), cols)
    x = x.gather(2, rows[:, None, :, None].expand(b, c, h, x.shape[3]))
    return x.gather(3, cols[:, None, None, :].expand(b, c, h, w))


class TensorLoader:
    """Batches of (images, labels) from in-memory tensors; shuffled with its own generator.

    `augment(x, generator)` runs on each training batch, then `transform(x)` on every batch
    (e.g. uint8 -> normalised float). The tensors may live on the training device; batches
    are then cut and augmented there.

    `shard(rank, world_size)` makes it serve one rank of a data-parallel run: every rank
    walks the same seeded permutation in *global* batches of batch_size * world_size
    images, augments the whole global batch (same random draws on every rank) and keeps
    its own slice. So a run on N ranks sees exactly the batches, augmentations included,
    of one process with N times the batch size.
    """

    def __init__(self, images, labels, batch_size, shuffle=False, drop_last=False, augment=None, seed=0, transform=None):
        if batch_size < 1:
            raise UserError(f"data.batch_size must be at least 1, got {batch_size}")
        self.images, self.labels = images, labels
        self.batch_size, self.shuffle, self.drop_last = batch_size, shuffle, drop_last
        self.augment, self.transform = augment, transform
        self.generator = torch.Generator().manual_seed(seed)
        self.rank, self.world_size = 0, 1  # unsharded until shard()

    def reseed(self, seed: int) -> None:
        """Restart the shuffle/augmentation stream (so twin training never depends on partner training)."""
        self.generator.manual_seed(seed)

    def shard(self, rank: int, world_size: int) -> None:
        """Serve rank `rank` of `world_size` data-parallel processes from now on."""
        self.rank, self.world_size = rank, world_size

    def _indices(self) -> torch.Tensor:
        n = len(self.labels)
        return torch.randperm(n, generator=self.generator) if self.shuffle else torch.arange(n)

    def __len__(self) -> int:
        n, global_batch = len(self.labels), self.batch_size * self.world_size
        if self.drop_last:
            return n // global_batch
        # A last global batch smaller than world_size leaves some ranks without a batch.
        full, rest = divmod(n, global_batch)
        return full + (1 if rest > self.rank else 0)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        idx = self._indices()
        global_batch = self.batch_size * self.world_size
        for start in range(0, len(idx), global_batch):
            batch = idx[start : start + global_batch]
            if self.drop_last and len(batch) < global_batch:
                break
            batch = host_to(batch, self.images.device)
            x, y = self.images[batch], self.labels[batch]
            if self.augment is not None:
                x = self.augment(x, self.generator)
            if self.world_size > 1:
                x, y = x.tensor_split(self.world_size)[self.rank], y.tensor_split(self.world_size)[self.rank]
                if len(y) == 0:
                    continue
            if self.transform is not None:
                x = self.transform(x)
            yield x, y


def train_drop_last(cfg) -> bool:
    """`data.drop_last` (default true): the training loader drops the last incomplete batch, so
    every step sees the same shapes (one compiled graph, one CUDA graph; no recompile at the
    end of each epoch). Validation never drops a batch."""
    value = cfg.get("drop_last", True)
    if not isinstance(value, bool):
        raise UserError(f"data.drop_last must be true or false, got {value!r}")
    return value


@dataclass
class Data:
    train: TensorLoader  # or any loader with len(), iteration over (x, y) and reseed(seed)
    val: TensorLoader
    num_classes: int
    input_size: tuple[int, int, int]  # (C, H, W)
    name: str

    def shard(self, rank: int, world_size: int) -> None:
        """Serve rank `rank` of `world_size` data-parallel processes from now on."""
        self.train.shard(rank, world_size)
        self.val.shard(rank, world_size)


def stratified_split(labels: torch.Tensor, val_fraction: float, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A fixed train/val split keeping class proportions (seeded independently of the run seed)."""
    g = torch.Generator().manual_seed(seed)
    train_idx, val_idx = [], []
    for c in labels.unique():
        idx = (labels == c).nonzero().flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        n_val = round(len(idx) * val_fraction)
        val_idx.append(idx[:n_val])
        train_idx.append(idx[n_val:])
    return torch.cat(train_idx).sort().values, torch.cat(val_idx).sort().values
