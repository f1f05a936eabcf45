"""bqat-export: a trained run's twin as packed integer weights and an ONNX QDQ graph.

One module per idea: `pack` (bit-packing of codes), `fixed` (a quantizer's frozen grid),
`weights` (weights.safetensors and the twin rebuilt from it), `onnx_qdq` (model.onnx),
`run` (a run dir -> export/ and report.json), `cli` (the `bqat-export` command).
The heavy dependencies (onnx, onnxruntime, safetensors: the [export] extra) load on use.
"""

_LAZY = {"export_run": "bqat.export.run", "load_packed_twin": "bqat.export.weights"}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'bqat.export' has no attribute {name!r}")
