"""`bqat-sensitivity RUN_DIR`: which blocks of a trained twin cost the most accuracy.

Block replacement holds a per-block signal: the top-1 of the network when block k alone,
or the first k blocks, are low-bit inside the FP partner. For a finished run this module
evaluates, on the run's validation set, with its checkpoint and its partner:

- prefix path k (k = 1..n-1): Q_1..Q_k then F_{k+1}..F_n (the paper's mixed paths; k = n
  is the twin itself, k = 0 the partner);
- single path k (k = 1..n): F_1..F_{k-1}, Q_k, F_{k+1}..F_n, the FP network with only
  block k low-bit;
- raised k (k = 1..n): the twin with every quantizer of block k refined to `--bits` (8),
  the other blocks as trained.

Raising a quantizer to b' bits keeps what training learned: its width becomes b' and a
learned step size s (LSQ, LSQ+, EWGS) becomes s / 2^(b'-b), so every point of the old grid
stays on the new one and each old step is split into 2^(b'-b) steps (the grid keeps its
bottom and reaches less than one old step past its top). PACT's clip alpha, LSQ+'s offset
and DoReFa's fixed ranges are kept as they are; only the number of levels grows. Nothing
is re-initialised or trained, and quantizers already at b' bits or more are left alone.

Each block's cost, in points of top-1, is measured three ways: alone in the FP network
(`single_cost` = FP - single k), after the LP prefix (`prefix_cost` = prefix k-1 - prefix
k) and inside the twin (`raised_gain` = raised k - twin). `cost` is their mean; the blocks
are ranked by it. Writes RUN_DIR/sensitivity.json and RUN_DIR/sensitivity.png, prints a
table and names the costliest blocks, with a `bits.layers` override that spends bits there.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from contextlib import contextmanager
from pathlib import Path

import torch
from omegaconf import OmegaConf
from rich.console import Console
from rich.table import Table
from torch import nn

from bqat.data import build_data
from bqat.engine import load_checkpoint, make_progress, num_batches, resolve_device
from bqat.errors import UserError
from bqat.export.rundir import checkpoint_path
from bqat.models import build_model, model_boundaries
from bqat.partner import load_pretrained, load_state_dict_into, read_weights
from bqat.quant import twin_from_config
from bqat.quant.size import layer_macs, model_size
from bqat.replace import BlockReplacement, prefix_path, single_path
from bqat.resume import fingerprint

JSON_NAME = "sensitivity.json"
PNG_NAME = "sensitivity.png"


# --- the run ------------------------------------------------------------------------------


def read_run(run_dir: Path, which: str) -> tuple[dict, object, Path]:
    """(checkpoint, its resolved config, its path) of a finished bqat-train run."""
    path = checkpoint_path(run_dir, which)
    ckpt = load_checkpoint(path)
    if not isinstance(ckpt, dict) or "twin" not in ckpt or "config" not in ckpt:
        raise UserError(f"{path} is not a bqat twin checkpoint (no 'twin' and 'config' entries); pass a folder bqat-train wrote")
    return ckpt, OmegaConf.create(ckpt["config"]), path


def run_cwd(run_dir: Path) -> Path:
    """The folder bqat-train ran in (Hydra records it in .hydra/hydra.yaml); the current one if unknown."""
    try:
        return Path(OmegaConf.load(run_dir / ".hydra" / "hydra.yaml").hydra.runtime.cwd)
    except Exception:  # noqa: BLE001 - a missing or foreign file: relative paths stay relative to here
        return Path.cwd()


def load_partner(fp: nn.Module, cfg, saved: dict | None, override: str | None, data, run_cwd: Path) -> nn.Module:
    """`fp` filled with the run's partner: the file it names (or `override`), checked against
    the fingerprint the checkpoint recorded. A relative path is read from `run_cwd`, the
    folder bqat-train ran in."""
    source = override or (saved or {}).get("source")
    if not source:
        raise UserError("the checkpoint does not record its partner; pass the partner's weights with --partner FILE")
    if source.startswith("timm:") and override is None:
        load_pretrained(fp, cfg, data.num_classes, data.input_size[0])
    else:
        path = Path(source)
        if not path.is_absolute() and override is None:  # the cache path is relative to where bqat-train ran
            path = run_cwd / path
        if not path.is_file():
            raise UserError(f"the run's partner {path} is missing; restore it or pass the partner's weights with --partner FILE")
        load_state_dict_into(fp, read_weights(path), f"partner {path}")
    expected = (saved or {}).get("fingerprint")
    if expected and fingerprint(fp) != expected:
        raise UserError(f"partner {source} has other weights than the run was trained against (fingerprint {fingerprint(fp)}, "
                        f"expected {expected}); pass the run's partner with --partner FILE")
    return fp.eval()


# --- blocks, quantizers, raising ----------------------------------------------------------


def block_layers(twin: nn.Module, boundaries: list[list[str]]) -> list[list[str]]:
    """Names of the quantized layers of each block; layers outside every block (the head) join the last."""
    quantized = [n for n, m in twin.named_modules() if getattr(m, "weight_quantizer", None) is not None
                 or getattr(m, "input_quantizer", None) is not None]
    layers: list[list[str]] = [[] for _ in boundaries]
    for name in quantized:
        k = next((i for i, names in enumerate(boundaries) if any(name == b or name.startswith(b + ".") for b in names)), len(boundaries) - 1)
        layers[k].append(name)
    return layers


def layer_quantizers(twin: nn.Module, names: list[str]) -> list[nn.Module]:
    return [q for n in names for q in (twin.get_submodule(n).weight_quantizer, twin.get_submodule(n).input_quantizer) if q is not None]


@contextmanager
def raised(quantizers: list[nn.Module], bits: int):
    """The quantizers refined to `bits` inside the block, restored after (see the module docstring)."""
    saved = []
    try:
        for q in quantizers:
            if q.bits >= bits:
                continue
            step = getattr(q, "step", None)
            saved.append((q, q.bits, q.floor, None if step is None else step.detach().clone()))
            factor = 2 ** (bits - q.bits)
            q.bits = bits
            if isinstance(step, nn.Parameter):
                step.data.div_(factor)
                q.floor = q.floor / factor  # the floor (bqat.quant.base) scales with the step it bounds
        yield
    finally:
        with torch.no_grad():
            for q, old_bits, floor, step in saved:
                q.bits, q.floor = old_bits, floor
                if step is not None:
                    q.step.copy_(step)


def block_patterns(twin: nn.Module, boundaries: list[list[str]], layers: list[str], below: int) -> list[str]:
    """bits.layers globs for the layers of one block whose weights or inputs are below `below` bits:
    `<module>.*` where every quantized layer under a block module qualifies, else the layer names."""
    def low(name):
        m = twin.get_submodule(name)
        return any(q is not None and q.bits < below for q in (m.weight_quantizer, m.input_quantizer))

    wanted = [n for n in layers if low(n)]
    patterns, covered = [], set()
    for top in (b for names in boundaries for b in names):
        inside = [n for n in layers if n.startswith(top + ".")]
        if inside and all(n in wanted for n in inside):
            patterns.append(f"{top}.*")
            covered.update(inside)
    return patterns + [n for n in wanted if n not in covered]


def override_line(patterns: list[str], bits: int) -> str:
    body = ", ".join(f'"{p}": {{w: {bits}, a: {bits}}}' for p in patterns)
    return f"'+bits.layers={{{body}}}'"


# --- measuring ----------------------------------------------------------------------------


@torch.no_grad()
def measure(hybrid, loader, quantizers_by_block: list[list[nn.Module]], bits: int, limit: int | None, device, progress: bool) -> dict:
    """Top-1 (percent) of the twin, the partner, every prefix and single path and every raised twin."""
    n = hybrid.n
    lp, fp = "q" * n, "f" * n
    prefixes = [prefix_path(k, n) for k in range(1, n)]
    singles = [single_path(k, n) for k in range(1, n + 1)]
    lp_heads = ["q" * j for j in range(1, n)]  # h_j of the LP backbone, where each raised block starts
    names = ["lp", "fp"] + [f"prefix_{k}" for k in range(1, n)] + [f"single_{k}" for k in range(1, n + 1)] + [f"raised_{k}" for k in range(1, n + 1)]
    correct = dict.fromkeys(names, 0)
    total = 0
    hybrid.eval()
    batches = num_batches(loader, limit)
    with make_progress(progress) as bar_view:
        bar = bar_view.add_task("sensitivity", total=batches, info="")
        for i, (x, y) in enumerate(loader):
            if i >= batches:
                break
            x, y = x.to(device), y.to(device)
            out = hybrid.run_paths(x, [lp, fp, *prefixes, *singles, *lp_heads])
            logits = {"lp": out[lp], "fp": out[fp]}
            logits.update({f"prefix_{k}": out[p] for k, p in enumerate(prefixes, start=1)})
            logits.update({f"single_{k}": out[p] for k, p in enumerate(singles, start=1)})
            for k in range(1, n + 1):
                h = x if k == 1 else out["q" * (k - 1)]
                with raised(quantizers_by_block[k - 1], bits):
                    h = hybrid.lp_blocks[k - 1](h)
                for block in hybrid.lp_blocks[k:]:
                    h = block(h)
                logits[f"raised_{k}"] = h
            for name, z in logits.items():
                correct[name] += int((z.argmax(1) == y).sum())
            total += len(y)
            bar_view.advance(bar)
    if total == 0:
        raise UserError("the validation set is empty; nothing to evaluate")
    return {name: 100.0 * c / total for name, c in correct.items()} | {"val_images": total}


def summarise(top1: dict, layers: list[list[str]], boundaries, twin: nn.Module) -> list[dict]:
    """One entry per block: its modules, size, the three top-1s and the three costs."""
    n = len(boundaries)
    chain = [top1["fp"]] + [top1[f"prefix_{k}"] for k in range(1, n)] + [top1["lp"]]  # LP prefix of k blocks
    blocks = []
    for k in range(1, n + 1):
        params = sum(twin.get_submodule(name).weight.numel() for name in layers[k - 1])
        single_cost = top1["fp"] - top1[f"single_{k}"]
        prefix_cost = chain[k - 1] - chain[k]
        raised_gain = top1[f"raised_{k}"] - top1["lp"]
        blocks.append({
            "block": k,
            "modules": list(boundaries[k - 1]) + (["(head)"] if k == n else []),
            "quantized_layers": len(layers[k - 1]),
            "weight_params": params,
            "prefix_top1": top1[f"prefix_{k}"] if k < n else top1["lp"],
            "single_top1": top1[f"single_{k}"],
            "raised_top1": top1[f"raised_{k}"],
            "single_cost": single_cost,
            "prefix_cost": prefix_cost,
            "raised_gain": raised_gain,
            "cost": statistics.fmean([single_cost, prefix_cost, raised_gain]),
        })
    return blocks


# --- writing ------------------------------------------------------------------------------


def print_table(result: dict, console: Console) -> None:
    table = Table(title=f"{result['model']} {result['quant']} sensitivity, val top-1 % ({result['val_images']} images): "
                        f"FP {result['fp_top1']:.2f}, twin {result['lp_top1']:.2f}")
    for column in ("block", "modules", "weights", "prefix Q1..Qk", "single Qk", f"Qk at {result['raise_bits']} bits", "cost"):
        table.add_column(column, justify="left" if column == "modules" else "right")
    for b in result["blocks"]:
        table.add_row(str(b["block"]), " ".join(b["modules"]), f"{b['weight_params']:,}", f"{b['prefix_top1']:.2f}",
                      f"{b['single_top1']:.2f}", f"{b['raised_top1']:.2f}", f"{b['cost']:+.2f}")
    console.print(table)
    top = result["blocks"][result["ranking"][0] - 1]
    order = ", ".join(str(k) for k in result["ranking"])
    if top["cost"] <= 0:
        console.print(f"no block costs top-1 on these {result['val_images']} images (every cost <= 0); ranking: {order}")
        console.print(f"written: {result['json']}, {result['png']}")
        return
    console.print(f"costliest block: {top['block']} ({' '.join(top['modules'])}), {top['cost']:.2f} points "
                  f"(single {top['single_cost']:+.2f}, prefix {top['prefix_cost']:+.2f}, at {result['raise_bits']} bits "
                  f"{top['raised_gain']:+.2f}); ranking: {order}")
    if result["suggestion"]:
        console.print(f"to spend bits there: {result['suggestion']}")
    else:
        console.print(f"every quantizer of block {top['block']} is at {result['suggest_bits']} bits or more already")
    console.print(f"written: {result['json']}, {result['png']}")


def plot(result: dict, path: Path) -> None:
    """Grouped bars per block: single path, prefix path and raised twin top-1, with the FP and twin lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    blocks = result["blocks"]
    xs = range(len(blocks))
    width = 0.27
    fig, ax = plt.subplots(figsize=(max(5.0, 1.6 * len(blocks) + 2), 4.2))
    series = (("single_top1", "single path: only Q_k low-bit"), ("prefix_top1", "prefix path: Q_1..Q_k low-bit"),
              ("raised_top1", f"twin with Q_k at {result['raise_bits']} bits"))
    for i, (key, label) in enumerate(series):
        ax.bar([x + (i - 1) * width for x in xs], [b[key] for b in blocks], width, label=label)
    ax.axhline(result["fp_top1"], color="grey", linestyle=":", label=f"FP partner ({result['fp_top1']:.2f})")
    ax.axhline(result["lp_top1"], color="black", linestyle="--", label=f"twin ({result['lp_top1']:.2f})")
    ax.set_xticks(list(xs), [f"block {b['block']}\n{' '.join(b['modules'])[:24]}" for b in blocks], fontsize=8)
    low = min(min(b[k] for b in blocks for k, _ in series), result["lp_top1"])
    ax.set_ylim(max(0.0, low - 5), min(100.0, max(result["fp_top1"], max(b["raised_top1"] for b in blocks)) + 3))
    ax.set_ylabel("val top-1 (%)")
    ax.set_title(f"{result['model']} {result['quant']} ({result['bits']}): block sensitivity")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# --- entry point --------------------------------------------------------------------------


def sensitivity(run_dir: str | Path, checkpoint: str = "last", bits: int = 8, limit_val_batches: int | None = None,
                device: str = "cpu", partner: str | None = None, suggest_bits: int = 4, progress: bool = True) -> dict:
    """Evaluate a finished run's blocks (module docstring); write sensitivity.json and .png; return the result."""
    run_dir = Path(run_dir)
    if not 2 <= bits <= 8:
        raise UserError(f"--bits must be an integer from 2 to 8, got {bits}")
    if not 2 <= suggest_bits <= 8:
        raise UserError(f"--suggest-bits must be an integer from 2 to 8, got {suggest_bits}")
    if limit_val_batches is not None and limit_val_batches < 1:
        raise UserError(f"--limit-val-batches must be a positive number of batches, got {limit_val_batches}")
    ckpt, cfg, ckpt_path = read_run(run_dir, checkpoint)
    dev = resolve_device(device)
    torch.manual_seed(int(cfg.get("seed", 0)))
    data = build_data(cfg.data, seed=cfg.seed, device=dev)
    fp = build_model(cfg.model, data.num_classes, in_chans=data.input_size[0])
    boundaries = model_boundaries(fp, cfg.model, data.input_size)
    fp = load_partner(fp, cfg, ckpt.get("partner"), partner, data, run_cwd(run_dir)).to(dev)
    quant_cfg = cfg.quant.copy()
    if "compile" in quant_cfg:
        quant_cfg.compile = False  # a few evaluation batches: compiling would cost more than it saves
    twin = twin_from_config(fp, cfg, quant_cfg)  # as train.py built it: its BatchNorm eps, its residual grids
    load_state_dict_into(twin, ckpt["twin"], f"checkpoint {ckpt_path}", hint="evaluate it with the bqat that trained it")
    twin.to(dev).eval()
    layers = block_layers(twin, boundaries)
    if not any(layers):
        raise UserError(f"run {run_dir} has no quantized layer (quant={cfg.quant.name}); sensitivity needs a low-bit twin")
    hybrid = BlockReplacement(twin, fp, boundaries, OmegaConf.create({"name": "none"}), cfg.loss, seed=int(cfg.seed))
    quantizers = [layer_quantizers(twin, names) for names in layers]
    top1 = measure(hybrid, data.val, quantizers, bits, limit_val_batches, dev, progress)
    blocks = summarise(top1, layers, boundaries, twin)
    ranking = [b["block"] for b in sorted(blocks, key=lambda b: -b["cost"])]
    patterns = block_patterns(twin, boundaries, layers[ranking[0] - 1], suggest_bits)
    size = model_size(twin, layer_macs(fp, data.input_size))
    result = {
        "run_dir": str(run_dir),
        "checkpoint": str(ckpt_path.relative_to(run_dir)),
        "model": cfg.model.name,
        "quant": cfg.quant.name,
        "bits": f"W{cfg.bits.w}A{cfg.bits.a}" + (" + bits.layers" if cfg.bits.get("layers") else ""),
        "bits_layers": OmegaConf.to_container(cfg.bits.layers, resolve=True) if cfg.bits.get("layers") else None,
        "val_images": top1["val_images"],
        "raise_bits": bits,
        "raise_rule": f"width -> {bits} bits, learned step sizes / 2^({bits}-b) (old grid points stay on the grid), "
                      "clip values, offsets and fixed ranges kept",
        "fp_top1": top1["fp"],
        "lp_top1": top1["lp"],
        "weight_bits": size["weight_bits"],
        "avg_weight_bits": size["avg_weight_bits"],
        "blocks": blocks,
        "ranking": ranking,
        "suggest_bits": suggest_bits,
        "suggestion": override_line(patterns, suggest_bits) if patterns else None,
        "json": str(run_dir / JSON_NAME),
        "png": str(run_dir / PNG_NAME),
    }
    (run_dir / JSON_NAME).write_text(json.dumps(result, indent=2) + "\n")
    plot(result, run_dir / PNG_NAME)
    return result


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="bqat-sensitivity",
        description="Top-1 of every prefix path, every single path and the twin with each block raised to 8 bits, for a "
                    "finished bqat-train run; writes RUN_DIR/sensitivity.json and sensitivity.png.")
    parser.add_argument("run_dir", help="a run folder written by bqat-train (outputs/runs/<run>)")
    parser.add_argument("--checkpoint", choices=("last", "best"), default="last", help="which checkpoint (default: last)")
    parser.add_argument("--bits", type=int, default=8, help="width each block is raised to (default: 8)")
    parser.add_argument("--suggest-bits", type=int, default=4, help="width of the suggested bits.layers override (default: 4)")
    parser.add_argument("--limit-val-batches", type=int, default=None, help="evaluate on this many validation batches (default: all)")
    parser.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:N or auto")
    parser.add_argument("--partner", default=None, help="the FP partner's weights, when the file the run recorded has moved")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser.parse_args(argv)


def main(argv=None) -> None:
    """Console script `bqat-sensitivity` and `python -m bqat.sensitivity`."""
    args = parse_args(argv)
    console = Console()
    try:
        result = sensitivity(args.run_dir, args.checkpoint, args.bits, args.limit_val_batches, args.device, args.partner,
                             args.suggest_bits, progress=not args.no_progress)
    except UserError as err:
        print(f"bqat-sensitivity: error: {err}", file=sys.stderr)
        sys.exit(2)
    print_table(result, console)


if __name__ == "__main__":
    main()
