"""model.onnx: the twin as an ONNX graph with QuantizeLinear/DequantizeLinear (QDQ) pairs.

Each quantized layer's weight and input activation pass through one QuantizeLinear ->
DequantizeLinear pair in an int8 (signed grid) or uint8 (unsigned grid) container; a Clip
before each activation pair keeps the codes on the low-bit grid [qn, qp] (ONNX has no
2- or 3-bit type). The graph comes from torch.onnx's TorchScript exporter
(`dynamo=False`): it maps torch.fake_quantize_per_{tensor,channel}_affine, which
FixedQuantizer emits while exporting, to QDQ pairs at opset >= 13; the torch.export-based
exporter of torch 2.x has no lowering for these ops.
"""

from __future__ import annotations

import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

DEFAULT_OPSET = 13


def export_onnx(twin: nn.Module, path: str | Path, example: torch.Tensor, opset: int = DEFAULT_OPSET) -> onnx.ModelProto:
    """Write `twin` (with FixedQuantizers) to `path` with a dynamic batch size; returns the checked model."""
    twin.eval()
    with warnings.catch_warnings():
        # The legacy exporter announces its deprecation and the tracer notes that the
        # grids' Python constants are frozen into the graph, which is what we want.
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", module=r"torch\.onnx")
        torch.onnx.export(twin, (example,), str(path), dynamo=False, opset_version=opset, input_names=["input"],
                          output_names=["logits"], dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
    model = onnx.load(str(path))
    onnx.checker.check_model(model)
    return model


def op_counts(model: onnx.ModelProto) -> Counter:
    return Counter(node.op_type for node in model.graph.node)


def session(path: str | Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def run(sess: ort.InferenceSession, x: torch.Tensor) -> torch.Tensor:
    """Logits of the ONNX model for batch `x`."""
    (logits,) = sess.run(["logits"], {"input": np.ascontiguousarray(x.detach().cpu().numpy(), dtype=np.float32)})
    return torch.from_numpy(logits)
