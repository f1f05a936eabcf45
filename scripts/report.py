#!/usr/bin/env python
"""The results table and plot of a set of runs, read from their metrics.json files.

    python scripts/report.py RUN_DIR [RUN_DIR ...] --name NAME [--out outputs/reports]

Reads every `metrics.json` below the given folders (never a log) and writes
`<out>/<NAME>/results.csv`, `results.md` and `top1_vs_bits.png`, and `top1_vs_size.png`
when the runs differ in model size (`weight_bits`, e.g. per-layer precision with bits.layers).

One row per cell: data x model x quantizer x schedule x bits x first/last policy x epochs
x learning rate x loss settings (every `loss.*` key that acts under the run's schedule, so
an objective ablation gets one row per variant) x `twin.residual_bits` x `twin.integer_bias` x model size in bits (runs with other
per-layer widths, bits.layers, are other cells). Runs of a cell that differ only in seed
are aggregated (mean and sample std of the LP top-1, and each seed's value). Each row
carries the FP partner's top-1, the LP twin's top-1, its difference from the same cell with
schedule `none` (plain QAT, no block replacement, with the same partner distillation), the
mean wall time, the published number closest to the cell (bqat/published.yaml, with its
method and source) and the run folders it came from.
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import sys
from collections import defaultdict
from importlib import resources
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # this clone's bqat, whichever bqat the environment has installed

import yaml  # noqa: E402

from bqat.errors import UserError  # noqa: E402

# What makes two runs the same cell (seeds are aggregated over).
KEY = ("data", "model", "quant", "schedule", "bits_w", "bits_a", "first_last", "epochs", "lr", "w_kd", "loss", "weight_bits",
       "residual_bits", "integer_bias")
REQUIRED = ("top1", "model", "quant", "schedule", "bits_w", "bits_a", "first_last", "epoch")
BASELINE_SCHEDULE = "none"
PLOT_NAME = "top1_vs_bits.png"
SIZE_PLOT_NAME = "top1_vs_size.png"

COLUMNS = (
    "data", "model", "quant", "schedule", "method", "bits_w", "bits_a", "first_last", "epochs", "lr", "w_kd", "loss",
    "weight_bits", "avg_weight_bits", "residual_bits", "integer_bias", "n_seeds", "seeds", "top1_by_seed", "fp_top1", "top1", "top1_std", "best_top1",
    "delta_vs_none",
    "train_s", "wall_s",
    "published_top1", "published_fp_top1", "published_method", "published_source", "run_dirs",
)


def warn(message: str) -> None:
    print(f"report: warning: {message}", file=sys.stderr)


# ---------------------------------------------------------------- reading runs


def load_runs(dirs: list[Path]) -> list[dict]:
    """One flat record per readable metrics.json below `dirs`; unreadable files are named and skipped."""
    runs = []
    for d in dirs:
        if not d.is_dir():
            raise UserError(f"run folder not found: {d}")
        for path in sorted(d.rglob("metrics.json")):
            try:
                metrics = json.loads(path.read_text())
            except (OSError, json.JSONDecodeError) as err:
                warn(f"skipping {path}: not valid JSON ({err})")
                continue
            missing = [k for k in REQUIRED if k not in metrics]
            if missing:
                warn(f"skipping {path}: missing {', '.join(missing)}")
                continue
            if metrics["top1"] is None:
                warn(f"skipping {path}: no epoch finished (top1 is null)")
                continue
            runs.append(record(metrics, path.parent))
    return runs


# The loss keys of conf/train.yaml and the value at which each term is off (or neutral).
# A key missing from an older run's metrics.json reads as its neutral value.
LOSS_NEUTRAL = {"w_mix": 1.0, "w_mix_decay": "constant", "w_kd": 0.0, "T": 1.0, "w_mp_kd": 0.0,
                "mp_teacher_grad": False, "path_weights": "uniform"}
# Keys that act only through the mixed paths: a plain-QAT run (schedule none) ignores them.
MIXED_ONLY = ("w_mix", "w_mix_decay", "w_mp_kd", "mp_teacher_grad", "path_weights")


def effective_loss(loss: dict, schedule: str) -> dict:
    """The loss settings that change what the run computed: T only when a KL term is on,
    mp_teacher_grad only with w_mp_kd, the mixed-path keys only when there are mixed paths."""
    out = {k: loss.get(k, v) if loss.get(k) is not None else v for k, v in LOSS_NEUTRAL.items()}
    if schedule == BASELINE_SCHEDULE:
        for k in MIXED_ONLY:
            out[k] = LOSS_NEUTRAL[k]
    if not float(out["w_mp_kd"]):
        out["mp_teacher_grad"] = LOSS_NEUTRAL["mp_teacher_grad"]
    if not float(out["w_kd"]) and not float(out["w_mp_kd"]):
        out["T"] = LOSS_NEUTRAL["T"]
    return out


def loss_label(loss: dict) -> str:
    """A compact name of the settings that differ from neutral, e.g. `kd1@T2+mpkd1+geo` ('' for CE only)."""
    parts = []
    if float(loss["w_mix"]) != 1.0:
        parts.append(f"mix{float(loss['w_mix']):g}")
    if loss["w_mix_decay"] != "constant":
        parts.append(f"{loss['w_mix_decay']}decay")
    if float(loss["w_kd"]):
        parts.append(f"kd{float(loss['w_kd']):g}")
    if float(loss["w_mp_kd"]):
        parts.append(f"mpkd{float(loss['w_mp_kd']):g}" + ("g" if loss["mp_teacher_grad"] else ""))
    if parts and float(loss["T"]) != 1.0 and (float(loss["w_kd"]) or float(loss["w_mp_kd"])):
        parts[-1] += f"@T{float(loss['T']):g}"
    if loss["path_weights"] != "uniform":
        parts.append({"geometric": "geo"}.get(loss["path_weights"], str(loss["path_weights"])))
    return "+".join(parts)


def record(metrics: dict, run_dir: Path) -> dict:
    loss = effective_loss(metrics.get("loss") or {}, str(metrics["schedule"]))
    return {
        "data": str(metrics.get("data", "?")),
        "model": str(metrics["model"]),
        "quant": str(metrics["quant"]),
        "schedule": str(metrics["schedule"]),
        "bits_w": int(metrics["bits_w"]),
        "bits_a": int(metrics["bits_a"]),
        "first_last": str(metrics["first_last"]),
        "epochs": int(metrics["epoch"]),
        "lr": metrics.get("lr"),  # None in runs written before bqat recorded it
        "w_kd": float(loss["w_kd"]),
        "T": float(loss["T"]),
        "loss": loss_label(loss),
        "weight_bits": metrics.get("weight_bits"),  # None in runs written before bqat measured it
        "residual_bits": metrics.get("twin_residual_bits"),  # None: the paper's twin (twin.residual_bits)
        "integer_bias": integer_bias_label(metrics),
        "avg_weight_bits": metrics.get("avg_weight_bits"),
        "mixed": bool(metrics.get("bits_layers")),
        "seed": metrics.get("seed"),
        "top1": float(metrics["top1"]),
        "best_top1": metrics.get("best_top1"),
        "fp_top1": metrics.get("partner_top1"),
        "train_s": metrics.get("train_seconds"),  # the twin's training loop only
        "wall_s": metrics.get("wall_seconds"),  # the whole run, partner and evaluation included
        "run_dir": str(run_dir),
    }


# ---------------------------------------------------------------- the table


def integer_bias_label(metrics: dict) -> str:
    """'' (float biases: the paper's twin, and runs from before the key), 'ib' (twin.integer_bias:
    the rounded bias in evaluation) or 'ib<N>' (and the last N epochs trained in that form)."""
    epochs = int(metrics.get("twin_integer_bias_epochs") or 0)
    # A run of the first version of the option recorded only the epochs, which implied the hooks.
    if not metrics.get("twin_integer_bias", bool(epochs)):
        return ""
    return f"ib{epochs}" if epochs else "ib"


def method_name(quant: str, schedule: str, loss: str, residual_bits: int | None = None, integer_bias: str = "") -> str:
    """`lsq` (plain QAT), `lsq+prefix` (with block replacement), then the loss label (`+kd1@T2+mpkd1`),
    `+res8` for a twin with residual grids (twin.residual_bits=8) and `+ib` / `+ib1` for one with
    integer biases (twin.integer_bias, twin.integer_bias_epochs=1)."""
    name = quant if schedule == BASELINE_SCHEDULE else f"{quant}+{schedule}"
    name = f"{name}+{loss}" if loss else name
    name = f"{name}+res{residual_bits}" if residual_bits else name
    return f"{name}+{integer_bias}" if integer_bias else name


def mean_or_none(values) -> float | None:
    values = [float(v) for v in values if v is not None]
    return statistics.fmean(values) if values else None


def aggregate(runs: list[dict]) -> list[dict]:
    """Group runs into cells; mean (and std over seeds) of every number."""
    cells: dict[tuple, list[dict]] = defaultdict(list)
    for run in runs:
        cells[tuple(run[k] for k in KEY)].append(run)
    rows = []
    for key, group in cells.items():
        seeds = [r["seed"] for r in group]
        repeated = sorted({s for s in seeds if seeds.count(s) > 1}, key=str)
        if repeated:
            warn(f"{len(group)} runs of cell {dict(zip(KEY, key))} share seed(s) {repeated}; they are averaged as if "
                 f"independent ({', '.join(r['run_dir'] for r in group)})")
        top1 = [r["top1"] for r in group]
        row = dict(zip(KEY, key), T=group[0]["T"])  # the loss label fixes the effective T
        row.update(
            method=method_name(row["quant"], row["schedule"], row["loss"], row["residual_bits"], row["integer_bias"]),
            n_seeds=len(group),
            seeds=",".join(str(s) for s in sorted(seeds, key=str)),
            top1_by_seed=";".join(f"s{r['seed']}:{r['top1']:.2f}" for r in sorted(group, key=lambda r: str(r["seed"]))),
            fp_top1=mean_or_none(r["fp_top1"] for r in group),
            top1=statistics.fmean(top1),
            top1_std=statistics.stdev(top1) if len(top1) > 1 else None,
            best_top1=mean_or_none(r["best_top1"] for r in group),
            train_s=mean_or_none(r["train_s"] for r in group),
            wall_s=mean_or_none(r["wall_s"] for r in group),
            run_dirs=";".join(sorted(r["run_dir"] for r in group)),
            avg_weight_bits=group[0]["avg_weight_bits"],
            mixed=group[0]["mixed"],
        )
        rows.append(row)
    rows.sort(key=sort_key)
    return rows


def sort_key(row: dict) -> tuple:
    # Tables read best grouped by network, widest bits first, baseline above its variants.
    return (row["data"], row["model"], row["first_last"], row["epochs"], row["lr"] is not None, row["lr"] or 0.0, row["w_kd"],
            -row["bits_w"], -row["bits_a"], row["quant"], row["schedule"] != BASELINE_SCHEDULE, row["schedule"], row["loss"],
            row["residual_bits"] or 0, row["integer_bias"])


def baseline_key(row: dict) -> tuple:
    """KEY of the row's plain-QAT twin: schedule none, the same partner distillation (w_kd, T), no mixed-path terms."""
    loss = effective_loss({"w_kd": row["w_kd"], "T": row["T"]}, BASELINE_SCHEDULE)
    base = dict(row, schedule=BASELINE_SCHEDULE, loss=loss_label(loss))
    return tuple(base[k] for k in KEY)


def attach_deltas(rows: list[dict]) -> None:
    """delta_vs_none: LP top-1 minus the same cell's with schedule `none` (None where that is the row, or absent)."""
    index = {tuple(r[k] for k in KEY): r for r in rows}
    for row in rows:
        row["delta_vs_none"] = None
        if row["schedule"] == BASELINE_SCHEDULE:
            continue
        base = index.get(baseline_key(row))
        if base is not None:
            row["delta_vs_none"] = row["top1"] - base["top1"]


# ---------------------------------------------------------------- published numbers


def load_published(path: Path | None = None) -> tuple[list[dict], dict[str, str]]:
    """bqat/published.yaml (package data) or the file given: (entries, {source key: citation})."""
    if path is None:
        text = resources.files("bqat").joinpath("published.yaml").read_text()
    else:
        text = Path(path).read_text()
    data = yaml.safe_load(text) or {}
    sources = {k: v["cite"] for k, v in (data.get("sources") or {}).items()}
    entries = list(data.get("results") or [])
    for entry in entries:
        if entry.get("source") not in sources:
            raise UserError(f"published entry {entry} names source {entry.get('source')!r}, which `sources` does not define")
    return entries, sources


def closest_published(row: dict, entries: list[dict]) -> dict | None:
    """The entry for the same data, model and bits; same quantizer, then schedule, then first/last preferred."""
    candidates = [
        e for e in entries
        if str(e["data"]) == row["data"] and str(e["model"]) == row["model"]
        and int(e["bits_w"]) == row["bits_w"] and int(e["bits_a"]) == row["bits_a"]
    ]
    if not candidates:
        return None

    def score(e):
        first_last = e.get("first_last")
        return (str(e.get("quant")) == row["quant"], str(e.get("schedule")) == row["schedule"],
                first_last is not None and str(first_last) == row["first_last"])

    return max(candidates, key=score)  # max keeps the first of equals: the file's order decides ties


def attach_published(rows: list[dict], entries: list[dict]) -> None:
    for row in rows:
        entry = closest_published(row, entries)
        row["published_top1"] = entry["top1"] if entry else None
        row["published_fp_top1"] = entry.get("fp_top1") if entry else None
        row["published_method"] = entry["method"] if entry else None
        row["published_source"] = entry["source"] if entry else None


# ---------------------------------------------------------------- writing


def fmt(value, digits: int = 2) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def write_csv(rows: list[dict], path: Path) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: fmt(row[k], 1 if k in ("train_s", "wall_s") else 2) for k in COLUMNS})


def write_markdown(rows: list[dict], sources: dict[str, str], path: Path, name: str, n_runs: int, dirs: list[Path]) -> None:
    used = [s for s in sources if any(r["published_source"] == s for r in rows)]
    lines = [
        f"# {name}: top-1 (%) by bit-width",
        "",
        f"{n_runs} runs read from metrics.json under {', '.join(f'`{d}`' for d in dirs)}. "
        "LP: the low-precision twin after the last epoch (mean ± std over seeds); FP: its frozen partner; "
        "train: seconds in the twin's training loop; wall: the whole run (partner and evaluation included); "
        f"Δ: LP minus the same cell with schedule `{BASELINE_SCHEDULE}` (the quantizer alone, no block replacement); "
        "published: the closest published number for the same network, data and bits, with its method. "
        "Every row's run folders (configs in `.hydra/`) are listed in results.csv.",
        "",
        "| data | model | W/A | first/last | method | epochs | lr | seeds | FP top-1 | LP top-1 | Δ vs none | train (s) | wall (s) | published |",
        "|---|---|---|---|---|---:|---:|---|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        lp = fmt(r["top1"]) + (f" ± {fmt(r['top1_std'])}" if r["top1_std"] is not None else "")
        delta = f"{r['delta_vs_none']:+.2f}" if r["delta_vs_none"] is not None else "—"
        lr = "—" if r["lr"] is None else f"{r['lr']:g}"
        published = "—"
        if r["published_top1"] is not None:
            ref = used.index(r["published_source"]) + 1
            fp = f", FP {fmt(float(r['published_fp_top1']))}" if r["published_fp_top1"] is not None else ""
            published = f"{fmt(float(r['published_top1']))} ({r['published_method']}{fp}) [{ref}]"
        bits = f"W{r['bits_w']}A{r['bits_a']}" + (f" + bits.layers ({r['avg_weight_bits']:.2f} b/weight)" if r["mixed"] else "")
        lines.append(
            f"| {r['data']} | {r['model']} | {bits} | {r['first_last']} | {r['method']} | "
            f"{r['epochs']} | {lr} | {r['seeds']} | {fmt(r['fp_top1']) or '—'} | {lp} | {delta} | {fmt(r['train_s'], 0) or '—'} | "
            f"{fmt(r['wall_s'], 0) or '—'} | {published} |"
        )
    lines += ["", f"![top-1 vs bits]({PLOT_NAME})", ""]
    if sizes_differ(rows):
        lines += [f"![top-1 vs size]({SIZE_PLOT_NAME})", ""]
    if used:
        lines += ["Published numbers:", ""] + [f"{i}. {sources[s]}" for i, s in enumerate(used, start=1)] + [""]
    path.write_text("\n".join(lines))


def plot(rows: list[dict], path: Path, name: str) -> None:
    """Top-1 vs weight bits: one panel per data x model x first/last, one line per method (and budget)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        panels[(r["data"], r["model"], r["first_last"])].append(r)
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4.2), squeeze=False)
    for ax, ((data, model, first_last), panel) in zip(axes[0], sorted(panels.items())):
        several_budgets = len({r["epochs"] for r in panel}) > 1
        several_lrs = len({r["lr"] for r in panel}) > 1
        lines: dict[tuple, list[dict]] = defaultdict(list)
        for r in panel:
            lines[(r["method"], r["epochs"], r["lr"] or 0.0)].append(r)
        for (method, epochs, lr), line in sorted(lines.items()):
            line.sort(key=lambda r: r["bits_w"])
            budget = [f"{epochs} ep"] * several_budgets + [f"lr {lr:g}"] * several_lrs
            label = f"{method} ({', '.join(budget)})" if budget else method
            ax.errorbar([r["bits_w"] for r in line], [r["top1"] for r in line],
                        yerr=[r["top1_std"] or 0.0 for r in line], marker="o", capsize=3, label=label)
        fp = mean_or_none(r["fp_top1"] for r in panel)
        if fp is not None:
            ax.axhline(fp, color="grey", linestyle=":", label=f"FP partner ({fp:.2f})")
        published: dict[str, dict[int, float]] = defaultdict(dict)
        for r in panel:
            if r["published_top1"] is not None:
                published[r["published_method"]][r["bits_w"]] = float(r["published_top1"])
        for method, points in sorted(published.items()):
            bits = sorted(points)
            ax.plot(bits, [points[b] for b in bits], linestyle="none", marker="*", markersize=11,
                    label=f"{method} (published)")
        bits = sorted({(r["bits_w"], r["bits_a"]) for r in panel})
        ax.set_xticks([w for w, _ in bits], [f"W{w}A{a}" for w, a in bits])
        ax.set_xlabel("bits (weights / activations)")
        ax.set_ylabel("top-1 (%)")
        ax.set_title(f"{model} on {data}, first/last {first_last}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    save_figure(fig, path, name)


def save_figure(fig, path: Path, name: str) -> None:
    """Title, lay out, write at 120 dpi and free a report figure."""
    import matplotlib.pyplot as plt

    fig.suptitle(name)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def sizes_differ(rows: list[dict]) -> bool:
    return len({r["weight_bits"] for r in rows if r["weight_bits"] is not None}) > 1


def plot_size(rows: list[dict], path: Path, name: str) -> None:
    """Top-1 vs model size (weight_bits, in MB): one panel per data x model, one series per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        if r["weight_bits"] is not None:
            panels[(r["data"], r["model"])].append(r)
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4.2), squeeze=False)
    for ax, ((data, model), panel) in zip(axes[0], sorted(panels.items())):
        series: dict[tuple, list[dict]] = defaultdict(list)
        for r in panel:
            series[(r["method"], r["epochs"])].append(r)
        several_budgets = len({r["epochs"] for r in panel}) > 1
        for (method, epochs), points in sorted(series.items()):
            points.sort(key=lambda r: r["weight_bits"])
            sizes = [r["weight_bits"] / 8e6 for r in points]
            ax.errorbar(sizes, [r["top1"] for r in points], yerr=[r["top1_std"] or 0.0 for r in points], marker="o", capsize=3,
                        label=f"{method} ({epochs} ep)" if several_budgets else method)
            for r, size in zip(points, sizes):
                label = f"W{r['bits_w']}A{r['bits_a']}" + ("+mix" if r["mixed"] else "") + f" fl{r['first_last']}"
                ax.annotate(label, (size, r["top1"]), textcoords="offset points", xytext=(4, 4), fontsize=7)
        fp = mean_or_none(r["fp_top1"] for r in panel)
        if fp is not None:
            ax.axhline(fp, color="grey", linestyle=":", label=f"FP partner ({fp:.2f})")
        ax.set_xlabel("weight size (MB: weight_bits / 8e6)")
        ax.set_ylabel("top-1 (%)")
        ax.set_title(f"{model} on {data}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    save_figure(fig, path, name)


# ---------------------------------------------------------------- entry point


def report(dirs: list[Path], name: str, out: Path, published: Path | None = None) -> Path:
    runs = load_runs(dirs)
    if not runs:
        raise UserError(f"no finished run (metrics.json) under {', '.join(map(str, dirs))}; train first "
                        "(`make reproduce-smoke`, or bqat-train -m ... with hydra.sweep.dir under that folder)")
    rows = aggregate(runs)
    attach_deltas(rows)
    entries, sources = load_published(published)
    attach_published(rows, entries)
    folder = out / name
    folder.mkdir(parents=True, exist_ok=True)
    write_csv(rows, folder / "results.csv")
    write_markdown(rows, sources, folder / "results.md", name, len(runs), dirs)
    plot(rows, folder / PLOT_NAME, name)
    if sizes_differ(rows):
        plot_size(rows, folder / SIZE_PLOT_NAME, name)
    return folder


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="folders searched (recursively) for metrics.json")
    parser.add_argument("--name", required=True, help="report name: the output folder under --out")
    parser.add_argument("--out", type=Path, default=Path("outputs/reports"), help="reports folder (default outputs/reports)")
    parser.add_argument("--published", type=Path, default=None, help="published numbers YAML (default: bqat/published.yaml)")
    args = parser.parse_args(argv)
    try:
        folder = report(args.runs, args.name, args.out, args.published)
    except UserError as err:
        print(f"report: error: {err}", file=sys.stderr)
        return 2
    extra = f", {SIZE_PLOT_NAME}" if (folder / SIZE_PLOT_NAME).is_file() else ""
    print(f"report: wrote {folder}/results.csv, results.md, {PLOT_NAME}{extra}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
