"""Block splitting: cut a model into an ordered list of blocks F_1..F_n that cover it.

A split is a list of boundaries, one list of names per block, run in order; the last
block also runs the model's head (pooling and classifier, `forward_head`). A name is a
module path (`layer1`, `blocks.3`, `features.denseblock2`) or, for the few models that do
work in code between modules (ViT's `_pos_embed`), a method of the model. The same names
cut the FP partner and its twin alike.

The split table (`default_boundaries`) has one generic rule and entries only where a
family needs one:
- generic (timm CNNs): the stages are timm's `feature_info` modules. `forward_features`
  is traced once to learn which modules it runs and in what order; containers that hold
  a stage (`blocks`, `stages`, `features`) are flattened one level per dotted name. Block
  k ends at the k-th stage; the last block also runs what follows the last stage
  (`conv_head`, `bn2`, `final_conv`, `norm_pre`) and the head. Stages at reduction 1 or
  2 (the stem of an ImageNet network) join F_1, so timm ResNet gives
  stem + layer1 | layer2 | layer3 | layer4 + head.
- CIFAR ResNets (stride-1 stem, stages at reduction 1/2/4): stem + layer1 | layer2 | layer3.
- ViT/DeiT: patch embedding + position embedding + the first quarter of the transformer
  blocks | ... | the last quarter + final norm.

Every split is checked: chaining the blocks must reproduce the model's own forward
exactly, else a clear error names `model.blocks`, the explicit override.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from bqat.errors import UserError

HEAD_MODULES = {"global_pool", "fc", "head", "head_drop", "classifier", "pre_logits", "norm_head", "fc_norm"}
OVERRIDE_HINT = "give one with model.blocks=[[stem,stage1],[stage2],...] (module names, in forward order)"


def resolve(model: nn.Module, name: str) -> Callable:
    """The submodule `name` (dotted path), or the model's method `name` (ViT's `_pos_embed`)."""
    try:
        return model.get_submodule(name)
    except AttributeError:
        step = getattr(model, name, None)
        if callable(step) and not isinstance(step, nn.Module):
            return step
        raise


@dataclass(frozen=True)
class Block:
    """One block F_k: runs `names` of `model` in order, then its head if `head`."""

    model: nn.Module
    names: tuple[str, ...]
    head: bool = False

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        for name in self.names:
            x = resolve(self.model, name)(x)
        if self.head:
            x = self.model.forward_head(x)
        return x


# --- the split table ---------------------------------------------------------------------


def resnet_boundaries(model: nn.Module, input_size=None) -> list[list[str]]:
    """ResNet layout (CIFAR ResNets): stem + layer1, layer2, ..., layerN."""
    children = [n for n, _ in model.named_children() if n not in HEAD_MODULES]
    stages = [n for n in children if n.startswith("layer") and n[5:].isdigit()]
    stem = children[: children.index(stages[0])]
    return [stem + [stages[0]]] + [[s] for s in stages[1:]]


def vit_boundaries(model: nn.Module, input_size=None, n_blocks: int = 4) -> list[list[str]]:
    """ViT/DeiT: its forward_features adds the class token and position embedding in code
    (`_pos_embed`), then runs `blocks` and `norm`; the transformer blocks go in n_blocks groups."""
    depth = len(model.blocks)
    n = min(n_blocks, depth)
    ends = [round(depth * (k + 1) / n) for k in range(n)]
    starts = [0, *ends[:-1]]
    groups = [[f"blocks.{i}" for i in range(a, b)] for a, b in zip(starts, ends)]
    groups[0] = ["patch_embed", "_pos_embed", "patch_drop", "norm_pre", *groups[0]]
    groups[-1].append("norm")
    return groups


def _family_table() -> list[tuple[type, Callable]]:
    """Families that need their own rule; everything else gets `feature_boundaries`."""
    from timm.models.vision_transformer import VisionTransformer

    from bqat.models.cifar_resnet import CifarResNet

    return [(CifarResNet, resnet_boundaries), (VisionTransformer, vit_boundaries)]


def default_boundaries(model: nn.Module, input_size: tuple[int, ...] | None = None) -> list[list[str]]:
    """The split table: a family's own rule where it has one, else the generic feature_info rule.

    `input_size` (C, H, W) is the probe input for tracing forward_features; by default the
    model's own pretrained input size.
    """
    for cls, rule in _family_table():
        if isinstance(model, cls):
            return rule(model, input_size)
    return feature_boundaries(model, input_size)


# --- the generic rule --------------------------------------------------------------------


def stage_modules(model: nn.Module) -> list[str]:
    """timm's feature_info modules at reduction >= 4: one per stage, the stem's left out."""
    info = getattr(model, "feature_info", None)
    info = getattr(info, "info", info)  # a FeatureInfo object or timm's plain list of dicts
    if not info or not hasattr(model, "forward_features") or not hasattr(model, "forward_head"):
        raise UserError(f"bqat has no block split for {type(model).__name__} (no timm feature_info); {OVERRIDE_HINT}")
    return [f["module"] for f in info if f.get("reduction", 4) >= 4]


def flatten_for(model: nn.Module, stages: list[str]) -> list[str]:
    """Top-level children, with every container that holds a stage replaced by its children
    (`blocks` -> `blocks.0`, `blocks.1`, ...), as deep as the dotted stage names go."""
    names = [n for n, _ in model.named_children()]
    for stage in stages:
        parts = stage.split(".")
        for depth in range(1, len(parts)):
            prefix = ".".join(parts[:depth])
            if prefix in names:
                i = names.index(prefix)
                children = [f"{prefix}.{c}" for c, _ in model.get_submodule(prefix).named_children()]
                names[i : i + 1] = children
    return names


def probe_input(model: nn.Module, input_size: tuple[int, ...] | None) -> torch.Tensor:
    if input_size is None:
        first = next((m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))), None)
        chans = getattr(first, "in_channels", 3)
        _, h, w = getattr(model, "pretrained_cfg", {}).get("input_size", (3, 224, 224))
        input_size = (chans, h, w)
    param = next(model.parameters())
    return torch.randn(2, *input_size, generator=torch.Generator().manual_seed(0)).to(param.device, param.dtype)


@torch.no_grad()
def forward_order(model: nn.Module, names: list[str], x: torch.Tensor) -> list[str]:
    """The names among `names` that forward_features runs, in the order it runs them."""
    order: list[str] = []
    hooks = [model.get_submodule(n).register_forward_hook(lambda *_, n=n: order.append(n)) for n in names]
    was_training = model.training
    try:
        model.eval()
        model.forward_features(x)
    except (RuntimeError, TypeError, ValueError) as err:
        raise UserError(f"tracing {type(model).__name__}.forward_features failed ({err}); check the input size or {OVERRIDE_HINT}") from err
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
    return order


def feature_boundaries(model: nn.Module, input_size: tuple[int, ...] | None = None) -> list[list[str]]:
    """Generic timm CNN rule: cut after each feature_info stage, in forward_features order."""
    stages = stage_modules(model)
    try:
        order = forward_order(model, flatten_for(model, stages), probe_input(model, input_size))
    except AttributeError as err:
        raise UserError(f"feature_info of {type(model).__name__} names no module ({err}); {OVERRIDE_HINT}") from err
    missing = [s for s in stages if s not in order]
    cuts = [order.index(s) + 1 for s in stages[:-1] if s in order]
    if missing or not stages or cuts != sorted(set(cuts)):
        raise UserError(f"bqat cannot cut {type(model).__name__} at its feature_info stages {stages}; {OVERRIDE_HINT}")
    return [order[a:b] for a, b in zip([0, *cuts], [*cuts, len(order)])]


# --- blocks and the check ----------------------------------------------------------------


def split_blocks(model: nn.Module, boundaries: list[list[str]]) -> list[Block]:
    """One Block per list of names; the last also runs `forward_head` if the model has one (timm's)."""
    last = len(boundaries) - 1
    head = callable(getattr(model, "forward_head", None))
    return [Block(model, tuple(names), head=head and i == last) for i, names in enumerate(boundaries)]


def chain(blocks: list[Block], x: torch.Tensor) -> torch.Tensor:
    for block in blocks:
        x = block(x)
    return x


@torch.no_grad()
def check_split(model: nn.Module, boundaries: list[list[str]], input_size: tuple[int, ...]) -> None:
    """Raise UserError unless chaining the blocks equals model(x) exactly (eval mode)."""
    was_training = model.training
    model.eval()
    try:
        param = next(model.parameters())
        x = torch.randn(2, *input_size, generator=torch.Generator().manual_seed(0)).to(param.device)
        try:
            same = torch.equal(chain(split_blocks(model, boundaries), x), model(x))
        except (AttributeError, RuntimeError, TypeError, ValueError) as err:
            raise UserError(f"block split {boundaries} does not run ({err}); set model.blocks explicitly") from err
        if not same:
            raise UserError(
                f"chaining blocks {boundaries} does not reproduce {type(model).__name__}'s forward; "
                "set model.blocks to boundaries that cover the model in order"
            )
    finally:
        model.train(was_training)
