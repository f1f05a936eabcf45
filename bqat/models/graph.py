"""The dataflow between a model's layers, read with torch.fx: which BatchNorm follows which
conv, and which conv ends a residual branch.

Two users: bqat-export folds a BatchNorm into the conv before it (`conv_bn_pairs`), and
the twin option `twin.residual_bits` puts a quantizer wherever a residual add reads or
writes a float tensor (`residual_points`). Both read the same traced graph, so a BatchNorm is
taken as "the conv's BatchNorm" only where the graph says so: its one input is the conv's
output and nothing else reads that output. A BatchNorm elsewhere (after a pooling, a
concat, a pre-activation block's BN before its conv) is left alone.

Convs, linears, BatchNorms and timm's own no-trace modules are leaves of the trace, so
quantized layers (and their quantizers' Python state) are never traced into; the model is
traced in eval mode (timm's DropPath and friends take their inference branch).
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from timm.layers import BatchNormAct2d, get_notrace_functions, get_notrace_modules
from torch import fx, nn

ADD_FUNCTIONS = {operator.add, operator.iadd, torch.add}
ADD_METHODS = {"add", "add_"}
IDENTITY_AT_INFERENCE = (nn.Identity, nn.Dropout, nn.Dropout2d)
SHAPE_ONLY_FUNCTIONS = {operator.getitem, F.pad}


class TraceError(RuntimeError):
    """torch.fx could not trace the model (control flow on tensor values, ...)."""


class _LayerTracer(fx.Tracer):
    def __init__(self):
        super().__init__(autowrap_functions=tuple(get_notrace_functions()))
        self._leaves = (nn.modules.conv._ConvNd, nn.Linear, nn.modules.batchnorm._BatchNorm, *get_notrace_modules())

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, self._leaves) or super().is_leaf_module(m, qualname)


def trace(model: nn.Module) -> fx.Graph:
    """The model's forward as an fx graph whose call_module nodes are its layers."""
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        return _LayerTracer().trace(model)
    except Exception as err:  # fx raises many types (TraceError, TypeError, NotImplementedError, ...)
        raise TraceError(f"torch.fx cannot trace {type(model).__name__}: {str(err).splitlines()[0] if str(err) else type(err).__name__}") from err
    finally:
        for m, training in modes.items():
            m.training = training


def is_foldable_batchnorm(m: nn.Module) -> bool:
    """A BatchNorm2d whose forward is known: plain (or synchronised) BatchNorm, or timm's
    BatchNormAct2d (BatchNorm, then its `drop` and `act`). Other subclasses are left alone."""
    return type(m) in (nn.BatchNorm2d, nn.SyncBatchNorm, BatchNormAct2d) or type(m).__name__ == "CPUSyncBatchNorm"


def _called_modules(graph: fx.Graph, model: nn.Module) -> dict[str, list[fx.Node]]:
    calls: dict[str, list[fx.Node]] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls.setdefault(node.target, []).append(node)
    return calls


def _conv_bn(graph: fx.Graph, model: nn.Module) -> dict[str, str]:
    """bn name -> conv name, for each BatchNorm whose sole input is a conv output read by it alone."""
    modules = dict(model.named_modules())
    calls = _called_modules(graph, model)
    pairs = {}
    for name, nodes in calls.items():
        if len(nodes) != 1 or not is_foldable_batchnorm(modules[name]):
            continue
        node = nodes[0]
        src = node.args[0] if len(node.args) == 1 and not node.kwargs else None
        if not (isinstance(src, fx.Node) and src.op == "call_module" and len(calls[src.target]) == 1):
            continue
        conv = modules[src.target]
        if isinstance(conv, nn.Conv2d) and len(src.users) == 1 and conv.out_channels == modules[name].num_features:
            pairs[name] = src.target
    return pairs


def conv_bn_pairs(model: nn.Module, graph: fx.Graph | None = None) -> list[tuple[str, str]]:
    """(conv name, BatchNorm name) for every BatchNorm2d that directly and only follows a Conv2d.

    Each module is called once in the forward (a shared layer is never folded)."""
    graph = trace(model) if graph is None else graph
    return [(conv, bn) for bn, conv in _conv_bn(graph, model).items()]


def _through_identities(node, modules: dict[str, nn.Module]):
    """The node an add really reads: identity-like layers (nn.Identity, dropout: no-ops at
    inference) in between are skipped, as long as each has this one reader."""
    while (isinstance(node, fx.Node) and node.op == "call_module" and isinstance(modules[node.target], IDENTITY_AT_INFERENCE)
           and len(node.args) == 1 and len(node.users) == 1):
        node = node.args[0]
    return node


def _is_add(node: fx.Node) -> bool:
    return (node.op == "call_function" and node.target in ADD_FUNCTIONS) or (node.op == "call_method" and node.target in ADD_METHODS)


@dataclass(frozen=True)
class ResidualPoint:
    """A module whose output crosses a residual add: `conv` is set for a branch output (the
    conv whose output, after its BatchNorm, enters the add), None for the residual stream."""

    module: str
    conv: str | None = None


def is_activation(m: nn.Module) -> bool:
    """An elementwise activation layer of torch.nn (ReLU, ReLU6, SiLU, ...)."""
    return type(m).__module__ == "torch.nn.modules.activation"


def _shortcut_source(node, modules: dict[str, nn.Module]):
    """The node a shortcut reads, through slicing and zero padding (CIFAR's option-A shortcut)
    and identity-like layers: both commute with a quantizer whose grid holds 0."""
    while isinstance(node, fx.Node):
        if node.op == "call_function" and node.target in SHAPE_ONLY_FUNCTIONS:
            node = node.args[0]
        elif node.op == "call_module" and isinstance(modules[node.target], IDENTITY_AT_INFERENCE) and len(node.args) == 1:
            node = node.args[0]
        else:
            return node
    return node


def residual_points(model: nn.Module, graph: fx.Graph | None = None) -> list[ResidualPoint]:
    """Where a residual network's adds read and write float tensors, in forward order.

    - branch: each conv whose output (after its BatchNorm, if any) goes straight into an add
      and nowhere else: a ResNet block's last conv and the shortcut's downsample conv;
    - stream: the module that produces the tensor an identity shortcut carries (the stem's
      activation or pooling) and the activation right after each add (the block output).
    A module called more than once in the forward (a shared ReLU) never qualifies: a
    quantizer on it would act on every call.
    """
    graph = trace(model) if graph is None else graph
    modules = dict(model.named_modules())
    calls = _called_modules(graph, model)
    bn_of = _conv_bn(graph, model)
    found: dict[str, ResidualPoint] = {}

    def once(node) -> bool:
        return isinstance(node, fx.Node) and node.op == "call_module" and len(calls[node.target]) == 1

    for node in graph.nodes:
        if not _is_add(node):
            continue
        for arg in node.args[:2]:
            arg = _through_identities(arg, modules)
            if once(arg) and len(arg.users) == 1 and arg.target in bn_of:
                found.setdefault(arg.target, ResidualPoint(arg.target, bn_of[arg.target]))
            elif once(arg) and len(arg.users) == 1 and isinstance(modules[arg.target], nn.Conv2d):
                found.setdefault(arg.target, ResidualPoint(arg.target, arg.target))
            elif once(src := _shortcut_source(arg, modules)) and not isinstance(modules[src.target], nn.Conv2d):
                found.setdefault(src.target, ResidualPoint(src.target))
        users = list(node.users)
        if len(users) == 1 and once(users[0]) and is_activation(modules[users[0].target]):
            found.setdefault(users[0].target, ResidualPoint(users[0].target))
    return list(found.values())


def residual_branch_outputs(model: nn.Module, graph: fx.Graph | None = None) -> list[tuple[str, str]]:
    """(conv name, output module name) of each residual branch output (`residual_points`)."""
    return [(p.conv, p.module) for p in residual_points(model, graph) if p.conv is not None]
