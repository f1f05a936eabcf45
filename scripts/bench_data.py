"""Time the data pipeline alone: build the `data` group's loaders, run one training epoch of
batches to the device, no model. Takes the same overrides as bqat-train.

    python scripts/bench_data.py data=cifar10 data.root=../shared/data/cifar10-jpeg data.in_memory=false

Prints one JSON line: build seconds (listing, decoding or the decoded cache), epoch
seconds, images per second.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bqat.config import quote_numeric_groups  # noqa: E402
from bqat.data import build_data  # noqa: E402
from bqat.engine import resolve_device  # noqa: E402


def main(argv: list[str]) -> dict:
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="train", overrides=quote_numeric_groups(argv))
    device = resolve_device(cfg.trainer.device)
    start = time.perf_counter()
    data = build_data(cfg.data, seed=cfg.seed, device=device)
    build = time.perf_counter() - start
    n_images, start = 0, time.perf_counter()
    for x, y in data.train:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        n_images += len(y)
    if device.type == "cuda":
        torch.cuda.synchronize()
    epoch = time.perf_counter() - start
    return {"data": cfg.data.name, "in_memory": bool(cfg.data.get("in_memory")), "device": str(device), "batches": len(data.train),
            "images": n_images, "build_seconds": round(build, 2), "epoch_seconds": round(epoch, 2),
            "images_per_second": round(n_images / epoch, 1), "overrides": argv}


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1:])))
