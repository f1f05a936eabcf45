"""ImageNet and any image-folder dataset: `data.root/train/<class>/*` and `data.root/val/<class>/*`
(or `test/`), classes in sorted order, images of any size.

Streamed (default): timm's transforms (`timm.data.create_transform`) at `data.image_size`,
random-resized crop, flip and colour jitter for training (`data.augment` passes more
arguments, e.g. `+data.augment.auto_augment=rand-m9-mstd0.5`), resize and centre crop
(`data.crop_pct`) for validation, in DataLoader workers. With `data.in_memory=true`
(small sets only) every image is resized to `data.image_size` once and training uses
the in-memory padded crop and flip.
"""

from __future__ import annotations

import os
from pathlib import Path

import timm.data
from omegaconf import OmegaConf

from bqat.data.base import Data, register_dataset
from bqat.data.files import check_memory, find_split, list_images, load_split, fixed_shuffle, read_rgb_pil
from bqat.data.loaders import ImageDataset, StreamLoader, memory_loaders, stream_pair
from bqat.errors import UserError


def image_folders(cfg, name: str, seed: int, device) -> Data:
    where = f"{cfg.root or '<folder>'}/train/<class>/*.jpg and {cfg.root or '<folder>'}/val/<class>/*.jpg (or test/)"
    if not cfg.root:
        raise UserError(f"data.root is not set: pass data.root=<folder> holding {where}")
    root = Path(cfg.root)
    if not root.is_dir():
        raise UserError(f"data.root={root} does not exist; expected {where}")
    train = list_images(find_split(root, ("train",), where), where)
    val = fixed_shuffle(list_images(find_split(root, ("val", "test"), where), where))
    if train.classes != val.classes:
        raise UserError(f"class folders of {train.root} ({len(train.classes)}) and {val.root} ({len(val.classes)}) differ; expected {where}")
    if cfg.num_classes is not None and len(train.classes) != cfg.num_classes:
        raise UserError(f"{train.root} has {len(train.classes)} class folders but data.num_classes={cfg.num_classes}; "
                        f"fix the tree or use data=imagefolder")
    size = int(cfg.image_size)
    if cfg.in_memory:
        check_memory(len(train.paths) + len(val.paths), size, f"data.in_memory=true for {root}")
        workers = int(cfg.num_workers) or os.cpu_count() or 1
        xs = [load_split(images, size, workers, cfg.get("cache_dir"), name) for images in (train, val)]
        pad = size // 8 if cfg.get("pad") is None else int(cfg.pad)
        train_loader, val_loader = memory_loaders(xs[0], train.labels, xs[1], val.labels, cfg=cfg, pad=pad, seed=seed,
                                                  device=device)
    else:
        train_loader, val_loader = stream_loaders(train, val, cfg, size, seed, device)
    return Data(train_loader, val_loader, len(train.classes), (3, size, size), name)


def stream_loaders(train, val, cfg, size, seed, device) -> tuple[StreamLoader, StreamLoader]:
    common_tf = dict(mean=tuple(cfg.mean), std=tuple(cfg.std), interpolation=cfg.interpolation)
    extra = OmegaConf.to_container(cfg.augment, resolve=True) if cfg.get("augment") else {}
    train_tf = timm.data.create_transform(size, is_training=True, **common_tf, **extra)
    val_tf = timm.data.create_transform(size, is_training=False, crop_pct=cfg.crop_pct, **common_tf)
    return stream_pair(ImageDataset(train.labels, train_tf, paths=train.paths, read=read_rgb_pil),
                       ImageDataset(val.labels, val_tf, paths=val.paths, read=read_rgb_pil),
                       cfg=cfg, seed=seed, device=device)


@register_dataset("imagenet")
def imagenet(cfg, seed: int = 0, device=None) -> Data:
    """ImageNet-1k (ILSVRC-2012) as train/ and val/ class folders (val sorted into classes)."""
    return image_folders(cfg, "imagenet", seed, device)


@register_dataset("imagefolder")
def imagefolder(cfg, seed: int = 0, device=None) -> Data:
    """Any train/ + val/ (or test/) image-folder tree; the class count comes from the folders."""
    return image_folders(cfg, "imagefolder", seed, device)
