"""scikit-learn's handwritten digits: the embedded default dataset (no download, no files)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from bqat.data.base import Data, TensorLoader, random_crop_flip, register_dataset, stratified_split, train_drop_last


@register_dataset("digits")
def digits(cfg, seed: int = 0, device=None) -> Data:
    """scikit-learn's 1797 handwritten digits (8x8, 0..16), upsampled to image_size, 3 channels."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = torch.tensor(bunch.images, dtype=torch.float32)[:, None] / 16.0
    images = F.interpolate(images, size=(cfg.image_size, cfg.image_size), mode="bilinear", align_corners=False)
    images = ((images - images.mean()) / images.std()).expand(-1, 3, -1, -1).contiguous()
    labels = torch.tensor(bunch.target, dtype=torch.long)
    tr, va = stratified_split(labels, cfg.val_fraction)
    pad = max(1, cfg.image_size // 16)

    def augment(x, g):
        return random_crop_flip(x, pad, flip=False, generator=g)

    train = TensorLoader(images[tr], labels[tr], cfg.batch_size, shuffle=True, drop_last=train_drop_last(cfg), augment=augment, seed=seed)
    val = TensorLoader(images[va], labels[va], cfg.batch_size)
    return Data(train, val, 10, (3, cfg.image_size, cfg.image_size), "digits")
