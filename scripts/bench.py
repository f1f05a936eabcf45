"""Step-time benchmark of block replacement: `make bench` -> outputs/bench/bench.json.

Everything is measured in one process on the same inputs (random images, one batch), one
model pair (default: the CIFAR ResNet-20 of the paper's CIFAR-10 table):

  fp_step_ms             FP network, plain training step (compiled whole with --compile)
  lsq_step_ms            the LSQ twin alone: BlockReplacement with schedule none (plain QAT)
  bwrf_step_ms           schedule prefix, every mixed path through its own FP suffix
                         (schedule.batch_paths=false where the option exists)
  bwrf_batched_step_ms   schedule prefix with schedule.batch_paths=true: the inputs entering
                         one partner block go through it as one batch (null where the
                         option does not exist yet)
  bwrf_sampled_step_ms   schedule sampled: one mixed path per step; the expected step time
                         under uniform draws (mean over paths of each path's median)
  fq_ms                  bqat's LSQ activation fake-quant, forward + backward, on a
                         128x64x16x16 tensor (compiled with --compile, as trainer.compile runs it)
  torch_fq_ms            torch._fake_quantize_learnable_per_tensor_affine on the same tensor
  fq_by_quantizer_ms     the same for every quantizer in the registry, built as Q(bits, "act"),
                         with its own compiled core (quant.compile=true) under --compile
  default                the steps exactly as bqat-train runs them: its composed config
                         (data=cifar10 + this bench's model, bits, batch and device +
                         --train-overrides) with the auto rules applied to the run's planned
                         updates (trainer.compile, quant.compile), the configured optimizer
                         (fused SGD), trainer.clip_grad and the finite-loss guard, through
                         bqat.engine.train_step: fp / lsq / bwrf step times, and guard_ms, what
                         the guard costs (the LSQ step with it minus without it, paired)
  aten_ops_per_step      operators dispatched in one eager step (TorchDispatchMode) of FP,
                         LSQ, prefix (and batched prefix): a device-independent proxy of the
                         kernel launches that bound small CNNs on a GPU
  partner_block_calls_per_step   partner-block calls of one prefix (and batched) step
  compile_break_even_steps   compile seconds / seconds saved per step, for quant.compile
                         (LSQ step with compiled quantizer cores against eager) and
                         trainer.compile (prefix step, blocks compiled against eager): the
                         numbers bqat.accel.AUTO_MIN_STEPS should rest on (use --cold-cache)

A step is zero_grad + forward + loss + backward + optimizer update (fused SGD, momentum
0.9, as bqat-train's default). Cases are interleaved (each repeat times every case once,
in rotating order) and medians are reported; ratios are also taken within each repeat
and their median reported (`ratios_paired`), which load drifting over the run cannot
bend. The first calls (compilation) are timed separately (compile_s). The eager cost rules
are checked once with a dispatch-level count of convolutions (checks: every LP conv runs
forward and backward once, the partner's convs compute no weight gradient).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import tempfile
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
from bqat.engine import clip_gradients, train_step  # noqa: E402
from bqat.guard import UpdateGuard  # noqa: E402
from bqat.models import default_boundaries  # noqa: E402
from bqat.quant import QUANTIZERS, Quantizer, keep_scales_positive, make_twin, twin_from_config  # noqa: E402
from bqat.replace import BlockReplacement  # noqa: E402

# Done-when targets of the speed issues, in FP-step units (so a slow baseline cannot flatter).
TARGETS = {"lsq_over_fp": 1.3, "bwrf_overhead_over_fp": 1.5, "bwrf_sampled_overhead_over_fp": 0.8, "fq_over_torch_fq": 0.25,
           "default_lsq_over_fp": 1.3, "bwrf_batched_overhead_over_fp": 0.5, "default_bwrf_overhead_over_fp": 0.5}
# Aten operators per prefix step over the LSQ step's (batched prefix where it exists).
OPS_TARGET = 1.1
# Training-set sizes of the built-in datasets (the default case's planned updates); others: --train-images.
TRAIN_IMAGES = {"cifar10": 50_000, "cifar100": 50_000, "imagenet": 1_281_167}
SCHEDULE_CONF = ROOT / "conf" / "schedule"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="resnet20")
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--bits", type=int, default=2, help="W and A bits of the twin (first/last layer at 8)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--repeats", type=int, default=15, help="timed samples per case")
    p.add_argument("--warmup", type=int, default=3, help="untimed calls per case after the first (compiling) one")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True, help="torch.compile as trainer.compile=true does")
    p.add_argument("--backend", default="inductor")
    p.add_argument("--eager", action=argparse.BooleanOptionalAction, default=True, help="also time the eager FP, LSQ and prefix steps")
    p.add_argument("--whole-twin", action="store_true", help="also time the LSQ twin compiled as one graph")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--fq-shape", default="128,64,16,16")
    p.add_argument("--default", action=argparse.BooleanOptionalAction, default=True,
                   help="time the default case (bqat-train's composed config and auto rules)")
    p.add_argument("--train-overrides", nargs="*", default=[], metavar="KEY=VALUE",
                   help="more bqat-train overrides for the default case, e.g. trainer.epochs=300")
    p.add_argument("--train-images", type=int, default=None, help="training-set size for the default case's planned updates "
                   "(known for cifar10/cifar100/imagenet/digits)")
    p.add_argument("--cold-cache", action="store_true", help="compile into a fresh inductor cache (compile costs as a first run pays them)")
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


class OpCount(TorchDispatchMode):
    """Counts every aten operator dispatched (about one kernel launch each on a GPU)."""

    def __init__(self):
        super().__init__()
        self.ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops += 1
        return func(*args, **(kwargs or {}))


def count_ops(fn) -> int:
    counter = OpCount()
    with counter:
        fn()
    return counter.ops


def count_convs(module) -> int:
    return sum(isinstance(m, torch.nn.Conv2d) for m in module.modules())


def block_convs(blocks) -> list[int]:
    return [sum(count_convs(b.model.get_submodule(n)) for n in b.names) for b in blocks]


def schedule_cfg(name: str, **keys):
    return OmegaConf.merge(OmegaConf.load(SCHEDULE_CONF / f"{name}.yaml"), keys)


def compose_train_cfg(overrides: list[str]):
    """conf/train.yaml composed with `overrides`, as bqat-train composes it."""
    from hydra import compose, initialize_config_dir

    from bqat.config import quote_numeric_groups, validate

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="train", overrides=quote_numeric_groups(overrides))
    validate(cfg)
    return cfg


def planned_updates(cfg, train_images: int | None) -> int:
    """Optimizer updates of the whole run, as bqat-train counts them for the auto rules."""
    n = train_images or TRAIN_IMAGES.get(cfg.data.name)
    if n is None and cfg.data.name == "digits":
        from bqat.data import build_data

        n = len(build_data(cfg.data).train.labels)
    if n is None:
        raise SystemExit(f"bench: --train-images N is needed for data={cfg.data.name} (its training-set size)")
    batch = int(cfg.data.batch_size)
    per_epoch = n // batch if cfg.data.get("drop_last", True) else -(-n // batch)
    if cfg.trainer.limit_train_batches is not None:
        per_epoch = min(per_epoch, int(cfg.trainer.limit_train_batches))
    return per_epoch * int(cfg.trainer.epochs)


def is_path(name: str, n: int) -> bool:
    return len(name) == n and set(name) <= {"q", "f"} and name != "q" * n


def set_core_compile(model, on: bool) -> None:
    for m in model.modules():
        if isinstance(m, Quantizer):
            m.use_compile = on


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

        # bqat-train's composed config: its loss keys for every case, everything for the default case.
        self.cfg = compose_train_cfg(["data=cifar10", f"model={args.model}", f"bits={args.bits}", f"data.batch_size={args.batch}",
                                      f"data.image_size={args.image_size}", f"trainer.device={args.device}", *args.train_overrides])
        fp = timm.create_model(args.model, num_classes=10)
        self.fp_model = fp
        self.fp = self.accel.prepare(copy.deepcopy(fp).train())
        self.partner = self.accel.prepare(copy.deepcopy(fp).eval())
        self.boundaries = default_boundaries(fp)
        bits = OmegaConf.create({"w": args.bits, "a": args.bits, "first_last": 8})
        self.twin = self.accel.prepare(make_twin(self.partner, OmegaConf.create({"name": "lsq", "per_channel": False, "compile": False}), bits))
        with torch.no_grad():
            self.twin.train()(self.x)  # initialise the step sizes
        self.fp_opt = torch.optim.SGD(self.fp.parameters(), lr=1e-4, momentum=0.9, fused=True)
        self.twin_opt = torch.optim.SGD(self.twin.parameters(), lr=1e-4, momentum=0.9, fused=True)

        # schedule.batch_paths (batched partner suffixes) where this tree has it: a BlockReplacement then says so.
        self.batched = hasattr(self.hybrid(schedule_cfg("prefix")), "batch_paths")
        prefix = {"batch_paths": False} if self.batched else {}
        self.hybrids = {
            "none": self.hybrid(schedule_cfg("none")),
            "prefix": self.hybrid(schedule_cfg("prefix", **prefix)),
            "sampled": self.hybrid(schedule_cfg("sampled", pool="prefix")),
        }
        if self.batched:
            self.hybrids["batched"] = self.hybrid(schedule_cfg("prefix", batch_paths=True))
        self.n = self.hybrids["none"].n
        self.eager_runners = self.hybrids["none"].runners
        self.fp_eager = self.fp
        self.fp_run = self.fp
        self.compiled_runners = self.eager_runners
        if args.compile:
            self.fp_run = torch.compile(self.fp, backend=args.backend, dynamic=False)
            compile_blocks(self.hybrids["none"], backend=args.backend)  # every hybrid shares these graphs
            self.compiled_runners = self.hybrids["none"].runners
        self.whole_twin = torch.compile(self.twin, backend=args.backend, dynamic=False) if args.whole_twin else None
        self.sampled_paths: list[str] = []

        shape = tuple(int(s) for s in args.fq_shape.split(","))
        self.act = torch.randn(shape, generator=g).to(self.device).requires_grad_(True)
        self.grad_out = torch.randn(shape, generator=g).to(self.device)

    def hybrid(self, sched) -> BlockReplacement:
        """A BlockReplacement over the shared twin and partner (so every case trains the same modules)."""
        return BlockReplacement(self.twin, self.partner, self.boundaries, sched, self.cfg.loss).train()

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

    def twin_step(self, schedule: str, runners=None, record=False, core_compile=False):
        hybrid = self.hybrids[schedule]

        def step():
            hybrid.runners = runners or self.compiled_runners
            if core_compile:
                set_core_compile(self.twin, True)
            with self.accel.autocast():
                loss, logs = hybrid.training_step(self.x, self.y)
            self.twin_opt.zero_grad(set_to_none=True)
            loss.backward()
            self.twin_opt.step()
            if core_compile:
                set_core_compile(self.twin, False)
            if record:
                self.sampled_paths.append(next((k[3:] for k in logs if k.startswith("ce/") and is_path(k[3:], self.n)), ""))
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
    def partner_block_calls(self, schedule: str) -> int:
        """Partner-block calls of one eager step of `schedule` (every call goes through hybrid.runners['f'])."""
        hybrid, calls = self.hybrids[schedule], [0]

        def counted(block):
            def run(*a, **k):
                calls[0] += 1
                return block(*a, **k)
            return run

        self.twin_step(schedule, runners={"q": self.eager_runners["q"], "f": [counted(b) for b in self.eager_runners["f"]]})()
        hybrid.runners = self.eager_runners
        own = getattr(hybrid, "partner_block_calls", None)  # BlockReplacement's own count, where it keeps one
        if own is not None and own != calls[0]:
            raise RuntimeError(f"partner-block calls: BlockReplacement counted {own}, its runners were called {calls[0]} times")
        return calls[0]

    def aten_ops(self) -> dict:
        """Aten operators of one eager step per case (TorchDispatchMode), and of the finite-loss guard."""
        ops = {"fp": count_ops(self.fp_step(self.fp_eager)), "lsq": count_ops(self.twin_step("none", runners=self.eager_runners)),
               "bwrf": count_ops(self.twin_step("prefix", runners=self.eager_runners))}
        if self.batched:
            ops["bwrf_batched"] = count_ops(self.twin_step("batched", runners=self.eager_runners))
        # The guard's own operators: the engine's step with the guard minus the same step without.
        hybrid, guard = self.hybrids["none"], UpdateGuard(self.twin_opt, self.device)
        hybrid.runners = self.eager_runners
        guarded = count_ops(lambda: train_step(hybrid, self.x, self.y, guard, step=1, epoch=1, accel=self.accel, clip_grad=5.0))
        ops["guard"] = guarded - count_ops(lambda: unguarded_step(hybrid, self.x, self.y, self.twin_opt, self.accel, 5.0))
        guard.check()
        return ops

    def cost_checks(self) -> dict:
        """Eager prefix steps under a dispatch-level count of convolutions."""
        n = self.n
        lp = block_convs(self.hybrids["none"].lp_blocks)
        fp = block_convs(self.hybrids["none"].fp_blocks)
        suffix = sum(sum(fp[k:]) for k in range(1, n))
        # Distillation from the partner (loss.w_kd > 0, the default) adds its full forward for
        # z_0, under no_grad: forward convolutions only, no backward.
        z0 = sum(fp) if self.cfg.loss.w_kd > 0 else 0
        counter = ConvCount()
        with counter:
            self.twin_step("prefix", runners=self.eager_runners)()
        checks = {
            "conv_forwards": counter.forward, "expected_conv_forwards": sum(lp) + suffix + z0, "partner_kd_convs": z0,
            "conv_backwards_with_weight_grad": counter.backward_weight, "lp_convs": sum(lp),
            "conv_backwards_input_only": counter.backward_input_only, "partner_suffix_convs": suffix,
            "lp_prefix_computed_once": counter.forward == sum(lp) + suffix + z0,
            "no_partner_weight_gradients": counter.backward_weight == sum(lp) and counter.backward_input_only == suffix,
        }
        if self.batched:  # every partner block F_2..F_n once, on the concatenated inputs
            counter = ConvCount()
            with counter:
                self.twin_step("batched", runners=self.eager_runners)()
            checks["batched_conv_forwards"] = counter.forward
            checks["batched_each_partner_block_once"] = counter.forward == sum(lp) + sum(fp[1:]) + z0
            checks["batched_no_partner_weight_gradients"] = counter.backward_weight == sum(lp) and counter.backward_input_only == sum(fp[1:])
        return checks


def expected_partner_calls(bench, n: int) -> dict:
    """Partner-block calls per step: the mixed paths' suffixes, n(n-1)/2 unbatched and n-1
    batched, plus, when the objective distils from the partner (loss.w_kd > 0), the n blocks of
    its own forward for z_0, which batching joins into the suffix calls only where
    BlockReplacement joins the FP path (on CUDA by default: then n calls in all)."""
    if not bench.cfg.loss.w_kd > 0:
        return {"bwrf": n * (n - 1) // 2, "bwrf_batched": n - 1}
    hybrid = bench.hybrids["batched"] if bench.batched else None
    joined = hybrid is not None and hybrid.joins_fp_path(bench.x)
    return {"bwrf": n * (n - 1) // 2 + n, "bwrf_batched": n if joined else n - 1 + n}


def unguarded_step(task, x, y, optimizer, accel, clip_grad):
    """The engine's step without the finite-loss guard (to measure what the guard costs)."""
    accel.step_begin()
    with accel.autocast():
        loss, _ = task.training_step(x, y)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    clip_gradients(optimizer, clip_grad)
    optimizer.step()


class DefaultCase:
    """The FP, LSQ and prefix steps exactly as bqat-train runs them with its composed config."""

    def __init__(self, bench: Bench, args):
        import hydra

        from bqat.task import PartnerTask
        from bqat.train import choose_compile

        cfg, device = bench.cfg, bench.device
        self.planned = planned_updates(cfg, args.train_images)
        setting, backend, mode = (cfg.trainer.compile, cfg.trainer.compile_backend, cfg.trainer.get("compile_mode"))
        mode = None if mode in (None, "default") else str(mode)
        self.compile, self.quant_compile, quant_cfg = choose_compile(cfg, setting, backend, self.planned, device)
        self.accel = Accel(cfg.trainer, device)
        self.clip = cfg.trainer.get("clip_grad")
        self.log_every = max(1, int(cfg.trainer.log_every_n_steps))
        x, y = self.accel.to_device(bench.x, bench.y)
        self.x, self.y = x, y

        fp = self.accel.prepare(copy.deepcopy(bench.fp_model).train())
        partner = self.accel.prepare(copy.deepcopy(bench.fp_model).eval())
        twin = self.accel.prepare(twin_from_config(partner, cfg, quant_cfg))  # as train.py
        with torch.no_grad():
            twin.train()(x)
        self.lsq = self.accel.prepare(BlockReplacement(twin, partner, bench.boundaries, schedule_cfg("none"), cfg.loss)).train()
        self.bwrf = self.accel.prepare(BlockReplacement(twin, partner, bench.boundaries, cfg.schedule, cfg.loss)).train()
        self.fp_task = PartnerTask(torch.compile(fp, backend=backend, mode=mode, dynamic=False) if self.compile else fp)
        if self.compile:
            compile_blocks(self.lsq, backend=backend, mode=mode)
            self.bwrf.runners = self.lsq.runners
            self.accel.use_compiled("trainer.compile", mode)
        factory = hydra.utils.instantiate(cfg.optim.optimizer)
        self.fp_opt, self.twin_opt = factory(fp), factory(twin)
        keep_scales_positive(self.twin_opt, twin)
        self.guards = {"fp": UpdateGuard(self.fp_opt, device), "lsq": UpdateGuard(self.twin_opt, device), "bwrf": UpdateGuard(self.twin_opt, device)}
        self.steps = 0

    def step(self, name: str):
        task = {"fp": self.fp_task, "lsq": self.lsq, "bwrf": self.bwrf}[name]
        guard = self.guards[name]

        def run():
            self.steps += 1
            train_step(task, self.x, self.y, guard, step=self.steps, epoch=1, accel=self.accel, clip_grad=self.clip)
            if self.steps % self.log_every == 0:  # the engine reads the guard back at log steps
                guard.check()
        return run

    def unguarded(self):
        def run():
            unguarded_step(self.lsq, self.x, self.y, self.twin_opt, self.accel, self.clip)
        return run

    def describe(self) -> dict:
        return {"planned_updates": self.planned, "compile": self.compile, "quant_compile": self.quant_compile,
                "optimizer": type(self.twin_opt).__name__, "guard": self.guards["lsq"].kind, "clip_grad": self.clip,
                "schedule": OmegaConf.to_container(self.bwrf.schedule.cfg) if self.bwrf.schedule.cfg is not None else None}


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.cold_cache:  # before anything compiles: inductor reads its cache folder from here
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="bqat-bench-inductor-")
        os.environ["TRITON_CACHE_DIR"] = os.path.join(os.environ["TORCHINDUCTOR_CACHE_DIR"], "triton")
    if args.threads:
        torch.set_num_threads(args.threads)
    console = Console()
    bench = Bench(args)

    cases = {}
    if args.compile:  # first: the quantizer cores' compile cost lands here, not in the fq cases
        cases["lsq_qcompile"] = bench.twin_step("none", runners=bench.eager_runners, core_compile=True)
    cases |= {
        "fp": bench.fp_step(bench.fp_run),
        "lsq": bench.twin_step("none"),
        "bwrf": bench.twin_step("prefix"),
        "bwrf_sampled": bench.twin_step("sampled", record=True),
        "fq": bench.quantizer_fq(QUANTIZERS["lsq"]),
        "torch_fq": bench.torch_fq(),
    }
    if bench.batched:
        cases["bwrf_batched"] = bench.twin_step("batched")
    if args.compile and args.eager:
        cases["fp_eager"] = bench.fp_step(bench.fp_eager)
        cases["lsq_eager"] = bench.twin_step("none", runners=bench.eager_runners)
        cases["bwrf_eager"] = bench.twin_step("prefix", runners=bench.eager_runners)
    if bench.whole_twin is not None:
        cases["lsq_whole_twin"] = whole_twin_step(bench)
    for name, cls in QUANTIZERS.items():  # each quantizer as quant.compile=true runs it
        cases[f"fq/{name}"] = bench.quantizer_fq(cls, core_compile=True)
    default = DefaultCase(bench, args) if args.default else None
    if default is not None:
        cases |= {"default_fp": default.step("fp"), "default_lsq": default.step("lsq"), "default_bwrf": default.step("bwrf"),
                  "default_lsq_unguarded": default.unguarded()}
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
    n = bench.n
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
    # Ratios of the medians, and the same ratios within each repeat (its cases ran back to
    # back), then the median over repeats: steadier when the machine's load drifts.
    rounds = [{k: v[r] for k, v in samples.items()} for r in range(args.repeats)]
    ratio_rules = {
        "lsq_over_fp": lambda t: t["lsq"] / t["fp"],
        "bwrf_overhead_over_fp": lambda t: (t["bwrf"] - t["lsq"]) / t["fp"],
        "bwrf_sampled_overhead_over_fp": lambda t: (t["bwrf_sampled"] - t["lsq"]) / t["fp"],
        "fq_over_torch_fq": lambda t: t["fq"] / t["torch_fq"],
        "bwrf_batched_overhead_over_fp": (lambda t: (t["bwrf_batched"] - t["lsq"]) / t["fp"]) if bench.batched else None,
        "default_lsq_over_fp": (lambda t: t["default_lsq"] / t["default_fp"]) if default else None,
        "default_bwrf_overhead_over_fp": (lambda t: (t["default_bwrf"] - t["default_lsq"]) / t["default_fp"]) if default else None,
    }
    medians = dict(ms, bwrf_sampled=sampled_expected)
    ratios = {k: rule(medians) if rule else None for k, rule in ratio_rules.items()}
    paired = {k: statistics.median(rule(t) for t in rounds) if rule else None for k, rule in ratio_rules.items()}
    # Issue 3's rule holds for every quantizer: fq/<name> <= 0.25 x torch's fused op.
    fq_names = [k[3:] for k in samples if k.startswith("fq/")]
    fq_paired = {q: statistics.median(t[f"fq/{q}"] / t["torch_fq"] for t in rounds) for q in fq_names}
    if "lsq_whole_twin" in samples:
        paired["whole_twin_over_per_block_lsq"] = statistics.median(t["lsq_whole_twin"] / t["lsq"] for t in rounds)

    ops = bench.aten_ops()
    ops_ratio = {"bwrf_over_lsq": ops["bwrf"] / ops["lsq"], "bwrf_batched_over_lsq": ops["bwrf_batched"] / ops["lsq"] if bench.batched else None}
    calls = {"bwrf": bench.partner_block_calls("prefix"), "bwrf_batched": bench.partner_block_calls("batched") if bench.batched else None}
    result = {
        "fp_step_ms": fp,
        "lsq_step_ms": ms["lsq"],
        "bwrf_step_ms": ms["bwrf"],
        "bwrf_batched_step_ms": ms.get("bwrf_batched"),
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
        "lsq_qcompile_step_ms": ms.get("lsq_qcompile"),
        "default": None if default is None else {
            **default.describe(), "fp_step_ms": ms["default_fp"], "lsq_step_ms": ms["default_lsq"], "bwrf_step_ms": ms["default_bwrf"],
            "lsq_unguarded_step_ms": ms["default_lsq_unguarded"],
            "guard_ms": statistics.median(t["default_lsq"] - t["default_lsq_unguarded"] for t in rounds) * 1000},
        "aten_ops_per_step": ops,
        "aten_ops_ratio": ops_ratio,
        "aten_ops_target": OPS_TARGET,
        "aten_ops_meet_target": (ops_ratio["bwrf_batched_over_lsq"] or ops_ratio["bwrf_over_lsq"]) <= OPS_TARGET,
        "partner_block_calls_per_step": calls,
        "partner_block_calls_expected": expected_partner_calls(bench, n),
        "compile_break_even_steps": break_even(compile_s, ms),
        "ratios": ratios,
        "ratios_paired": paired,
        "targets": TARGETS,
        "meets_targets": {k: None if ratios[k] is None else ratios[k] <= TARGETS[k] for k in TARGETS},
        "meets_targets_paired": {k: None if paired[k] is None else paired[k] <= TARGETS[k] for k in TARGETS},
        "compile_s": compile_s,
        "checks": bench.cost_checks(),
        "samples_ms": {k: [round(1000 * t, 3) for t in v] for k, v in samples.items()},
        "device": torch.cuda.get_device_name(bench.device) if bench.device.type == "cuda" else cpu_name(),
        "device_type": bench.device.type,
        "threads": torch.get_num_threads(),
        "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,  # the machine's load while measuring
        "model": args.model,
        "image_size": args.image_size,
        "batch": args.batch,
        "bits": args.bits,
        "precision": args.precision,
        "compile": args.compile,
        "backend": args.backend if args.compile else None,
        "cold_cache": args.cold_cache,
        "repeats": args.repeats,
        "fq_shape": [int(s) for s in args.fq_shape.split(",")],
        "torch": torch.__version__,
        "timm": timm.__version__,
        "python": platform.python_version(),
        "blocks": n,
        "batch_paths": bench.batched,
    }
    if default is not None:
        result["default"]["overrides"] = ["data=cifar10", f"model={args.model}", f"bits={args.bits}", f"data.batch_size={args.batch}",
                                          f"data.image_size={args.image_size}", f"trainer.device={args.device}", *args.train_overrides]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print_table(console, result, ms)
    console.print(f"wrote {out}")
    return result


def break_even(compile_s: dict, ms: dict) -> dict:
    """Updates after which compiling has paid for itself: extra seconds of the first calls over the
    seconds saved per step. quant: LSQ with compiled quantizer cores vs eager; trainer: the
    prefix step (every block compiled, LP and partner) vs eager. None where not measured or no saving."""
    def rule(compiled: list[str], eager: str, against: str):
        if not all(k in ms for k in (*compiled, eager, against)):
            return None
        extra = sum(compile_s[k] - ms[k] / 1000 for k in compiled)
        saved = (ms[eager] - ms[against]) / 1000
        return round(extra / saved) if saved > 0 else None

    return {"quant": rule(["lsq_qcompile"], "lsq_eager", "lsq_qcompile"),
            "trainer": rule(["lsq", "bwrf"], "bwrf_eager", "bwrf"),
            "compile_s_quant": compile_s.get("lsq_qcompile"),
            "compile_s_trainer": (compile_s["lsq"] + compile_s["bwrf"]) if "lsq_eager" in ms else None}


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
        if value is None:
            return "n/a"
        return f"[green]{value:.3f}[/]" if ok else f"[red]{value:.3f}[/]"

    for k, v in result["ratios"].items():
        ratios.add_row(k, mark(v, result["meets_targets"][k]), mark(result["ratios_paired"][k], result["meets_targets_paired"][k]),
                       f"<= {result['targets'][k]}")
    for q, r in result["fq_by_quantizer_over_torch_fq"].items():
        ratios.add_row(f"fq/{q} over torch_fq", "", mark(r, result["fq_by_quantizer_meets_target"][q]), f"<= {result['targets']['fq_over_torch_fq']}")
    console.print(ratios)
    if "whole_twin_over_per_block_lsq" in result["ratios_paired"]:
        console.print(f"LSQ step, twin compiled whole / per block: {result['ratios_paired']['whole_twin_over_per_block_lsq']:.3f}")
    ops, calls = result["aten_ops_per_step"], result["partner_block_calls_per_step"]
    console.print(f"aten ops per eager step: {ops}; prefix / LSQ: {result['aten_ops_ratio']} (target <= {result['aten_ops_target']})")
    console.print(f"partner-block calls per step: {calls} (expected {result['partner_block_calls_expected']})")
    if result["default"] is not None:
        d = result["default"]
        console.print(f"default settings ({d['planned_updates']} planned updates: compile={d['compile']}, quant_compile={d['quant_compile']}, "
                      f"guard {d['guard']}): guard costs {d['guard_ms']:.3f} ms per step")
    console.print(f"compile break-even (updates): {result['compile_break_even_steps']}")
    checks = result["checks"]
    console.print(f"eager cost checks: LP prefix computed once: {checks['lp_prefix_computed_once']}, "
                  f"no partner weight gradients: {checks['no_partner_weight_gradients']}")


if __name__ == "__main__":
    main()
