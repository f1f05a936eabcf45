"""weights.safetensors: a trained twin as packed integer codes, and the twin rebuilt from it.

Layout (every name is the twin's module path):
  <layer>.weight.codes        uint8, the weight's codes bit-packed at the grid's width (pack.py)
  <layer>.weight.scale        float32, () per tensor or (C,) per output channel
  <layer>.weight.zero_point   float32, same shape
  <layer>.input.scale         float32 (), the input activation's grid
  <layer>.input.zero_point    float32 ()
  <module>.output.scale       float32 (), an output grid (twin.residual_bits: on the BatchNorm
  <module>.output.zero_point  float32 ()  that ends a residual branch)
  everything else the twin holds in float: biases, BatchNorms not folded, float layers.
Metadata (strings): "format", "layers" (JSON: per quantized layer the weight's shape, each
grid's bits, qn, qp, per_channel, and "folded_bn": the BatchNorm folded into it) and "model"
(JSON: num_classes, in_chans, input_size).

With BatchNorm folding (the default, fold.py) a folded conv stores its BatchNorm as
per-channel weight scales and a bias; its codes are the trained twin's. Each grid's width
is read from its own quantizer, so layers may differ in bits.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from omegaconf import OmegaConf
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from bqat.errors import UserError
from bqat.export.fixed import FixedQuantizer, check_on_grid, freeze
from bqat.export.fold import can_fold, fold_batchnorm, remainder
from bqat.export.pack import pack_codes, packed_size, unpack_codes
from bqat.models import build_model
from bqat.models.graph import TraceError, conv_bn_pairs
from bqat.quant.integer_bias import bias_shifts
from bqat.quant.modules import QUANT_MODULES, QConv2d, QLinear, attach_output_quantizer, output_quantizer
from bqat.quant.twin import set_bn_eps, swap_modules

log = logging.getLogger("bqat")

FORMAT = "bqat-packed/2"
READABLE_FORMATS = ("bqat-packed/1", FORMAT)  # /1: no folded BatchNorm, no output grids
QUANTIZER_ATTRS = ("weight_quantizer", "input_quantizer", "output_quantizer")


def quantized_layers(twin: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in twin.named_modules() if isinstance(m, (QConv2d, QLinear))]


def output_grids(twin: nn.Module) -> list[tuple[str, nn.Module]]:
    """Modules whose output has its own quantizer (twin.residual_bits), with that quantizer."""
    return [(n, q) for n, m in twin.named_modules() if (q := output_quantizer(m)) is not None]


@torch.no_grad()
def _quantizer_io(twin: nn.Module, quantizers: dict[str, nn.Module], x: torch.Tensor) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Each activation quantizer's input and output on batch `x`, by name."""
    seen, hooks = {}, []

    def keep(name):
        def hook(_module, inputs, output):  # returns None: the forward pass is left unchanged
            if name not in seen:  # copies: a later in-place op (`x += shortcut`, ReLU) would change them
                seen[name] = (inputs[0].clone(), output.clone())
        return hook

    for name, q in quantizers.items():
        hooks.append(q.register_forward_hook(keep(name)))
    try:
        twin.eval()(x)
    finally:
        for h in hooks:
            h.remove()
    return seen


def foldable_pairs(twin: nn.Module) -> dict[str, str]:
    """conv name -> BatchNorm name for each BatchNorm that can go into its quantized conv."""
    try:
        pairs = conv_bn_pairs(twin)
    except TraceError as err:
        log.warning(f"export: BatchNorm stays unfolded: {err}")
        return {}
    layers = dict(quantized_layers(twin))
    return {conv: bn for conv, bn in pairs
            if conv in layers and layers[conv].weight_quantizer is not None and can_fold(twin.get_submodule(bn))}


def _checked_activation(name: str, quantizer, acts) -> FixedQuantizer:
    grid = freeze(quantizer, name)
    if name not in acts:
        raise UserError(f"cannot export {name}: the layer did not run on a validation batch, so its grid cannot be checked")
    check_on_grid(grid, quantizer, *acts[name], name)
    return grid


@torch.no_grad()
def pack_twin(twin: nn.Module, calib_x: torch.Tensor, model_info: dict, fold_bn: bool = True) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors and metadata of weights.safetensors for a trained `twin`.

    `calib_x` (a validation batch) lets each activation quantizer show that it honours its
    reported grid; weights are checked in full. `fold_bn` folds each BatchNorm that follows
    a quantized conv into that conv (fold.py).
    """
    layers = quantized_layers(twin)
    if not layers:
        raise UserError("the twin has no quantized layers (quant=none?); bqat-export exports low-bit twins")
    # Frozen before the calibration pass, which would initialise a quantizer that never saw data.
    weights = {name: freeze(m.weight_quantizer, f"{name}.weight_quantizer") for name, m in layers}
    act_quantizers = {f"{n}.input_quantizer": m.input_quantizer for n, m in layers if m.input_quantizer is not None}
    act_quantizers.update({f"{n}.output_quantizer": q for n, q in output_grids(twin)})
    for name, q in act_quantizers.items():
        freeze(q, name)
    acts = _quantizer_io(twin, act_quantizers, calib_x)
    folds = foldable_pairs(twin) if fold_bn else {}
    shifts = bias_shifts(twin)  # twin.integer_bias: the biases as the twin computes them, on the int32 grids

    tensors, layout, stored = {}, {}, set()  # `stored`: state-dict keys written in their packed form
    for name, m in layers:
        entry = {}
        wq = weights[name]
        if wq is not None:
            w = m.weight_quantizer(m.weight)
            check_on_grid(wq, m.weight_quantizer, m.weight, w, f"{name}.weight_quantizer")
            codes = wq.codes(w)
            if name in folds:
                bn = folds[name]
                wq, tensors[f"{name}.bias"] = fold_batchnorm(wq, m.bias, twin.get_submodule(bn), shifts.pop(bn, None))
                entry["folded_bn"] = bn
                stored.add(f"{name}.bias")
            tensors[f"{name}.weight.codes"] = pack_codes(codes, wq.bits, wq.qn)
            tensors[f"{name}.weight.scale"], tensors[f"{name}.weight.zero_point"] = wq.scale, wq.zero_point
            entry["weight"] = {**wq.describe(), "shape": list(m.weight.shape)}
            stored.add(f"{name}.weight")
        if m.input_quantizer is not None:
            aq = _checked_activation(f"{name}.input_quantizer", m.input_quantizer, acts)
            tensors[f"{name}.input.scale"], tensors[f"{name}.input.zero_point"] = aq.scale, aq.zero_point
            entry["input"] = aq.describe()
        layout[name] = entry
    for name, q in output_grids(twin):
        oq = _checked_activation(f"{name}.output_quantizer", q, acts)
        tensors[f"{name}.output.scale"], tensors[f"{name}.output.zero_point"] = oq.scale, oq.zero_point
        layout.setdefault(name, {})["output"] = oq.describe()
    gone = tuple(f"{n}.{attr}." for n in layout for attr in QUANTIZER_ATTRS) + tuple(f"{bn}." for bn in folds.values())
    # The rest (BatchNorm not folded, biases, float layers) is stored as the twin holds it.
    for key, value in twin.state_dict().items():
        if key not in stored and not key.startswith(gone):
            tensors[key] = value.detach().cpu()
    for name, delta in shifts.items():  # a BatchNorm not folded, a Linear: the shift goes into its bias
        tensors[f"{name}.bias"] = (tensors[f"{name}.bias"].double() + delta.double().cpu()).float()
    tensors = {k: v.contiguous() for k, v in tensors.items()}
    metadata = {"format": FORMAT, "layers": json.dumps(layout), "model": json.dumps(model_info)}
    return tensors, metadata


def save_packed(tensors: dict[str, torch.Tensor], metadata: dict[str, str], path: str | Path) -> None:
    save_file(tensors, str(path), metadata=metadata)


def packed_bytes(tensors: dict[str, torch.Tensor]) -> int:
    """Bytes of tensor data in the packed file (its JSON header aside)."""
    return sum(t.numel() * t.element_size() for t in tensors.values())


def _read(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    if not path.is_file():
        raise UserError(f"packed weights not found: {path}; run bqat-export RUN_DIR first")
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata() or {}
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    if metadata.get("format") not in READABLE_FORMATS:
        raise UserError(f"{path} is not a bqat packed twin this bqat reads (format {metadata.get('format')!r}, "
                        f"expected one of {', '.join(READABLE_FORMATS)})")
    return tensors, metadata


def _fixed(spec: dict, tensors: dict, prefix: str) -> FixedQuantizer:
    return FixedQuantizer(spec["bits"], spec["kind"], spec["qn"], spec["qp"], tensors[f"{prefix}.scale"],
                          tensors[f"{prefix}.zero_point"], per_channel=spec["per_channel"])


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


@torch.no_grad()
def load_packed_twin(path: str | Path, cfg=None) -> nn.Module:
    """Rebuild the twin (eval mode) from weights.safetensors and the run's config.

    `cfg` defaults to the config.yaml saved beside the file. The network comes from
    `cfg.model`; each quantized layer gets FixedQuantizers holding the stored grids and
    its weight the dequantized codes, a folded BatchNorm becomes an identity (timm's
    BatchNormAct2d: its activation) with its conv holding the folded scales and bias, and
    each output grid hooks onto its module. Unfolded, the forward pass equals the trained
    twin's; folded, it equals it to float rounding (README, "Exporting a run").
    """
    path = Path(path)
    tensors, metadata = _read(path)
    if cfg is None:
        cfg_path = path.parent / "config.yaml"
        if not cfg_path.is_file():
            raise UserError(f"{cfg_path} not found: the packed twin needs the run config saved beside it")
        cfg = OmegaConf.load(cfg_path)
    layout, info = json.loads(metadata["layers"]), json.loads(metadata["model"])
    twin = build_model(cfg.model, info["num_classes"], in_chans=info["in_chans"])
    set_bn_eps(twin, (cfg.get("twin") or {}).get("bn_eps"))  # the eps the twin trained with
    layers = {n: spec for n, spec in layout.items() if "weight" in spec or "input" in spec}

    def make(name, m):
        if name not in layers:
            return None
        spec = layers[name]
        wq = _fixed(spec["weight"], tensors, f"{name}.weight") if "weight" in spec else None
        aq = _fixed(spec["input"], tensors, f"{name}.input") if "input" in spec else None
        return QUANT_MODULES[type(m)].from_float(m, wq, aq)

    swap_modules(twin, make)
    missing = set(layers) - {n for n, _ in quantized_layers(twin)}
    if missing:
        raise UserError(f"{path} does not match model {cfg.model.name}: no layer named {sorted(missing)[0]}")
    for name, spec in layers.items():
        if "folded_bn" in spec:
            conv = twin.get_submodule(name)
            _replace(twin, spec["folded_bn"], remainder(twin.get_submodule(spec["folded_bn"])))
            if conv.bias is None:
                conv.bias = nn.Parameter(torch.zeros(conv.out_channels))
    grids = {f"{n}.{t}.{p}" for n, spec in layout.items() for t in ("weight", "input", "output") if t in spec
             for p in ("codes", "scale", "zero_point")}
    floats = {k: v for k, v in tensors.items() if k not in grids}
    result = twin.load_state_dict(floats, strict=False)
    filled = {f"{n}.weight" for n, s in layers.items() if "weight" in s}
    left = [k for k in result.missing_keys if k not in filled and not any(f".{a}." in f".{k}" for a in QUANTIZER_ATTRS)]
    if left or result.unexpected_keys:
        bad = (left or result.unexpected_keys)[0]
        raise UserError(f"{path} does not match model {cfg.model.name} (tensor {bad!r}); export and load with the same bqat")
    for name, spec in layers.items():
        if "weight" in spec:
            m = twin.get_submodule(name)
            shape, w = spec["weight"]["shape"], spec["weight"]
            count = int(torch.Size(shape).numel())
            codes = unpack_codes(tensors[f"{name}.weight.codes"], w["bits"], w["qn"], count).reshape(shape)
            m.weight.copy_(m.weight_quantizer.dequantize(codes))
    for name, spec in layout.items():
        if "output" in spec:
            attach_output_quantizer(twin.get_submodule(name), _fixed(spec["output"], tensors, f"{name}.output"))
    return twin.eval()


__all__ = ["FORMAT", "foldable_pairs", "load_packed_twin", "output_grids", "pack_twin", "packed_bytes", "packed_size", "quantized_layers", "save_packed"]
