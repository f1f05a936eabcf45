"""Datasets and loaders, one package: `build_data(cfg)` returns a `Data` (train/val loaders).

- `base`: `Data`, the in-memory `TensorLoader`, batched augmentation, the dataset registry
  (`DATASETS`, `@register_dataset`); every other module builds on it, none imports this
  package's `__init__`, so there is no import circle;
- one module per dataset family, each registering its datasets by name: `digits` (the
  embedded default), `cifar` (`cifar10`, `cifar100`), `imagenet` (`imagenet`, `imagefolder`);
- `files` reads image-folder trees and decodes them into uint8 tensors; `loaders` turns
  images into batches, in memory with tensor ops or streamed through DataLoader workers.

Loaders start unsharded; `Data.shard(rank, world_size)` makes them serve one rank of a
data-parallel run (bqat.train does it after the partner is trained on all the data).
"""

from bqat.data import cifar, digits, imagenet  # noqa: F401  (register the datasets)
from bqat.data.base import DATASETS, Data, TensorLoader, random_crop_flip, register_dataset, stratified_split


def build_data(cfg, seed: int = 0, device=None) -> Data:
    """The `data` group's dataset, unsharded; `device` is where in-memory datasets keep their tensors."""
    return DATASETS[cfg.name](cfg, seed=seed, device=device)


__all__ = ["DATASETS", "Data", "TensorLoader", "build_data", "random_crop_flip", "register_dataset", "stratified_split"]
