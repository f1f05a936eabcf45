"""Image-folder trees on disk: list them, check them, decode them into uint8 tensors.

The layout is torchvision's ImageFolder: `<root>/<split>/<class>/<image>`, classes in
sorted order. Decoding runs in a thread pool (torchvision's decoders release the GIL)
and the result can be cached on disk, so a sweep decodes a dataset once.
"""

from __future__ import annotations

import hashlib
import logging
import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
import torchvision.transforms.v2.functional as TF
from PIL import Image, UnidentifiedImageError

try:  # torchvision's C++ decoders: about twice PIL's speed; deprecated in 0.29 in favour of torchcodec
    from torchvision.io import ImageReadMode, decode_image, read_file
except ImportError:  # a torchvision without them: PIL decodes everything
    decode_image = None

from bqat.engine import atomic_save
from bqat.errors import UserError

log = logging.getLogger("bqat")

CHUNK = 512  # images per decoding task: amortises scheduling, still balances the threads
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


@dataclass
class ImageList:
    """One split of an image-folder tree: file paths, integer labels, class names."""

    root: Path
    paths: list[str]
    labels: torch.Tensor
    classes: list[str]


def find_split(root: Path, names: tuple[str, ...], layout: str) -> Path:
    """The first of `root/<name>` that exists; else one line naming the layout expected."""
    for name in names:
        if (root / name).is_dir():
            return root / name
    raise UserError(f"data.root={root} has no {' or '.join(n + '/' for n in names)} folder; expected {layout}")


def list_images(split_dir: Path, layout: str) -> ImageList:
    """Scan `split_dir/<class>/*` (sorted), refusing empty trees and empty classes."""
    classes = sorted(e.name for e in os.scandir(split_dir) if e.is_dir() and not e.name.startswith("."))
    if not classes:
        raise UserError(f"{split_dir} has no class folders; expected {layout}")
    paths, labels = [], []
    for label, name in enumerate(classes):
        files = sorted(e.name for e in os.scandir(split_dir / name) if e.is_file() and e.name.lower().endswith(IMG_EXTENSIONS))
        if not files:
            raise UserError(f"{split_dir / name} holds no images ({', '.join(IMG_EXTENSIONS)}); expected {layout}")
        paths += [str(split_dir / name / f) for f in files]
        labels += [label] * len(files)
    return ImageList(split_dir, paths, torch.tensor(labels, dtype=torch.long), classes)


def fixed_shuffle(images: ImageList) -> ImageList:
    """The same files in a fixed, seed-independent shuffled order.

    Folder trees list class by class; validation in that order with trainer.limit_val_batches
    would test one class only. A fixed permutation keeps validation deterministic and makes
    every prefix of it a fair sample.
    """
    order = torch.randperm(len(images.paths), generator=torch.Generator().manual_seed(0))
    return ImageList(images.root, [images.paths[i] for i in order.tolist()], images.labels[order], images.classes)


def fit_size(img, size: int):
    """Resize the short side to `size` and centre-crop to a square; a no-op when already size x size.

    Works on PIL images and CHW tensors alike (torchvision.transforms.v2).
    """
    h, w = TF.get_size(img)
    if (h, w) == (size, size):
        return img
    return TF.center_crop(TF.resize(img, size, antialias=True), [size, size])


class FitSize:
    """`fit_size` as a transform (a class, not a lambda, so DataLoader workers can pickle it)."""

    def __init__(self, size: int):
        self.size = size

    def __call__(self, img):
        return fit_size(img, self.size)


def read_rgb_pil(path: str) -> Image.Image:
    """PIL RGB image; an unreadable file is the user's to fix, so say which one."""
    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    except (OSError, UnidentifiedImageError, ValueError) as err:
        raise UserError(f"cannot read image {path} ({err}); replace or remove the file") from None


def read_rgb_tensor(path: str) -> torch.Tensor:
    """uint8 CHW RGB: torchvision's fast decoders, PIL for the formats they lack (bmp, tiff, ...)."""
    if decode_image is not None:
        try:
            return decode_image(read_file(path), mode=ImageReadMode.RGB)
        except RuntimeError:
            pass  # PIL below reads more formats, or names the broken file
    return TF.pil_to_tensor(read_rgb_pil(path))


def decode_images(paths: list[str], size: int, workers: int) -> torch.Tensor:
    """Decode every image into one (N, 3, size, size) uint8 tensor, in parallel chunks."""
    out = torch.empty((len(paths), 3, size, size), dtype=torch.uint8)

    def decode_chunk(start: int) -> None:
        for i in range(start, min(start + CHUNK, len(paths))):
            out[i] = fit_size(read_rgb_tensor(paths[i]), size)

    with warnings.catch_warnings(), ThreadPoolExecutor(max(1, workers)) as pool:
        warnings.filterwarnings("ignore", message=".*image decoding and encoding capabilities of TorchVision", category=DeprecationWarning)
        list(pool.map(decode_chunk, range(0, len(paths), CHUNK)))  # list(): re-raises a chunk's error
    return out


def fingerprint(images: ImageList, size: int) -> str:
    """Changes whenever a file is added, removed, renamed or rewritten (size and mtime)."""
    h = hashlib.sha1(f"{images.root.resolve()}|{size}|{images.classes}".encode())
    for p in images.paths:
        st = os.stat(p)
        h.update(f"{p}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:12]


def load_split(images: ImageList, size: int, workers: int, cache_dir: str | None, name: str) -> torch.Tensor:
    """Decoded uint8 images of one split, from the cache under `cache_dir` when it is current.

    The cache lives in a bqat folder (`data.cache_dir`, default outputs/cache/data), never
    next to the user's data. A stale entry (files changed) simply gets a new name.
    """
    cache = None
    if cache_dir:
        cache = Path(cache_dir) / f"{name}-{images.root.name}-{size}px-{fingerprint(images, size)}.pt"
        if cache.is_file():
            saved = torch.load(cache, map_location="cpu", weights_only=True)
            if saved.shape == (len(images.paths), 3, size, size):
                log.info(f"data: {len(images.paths)} decoded images from {cache}")
                return saved
    log.info(f"data: decoding {len(images.paths)} images of {images.root} at {size}px ({workers} threads)")
    decoded = decode_images(images.paths, size, workers)
    if cache is not None:
        atomic_save(decoded, cache, hint=", or cache decoded images elsewhere (data.cache_dir=<folder>) or not at all (data.cache_dir=null)")
    return decoded


def check_memory(n_images: int, size: int, what: str) -> None:
    """Refuse an in-memory dataset that cannot fit in RAM, before spending time decoding it."""
    need = n_images * 3 * size * size
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return
    if need > 0.7 * total:
        raise UserError(
            f"{what}: {n_images} images at {size}px need {need / 2**30:.1f} GiB as uint8, more than this machine's "
            f"{total / 2**30:.1f} GiB allows; use data.in_memory=false (streamed through DataLoader workers)"
        )
