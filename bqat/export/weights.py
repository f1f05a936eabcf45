"""weights.safetensors: a trained twin as packed integer codes, and the twin rebuilt from it.

Layout (every name is the twin's module path):
  <layer>.weight.codes        uint8, the weight's codes bit-packed at the grid's width (pack.py)
  <layer>.weight.scale        float32, () per tensor or (C,) per output channel
  <layer>.weight.zero_point   float32, same shape
  <layer>.input.scale         float32 (), the input activation's grid
  <layer>.input.zero_point    float32 ()
  everything else the twin holds in float: BatchNorm, biases, float first/last layers.
Metadata (strings): "format", "layers" (JSON: per quantized layer the weight's shape and
each grid's bits, qn, qp, per_channel) and "model" (JSON: num_classes, in_chans, input_size).

BatchNorm stays unfolded: the twin quantizes the conv weight before BatchNorm, so folding
it would move the weights off their grid, and neither this file nor the ONNX graph needs it.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from omegaconf import OmegaConf
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from bqat.errors import UserError
from bqat.export.fixed import FixedQuantizer, check_on_grid, freeze
from bqat.export.pack import pack_codes, packed_size, unpack_codes
from bqat.models import build_model
from bqat.quant.modules import QUANT_MODULES, QConv2d, QLinear
from bqat.quant.twin import swap_modules

FORMAT = "bqat-packed/1"
QUANTIZER_ATTRS = ("weight_quantizer", "input_quantizer")


def quantized_layers(twin: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in twin.named_modules() if isinstance(m, (QConv2d, QLinear))]


@torch.no_grad()
def _quantizer_io(twin: nn.Module, layers, x: torch.Tensor) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Each layer's input activation before and after its input quantizer, on batch `x`."""
    seen, hooks = {}, []

    def keep(name):
        def hook(_module, inputs, output):  # returns None: the forward pass is left unchanged
            seen.setdefault(name, (inputs[0], output))
        return hook

    for name, m in layers:
        if m.input_quantizer is not None:
            hooks.append(m.input_quantizer.register_forward_hook(keep(name)))
    try:
        twin.eval()(x)
    finally:
        for h in hooks:
            h.remove()
    return seen


@torch.no_grad()
def pack_twin(twin: nn.Module, calib_x: torch.Tensor, model_info: dict) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors and metadata of weights.safetensors for a trained `twin`.

    `calib_x` (a validation batch) lets each input quantizer show that it honours its
    reported grid; weights are checked in full.
    """
    layers = quantized_layers(twin)
    if not layers:
        raise UserError("the twin has no quantized layers (quant=none?); bqat-export exports low-bit twins")
    # Frozen before the calibration pass, which would initialise a quantizer that never saw data.
    grids = {name: (freeze(m.weight_quantizer, f"{name}.weight_quantizer"), freeze(m.input_quantizer, f"{name}.input_quantizer"))
             for name, m in layers}
    acts = _quantizer_io(twin, layers, calib_x)
    tensors, layout, replaced, quantizer_keys = {}, {}, set(), ()
    for name, m in layers:
        entry = {}
        wq, aq = grids[name]
        if wq is not None:
            w = m.weight_quantizer(m.weight)
            check_on_grid(wq, m.weight_quantizer, m.weight, w, f"{name}.weight_quantizer")
            tensors[f"{name}.weight.codes"] = pack_codes(wq.codes(w), wq.bits, wq.qn)
            tensors[f"{name}.weight.scale"], tensors[f"{name}.weight.zero_point"] = wq.scale, wq.zero_point
            entry["weight"] = {**wq.describe(), "shape": list(m.weight.shape)}
            replaced.add(f"{name}.weight")
        if aq is not None:
            if name not in acts:
                raise UserError(f"cannot export {name}: the layer did not run on a validation batch, so its input grid cannot be checked")
            check_on_grid(aq, m.input_quantizer, *acts[name], f"{name}.input_quantizer")
            tensors[f"{name}.input.scale"], tensors[f"{name}.input.zero_point"] = aq.scale, aq.zero_point
            entry["input"] = aq.describe()
        layout[name] = entry
        quantizer_keys += tuple(f"{name}.{attr}." for attr in QUANTIZER_ATTRS)
    # The rest (BatchNorm, biases, float layers) is stored as the twin holds it.
    for key, value in twin.state_dict().items():
        if key not in replaced and not key.startswith(quantizer_keys):
            tensors[key] = value.detach().cpu()
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
    if metadata.get("format") != FORMAT:
        raise UserError(f"{path} is not a bqat packed twin (format {metadata.get('format')!r}, expected {FORMAT!r})")
    return tensors, metadata


def _fixed(spec: dict, tensors: dict, prefix: str) -> FixedQuantizer:
    return FixedQuantizer(spec["bits"], spec["kind"], spec["qn"], spec["qp"], tensors[f"{prefix}.scale"],
                          tensors[f"{prefix}.zero_point"], per_channel=spec["per_channel"])


@torch.no_grad()
def load_packed_twin(path: str | Path, cfg=None) -> nn.Module:
    """Rebuild the twin (eval mode) from weights.safetensors and the run's config.

    `cfg` defaults to the config.yaml saved beside the file. The network comes from
    `cfg.model`; each quantized layer gets FixedQuantizers holding the stored grids and
    its weight the dequantized codes, so the forward pass equals the trained twin's.
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

    def make(name, m):
        if name not in layout:
            return None
        spec = layout[name]
        wq = _fixed(spec["weight"], tensors, f"{name}.weight") if "weight" in spec else None
        aq = _fixed(spec["input"], tensors, f"{name}.input") if "input" in spec else None
        return QUANT_MODULES[type(m)].from_float(m, wq, aq)

    swap_modules(twin, make)
    missing = set(layout) - {n for n, _ in quantized_layers(twin)}
    if missing:
        raise UserError(f"{path} does not match model {cfg.model.name}: no layer named {sorted(missing)[0]}")
    grids = {f"{n}.{t}.{p}" for n, spec in layout.items() for t in spec for p in ("codes", "scale", "zero_point")}
    floats = {k: v for k, v in tensors.items() if k not in grids}
    result = twin.load_state_dict(floats, strict=False)
    filled = {f"{n}.weight" for n, s in layout.items() if "weight" in s}
    left = [k for k in result.missing_keys if k not in filled and not any(f".{a}." in f".{k}" for a in QUANTIZER_ATTRS)]
    if left or result.unexpected_keys:
        bad = (left or result.unexpected_keys)[0]
        raise UserError(f"{path} does not match model {cfg.model.name} (tensor {bad!r}); export and load with the same bqat")
    for name, spec in layout.items():
        if "weight" in spec:
            m = twin.get_submodule(name)
            shape, w = spec["weight"]["shape"], spec["weight"]
            count = int(torch.Size(shape).numel())
            codes = unpack_codes(tensors[f"{name}.weight.codes"], w["bits"], w["qn"], count).reshape(shape)
            m.weight.copy_(m.weight_quantizer.dequantize(codes))
    return twin.eval()


__all__ = ["FORMAT", "load_packed_twin", "pack_twin", "packed_bytes", "packed_size", "quantized_layers", "save_packed"]
