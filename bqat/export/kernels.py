"""What onnxruntime makes of model.onnx: which quantized layers run as integer operators.

onnxruntime's graph optimiser (ORT_ENABLE_ALL, the default of an InferenceSession) fuses
each DequantizeLinear -> Conv/Gemm -> QuantizeLinear group into one integer operator
(qdq_ops.py has the rules). `optimize` saves the optimised graph
(SessionOptions.optimized_model_filepath) and `summarize` reads it back: how many
integer operators it holds, which float operators remain, and for every quantized layer
that stays float, why (read from model.onnx: what its Conv/Gemm reads and what reads it).
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import onnx
import onnxruntime as ort
from onnx import numpy_helper

INTEGER_OPS = ("QLinearConv", "ConvInteger", "QGemm", "MatMulInteger", "QLinearMatMul", "MatMulIntegerToFloat")
# Operators that only move, reshape or convert data (or hold constants): not counted as float compute.
DATA_OPS = {"QuantizeLinear", "DequantizeLinear", "Clip", "Transpose", "Reshape", "Flatten", "Squeeze", "Unsqueeze",
            "Identity", "Constant", "ConstantOfShape", "Shape", "Gather", "Concat", "Cast", "Slice", "Pad",
            "ReorderInput", "ReorderOutput"}
# An int32 bias may move a fused conv's output by at most this fraction of the step of the grid
# right after it; a conv whose bias would move it more (an 8-bit conv, whose codes cannot be
# stretched: the stem) stays in float, so that the integer graph keeps the twin's codes.
BIAS_TOLERANCE = 0.01
Q_COMMUTES = ("MaxPool", "Reshape", "Transpose")
LEVELS = {"extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED, "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}


def session_options(threads: int | None = None, level: str = "all") -> ort.SessionOptions:
    options = ort.SessionOptions()
    options.graph_optimization_level = LEVELS[level]
    if threads is not None:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    options.log_severity_level = 3  # the "optimised model holds NCHWc/NHWC ops" notice is expected
    return options


def optimize(path: str | Path, out: str | Path, level: str = "all") -> onnx.ModelProto:
    """Run onnxruntime's graph optimiser on `path`, save the result to `out`, return it."""
    options = session_options(level=level)
    options.optimized_model_filepath = str(out)
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return onnx.load(str(out))


def op_counts(model: onnx.ModelProto) -> Counter:
    return Counter(node.op_type for node in model.graph.node)


def _readers_after(node: onnx.NodeProto, consumers: dict) -> tuple[str, list]:
    """The op output a Conv's QuantizeLinear would read, and its readers.

    onnxruntime drops a Relu/Clip right after the conv that its QuantizeLinear makes redundant,
    and moves a QuantizeLinear up through MaxPool, Reshape and Transpose (which commute with
    it) when each is the only reader; both are followed here."""
    out = node.output[0]
    readers = consumers.get(out, [])
    if len(readers) == 1 and readers[0].op_type in ("Relu", "Clip"):
        out, readers = readers[0].output[0], consumers.get(readers[0].output[0], [])
    while len(readers) == 1 and readers[0].op_type in Q_COMMUTES:
        out, readers = readers[0].output[0], consumers.get(readers[0].output[0], [])
    return out, readers


def _float_reason(node: onnx.NodeProto, producer: dict, consumers: dict, outputs: set[str]) -> str | None:
    """Why onnxruntime cannot fuse this Conv/Gemm into an integer operator (None: it can)."""
    feeds = [producer.get(name) for name in node.input if name]
    what = ("input activation", "weight", "bias")
    for i, src in enumerate(feeds):
        if src is None or src.op_type != "DequantizeLinear":
            if i == 0:
                return "its input is not on an integer grid (no quantizer, or a zero point that is not an integer)"
            return f"its {what[i]} is not an integer constant" + (" (the input's zero point is not an integer)" if i == 2 else "")
    if node.op_type == "Gemm":
        return None  # QGemm may output float
    out, readers = _readers_after(node, consumers)
    if out in outputs or not readers or any(r.op_type != "QuantizeLinear" for r in readers) or len(readers) > 1:
        kinds = sorted({r.op_type for r in readers if r.op_type != "QuantizeLinear"}) or (["a second quantizer"] if len(readers) > 1 else ["the graph output"])
        return f"its output goes on in float to {', '.join(kinds)} (no quantizer right after it)"
    return None


def _constant(model: onnx.ModelProto, name: str):
    for t in model.graph.initializer:
        if t.name == name:
            return numpy_helper.to_array(t)
    for n in model.graph.node:
        if n.op_type == "Constant" and n.output[0] == name:
            return numpy_helper.to_array(n.attribute[0].t)
    return None


def output_steps(model: onnx.ModelProto) -> dict[str, float]:
    """Layer name -> the step of the QuantizeLinear right after its Conv (`_readers_after`)."""
    consumers: dict[str, list] = {}
    for n in model.graph.node:
        for name in n.input:
            consumers.setdefault(name, []).append(n)
    steps = {}
    for node in model.graph.node:
        if node.op_type != "Conv":
            continue
        _, readers = _readers_after(node, consumers)
        if len(readers) == 1 and readers[0].op_type == "QuantizeLinear":
            scale = _constant(model, readers[0].input[1])
            if scale is not None:
                steps[_layer_name(node.name)] = float(scale)
    return steps


def float_layers(model: onnx.ModelProto) -> dict[str, str]:
    """Conv/Gemm node name -> why it stays float, for each that onnxruntime cannot fuse."""
    producer = {out: n for n in model.graph.node for out in n.output}
    consumers: dict[str, list] = {}
    for n in model.graph.node:
        for name in n.input:
            consumers.setdefault(name, []).append(n)
    outputs = {o.name for o in model.graph.output}
    reasons = {}
    for node in model.graph.node:
        if node.op_type in ("Conv", "Gemm"):
            why = _float_reason(node, producer, consumers, outputs)
            if why is not None:
                reasons[_layer_name(node.name)] = why
    return reasons


def _layer_name(node_name: str) -> str:
    """The module path in torch.onnx's node name: '/layer1/layer1.0/conv1/Conv' -> 'layer1.0.conv1'.

    Each scope is a child's name, written as 'parent.index' for a Sequential's children."""
    path: list[str] = []
    for part in [p for p in node_name.split("/") if p][:-1]:
        if path and part.startswith(path[-1] + "."):
            path[-1] = part
        else:
            path.append(part)
    return ".".join(path) or node_name


def integer_ops(optimized: onnx.ModelProto) -> int:
    """How many integer operators (INTEGER_OPS) an optimised graph holds."""
    counts = op_counts(optimized)
    return sum(counts[op] for op in INTEGER_OPS)


def summarize(optimized: onnx.ModelProto, float_layers: dict[str, str], quantized_ops: int) -> dict:
    """The report's integer_ops, quantized_ops, float_ops and float_layers (from `float_layers(model)`)."""
    counts = op_counts(optimized)
    return {
        "integer_ops": integer_ops(optimized),
        "quantized_ops": quantized_ops,
        "integer_op_types": {op: counts[op] for op in INTEGER_OPS if counts[op]},
        "float_ops": {op: n for op, n in sorted(counts.items()) if op not in INTEGER_OPS and op not in DATA_OPS},
        "float_layers": float_layers,
    }
