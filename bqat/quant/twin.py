"""The low-bit twin: a deep copy of the FP model whose Conv2d/Linear layers quantize
their weights and input activations (DESIGN.md). One module-swap function does it all."""

from __future__ import annotations

import copy
import logging
import re
from collections import Counter
from typing import Callable

from torch import nn

from bqat.config import bits_config, default_option, named_config
from bqat.errors import UserError
from bqat.models.graph import TraceError, residual_points
from bqat.quant.integer_bias import attach_integer_bias
from bqat.quant.mixed import apply_patterns, describe, layer_patterns
from bqat.quant.modules import QUANT_MODULES, QConv2d, attach_output_quantizer, output_quantizer
from bqat.quant.registry import get_quantizer

log = logging.getLogger("bqat")


def quantizable_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Conv2d and Linear layers (and the timm subclasses bqat knows) in registration order."""
    return [(n, m) for n, m in model.named_modules() if type(m) in QUANT_MODULES]


def float_layers(model: nn.Module, exempt: set[str] = frozenset()) -> list[tuple[str, nn.Module]]:
    """Conv/Linear layers (any subclass) that no quantized module replaced, except `exempt` names."""
    return [
        (n, m)
        for n, m in model.named_modules()
        if isinstance(m, (nn.modules.conv._ConvNd, nn.Linear)) and not isinstance(m, tuple(QUANT_MODULES.values())) and n not in exempt
    ]


def report_float_layers(twin: nn.Module, exempt: set[str]) -> None:
    """Say which weighted layers stay float (a Conv2d subclass with its own forward, Conv1d, ...),
    and that reparameterisable blocks (RepVGG, MobileOne) are quantized branch by branch."""
    kept = float_layers(twin, exempt)
    if kept:
        kinds = ", ".join(f"{c} {t}" for t, c in Counter(type(m).__name__ for _, m in kept).items())
        log.warning(f"twin: {len(kept)} layers stay float (no quantized version of their type: {kinds}), "
                    f"e.g. {', '.join(n for n, _ in kept[:3])}")
    reparam = Counter(type(m).__name__ for m in twin.modules() if callable(getattr(m, "reparameterize", None)))
    if reparam:
        kinds = ", ".join(f"{c} {t}" for t, c in reparam.items())
        log.info(f"twin: {kinds} quantized in training form, each branch on its own grid; "
                 "reparameterizing the twin would leave the grids")


def first_last_names(model: nn.Module) -> tuple[str, str]:
    """The first conv and the classifier: the layers the first/last-layer policy applies to."""
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    if not layers:
        raise UserError("the model has no Conv2d or Linear layer to quantize")
    first = layers[0][0]
    last = layers[-1][0]
    if hasattr(model, "get_classifier"):
        clf = model.get_classifier()
        last = next((n for n, m in layers if m is clf), last)
    return first, last


def is_depthwise(m: nn.Module) -> bool:
    return isinstance(m, nn.Conv2d) and m.groups > 1 and m.groups == m.in_channels


def layer_bits(name: str, bits_cfg, edges: tuple[str, str], depthwise: bool = False) -> tuple[int, int] | None:
    """(weight bits, activation bits) of one layer, or None to keep it in float."""
    # bits.depthwise (same | 2..8 | fp): a depthwise conv's output channel sees one input
    # channel only, so an input channel its activation grid rounds to all zeros is lost
    # for good (README, "Models and blocks"); a finer grid there keeps weak channels alive.
    policy = str(bits_cfg.get("depthwise", "same"))
    if depthwise and name not in edges and policy != "same":
        return None if policy == "fp" else (int(policy), int(policy))
    if name in edges:
        policy = str(bits_cfg.first_last)
        if policy == "fp":
            return None
        if policy != "same":
            return int(policy), int(policy)
    return int(bits_cfg.w), int(bits_cfg.a)


def model_name(model: nn.Module) -> str:
    """timm's architecture name of `model` (`resnet20`), else its class name: for messages."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    return str(cfg.get("architecture") or type(model).__name__)


def layer_widths(model: nn.Module, bits_cfg, name: str | None = None) -> dict[str, tuple[int | None, int | None]]:
    """(weight bits, input bits) of every quantizable layer of `model`, None where it stays float.

    The uniform rules (`bits.w`, `bits.a`, `bits.depthwise`, `bits.first_last`) first, then
    the `bits.layers` globs in order, the last match winning (bqat.quant.mixed). Depends on
    the layer names only, so it can run on the FP model before anything is trained; `name`
    (the model's config name) is what an error calls the model.
    """
    edges = first_last_names(model)
    widths = {}
    for layer, m in quantizable_layers(model):
        bits = layer_bits(layer, bits_cfg, edges, depthwise=is_depthwise(m))
        widths[layer] = (None, None) if bits is None else bits
    return apply_patterns(widths, layer_patterns(bits_cfg), name or model_name(model))


def swap_modules(model: nn.Module, make: Callable[[str, nn.Module], nn.Module | None]) -> nn.Module:
    """Replace every Conv2d/Linear `m` named `name` with make(name, m), unless it returns None."""
    for name, module in quantizable_layers(model):
        new = make(name, module)
        if new is None:
            continue
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, new)
    return model


def build_quantizer(quant_cfg, bits: int, kind: str, **kwargs) -> nn.Module:
    """`Cls(bits, kind, per_channel, channels, **extras)`, extras = the quant config's other keys."""
    cls = get_quantizer(quant_cfg.name)
    extras = {k: v for k, v in quant_cfg.items() if k not in ("name", "per_channel")}
    try:
        return cls(bits, kind, **kwargs, **extras)
    except TypeError as err:  # an unknown extra key, e.g. a typo in `+quant.<key>=...`
        found = re.search(r"unexpected keyword argument '(\w+)'", str(err))
        if not found:
            raise
        raise UserError(f"quant={quant_cfg.name} has no option quant.{found.group(1)}; see conf/quant/{quant_cfg.name}.yaml") from err


def weights_per_channel(setting, model: nn.Module) -> bool:
    """`quant.per_channel` (true | false | auto) for the conv/linear weights of `model`.

    auto: per-channel in networks with depthwise convs, per-tensor otherwise. Beside a
    depthwise conv the pointwise convs' output channels span very different ranges, and one
    step per tensor rounds the weak ones away (Krishnamoorthi 2018, "Quantizing deep
    convolutional networks for efficient inference", sec. 3: per-channel weights close most
    of MobileNet's quantization gap); ResNets keep LSQ's per-tensor steps.
    """
    if isinstance(setting, bool):
        return setting
    if str(setting) == "auto":
        return any(is_depthwise(m) for m in model.modules())
    raise UserError(f"quant.per_channel must be true, false or auto, got {setting!r}")


def make_twin(fp: nn.Module, quant=None, bits=None) -> nn.Module:
    """Deep copy of `fp` whose Conv2d/Linear layers quantize their weights and input activations.

    `quant`: a quantizer name ('lsq', 'lsqplus', 'pact', 'dorefa', 'ewgs', 'none'), a dict with a
    'name' and some of its options (`{"name": "lsq", "per_channel": True}`; the rest from
    conf/quant/<name>.yaml), or the `quant` config. `bits`: an int (weights and activations),
    a conf/bits option ('w2a4'), a dict of w, a, first_last, depthwise, or the `bits` config.
    None: conf/train.yaml's defaults (lsq, W2A2 with the first conv and the classifier at 8 bits).
    `fp` is left as it is; the twin's quantizers initialise from the first batch they see.
    """
    quant_cfg = named_config("quant", default_option("quant") if quant is None else quant, "quant")
    bits_cfg = bits_config(default_option("bits") if bits is None else bits)
    twin = copy.deepcopy(fp)
    twin.train()
    for p in twin.parameters():
        p.requires_grad_(True)
    if quant_cfg.name == "none":
        return twin
    get_quantizer(quant_cfg.name)  # an unknown name fails once, naming the known ones
    widths = layer_widths(twin, bits_cfg)
    all_per_channel = weights_per_channel(quant_cfg.per_channel, twin)
    by_policy: set[str] = set()  # layers the first/last policy or bits.layers keep float on purpose

    def make(name, m):
        w_bits, a_bits = widths[name]
        if w_bits is None and a_bits is None:
            by_policy.add(name)
            return None
        per_channel = all_per_channel or is_depthwise(m)
        # Each quantizer gets its own width; a width of None (fp) leaves that tensor float.
        wq = None if w_bits is None else build_quantizer(quant_cfg, w_bits, "weight", per_channel=per_channel, channels=m.weight.shape[0])
        aq = None if a_bits is None else build_quantizer(quant_cfg, a_bits, "act")
        return QUANT_MODULES[type(m)].from_float(m, wq, aq)

    swap_modules(twin, make)
    report_float_layers(twin, by_policy)
    if layer_patterns(bits_cfg):
        log.info(f"twin: per-layer widths (bits.layers): {describe(widths)}")
    return twin


def set_bn_eps(twin: nn.Module, eps: float | None) -> int:
    """Set the eps of every BatchNorm of the twin (`twin.bn_eps`; None keeps the partner's).

    A low-bit activation grid can round a channel to all zeros; after a depthwise conv that
    channel reaches its BatchNorm with zero batch variance, and batch-statistics BatchNorm
    multiplies its gradient by gamma / sqrt(eps): 316 at PyTorch's 1e-5, 32 at 1e-3 (the
    TensorFlow / Keras default, which the MobileNet and EfficientNet recipes use). Channels
    with a real variance (>> eps) hardly change. Returns how many layers were changed.
    """
    if eps is None:
        return 0
    if not eps > 0:
        raise UserError(f"twin.bn_eps must be > 0 or null, got {eps!r}")
    layers = [m for m in twin.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for m in layers:
        m.eps = float(eps)
    return len(layers)


# What `twin.residual_bits=auto` (the default) puts on the residual adds: 8-bit grids cost
# 0.34 +- 0.05 points at W2A2 on CIFAR-10 ResNet-20 over three seeds and about 5-10 % step time
# (docs/results/cifar10_resnet20_objective.md), and let bqat-export run nearly every conv as an
# integer operator (README, "Exporting a run").
AUTO_RESIDUAL_BITS = 8


def add_residual_quantizers(twin: nn.Module, quant_cfg, bits) -> list[str]:
    """`twin.residual_bits`: activation quantizers of `bits` bits where the residual adds read
    and write float tensors (bqat.models.graph.residual_points).

    In a ResNet block the last conv's output (after its BatchNorm) enters the residual add
    without a quantizer, and the add writes the float residual stream that the next block's
    shortcut carries. An integer backend (onnxruntime's QLinearConv / QLinearAdd, bqat-export)
    needs a grid on both: the branch output, so the conv can requantize its result, and the
    stream (block outputs, and the stem's output that the first shortcut reads), so the add
    runs on integers too. With this option the twin trains with those grids; the next conv's
    own input quantizer then reads the stream's grid. None adds nothing: the paper's twin.
    "auto" is AUTO_RESIDUAL_BITS where a quantized conv feeds a residual add, and nothing
    (with a log line, no error) for a model without one or one torch.fx cannot trace.
    Returns the names of the modules whose outputs got a quantizer (residual_bits_of reads
    the bits back).
    """
    if bits is None or quant_cfg.name == "none":
        return []
    auto = bits == "auto"
    try:
        points = residual_points(twin)
    except TraceError as err:
        if auto:
            log.warning(f"twin.residual_bits=auto: torch.fx cannot read the model's residual adds ({err}); "
                        "the twin gets no residual grids, and bqat-export runs those convs in float")
            return []
        raise UserError(f"twin.residual_bits needs the model's residual adds, which torch.fx reads: {err}; "
                        "set twin.residual_bits=null") from None
    # A branch whose conv stays float (first/last policy, unknown subclass) has no integer form anyway.
    points = [p for p in points if p.conv is None or isinstance(twin.get_submodule(p.conv), QConv2d)]
    if not any(p.conv is not None for p in points):
        if auto:
            log.info("twin.residual_bits=auto: no quantized conv of the model feeds a residual add, nothing to add")
            return []
        raise UserError(f"twin.residual_bits={bits}, but no quantized conv of the model feeds a residual add; "
                        "set twin.residual_bits=null")
    bits = AUTO_RESIDUAL_BITS if auto else int(bits)
    for p in points:
        attach_output_quantizer(twin.get_submodule(p.module), build_quantizer(quant_cfg, bits, "act"))
    branches = sum(p.conv is not None for p in points)
    log.info(f"twin: {branches} residual branch outputs and {len(points) - branches} residual stream tensors "
             f"quantized at {bits} bits (twin.residual_bits{'=auto' if auto else ''})")
    return [p.module for p in points]


def residual_bits_of(twin: nn.Module) -> int | None:
    """The bits of the twin's residual grids (add_residual_quantizers), None if it has none:
    what a run with twin.residual_bits=auto resolved to."""
    widths = {q.bits for m in twin.modules() if (q := output_quantizer(m)) is not None}
    return max(widths) if widths else None


def twin_from_config(fp: nn.Module, cfg, quant=None) -> nn.Module:
    """The twin of a run config as bqat-train builds it (make_twin, twin.bn_eps,
    twin.integer_bias, twin.residual_bits),
    without the SyncBatchNorm swap of multi-process runs: what export, benchmarks and tests rebuild.
    `quant` replaces cfg.quant (the quant config as train.choose_compile resolved it)."""
    quant = cfg.quant if quant is None else quant
    twin = make_twin(fp, quant, cfg.bits)
    recipe = cfg.get("twin") or {}
    set_bn_eps(twin, recipe.get("bn_eps"))
    attach_integer_bias(twin, recipe.get("integer_bias", False))
    add_residual_quantizers(twin, quant, recipe.get("residual_bits"))
    return twin
