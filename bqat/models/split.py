"""Block splitting: cut a model into an ordered list of blocks F_1..F_n that cover it.

A split is a list of boundaries, one list of module names per block, run in order;
the last block also runs the model's head (pooling and classifier, `forward_head`).
The same names cut the FP partner and its twin alike. Every split is checked: chaining
the blocks must reproduce the model's own forward exactly, else a clear error names
`model.blocks`, the explicit override.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from bqat.errors import UserError

HEAD_MODULES = {"global_pool", "fc", "head", "head_drop", "classifier", "pre_logits", "norm_head", "fc_norm"}


@dataclass(frozen=True)
class Block:
    """One block F_k: runs `names` of `model` in order, then its head if `head`."""

    model: nn.Module
    names: tuple[str, ...]
    head: bool = False

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        for name in self.names:
            x = self.model.get_submodule(name)(x)
        if self.head:
            x = self.model.forward_head(x)
        return x


def resnet_boundaries(model: nn.Module) -> list[list[str]]:
    """ResNet family (timm ResNet/ResNeXt, CIFAR ResNets): stem + layer1, layer2, ..., layerN."""
    children = [n for n, _ in model.named_children() if n not in HEAD_MODULES]
    stages = [n for n in children if n.startswith("layer") and n[5:].isdigit()]
    stem = children[: children.index(stages[0])]
    return [stem + [stages[0]]] + [[s] for s in stages[1:]]


def default_boundaries(model: nn.Module) -> list[list[str]]:
    """The split table: one rule per model family."""
    names = {n for n, _ in model.named_children()}
    if {"layer1", "layer2"} <= names and hasattr(model, "forward_head"):
        return resnet_boundaries(model)
    raise UserError(
        f"bqat has no block split for {type(model).__name__}; give one with "
        "model.blocks=[[stem,stage1],[stage2],...] (module names, in forward order)"
    )


def split_blocks(model: nn.Module, boundaries: list[list[str]]) -> list[Block]:
    last = len(boundaries) - 1
    return [Block(model, tuple(names), head=(i == last)) for i, names in enumerate(boundaries)]


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
        except (AttributeError, RuntimeError, TypeError) as err:
            raise UserError(f"block split {boundaries} does not run ({err}); set model.blocks explicitly") from err
        if not same:
            raise UserError(
                f"chaining blocks {boundaries} does not reproduce {type(model).__name__}'s forward; "
                "set model.blocks to boundaries that cover the model in order"
            )
    finally:
        model.train(was_training)
