"""Tiny datasets on disk in the layouts bqat reads, made inside a test's tmp_path."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
from PIL import Image

CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def cifar_images(n_per_class: int, num_classes: int = 10, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(N, 32, 32, 3) uint8 random images, class-sorted labels (N = n_per_class * num_classes)."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(num_classes), n_per_class)
    images = rng.integers(0, 256, size=(len(labels), 32, 32, 3), dtype=np.uint8)
    return images, labels


def write_cifar10_python(root: Path, train: tuple, test: tuple) -> Path:
    """torchvision's CIFAR-10 python release: five train batches, one test batch, meta."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)

    def dump(name, images, labels):
        entry = {"batch_label": name, "labels": [int(v) for v in labels],
                 "data": images.transpose(0, 3, 1, 2).reshape(len(images), -1), "filenames": [f"{i}.png" for i in range(len(images))]}
        with open(folder / name, "wb") as f:
            pickle.dump(entry, f, protocol=2)

    images, labels = train
    for i, part in enumerate(np.array_split(np.arange(len(labels)), 5)):
        dump(f"data_batch_{i + 1}", images[part], labels[part])
    dump("test_batch", *test)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": CIFAR10_CLASSES}, f, protocol=2)
    return folder


def write_image_tree(root: Path, split: str, images: np.ndarray, labels: np.ndarray, classes: list[str], ext: str = "png") -> None:
    """root/split/<class>/NNNN.<ext>, files numbered in the order given."""
    for i, (img, label) in enumerate(zip(images, labels)):
        d = root / split / classes[label]
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(d / f"{i:04d}.{ext}", quality=95)
