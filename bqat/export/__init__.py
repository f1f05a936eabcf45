"""bqat-export: a trained run's twin as packed integer weights and an ONNX graph onnxruntime runs on integer kernels.

One module per idea: `pack` (bit-packing of codes), `fixed` (a quantizer's frozen grid),
`fold` (BatchNorm into the conv's scales and bias), `weights` (weights.safetensors and the
twin rebuilt from it), `qdq_ops` (the Q/DQ ops as onnxruntime fuses them), `onnx_qdq`
(model.onnx, model_fp32.onnx), `kernels` (what onnxruntime's optimiser made of it),
`latency` (fp32 vs integer timing), `run` (a run dir -> export/ and report.json), `cli`
(the `bqat-export` command).
The heavy dependencies (onnx, onnxruntime, safetensors: the [export] extra) load on use.
"""

_LAZY = {"export_run": "bqat.export.run", "load_packed_twin": "bqat.export.weights"}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'bqat.export' has no attribute {name!r}")
