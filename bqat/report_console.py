"""The end-of-run summary table on the console (rich)."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console
from rich.table import Table


def _fmt(value) -> str:
    return "-" if value is None else f"{value:.2f}"


def print_summary(metrics: dict, run_dir: Path, console: Console | None = None) -> None:
    console = console or Console()
    title = f"{metrics['model']} {metrics['quant']} W{metrics['bits_w']}A{metrics['bits_a']} ({metrics['schedule']}, first/last {metrics['first_last']})"
    table = Table(title=title)
    table.add_column("network")
    table.add_column("val top-1 %", justify="right")
    table.add_row("FP partner", _fmt(metrics["partner_top1"]))
    table.add_row("LP twin (last)", _fmt(metrics["top1"]))
    table.add_row("LP twin (best)", _fmt(metrics["best_top1"]))
    for k, value in enumerate(metrics["mixed_top1"], start=1):
        table.add_row(f"mixed path {k} (Q_1..Q_{k} -> FP)", _fmt(value))
    console.print(table)
    if metrics.get("weight_bits") is not None:
        mixed = " (bits.layers)" if metrics.get("bits_layers") else ""
        console.print(f"twin size{mixed}: {metrics['weight_bits']:,} weight bits ({metrics['avg_weight_bits']:.2f} per parameter), "
                      f"{metrics['bops'] / 1e9:.3f} GBOPs (FP {metrics['fp32_bops'] / 1e9:.1f})")
    console.print(f"run folder: {run_dir}  ({metrics['epoch']} epochs, {metrics['wall_seconds']:.0f} s)")
