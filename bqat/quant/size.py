"""Model size in bits and bit operations (BOPs) of a twin: what mixed-precision papers plot.

- `weight_bits`: every parameter of the network (each `nn.Parameter` of the twin outside its
  quantizers: conv / linear weights and biases, BatchNorm's weight and bias) times the bits
  it is stored at: a quantized layer's weight at its weight quantizer's width, every other
  parameter (biases, BatchNorm, the weights of float layers) at 32. Quantizer parameters
  (step sizes, clipping values) and buffers (BatchNorm running statistics) are not counted.
  `avg_weight_bits` = weight_bits / number of those parameters.
- `bops`: per Conv / Linear layer, MACs x weight bits x input-activation bits, summed; a float
  weight or input counts 32 bits, so a float layer counts 32 x 32. MACs are measured with
  forward hooks on one probe input of the data's size (batch 1); other operations
  (BatchNorm, additions, pooling) are not counted. `fp32_bops` = all those MACs x 32 x 32.
"""

from __future__ import annotations

import torch
from torch import nn

from bqat.quant.base import Quantizer

FLOAT_BITS = 32
WEIGHTED = (nn.modules.conv._ConvNd, nn.Linear)


@torch.no_grad()
def layer_macs(model: nn.Module, input_size: tuple[int, ...]) -> dict[str, int]:
    """Multiply-accumulates of every Conv / Linear layer (any subclass) for one input of shape
    `input_size` (C, H, W), by layer name. Runs `model` once in eval mode (its mode is restored).

    Run it on the FP model (or a twin whose quantizers are initialised): a quantizer that
    has not seen data would initialise itself on the probe.
    """
    macs: dict[str, int] = {}

    def count(name):
        def hook(module, _inputs, output):
            per_output = module.in_features if isinstance(module, nn.Linear) else \
                (module.in_channels // module.groups) * int(torch.Size(module.kernel_size).numel())
            macs[name] = macs.get(name, 0) + output.numel() * per_output
        return hook

    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, WEIGHTED)]
    hooks = [m.register_forward_hook(count(n)) for n, m in layers]
    param = next(model.parameters(), None)
    probe = torch.zeros(1, *input_size, device=param.device if param is not None else "cpu")
    training = model.training
    try:
        model.eval()(probe)
    finally:
        model.train(training)
        for h in hooks:
            h.remove()
    return {n: macs.get(n, 0) for n, _ in layers}


def layer_bit_widths(twin: nn.Module) -> dict[str, tuple[int, int]]:
    """(weight bits, input bits) of every Conv / Linear layer of `twin`; float tensors count 32."""
    widths = {}
    for name, m in twin.named_modules():
        if isinstance(m, WEIGHTED):
            wq, aq = getattr(m, "weight_quantizer", None), getattr(m, "input_quantizer", None)
            widths[name] = (FLOAT_BITS if wq is None else int(wq.bits), FLOAT_BITS if aq is None else int(aq.bits))
    return widths


def stored_parameters(twin: nn.Module):
    """(module name, parameter name, tensor, bits) of every network parameter the size counts."""
    seen: set[int] = set()
    for name, m in twin.named_modules():
        if isinstance(m, Quantizer):
            continue
        wq = getattr(m, "weight_quantizer", None)
        for pname, p in m.named_parameters(recurse=False):
            if id(p) in seen:  # a tied parameter is stored once
                continue
            seen.add(id(p))
            bits = int(wq.bits) if pname == "weight" and wq is not None else FLOAT_BITS
            yield name, pname, p, bits


def model_size(twin: nn.Module, macs: dict[str, int]) -> dict[str, float | int]:
    """weight_bits, avg_weight_bits, bops and fp32_bops of `twin` (see the module docstring),
    with `macs` from `layer_macs` of the same network (the FP partner's names match the twin's)."""
    params = weight_bits = 0
    for _, _, p, bits in stored_parameters(twin):
        params += p.numel()
        weight_bits += p.numel() * bits
    widths = layer_bit_widths(twin)
    bops = 0
    for name, n in macs.items():
        w_bits, a_bits = widths.get(name, (FLOAT_BITS, FLOAT_BITS))
        bops += n * w_bits * a_bits
    return {
        "weight_bits": int(weight_bits),
        "avg_weight_bits": weight_bits / params if params else 0.0,
        "bops": int(bops),
        "fp32_bops": int(sum(macs.values()) * FLOAT_BITS * FLOAT_BITS),
    }
