"""Step-time benchmark of block replacement: `make bench` -> outputs/bench/bench.json.

Everything is measured in one process on the same inputs, one model pair:

  fp_step_ms             FP network, plain training step (compiled whole with --compile)
  lsq_step_ms            the LSQ twin alone: BlockReplacement with schedule none (plain QAT)
  bwrf_step_ms           schedule prefix: LP backbone + all n-1 mixed paths (the paper)
  bwrf_sampled_step_ms   schedule sampled: one mixed path per step; the expected step time
                         under uniform draws (mean over paths of each path's median)
  fq_ms                  bqat's LSQ activation fake-quant, forward + backward, on a
                         128x64x16x16 tensor (compiled with --compile, as trainer.compile runs it)
  torch_fq_ms            torch._fake_quantize_learnable_per_tensor_affine on the same tensor
  fq_by_quantizer_ms     the same for every quantizer in the registry, built as Q(bits, "act"),
                         with its own compiled core (quant.compile=true) under --compile

A step is zero_grad + forward + loss + backward + SGD update. Cases are interleaved
(each repeat times every case once, in rotating order) and medians are reported, so load
from other processes hits all cases alike; the first calls (compilation) are timed
separately (compile_s). The eager cost rules are checked once with a dispatch-level count
of convolutions (checks: every LP conv runs forward and backward once, the partner's convs
compute no weight gradient).
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from rich.console import Console
from rich.table import Table
from torch.utils._python_dispatch import TorchDispatchMode

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import bqat.models  # noqa: E402,F401  (registers the CIFAR ResNets with timm)
from bqat.accel import Accel, compile_blocks  # noqa: E402
from bqat.models import default_boundaries  # noqa: E402
from bqat.quant import QUANTIZERS, make_twin  # noqa: E402
from bqat.replace import BlockReplacement, build_schedule  # noqa: E402

# Done-when targets of the speed issue, in FP-step units (so a slow baseline cannot flatter).
TARGETS = {"lsq_over_fp": 1.3, "bwrf_overhead_over_fp": 1.5, "bwrf_sampled_overhead_over_fp": 0.8, "fq_over_torch_fq": 0.25}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="resnet18")
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--bits", type=int, default=2, help="W and A bits of the twin (first/last layer at 8)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--repeats", type=int, default=15, help="timed samples per case")
    p.add_argument("--warmup", type=int, default=3, help="untimed calls per case after the first (compiling) one")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True, help="torch.compile as trainer.compile=true does")
    p.add_argument("--backend", default="inductor")
    p.add_argument("--eager", action=argparse.BooleanOptionalAction, default=True, help="also time the eager FP and LSQ steps")
    p.add_argument("--whole-twin", action="store_true", help="also time the LSQ twin compiled as one graph")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--fq-shape", default="128,64,16,16")
    p.add_argument("--out", default=str(ROOT / "outputs" / "bench" / "bench.json"))
    return p.parse_args(argv)


class ConvCount(TorchDispatchMode):
    """Counts convolution forwards and backwards, and which backwards compute a weight gradient."""

    def __init__(self):
        super().__init__()
        self.forward = self.backward_weight = self.backward_input_only = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten.convolution.default:
            self.forward += 1
        elif func is torch.ops.aten.convolution_backward.default:
            mask = args[-1]
            self.backward_weight += bool(mask[1])
            self.backward_input_only += (not mask[1]) and bool(mask[0])
        return func(*args, **(kwargs or {}))


def count_convs(module) -> int:
    return sum(isinstance(m, torch.nn.Conv2d) for m in module.modules())


def block_convs(blocks) -> list[int]:
    return [sum(count_convs(b.model.get_submodule(n)) for n in b.names) for b in blocks]


class Bench:
    def __init__(self, args):
        self.args = args
        self.device = torch.device(args.device)
        self.accel = Accel({"precision": args.precision}, self.device)
        torch.manual_seed(0)
        g = torch.Generator().manual_seed(0)
        x = torch.randn(args.batch, 3, args.image_size, args.image_size, generator=g)
        y = torch.randint(0, 10, (args.batch,), generator=g)
        self.x, self.y = self.accel.to_device(x, y)

        fp = timm.create_model(args.model, num_classes=10)
        self.fp = self.accel.prepare(copy.deepcopy(fp).train())
        partner = copy.deepcopy(fp).eval()
        bits = OmegaConf.create({"w": args.bits, "a": args.bits, "first_last": 8})
        twin = make_twin(partner, OmegaConf.create({"name": "lsq", "per_channel": False}), bits)
        loss_cfg = OmegaConf.create({"w_mix": 1.0, "w_mix_decay": "constant", "w_kd": 0.0, "T": 1.0})
        self.hybrid = self.accel.prepare(BlockReplacement(twin, partner, default_boundaries(fp), OmegaConf.create({"name": "prefix"}), loss_cfg))
        with torch.no_grad():
            self.hybrid.twin.train()(self.x)  # initialise the step sizes
        self.hybrid.train()
        self.schedules = {name: build_schedule(OmegaConf.create({"name": name, "pool": "prefix"})) for name in ("none", "prefix", "sampled")}
        self.fp_opt = torch.optim.SGD(self.fp.parameters(), lr=1e-4, momentum=0.9)
        self.twin_opt = torch.optim.SGD(self.hybrid.twin.parameters(), lr=1e-4, momentum=0.9)

        self.eager_runners = self.hybrid.runners
        self.fp_eager = self.fp
        self.fp_run = self.fp
        if args.compile:
            self.fp_run = torch.compile(self.fp, backend=args.backend, dynamic=False)
            compile_blocks(self.hybrid, backend=args.backend)
        self.compiled_runners = self.hybrid.runners
        self.whole_twin = torch.compile(self.hybrid.twin, backend=args.backend, dynamic=False) if args.whole_twin else None
        self.sampled_paths: list[str] = []

        shape = tuple(int(s) for s in args.fq_shape.split(","))
        self.act = torch.randn(shape, generator=g).to(self.device).requires_grad_(True)
        self.grad_out = torch.randn(shape, generator=g).to(self.device)

    # --- training steps ---
    def sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def fp_step(self, model):
        def step():
            with self.accel.autocast():
                loss = F.cross_entropy(model(self.x), self.y)
            self.fp_opt.zero_grad(set_to_none=True)
            loss.backward()
            self.fp_opt.step()
        return step

    def twin_step(self, schedule: str, runners=None, record=False):
        def step():
            self.hybrid.schedule = self.schedules[schedule]
            self.hybrid.runners = runners or self.compiled_runners
            with self.accel.autocast():
                loss, logs = self.hybrid.training_step(self.x, self.y)
            self.twin_opt.zero_grad(set_to_none=True)
            loss.backward()
            self.twin_opt.step()
            if record:
                self.sampled_paths.append(next((k[3:] for k in logs if k.startswith("ce/") and k != "ce/lp"), ""))
        return step

    # --- fake quantization ---
    def quantizer_fq(self, cls, core_compile: bool = False):
        """Forward+backward of one activation quantizer. With --compile: the whole module under
        torch.compile (as inside trainer.compile's block graphs), or with `core_compile` the
        quantizer's own compiled core (quant.compile=true)."""
        q = cls(self.args.bits, "act", compile=core_compile and self.args.compile).to(self.device)
        with torch.no_grad():
            q(self.act.detach())  # initialise on the tensor it will quantize
        run = torch.compile(q, backend=self.args.backend, dynamic=False) if self.args.compile and not core_compile else q

        def fq():
            self.act.grad = None
            q.zero_grad(set_to_none=True)
            run(self.act).backward(self.grad_out)
        return fq

    def torch_fq(self):
        qmax = 2**self.args.bits - 1
        lsq = QUANTIZERS["lsq"](self.args.bits, "act")
        with torch.no_grad():
            lsq(self.act.detach())
        scale = torch.nn.Parameter(lsq.step.detach().reshape(1).clone().to(self.device))
        zero_point = torch.nn.Parameter(torch.zeros(1, device=self.device))
        grad_factor = 1.0 / (self.act[0].numel() * qmax) ** 0.5

        def fq():
            self.act.grad = scale.grad = zero_point.grad = None
            out = torch._fake_quantize_learnable_per_tensor_affine(self.act, scale, zero_point, 0, qmax, grad_factor)
            out.backward(self.grad_out)
        return fq

    # --- checks ---
    def cost_checks(self) -> dict:
        """Eager prefix step under a dispatch-level count of convolutions."""
        counter = ConvCount()
        with counter:
            self.twin_step("prefix", runners=self.eager_runners)()
        n = self.hybrid.n
        lp = block_convs(self.hybrid.lp_blocks)
        fp = block_convs(self.hybrid.fp_blocks)
        # schedule.batch_paths: each partner block F_2..F_n once, all paths in one batch.
        suffix = sum(fp[1:]) if self.hybrid.batch_paths else sum(sum(fp[k:]) for k in range(1, n))
        return {
            "partner_block_calls_per_step": self.hybrid.partner_block_calls, "expected_partner_block_calls": n - 1,
            "conv_forwards": counter.forward, "expected_conv_forwards": sum(lp) + suffix,
            "conv_backwards_with_weight_grad": counter.backward_weight, "lp_convs": sum(lp),
            "conv_backwards_input_only": counter.backward_input_only, "partner_suffix_convs": suffix,
            "lp_prefix_computed_once": counter.forward == sum(lp) + suffix,
            "no_partner_weight_gradients": counter.backward_weight == sum(lp) and counter.backward_input_only == suffix,
        }


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    console = Console()
    bench = Bench(args)

    cases = {
        "fp": bench.fp_step(bench.fp_run),
        "lsq": bench.twin_step("none"),
        "bwrf": bench.twin_step("prefix"),
        "bwrf_sampled": bench.twin_step("sampled", record=True),
        "fq": bench.quantizer_fq(QUANTIZERS["lsq"]),
        "torch_fq": bench.torch_fq(),
    }
    if args.compile and args.eager:
        cases["fp_eager"] = bench.fp_step(bench.fp_eager)
        cases["lsq_eager"] = bench.twin_step("none", runners=bench.eager_runners)
    if bench.whole_twin is not None:
        cases["lsq_whole_twin"] = whole_twin_step(bench)
    for name, cls in QUANTIZERS.items():  # each quantizer as quant.compile=true runs it
        cases[f"fq/{name}"] = bench.quantizer_fq(cls, core_compile=True)
    fq_inner = 5  # fake-quant calls per timed sample (each is a few ms)

    def timed(name, fn):
        calls = fq_inner if name.startswith(("fq", "torch_fq")) else 1
        bench.sync()
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        bench.sync()
        return (time.perf_counter() - start) / calls

    console.print(f"[bold]bench[/] {args.model} {args.image_size}x{args.image_size} batch {args.batch} W{args.bits}A{args.bits} "
                  f"on {args.device}, {torch.get_num_threads()} threads, compile={args.compile}: warming up (compiling) ...")
    compile_s = {}
    for name, fn in cases.items():
        compile_s[name] = timed(name, fn)
        for _ in range(args.warmup):
            fn()
    n = bench.hybrid.n
    while len(set(bench.sampled_paths)) < n - 1:  # every sampled path compiled before timing
        cases["bwrf_sampled"]()
    bench.sampled_paths.clear()

    samples = {name: [] for name in cases}
    names = list(cases)
    for r in range(args.repeats):
        for name in names[r % len(names):] + names[: r % len(names)]:
            samples[name].append(timed(name, cases[name]))

    ms = {name: 1000 * statistics.median(v) for name, v in samples.items()}
    by_path = {}
    for path, t in zip(bench.sampled_paths, samples["bwrf_sampled"]):
        by_path.setdefault(path, []).append(1000 * t)
    sampled_expected = statistics.mean(statistics.median(v) for v in by_path.values())
    fp = ms["fp"]
    ratios = {
        "lsq_over_fp": ms["lsq"] / fp,
        "bwrf_overhead_over_fp": (ms["bwrf"] - ms["lsq"]) / fp,
        "bwrf_sampled_overhead_over_fp": (sampled_expected - ms["lsq"]) / fp,
        "fq_over_torch_fq": ms["fq"] / ms["torch_fq"],
    }
    # The same ratios within each repeat (its cases ran back to back), then the median over
    # repeats: steadier than ratios of medians when the machine's load drifts.
    rounds = [{k: v[r] for k, v in samples.items()} for r in range(args.repeats)]
    paired = {
        "lsq_over_fp": statistics.median(t["lsq"] / t["fp"] for t in rounds),
        "bwrf_overhead_over_fp": statistics.median((t["bwrf"] - t["lsq"]) / t["fp"] for t in rounds),
        "bwrf_sampled_overhead_over_fp": statistics.median((t["bwrf_sampled"] - t["lsq"]) / t["fp"] for t in rounds),
        "fq_over_torch_fq": statistics.median(t["fq"] / t["torch_fq"] for t in rounds),
    }
    # Issue 3's rule holds for every quantizer: fq/<name> <= 0.25 x torch's fused op.
    fq_names = [k[3:] for k in samples if k.startswith("fq/")]
    fq_paired = {q: statistics.median(t[f"fq/{q}"] / t["torch_fq"] for t in rounds) for q in fq_names}
    if "lsq_whole_twin" in samples:
        paired["whole_twin_over_per_block_lsq"] = statistics.median(t["lsq_whole_twin"] / t["lsq"] for t in rounds)
    result = {
        "fp_step_ms": fp,
        "lsq_step_ms": ms["lsq"],
        "bwrf_step_ms": ms["bwrf"],
        "bwrf_sampled_step_ms": sampled_expected,
        "bwrf_sampled_median_step_ms": ms["bwrf_sampled"],
        "bwrf_sampled_by_path_ms": {p: statistics.median(v) for p, v in sorted(by_path.items())},
        "fq_ms": ms["fq"],
        "torch_fq_ms": ms["torch_fq"],
        "fq_by_quantizer_ms": {k[3:]: v for k, v in ms.items() if k.startswith("fq/")},
        "fq_by_quantizer_over_torch_fq": fq_paired,  # paired, like ratios_paired
        "fq_by_quantizer_meets_target": {q: r <= TARGETS["fq_over_torch_fq"] for q, r in fq_paired.items()},
        "eager": {k: v for k, v in ms.items() if k.endswith("_eager")},
        "whole_twin_lsq_step_ms": ms.get("lsq_whole_twin"),
        "ratios": ratios,
        "ratios_paired": paired,
        "targets": TARGETS,
        "meets_targets": {k: ratios[k] <= TARGETS[k] for k in TARGETS},
        "meets_targets_paired": {k: paired[k] <= TARGETS[k] for k in TARGETS},
        "compile_s": compile_s,
        "checks": bench.cost_checks(),
        "samples_ms": {k: [round(1000 * t, 3) for t in v] for k, v in samples.items()},
        "device": torch.cuda.get_device_name(bench.device) if bench.device.type == "cuda" else cpu_name(),
        "device_type": bench.device.type,
        "threads": torch.get_num_threads(),
        "model": args.model,
        "image_size": args.image_size,
        "batch": args.batch,
        "bits": args.bits,
        "precision": args.precision,
        "compile": args.compile,
        "backend": args.backend if args.compile else None,
        "repeats": args.repeats,
        "fq_shape": [int(s) for s in args.fq_shape.split(",")],
        "torch": torch.__version__,
        "timm": timm.__version__,
        "python": platform.python_version(),
        "blocks": n,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print_table(console, result, ms)
    console.print(f"wrote {out}")
    return result


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def whole_twin_step(bench):
    """The LSQ step with the twin compiled as one graph (to compare with per-block compilation)."""
    def step():
        with bench.accel.autocast():
            loss = F.cross_entropy(bench.whole_twin(bench.x), bench.y)
        bench.twin_opt.zero_grad(set_to_none=True)
        loss.backward()
        bench.twin_opt.step()
    return step


def print_table(console, result, ms):
    table = Table(title=f"step times ({result['model']}, batch {result['batch']}, {result['device_type']}, {result['threads']} threads, "
                        f"compile={result['compile']}), medians of {result['repeats']}")
    table.add_column("case")
    table.add_column("ms", justify="right")
    table.add_column("first call s", justify="right")
    for name in ms:
        value = result["bwrf_sampled_step_ms"] if name == "bwrf_sampled" else ms[name]
        table.add_row(name, f"{value:.2f}", f"{result['compile_s'][name]:.1f}")
    console.print(table)
    ratios = Table(title="ratios (FP-step units): of the medians, and median of per-repeat ratios")
    for col in ("ratio", "of medians", "paired", "target"):
        ratios.add_column(col, justify="right" if col != "ratio" else "left")

    def mark(value, ok):
        return f"[green]{value:.3f}[/]" if ok else f"[red]{value:.3f}[/]"

    for k, v in result["ratios"].items():
        ratios.add_row(k, mark(v, result["meets_targets"][k]), mark(result["ratios_paired"][k], result["meets_targets_paired"][k]),
                       f"<= {result['targets'][k]}")
    for q, r in result["fq_by_quantizer_over_torch_fq"].items():
        ratios.add_row(f"fq/{q} over torch_fq", "", mark(r, result["fq_by_quantizer_meets_target"][q]), f"<= {result['targets']['fq_over_torch_fq']}")
    console.print(ratios)
    if "whole_twin_over_per_block_lsq" in result["ratios_paired"]:
        console.print(f"LSQ step, twin compiled whole / per block: {result['ratios_paired']['whole_twin_over_per_block_lsq']:.3f}")
    checks = result["checks"]
    console.print(f"eager cost checks: LP prefix computed once: {checks['lp_prefix_computed_once']}, "
                  f"no partner weight gradients: {checks['no_partner_weight_gradients']}")


if __name__ == "__main__":
    main()
