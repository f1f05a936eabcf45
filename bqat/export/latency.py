"""Latency of model_fp32.onnx and model.onnx under onnxruntime on this CPU.

Both graphs run in sessions with the same settings (ORT_ENABLE_ALL, `threads` intra-op
threads, one inter-op thread, the CPU execution provider). Each batch size is timed as
`warmup` runs of each model, then `runs` rounds that time one run of each model in turn
(alternating which goes first), so that a change in machine load hits both alike; the
report gives each model's median in milliseconds. The input is a validation batch
(repeated to the batch size): the integer graph's cost does not depend on the values.
"""

from __future__ import annotations

import os
import statistics
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from bqat.export.kernels import session_options

BATCHES = (1, 32)
DEFAULT_RUNS = 50  # timed rounds per batch size (the median is reported)


def default_threads() -> int:
    """The cores this process may run on (what onnxruntime uses by default)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _batch(x: torch.Tensor, size: int) -> np.ndarray:
    reps = -(-size // len(x))
    return np.ascontiguousarray(x.repeat(reps, *([1] * (x.dim() - 1)))[:size].numpy(), dtype=np.float32)


def measure(models: dict[str, str | Path], x: torch.Tensor, threads: int, runs: int = 50, warmup: int = 5,
            batches: tuple[int, ...] = BATCHES) -> dict[str, dict[str, float]]:
    """{model name: {batch size: median ms}} for each ONNX file in `models`."""
    sessions = {name: ort.InferenceSession(str(path), session_options(threads), providers=["CPUExecutionProvider"])
                for name, path in models.items()}
    result: dict[str, dict[str, float]] = {name: {} for name in models}
    for size in batches:
        feed = {"input": _batch(x, size)}
        for sess in sessions.values():
            for _ in range(warmup):
                sess.run(None, feed)
        times: dict[str, list[float]] = {name: [] for name in sessions}
        order = list(sessions)
        for i in range(runs):
            for name in order if i % 2 == 0 else reversed(order):
                start = time.perf_counter()
                sessions[name].run(None, feed)
                times[name].append(time.perf_counter() - start)
        for name, values in times.items():
            result[name][str(size)] = round(1000 * statistics.median(values), 4)
    return result


def latency_report(fp32: Path, integer: Path, x: torch.Tensor, threads: int, runs: int, warmup: int = 5) -> dict:
    """The report's latency_ms, speedup (fp32 time / integer time) and the settings they were taken with."""
    ms = measure({"fp32": fp32, "integer": integer}, x, threads, runs, warmup)
    return {
        "latency_ms": ms,
        "speedup": {b: round(ms["fp32"][b] / ms["integer"][b], 3) for b in ms["fp32"]},
        "latency_settings": {"threads": threads, "runs": runs, "warmup": warmup, "statistic": "median",
                             "graph_optimization": "ORT_ENABLE_ALL", "onnxruntime": ort.__version__},
    }
