"""bqat: quantization-aware training guided by block replacement (arXiv 2412.15846).

The command line is `bqat-train` (bqat.train). From Python, the same machinery wraps your own
twin and training loop (README, "Use it from Python"; examples/):

    from bqat import BlockReplacement, make_twin
    twin = make_twin(model, quant="lsq", bits=2)          # or any quantized nn.Module (Brevitas, your own)
    br = BlockReplacement(twin, model, blocks=None, schedule="prefix", loss={"w_kd": 1.0})
    optimizer = torch.optim.SGD(br.parameters(), lr=0.01)  # the twin's parameters only
    loss, logs = br.training_step(x, y)                    # then loss.backward(); optimizer.step()
    logits = br.evaluate(x)                                # {'lp': twin, 'mixed_k': each mixed path}
    deploy(br.twin)

- `BlockReplacement(twin, partner, blocks=None, schedule="prefix", loss=None, seed=0, example_input=None)`:
  trains `twin` with the mixed paths of `schedule` through `partner`, which it freezes (eval
  mode, requires_grad=False; gradients still flow through it to its inputs). `blocks`: None
  (bqat's automatic split, timm models), a list of lists of module names, or a callable
  model -> list of callables applied to both models. At construction it checks that the blocks
  chain to each model's forward and that twin and partner agree in block count and shapes
  (a mismatch is one ValueError naming the block or module); the twin is left as it was.
- `make_twin(model, quant=None, bits=None)`: a deep copy of `model` with bqat's quantizers on
  its Conv2d/Linear layers; `quant` a name or dict ('lsq', {"name": "pact", ...}), `bits` an
  int, a conf/bits option ('w2a4') or a dict; None: conf/train.yaml's defaults (lsq, W2A2).
- `keep_scales_positive(optimizer, twin)`: after each step, keeps the learned step sizes of
  bqat's quantizers at or above their floor (bqat-train does it; do it in your loop too).
- `QUANTIZERS`, `SCHEDULES`, `DATASETS` and `register_quantizer`, `register_schedule`,
  `register_dataset`: the registries `bqat-train` picks from by name.
"""

__version__ = "0.1.0"

# Imported on first use (PEP 562): `import bqat.config` stays light and free of import circles.
_API = {
    "BlockReplacement": "bqat.replace",
    "SCHEDULES": "bqat.replace",
    "register_schedule": "bqat.replace",
    "make_twin": "bqat.quant",
    "keep_scales_positive": "bqat.quant",
    "QUANTIZERS": "bqat.quant",
    "register_quantizer": "bqat.quant",
    "DATASETS": "bqat.data",
    "register_dataset": "bqat.data",
}

__all__ = sorted(_API)


def __getattr__(name):
    if name in _API:
        import importlib

        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'bqat' has no attribute {name!r}")
