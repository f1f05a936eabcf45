"""One CIFAR-10 ResNet-20 training epoch per configuration, on a GPU: scripts/gpu_bench.sh runs it.

Configurations: method (fp: the FP network alone; lsq: the LSQ twin, schedule none; prefix:
LSQ with block replacement, the default schedule) x mode (eager; compiled: trainer.compile
per block, inductor; reduce-overhead: the same replayed as CUDA graphs) x precision (fp32,
bf16 autocast). Every configuration builds its models afresh from bqat-train's composed
config (in-memory data on the device, fused SGD, trainer.clip_grad, the finite-loss guard)
and runs the engine's own loop (bqat.engine.train_epoch): first `--warmup-steps` updates
(compiling, CUDA-graph recording; timed as warmup_s), then one whole epoch, timed between
device synchronisations, without evaluation. Before the timed epoch, torch's CUDA sync debug
mode counts the synchronizing calls of 12 and of 4 steps with one log step each:
`syncs_per_step` is their difference per step (0: nothing waits for the GPU between log steps). The FP partner keeps its random initial weights
(partner.epochs=0): step times do not depend on them.

The JSON is rewritten after every configuration, so a run cut short keeps what it measured;
configurations are ordered so that the most telling come first, and none starts once
`--budget-s` seconds have passed (they are listed as skipped).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

METHODS = ("fp", "lsq", "prefix")
MODES = ("eager", "reduce-overhead", "compiled")
PRECISIONS = ("fp32", "bf16")
# Goals of the speed issue on an H100/H200: a block-replacement epoch within 2x the FP
# epoch and within 4 s (fp32 or bf16, any mode).
GOAL_RATIO, GOAL_SECONDS = 2.0, 4.0


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-root", help="data.root: CIFAR-10 (python release or image folders)")
    p.add_argument("--data", default="cifar10", help="data group (digits: no data.root, for a CPU smoke test)")
    p.add_argument("--device", default="cuda")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--precisions", default=",".join(PRECISIONS))
    p.add_argument("--warmup-steps", type=int, default=30, help="untimed updates before the timed epoch (compiling, CUDA-graph recording)")
    p.add_argument("--limit-train-batches", type=int, default=None, help="cut the timed epoch (smoke tests)")
    p.add_argument("--budget-s", type=float, default=450.0, help="start no configuration after this many seconds")
    p.add_argument("--out", default=str(ROOT / "outputs" / "bench" / "gpu_bench.json"))
    p.add_argument("--dry-run", action="store_true", help="print the configurations and the composed overrides, run nothing")
    p.add_argument("overrides", nargs="*", help="more bqat-train overrides (KEY=VALUE), e.g. data.batch_size=256")
    args = p.parse_args(argv)
    args.methods, args.modes, args.precisions = (split(args.methods, METHODS, "--methods"), split(args.modes, MODES, "--modes"),
                                                 split(args.precisions, PRECISIONS, "--precisions"))
    if args.data == "cifar10" and not args.data_root and not any(o.startswith("data.root=") for o in args.overrides):
        p.error("--data-root (or data.root=...) is required for CIFAR-10")
    return args


def split(value: str, known: tuple, flag: str) -> list[str]:
    items = [v for v in value.split(",") if v]
    unknown = sorted(set(items) - set(known))
    if unknown or not items:
        raise SystemExit(f"gpu_bench: {flag} takes a comma-separated subset of {','.join(known)}, got {value!r}")
    return items


def plan(args) -> list[dict]:
    """The configurations in the order they run: eager and CUDA graphs before plain compiled, fp32 first."""
    order = [(mode, precision) for mode in MODES for precision in PRECISIONS]
    order.sort(key=lambda mp: (MODES.index(mp[0]) // 2, PRECISIONS.index(mp[1]), MODES.index(mp[0])))
    return [{"method": method, "mode": mode, "precision": precision} for mode, precision in order
            if mode in args.modes and precision in args.precisions for method in METHODS if method in args.methods]


def overrides(args) -> list[str]:
    base = [f"data={args.data}", "model=resnet20", "bits=2", "quant=lsq", f"trainer.device={args.device}", "trainer.progress=false",
            "partner.epochs=0", "quant.compile=false", "trainer.compile=false"]
    if args.data_root:
        base.append(f"data.root={args.data_root}")
    if args.data != "digits":
        base.append("data.in_memory=true")
    return base + list(args.overrides)


def compose(overrides_: list[str]):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from bqat.config import quote_numeric_groups, validate

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = hydra_compose(config_name="train", overrides=quote_numeric_groups(overrides_))
    validate(cfg)
    return cfg


def build(cfg, data, method: str, mode: str, precision: str, device: torch.device):
    """(task, optimizer, scheduler, accel) for one configuration, as bqat-train builds them."""
    import hydra
    from omegaconf import OmegaConf

    from bqat.accel import Accel, compile_blocks
    from bqat.models import build_model, model_boundaries
    from bqat.quant import keep_scales_positive, twin_from_config
    from bqat.replace import BlockReplacement
    from bqat.task import PartnerTask
    from bqat.train import build_scheduler

    trainer = OmegaConf.merge(cfg.trainer, {"precision": precision})
    accel = Accel(trainer, device)
    if mode != "eager":  # fresh graphs per configuration (inductor's cache still serves repeated ones)
        torch._dynamo.reset()
    torch.manual_seed(cfg.seed)
    fp = build_model(cfg.model, data.num_classes, in_chans=data.input_size[0])
    backend, compile_mode = cfg.trainer.compile_backend, (None if mode == "compiled" else "reduce-overhead")
    if method == "fp":
        model = accel.prepare(fp.train())
        task = PartnerTask(torch.compile(model, backend=backend, mode=compile_mode, dynamic=False) if mode != "eager" else model)
        params = model
    else:
        boundaries = model_boundaries(fp, cfg.model, data.input_size)
        partner = accel.prepare(fp.eval())
        twin = twin_from_config(partner, cfg)  # as train.py
        schedule = OmegaConf.load(ROOT / "conf" / "schedule" / "none.yaml") if method == "lsq" else cfg.schedule
        task = accel.prepare(BlockReplacement(twin, partner, boundaries, schedule, cfg.loss, seed=cfg.seed))
        init_x, _ = accel.to_device(*next(iter(data.train)))
        with torch.no_grad():
            task.twin.train()(init_x)  # quantizer initialisation, before compiling (as bqat-train)
        if mode != "eager":
            compile_blocks(task, backend=backend, mode=compile_mode)
        params = task.twin
    if mode != "eager":
        accel.use_compiled("trainer.compile", compile_mode)
    optimizer = hydra.utils.instantiate(cfg.optim.optimizer)(params)
    if method != "fp":
        keep_scales_positive(optimizer, params)
    scheduler = build_scheduler(optimizer, cfg, len(data.train))
    return task, optimizer, scheduler, accel


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_one(cfg, data, config: dict, device: torch.device, args) -> dict:
    from omegaconf import OmegaConf

    from bqat.engine import FitState, train_epoch
    from bqat.guard import UpdateGuard

    task, optimizer, scheduler, accel = build(cfg, data, config["method"], config["mode"], config["precision"], device)
    guard = UpdateGuard(optimizer, device)
    steps = len(data.train) if args.limit_train_batches is None else min(len(data.train), args.limit_train_batches)
    state = FitState()

    def epoch(limit):
        trainer = OmegaConf.merge(cfg.trainer, {"limit_train_batches": limit})
        sync(device)
        start = time.perf_counter()
        train_epoch(task, data.train, optimizer, scheduler, state, epochs=2, cfg=trainer, device=device, accel=accel,
                    clip_grad=cfg.trainer.get("clip_grad"), guard=guard)
        sync(device)
        return time.perf_counter() - start

    def syncs(limit: int) -> int:
        """Synchronizing CUDA calls in `limit` steps with one log step (the last): torch's sync debug mode."""
        import warnings

        trainer = OmegaConf.merge(cfg.trainer, {"limit_train_batches": limit, "log_every_n_steps": 10**9})
        state.batch = 0
        torch.cuda.set_sync_debug_mode("warn")
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                train_epoch(task, data.train, optimizer, scheduler, state, epochs=2, cfg=trainer, device=device, accel=accel,
                            clip_grad=cfg.trainer.get("clip_grad"), guard=guard)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        return sum("synchronizing" in str(w.message) for w in caught)

    warmup_s = epoch(args.warmup_steps) if args.warmup_steps else 0.0
    # Host syncs per step between log steps (the CUDA-graph step's promise: none), where it can be counted.
    per_step_syncs = (syncs(12) - syncs(4)) / 8 if device.type == "cuda" and steps >= 12 else None
    state.batch = 0
    epoch_s = epoch(steps)
    return {**config, "epoch_s": round(epoch_s, 3), "steps": steps, "step_ms": round(1000 * epoch_s / steps, 3),
            "warmup_steps": args.warmup_steps, "warmup_s": round(warmup_s, 2), "guard": guard.kind,
            "compile_cost_s": accel.compile_cost_s, "syncs_per_step": per_step_syncs}


def summary(results: list[dict]) -> dict:
    """Per (mode, precision): prefix and LSQ epochs over the FP epoch, and the issue's goals."""
    out = {}
    by = {(r["method"], r["mode"], r["precision"]): r.get("epoch_s") for r in results}
    for (method, mode, precision), seconds in by.items():
        key = f"{mode}/{precision}"
        fp = by.get(("fp", mode, precision))
        if method == "fp" or seconds is None or not fp:
            continue
        entry = out.setdefault(key, {})
        entry[f"{method}_over_fp"] = round(seconds / fp, 3)
        if method == "prefix":
            entry["meets_goal"] = seconds <= GOAL_RATIO * fp and seconds <= GOAL_SECONDS
    return out


def environment(device: torch.device) -> dict:
    env = {"torch": torch.__version__, "python": platform.python_version(), "cpus": os.cpu_count(), "device_type": device.type,
           "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None}
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
        env["cuda"] = torch.version.cuda
    return env


def main(argv=None) -> dict:
    args = parse_args(argv)
    configs = plan(args)
    ovr = overrides(args)
    if args.dry_run:
        print(json.dumps({"overrides": ovr, "configurations": configs, "out": args.out}, indent=2))
        return {"overrides": ovr, "configurations": configs}
    start = time.perf_counter()
    from bqat.data import build_data
    from bqat.engine import resolve_device

    cfg = compose(ovr)
    device = resolve_device(cfg.trainer.device)
    data = build_data(cfg.data, seed=cfg.seed, device=device)
    result = {"command": sys.argv if argv is None else ["scripts/gpu_bench.py", *argv], "overrides": ovr,
              "model": "resnet20", "batch": int(cfg.data.batch_size), "bits": 2, "data": cfg.data.name,
              "data_seconds": round(time.perf_counter() - start, 1), "environment": environment(device),
              "goal": {"prefix_over_fp_at_most": GOAL_RATIO, "prefix_epoch_s_at_most": GOAL_SECONDS}, "results": []}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for config in configs:
        elapsed = time.perf_counter() - start
        if elapsed > args.budget_s:
            entry = {**config, "skipped": f"time budget: {elapsed:.0f} s > {args.budget_s:.0f} s"}
        else:
            try:
                entry = run_one(cfg, data, config, device, args)
            except Exception as err:  # noqa: BLE001 - one failing configuration must not lose the others
                first = str(err).strip().splitlines()[0] if str(err).strip() else ""
                entry = {**config, "error": f"{type(err).__name__}: {first[:300]}"}
            if device.type == "cuda":
                torch.cuda.empty_cache()
        result["results"].append(entry)
        result["summary"] = summary(result["results"])
        result["total_seconds"] = round(time.perf_counter() - start, 1)
        out.write_text(json.dumps(result, indent=2) + "\n")
        print(json.dumps(entry), flush=True)
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
