"""Latency of model_fp32.onnx and model.onnx under onnxruntime on this CPU.

Both graphs run in sessions with the same settings (ORT_ENABLE_ALL, `threads` intra-op
threads, one inter-op thread, the CPU execution provider). Each batch size is timed as
`warmup` runs of each model, then rounds that run each model in turn (alternating which
goes first): untimed runs for at least `SETTLE_S`, then `BLOCK` timed ones, until each has
`runs` timed runs, so that a change in machine load hits both alike. The untimed runs
matter: after a run, onnxruntime's idle worker threads spin for a while waiting for more
work, and on a small machine a session that runs right after another shares the cores with
those spinning threads (on 2 cores, timing the two models strictly one run each in turn
measured both about twice as slow as alone). The report gives each model's median in
milliseconds. The input is a validation batch
(repeated to the batch size): the integer graph's cost does not depend on the values.

`op_profile` says where that time goes: onnxruntime's own profiler (SessionOptions.
enable_profiling) sums each operator type's kernel time over a few runs at the largest
batch, per run, for both graphs, so a deployer sees which float operators remain costly.
"""

from __future__ import annotations

import json
import os
import statistics
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from bqat.export.kernels import session_options

BATCHES = (1, 32)
DEFAULT_RUNS = 50  # timed runs per model and batch size (the median is reported)
BLOCK = 10  # timed runs of one model in a row
SETTLE_S = 0.05  # untimed runs before them, at least this long (the other session's threads stop spinning)


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
        for i in range(-(-runs // BLOCK)):
            for name in order if i % 2 == 0 else reversed(order):
                settle = time.perf_counter() + SETTLE_S
                while True:  # untimed: the other session's threads may still spin
                    sessions[name].run(None, feed)
                    if time.perf_counter() >= settle:
                        break
                for _ in range(min(BLOCK, runs - len(times[name]))):
                    start = time.perf_counter()
                    sessions[name].run(None, feed)
                    times[name].append(time.perf_counter() - start)
        for name, values in times.items():
            result[name][str(size)] = round(1000 * statistics.median(values), 4)
    return result


def op_profile(path: str | Path, x: torch.Tensor, threads: int, size: int = BATCHES[-1], runs: int = 10,
               warmup: int = 3) -> dict[str, float]:
    """{operator type: kernel ms per run} of one ONNX file at batch `size`, largest first, as
    onnxruntime's profiler records it (the optimised graph's operators: FusedConv, QLinearConv...)."""
    options = session_options(threads)
    with tempfile.TemporaryDirectory() as tmp:
        options.enable_profiling = True
        options.profile_file_prefix = str(Path(tmp) / "ort")
        sess = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        feed = {"input": _batch(x, size)}
        for _ in range(warmup + runs):
            sess.run(None, feed)
        events = json.loads(Path(sess.end_profiling()).read_text())
    # Count only the timed runs: node events from the first run after the warm-up on.
    starts = sorted(e["ts"] for e in events if e.get("cat") == "Session" and e.get("name") == "model_run")
    first = starts[warmup] if len(starts) > warmup else 0
    total: Counter = Counter()
    for e in events:
        if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time") and e["ts"] >= first:
            total[e["args"]["op_name"]] += float(e["dur"]) / 1000
    counted = len(starts) - warmup if len(starts) > warmup else warmup + runs
    return {op: round(ms / counted, 4) for op, ms in total.most_common()}


def latency_report(fp32: Path, integer: Path, x: torch.Tensor, threads: int, runs: int, warmup: int = 5) -> dict:
    """The report's latency_ms, speedup (fp32 time / integer time), op_profile_ms (where the time
    goes at the largest batch, per operator type) and the settings they were taken with."""
    ms = measure({"fp32": fp32, "integer": integer}, x, threads, runs, warmup)
    return {
        "latency_ms": ms,
        "op_profile_ms": {name: op_profile(path, x, threads) for name, path in (("fp32", fp32), ("integer", integer))},
        "speedup": {b: round(ms["fp32"][b] / ms["integer"][b], 3) for b in ms["fp32"]},
        "latency_settings": {"threads": threads, "runs": runs, "warmup": warmup, "statistic": "median", "block": BLOCK, "settle_s": SETTLE_S,
                             "graph_optimization": "ORT_ENABLE_ALL", "onnxruntime": ort.__version__},
    }
