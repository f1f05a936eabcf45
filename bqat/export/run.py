"""Export one finished run: RUN_DIR -> RUN_DIR/export/{weights.safetensors, model.onnx,
model_fp32.onnx, model.optimized.onnx, config.yaml, report.json}.

The twin comes from the run's checkpoint exactly as training built it (twin_from_config:
its BatchNorm eps, its residual grids); the packed file and both ONNX graphs are built from
the twin *rebuilt from the packed file* (BatchNorm folded by default), so the report checks
the whole chain against the PyTorch fake-quant twin on the validation set, says which of
its layers onnxruntime runs as integer operators (kernels.py) and how fast (latency.py).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from bqat.data import build_data
from bqat.engine import load_checkpoint
from bqat.errors import UserError
from bqat.export import kernels, latency, onnx_qdq
from bqat.export.rundir import checkpoint_path
from bqat.export.weights import load_packed_twin, pack_twin, packed_bytes, quantized_layers, save_packed
from bqat.models import build_model
from bqat.quant import integer_bias, residual_bits_of, twin_from_config


# The folded twin equals the trained twin to float rounding; README ("Exporting a run") says why
# an image can still move by more (a code at a rounding tie that the rounding flips).
FOLD_TOLERANCE = 1e-4
# Val images of the float64 check (Float64Check): all of a small val set, a sample of a large one.
FP64_IMAGES = 1024


def read_checkpoint(ckpt_path: Path) -> tuple[dict, DictConfig]:
    """The twin's state_dict and the resolved config saved in a training checkpoint."""
    ckpt = load_checkpoint(ckpt_path)
    if not isinstance(ckpt, dict) or "twin" not in ckpt or "config" not in ckpt:
        raise UserError(f"{ckpt_path} is not a bqat twin checkpoint (no 'twin' and 'config' entries)")
    cfg = OmegaConf.create(ckpt["config"])
    return ckpt["twin"], cfg


def fp32_bytes(twin: torch.nn.Module) -> int:
    """Bytes of the same network in float32: the twin's state without its quantizers."""
    total = 0
    for key, value in twin.state_dict().items():
        if ".weight_quantizer." in f".{key}" or ".input_quantizer." in f".{key}" or not isinstance(value, torch.Tensor):
            continue
        total += value.numel() * (4 if value.is_floating_point() else value.element_size())
    return total


class Float64Check:
    """The fold without float32's rounding, on the first `images` val images: the trained twin
    and the rebuilt twin, both run in float64, and the trained twin's own float32 logits
    against its float64 ones.

    In float32 the fold's rounding (and the twin's own) can flip a code that sits at a rounding
    tie, and the flip propagates (compare's `rebuilt_within_tolerance`). Float64 removes the
    arithmetic's rounding (not that of the packed file's float32 scales and biases, ~6e-8, so
    a flip stays possible, far rarer): `rebuilt_fp64_within_tolerance` is what says the fold
    computes the twin's function, `twin_fp32_within_tolerance` how often float32 alone moves
    the twin itself by more than the tolerance. A twin that cannot run in float64 (a quantizer
    that insists on float32) gets `fp64_skipped` with why, instead of the numbers."""

    def __init__(self, twin: nn.Module, rebuilt: nn.Module, images: int = FP64_IMAGES):
        self.images, self.seen, self.within, self.twin_within, self.diff = images, 0, 0, 0, 0.0
        self.skipped = None
        try:
            self.t64, self.r64 = copy.deepcopy(twin).double().eval(), copy.deepcopy(rebuilt).double().eval()
        except (RuntimeError, TypeError) as err:
            self.skipped = str(err).splitlines()[0]

    @torch.no_grad()
    def add(self, x: torch.Tensor, twin_logits: torch.Tensor) -> None:
        """Check the batch `x`, whose float32 twin logits are `twin_logits`, up to `images` in all."""
        if self.skipped is not None or self.seen >= self.images:
            return
        x, twin_logits = x[: self.images - self.seen], twin_logits[: self.images - self.seen]
        try:
            ref, folded = self.t64(x.double()), self.r64(x.double())
        except (RuntimeError, TypeError) as err:
            self.skipped = str(err).splitlines()[0]
            return
        d = (folded - ref).abs().amax(1)
        self.diff = max(self.diff, d.max().item())
        self.within += (d <= FOLD_TOLERANCE).sum().item()
        self.twin_within += ((twin_logits.double() - ref).abs().amax(1) <= FOLD_TOLERANCE).sum().item()
        self.seen += len(x)

    def report(self) -> dict:
        if self.skipped is not None:
            return {"fp64_skipped": self.skipped}
        return {
            "rebuilt_fp64_max_abs_logit_diff": self.diff,
            "rebuilt_fp64_within_tolerance": self.within / self.seen,
            "twin_fp32_within_tolerance": self.twin_within / self.seen,
            "fp64_images": self.seen,
        }


@torch.no_grad()
def compare(twin, rebuilt, sess, loader, limit=None, fp64_images: int = FP64_IMAGES) -> dict:
    """Top-1 of the PyTorch twin and of ONNX Runtime, how far apart they are, and how far the
    rebuilt (folded) twin is from the trained one, in float32 and (Float64Check, on the first
    `fp64_images` images) in float64, over `loader` in one pass."""
    agree = correct_torch = correct_onnx = total = rebuilt_within = 0
    diff_onnx = diff_rebuilt = 0.0
    fp64 = Float64Check(twin, rebuilt, fp64_images)
    for i, (x, y) in enumerate(loader):
        if limit is not None and i >= limit:
            break
        ref = twin(x)
        ort_logits = onnx_qdq.run(sess, x)
        diff_onnx = max(diff_onnx, (ort_logits - ref).abs().max().item())
        rebuilt_diff = (rebuilt(x) - ref).abs().amax(1)
        diff_rebuilt = max(diff_rebuilt, rebuilt_diff.max().item())
        rebuilt_within += (rebuilt_diff <= FOLD_TOLERANCE).sum().item()
        fp64.add(x, ref)
        agree += (ort_logits.argmax(1) == ref.argmax(1)).sum().item()
        correct_torch += (ref.argmax(1) == y).sum().item()
        correct_onnx += (ort_logits.argmax(1) == y).sum().item()
        total += len(y)
    if total == 0:
        raise UserError("the validation set is empty; nothing to check the export on")
    return {
        "torch_top1": 100.0 * correct_torch / total,
        "onnx_top1": 100.0 * correct_onnx / total,
        "agreement": agree / total,
        "max_abs_logit_diff": diff_onnx,
        "rebuilt_max_abs_logit_diff": diff_rebuilt,
        # BatchNorm folded: images whose logits stay within the stated tolerance of the twin's
        "rebuilt_within_tolerance": rebuilt_within / total,
        "fold_tolerance": FOLD_TOLERANCE,
        "val_images": total,
        **fp64.report(),
    }


def export_integer_onnx(rebuilt: nn.Module, path: Path, example: torch.Tensor, opset: int, optimized_path: Path,
                        bias_tolerance: float = kernels.BIAS_TOLERANCE):
    """model.onnx, onnxruntime's optimised graph of it (saved to `optimized_path`), and the
    quantized layers onnxruntime will run in float, with why.

    A first export shows which convs cannot fuse (kernels.float_layers) and how far each
    fused conv's int32 bias moves its output (onnx_qdq.bias_errors against the step of the
    grid after it); those beyond `bias_tolerance` (of that step) run in float too. The final export
    gives the first their float bias and the others no Q/DQ at all (IntegerLayer modes),
    so the integer graph rounds no bias it does not run on integers."""
    view = onnx_qdq.integer_view(rebuilt, example)
    model = onnx_qdq.export_onnx(view, path, example, opset=opset)
    float_layers = kernels.float_layers(model)
    steps, errors = kernels.output_steps(model), onnx_qdq.bias_errors(view, rebuilt)
    exact = {}
    for name, error in errors.items():
        if name not in float_layers and name in steps and error > bias_tolerance * steps[name]:
            exact[name] = (f"its int32 bias would move its output by up to {error / steps[name]:.2g} of the next grid's step "
                           f"(more than --bias-tolerance {bias_tolerance:g}): kept in float, exact")
    if float_layers or exact:
        model, optimized = _export_float_layers(rebuilt, path, example, opset, set(float_layers), set(exact), optimized_path)
    else:
        optimized = kernels.optimize(path, optimized_path)
    float_layers.update(exact)
    return model, optimized, float_layers


def _export_float_layers(rebuilt: nn.Module, path: Path, example: torch.Tensor, opset: int, float_output: set, exact: set,
                         optimized_path: Path):
    """model.onnx and its optimised graph, with `float_output` layers on constant float weights
    (fast float kernels), unless onnxruntime would then quantize one of those weights itself
    (IntegerLayer's "float_weight"): then with their weights behind DequantizeLinear, as trained."""
    fused = len(quantized_layers(rebuilt)) - len(float_output) - len(exact)
    view = onnx_qdq.integer_view(rebuilt, example, float_output=float_output, in_float=exact, float_weight=True)
    model = onnx_qdq.export_onnx(view, path, example, opset=opset)
    optimized = kernels.optimize(path, optimized_path)
    if kernels.integer_ops(optimized) > fused:
        view = onnx_qdq.integer_view(rebuilt, example, float_output=float_output, in_float=exact)
        model = onnx_qdq.export_onnx(view, path, example, opset=opset)
        optimized = kernels.optimize(path, optimized_path)
    return model, optimized


def export_run(run_dir: str | Path, checkpoint: str = "last", opset: int = onnx_qdq.DEFAULT_OPSET, limit_val_batches: int | None = None,
               fold_bn: bool = True, latency_runs: int = latency.DEFAULT_RUNS, threads: int | None = None,
               bias_tolerance: float = kernels.BIAS_TOLERANCE) -> dict:
    """Write RUN_DIR/export/ and return the report (also written as report.json).

    `latency_runs=0` skips the latency measurement; `threads` defaults to the cores this
    process may use; `bias_tolerance` is how far (in steps of the grid after it) a fused
    conv's int32 bias may move its output before the conv runs in float instead."""
    run_dir = Path(run_dir)
    ckpt_path = checkpoint_path(run_dir, checkpoint)
    state, cfg = read_checkpoint(ckpt_path)
    data = build_data(cfg.data, seed=cfg.seed)
    fp = build_model(cfg.model, data.num_classes, in_chans=data.input_size[0])
    twin = twin_from_config(fp, cfg)
    try:
        twin.load_state_dict(state)
    except RuntimeError as err:
        raise UserError(f"{ckpt_path} does not fit model {cfg.model.name} with quant={cfg.quant.name}: "
                        f"{str(err).splitlines()[0]}") from None
    twin.eval()

    out = run_dir / "export"
    out.mkdir(exist_ok=True)
    calib_x, _ = next(iter(data.val))
    info = {"num_classes": data.num_classes, "in_chans": data.input_size[0], "input_size": list(data.input_size)}
    tensors, metadata = pack_twin(twin, calib_x, info, fold_bn=fold_bn)
    save_packed(tensors, metadata, out / "weights.safetensors")
    OmegaConf.save(cfg, out / "config.yaml")

    rebuilt = load_packed_twin(out / "weights.safetensors")
    model, optimized, float_layers = export_integer_onnx(rebuilt, out / "model.onnx", calib_x[:1], opset, out / "model.optimized.onnx",
                                                         bias_tolerance)
    onnx_qdq.export_onnx(onnx_qdq.float_view(rebuilt), out / "model_fp32.onnx", calib_x[:1], opset=opset)

    report = compare(twin, rebuilt, onnx_qdq.session(out / "model.onnx"), data.val, limit_val_batches)
    layers = quantized_layers(twin)
    fp32, packed = fp32_bytes(twin), packed_bytes(tensors)
    layout = json.loads(metadata["layers"])
    report.update({
        "fp32_bytes": fp32,
        "packed_bytes": packed,
        "compression": fp32 / packed,
        "file_bytes": {name: (out / name).stat().st_size for name in ("weights.safetensors", "model.onnx", "model_fp32.onnx")},
        "quantized_layers": len(layers),
        "qdq_pairs": onnx_qdq.op_counts(model)["QuantizeLinear"],
        "fold_bn": fold_bn,
        "folded_bn": sum("folded_bn" in spec for spec in layout.values()),
        "batchnorm_left": sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in rebuilt.modules()),
        **kernels.summarize(optimized, float_layers, sum(m.weight_quantizer is not None and m.input_quantizer is not None for _, m in layers)),
        "bias_tolerance": bias_tolerance,
        "opset": opset,
        "checkpoint": str(ckpt_path.relative_to(run_dir)),
        "model": cfg.model.name,
        "quant": cfg.quant.name,
        "bits_w": int(cfg.bits.w),
        "bits_a": int(cfg.bits.a),
        "first_last": str(cfg.bits.first_last),
        "twin_residual_bits": residual_bits_of(twin),
        "twin_integer_bias": bool(integer_bias.hooks(twin)),  # the biases the twin rounds itself (twin.integer_bias)
    })
    if latency_runs > 0:
        threads = latency.default_threads() if threads is None else threads
        report.update(latency.latency_report(out / "model_fp32.onnx", out / "model.onnx", calib_x, threads, latency_runs))
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    return report
