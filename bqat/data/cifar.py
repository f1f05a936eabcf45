"""CIFAR-10 and CIFAR-100 (Krizhevsky 2009), from either of two layouts at `data.root`:

- torchvision's python release: `cifar-10-batches-py/` (`data_batch_1..5`, `test_batch`)
  or `cifar-100-python/` (`train`, `test`), in `data.root` or as `data.root` itself;
  `data.download=true` fetches it when missing;
- an image-folder tree: `data.root/{train,test}/<class>/*.png|jpg` (sorted class names
  give the labels; for CIFAR-10 that is the release's own order).

The test split is the validation set. Training: `data.pad`-pixel padded random crop and
horizontal flip; then normalisation with `data.mean`/`data.std`.
"""

from __future__ import annotations

import logging
import os
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torchvision.transforms as T

from bqat.data.base import Data, register_dataset
from bqat.data.files import FitSize, check_memory, find_split, fit_size, list_images, load_split, fixed_shuffle, read_rgb_pil
from bqat.data.loaders import ImageDataset, StreamLoader, memory_loaders, stream_pair
from bqat.errors import UserError

log = logging.getLogger("bqat")


@dataclass(frozen=True)
class Release:
    """Where one CIFAR variant keeps its python-release files and labels."""

    title: str
    folder: str
    train: tuple[str, ...]
    test: str
    label_key: str
    num_classes: int
    download: str  # torchvision.datasets class that can fetch it


RELEASES = {
    "cifar10": Release("CIFAR-10", "cifar-10-batches-py", tuple(f"data_batch_{i}" for i in range(1, 6)), "test_batch", "labels", 10, "CIFAR10"),
    "cifar100": Release("CIFAR-100", "cifar-100-python", ("train",), "test", "fine_labels", 100, "CIFAR100"),
}


def layout(rel: Release, root) -> str:
    return (f"{root}/{rel.folder}/ (torchvision's python release; data.download=true fetches it) "
            f"or {root}/{{train,test}}/<class>/*.png|jpg with {rel.num_classes} class folders")


class _ArraysOnly(pickle.Unpickler):
    """The python release is a pickle; allow numpy arrays and nothing that could run code."""

    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")}

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        return super().find_class(module, name)


def read_batch(path: Path, rel: Release) -> tuple[np.ndarray, np.ndarray]:
    """One python-release file -> (N, 32, 32, 3) uint8 images, (N,) int64 labels."""
    try:
        with open(path, "rb") as f:
            entry = _ArraysOnly(f, encoding="latin1").load()
        data = np.asarray(entry["data"], dtype=np.uint8)
        labels = np.asarray(entry[rel.label_key], dtype=np.int64)
        if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(labels) != len(data):
            raise ValueError(f"data of shape {data.shape} with {len(labels)} labels, expected (N, 3072) and N labels")
        if labels.min(initial=0) < 0 or labels.max(initial=0) >= rel.num_classes:
            raise ValueError(f"labels outside 0..{rel.num_classes - 1}")
    except (OSError, EOFError, KeyError, TypeError, ValueError, IndexError, pickle.UnpicklingError) as err:
        raise UserError(f"{path} is not a {rel.title} python-release batch ({type(err).__name__}: {err}); "
                        f"re-download it (data.download=true into an empty data.root)") from None
    return np.ascontiguousarray(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)), labels


def find_release(root: Path, rel: Release) -> Path | None:
    for folder in (root / rel.folder, root):
        if (folder / rel.test).is_file():
            return folder
    return None


def read_release(folder: Path, rel: Release) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    missing = [n for n in (*rel.train, rel.test) if not (folder / n).is_file()]
    if missing:
        raise UserError(f"{folder} lacks {', '.join(missing)}; expected {layout(rel, folder.parent)}")
    parts = [read_batch(folder / n, rel) for n in rel.train]
    train = (np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]))
    return {"train": train, "test": read_batch(folder / rel.test, rel)}


def download(root: Path, rel: Release) -> Path:
    """torchvision's downloader (checks the archive's md5); offline it fails in one line."""
    import torchvision.datasets

    log.info(f"data: downloading {rel.title} into {root}")
    try:
        getattr(torchvision.datasets, rel.download)(str(root), train=True, download=True)
    except Exception as err:  # noqa: BLE001 - network and archive errors alike: the user must fetch it
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"cannot download {rel.title} into {root} ({reason}); fetch torchvision's python release elsewhere "
                        f"and unpack it there, or point data.root at an existing copy") from None
    return root / rel.folder


def cifar(cfg, name: str, seed: int, device) -> Data:
    rel = RELEASES[name]
    root, size = Path(cfg.root or ""), int(cfg.image_size)
    folder = locate_release(cfg, rel)
    # Each split is (uint8 NHWC array, labels) from the release, or an ImageList of files.
    splits = read_release(folder, rel) if folder is not None else list_tree(root, rel)
    n = {k: len(v[1]) if isinstance(v, tuple) else len(v.paths) for k, v in splits.items()}
    log.info(f"data: {rel.title} from {folder or root} ({'python release' if folder else 'image folders'}): "
             f"{n['train']} train / {n['test']} test images")
    if cfg.in_memory:
        x, y = memory_tensors(splits, size, cfg, rel, root)
        train, val = memory_loaders(x["train"], y["train"], x["test"], y["test"], cfg=cfg, pad=int(cfg.pad), seed=seed,
                                    device=device)
    else:
        train, val = stream_loaders(splits, cfg, size, seed, device)
    return Data(train, val, rel.num_classes, (3, size, size), name)


def locate_release(cfg, rel: Release) -> Path | None:
    """The python-release folder (downloading it if asked), None for an image-folder tree."""
    if not cfg.root:
        raise UserError(f"data.root is not set: pass data.root=<folder> holding {layout(rel, '<folder>')}")
    root = Path(cfg.root)
    folder = find_release(root, rel) if root.is_dir() else None
    if folder is None and cfg.get("download") and not (root / "train").is_dir():
        folder = download(root, rel)
    if folder is None and not root.is_dir():
        raise UserError(f"data.root={root} does not exist; expected {layout(rel, root)}")
    return folder


def list_tree(root: Path, rel: Release) -> dict:
    """Image-folder layout: the files of train/ and test/ (or val/), checked against the release."""
    where = layout(rel, root)
    dirs = {"train": find_split(root, ("train",), where), "test": find_split(root, ("test", "val"), where)}
    splits = {}
    for split, folder in dirs.items():
        images = list_images(folder, where)
        if len(images.classes) != rel.num_classes:
            raise UserError(f"{images.root} has {len(images.classes)} class folders, {rel.title} has {rel.num_classes}; "
                            f"use data=imagefolder for other datasets")
        splits[split] = fixed_shuffle(images) if split == "test" else images
    if splits["train"].classes != splits["test"].classes:
        raise UserError(f"class folders of {splits['train'].root} and {splits['test'].root} differ; expected {where}")
    return splits


def memory_tensors(splits: dict, size: int, cfg, rel: Release, root: Path) -> tuple[dict, dict]:
    """uint8 NCHW images and labels per split: converted from the release, or decoded (and cached)."""
    if not isinstance(splits["train"], tuple):
        check_memory(sum(len(s.paths) for s in splits.values()), size, f"data.in_memory=true for {root}")
    workers = int(cfg.num_workers) or os.cpu_count() or 1
    x, y = {}, {}
    for split, entry in splits.items():
        if isinstance(entry, tuple):
            x[split], y[split] = fit_size(torch.from_numpy(entry[0]).permute(0, 3, 1, 2).contiguous(), size), torch.from_numpy(entry[1])
        else:
            x[split], y[split] = load_split(entry, size, workers, cfg.get("cache_dir"), rel.title.lower()), entry.labels
    return x, y


def stream_loaders(splits: dict, cfg, size: int, seed, device) -> tuple[StreamLoader, StreamLoader]:
    """torchvision's classic CIFAR pipeline per image, in DataLoader workers."""
    tail = [T.ToTensor(), T.Normalize(cfg.mean, cfg.std)]
    train_tf = T.Compose([FitSize(size), T.RandomCrop(size, padding=int(cfg.pad)), T.RandomHorizontalFlip(), *tail])
    val_tf = T.Compose([FitSize(size), *tail])

    def dataset(split, transform):
        entry = splits[split]
        if isinstance(entry, tuple):  # python release: (N, 32, 32, 3) uint8 arrays
            return ImageDataset(torch.as_tensor(entry[1]), transform, pixels=entry[0])
        return ImageDataset(entry.labels, transform, paths=entry.paths, read=read_rgb_pil)

    return stream_pair(dataset("train", train_tf), dataset("test", val_tf), cfg=cfg, seed=seed, device=device)


@register_dataset("cifar10")
def cifar10(cfg, seed: int = 0, device=None) -> Data:
    """CIFAR-10: 50,000 train / 10,000 test 32x32 images in 10 classes."""
    return cifar(cfg, "cifar10", seed, device)


@register_dataset("cifar100")
def cifar100(cfg, seed: int = 0, device=None) -> Data:
    """CIFAR-100: 50,000 train / 10,000 test 32x32 images in 100 (fine) classes."""
    return cifar(cfg, "cifar100", seed, device)
