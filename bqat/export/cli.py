"""The `bqat-export` command: RUN_DIR -> RUN_DIR/export/, a one-line error for anything a user can fix."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table

from bqat.errors import UserError
from bqat.export.rundir import checkpoint_path

DEFAULT_RUNS = 50  # bqat.export.latency.DEFAULT_RUNS, repeated here so `--help` needs no torch
BIAS_TOLERANCE = 0.01  # bqat.export.kernels.BIAS_TOLERANCE, likewise


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="bqat-export",
        description="Write RUN_DIR/export/{weights.safetensors, model.onnx, config.yaml, report.json} for a finished bqat-train run.")
    parser.add_argument("run_dir", help="a run folder written by bqat-train (outputs/runs/<run>)")
    parser.add_argument("--checkpoint", choices=("last", "best"), default="last", help="which checkpoint to export (default: last)")
    parser.add_argument("--opset", type=int, default=13, help="ONNX opset, 13 or later (default: 13)")
    parser.add_argument("--limit-val-batches", type=int, default=None, help="check the export on this many validation batches (default: all)")
    parser.add_argument("--fold-bn", action=argparse.BooleanOptionalAction, default=True,
                        help="fold each BatchNorm that follows a quantized conv into its per-channel weight scales and bias "
                             "(default); --no-fold-bn keeps BatchNorm as a float op after the conv")
    parser.add_argument("--latency-runs", type=int, default=DEFAULT_RUNS,
                        help=f"time fp32 and integer ONNX this many rounds per batch size (1, 32) and report medians; 0 skips (default: {DEFAULT_RUNS})")
    parser.add_argument("--bias-tolerance", type=float, default=BIAS_TOLERANCE,
                        help="how far a fused conv's int32 bias may move its output, in steps of the grid after it, before the conv "
                             f"runs in float instead (default: {BIAS_TOLERANCE}; smaller: closer to the twin, fewer integer ops)")
    parser.add_argument("--threads", type=int, default=None, help="onnxruntime intra-op threads for the latency (default: the cores this process may use)")
    return parser.parse_args(argv)


def print_report(report: dict, out: Path, console: Console | None = None) -> None:
    console = console or Console()
    table = Table(title=f"{report['model']} {report['quant']} W{report['bits_w']}A{report['bits_a']} export ({report['checkpoint']})")
    table.add_column("check")
    table.add_column("value", justify="right")
    table.add_row("val top-1 %, PyTorch twin", f"{report['torch_top1']:.2f}")
    table.add_row("val top-1 %, ONNX Runtime", f"{report['onnx_top1']:.2f}")
    table.add_row(f"top-1 agreement ({report['val_images']} images)", f"{report['agreement']:.4f}")
    table.add_row("max |logit diff|, ONNX vs twin", f"{report['max_abs_logit_diff']:.2e}")
    table.add_row("max |logit diff|, rebuilt vs twin", f"{report['rebuilt_max_abs_logit_diff']:.2e}")
    table.add_row(f"images within {report['fold_tolerance']:g}, rebuilt vs twin", f"{report['rebuilt_within_tolerance']:.4f}")
    if "rebuilt_fp64_within_tolerance" in report:
        table.add_row(f"the same in float64 ({report['fp64_images']} images)", f"{report['rebuilt_fp64_within_tolerance']:.4f}")
        table.add_row("twin float32 within it of twin float64", f"{report['twin_fp32_within_tolerance']:.4f}")
    table.add_row("fp32 / packed bytes", f"{report['fp32_bytes']} / {report['packed_bytes']} = {report['compression']:.1f}x")
    table.add_row("BatchNorm folded / left", f"{report['folded_bn']} / {report['batchnorm_left']}")
    table.add_row("integer ops in onnxruntime (quantized layers)", f"{report['integer_ops']} ({report['quantized_ops']})")
    for batch, ms in report.get("latency_ms", {}).get("integer", {}).items():
        fp = report["latency_ms"]["fp32"][batch]
        table.add_row(f"latency ms, batch {batch}: fp32 / integer", f"{fp:.3f} / {ms:.3f} = {fp / ms:.2f}x")
    console.print(table)
    if report.get("latency_settings"):
        console.print(f"latency: median of {report['latency_settings']['runs']} runs, {report['latency_settings']['threads']} threads")
    for graph, ops in report.get("op_profile_ms", {}).items():
        top = ", ".join(f"{op} {ms:.2f}" for op, ms in list(ops.items())[:4])
        console.print(f"time by operator, {graph}, batch 32 (ms per run): {top}")
    for layer, why in report["float_layers"].items():
        console.print(f"float in onnxruntime: {layer}: {why}")
    console.print(f"written: {out}/{{weights.safetensors, model.onnx, model_fp32.onnx, model.optimized.onnx, config.yaml, report.json}}")


def main(argv=None) -> None:
    """Console script `bqat-export` and `python -m bqat.export`."""
    args = parse_args(argv)
    try:
        if args.opset < 13:
            raise UserError(f"--opset must be 13 or later (per-channel QuantizeLinear), got {args.opset}")
        if args.limit_val_batches is not None and args.limit_val_batches < 1:
            raise UserError(f"--limit-val-batches must be a positive number of batches, got {args.limit_val_batches}")
        if args.latency_runs < 0:
            raise UserError(f"--latency-runs must be 0 (skip) or a positive number of runs, got {args.latency_runs}")
        if not args.bias_tolerance >= 0:
            raise UserError(f"--bias-tolerance must be 0 or more (steps of the next grid), got {args.bias_tolerance}")
        if args.threads is not None and args.threads < 1:
            raise UserError(f"--threads must be a positive number of threads, got {args.threads}")
        checkpoint_path(args.run_dir, args.checkpoint)  # a wrong path fails here, before torch loads
        try:
            from bqat.export.run import export_run
        except ImportError as err:
            raise UserError(f"bqat-export needs the [export] extra ({err.name} is not installed): pip install -e '.[export]'") from None
        report = export_run(args.run_dir, args.checkpoint, args.opset, args.limit_val_batches, fold_bn=args.fold_bn,
                            latency_runs=args.latency_runs, threads=args.threads, bias_tolerance=args.bias_tolerance)
    except UserError as err:
        print(f"bqat-export: error: {err}", file=sys.stderr)
        sys.exit(2)
    print_report(report, Path(args.run_dir) / "export")


if __name__ == "__main__":
    main()
