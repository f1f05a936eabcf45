"""The blocks of a twin and its partner, from what `BlockReplacement` is given, and the check
that they fit together.

`blocks` is one of
- None: bqat's automatic split of the partner (`bqat.models.split.default_boundaries`, timm
  models), whose module names then cut the twin too;
- a list of lists of module names, one list per block, in forward order (as `model.blocks`);
  the last block also runs the model's `forward_head` when it has one (timm models);
- a callable `model -> list of callables`, applied to the twin and to the partner alike: for
  models that do work in code between their modules (torchvision's ResNet flattens in `forward`).

The check (`check_blocks`) runs a probe batch through each model, in eval mode, under no_grad:
chaining the blocks must reproduce the model's own forward, and the twin's blocks must agree with
the partner's in number and output shapes. Running the twin would initialise its data-dependent
quantizers (bqat's step sizes, Brevitas' statistics) from the probe, so the twin is checked on a
deep copy: the twin given is left exactly as it was.
"""

from __future__ import annotations

import copy
from typing import Callable, Sequence

import torch
from torch import nn

from bqat.errors import BadArgument, UserError
from bqat.models.split import default_boundaries, resolve, split_blocks

Cut = Callable[[nn.Module], list]  # model -> its blocks, in order


def block_cut(blocks, partner: nn.Module, input_size: tuple[int, ...] | None) -> tuple[Cut, list[list[str]] | None]:
    """(model -> blocks, the module names or None for a callable) from the `blocks` argument."""
    if callable(blocks) and not isinstance(blocks, (list, tuple)):
        return called(blocks), None
    if blocks is None:
        try:
            names = default_boundaries(partner, input_size)
        except UserError as err:
            raise BadArgument(f"{err} (in Python: BlockReplacement(..., blocks=[[names], ...]) or blocks=<model -> list of callables>)") from None
    else:
        names = module_names(blocks)
    return (lambda model: split_blocks(model, names)), names


def module_names(blocks) -> list[list[str]]:
    if not isinstance(blocks, Sequence) or isinstance(blocks, str) or not blocks or not all(
            isinstance(b, Sequence) and not isinstance(b, str) and b and all(isinstance(n, str) for n in b) for b in blocks):
        raise BadArgument(f"blocks must be None, a list of lists of module names ([['conv1', 'layer1'], ['layer2'], ...]) "
                          f"or a callable model -> list of callables; got {blocks!r:.200}")
    return [list(b) for b in blocks]


def called(fn: Callable) -> Cut:
    def cut(model: nn.Module) -> list:
        blocks = list(fn(model))
        bad = next((k for k, b in enumerate(blocks, 1) if not callable(b)), None)
        if not blocks or bad is not None:
            what = "no blocks" if not blocks else f"block {bad}, a {type(blocks[bad - 1]).__name__}, which cannot be called"
            raise BadArgument(f"blocks({type(model).__name__}) returned {what}; it must return a list of callables (modules or functions)")
        return blocks

    return cut


def check_names(names: list[list[str]], model: nn.Module, role: str) -> None:
    """Every name of every block is a module (or method) of `model`."""
    for k, block in enumerate(names, 1):
        for name in block:
            try:
                resolve(model, name)
            except AttributeError:
                raise BadArgument(f"block {k}: the {role} ({type(model).__name__}) has no module {name!r}; "
                                  f"blocks must name modules both models have") from None


def probe(model: nn.Module, example_input) -> tuple[torch.Tensor | None, bool]:
    """(probe batch, whether its size was guessed): `example_input` (a batch, or its (C, H, W)),
    else timm's `pretrained_cfg` input size; (None, True) when neither says."""
    if isinstance(example_input, torch.Tensor):
        return example_input[:2].detach(), False
    size, guessed = example_input, False
    if size is None:
        size, guessed = getattr(model, "pretrained_cfg", None) and model.pretrained_cfg.get("input_size"), True
        if size is None:
            return None, True
    param = next(model.parameters(), None)
    x = torch.randn(2, *tuple(int(s) for s in size), generator=torch.Generator().manual_seed(0))
    return (x if param is None else x.to(param.device, param.dtype)), guessed


class ProbeFailed(Exception):
    """The model's own forward rejected the probe: its size was wrong, not the blocks."""


@torch.no_grad()
def block_shapes(model: nn.Module, blocks: list, x: torch.Tensor, role: str, *, guessed: bool) -> list[tuple]:
    """Output shapes of the blocks chained on `x`; raises unless the chain equals model(x)."""
    was_training = model.training
    model.eval()
    try:
        x = on_device(x, model)
        try:
            expected = model(x)
        except Exception as err:  # noqa: BLE001 - the model's own forward: wrong probe size (or a broken model)
            if guessed:
                raise ProbeFailed from err
            raise BadArgument(f"the {role} ({type(model).__name__}) rejects example_input of shape {tuple(x.shape)} "
                              f"({type(err).__name__}: {err})") from None
        h, shapes = x, []
        for k, block in enumerate(blocks, 1):
            try:
                h = block(h)
            except Exception as err:  # noqa: BLE001 - whatever a block raises, its place is the news
                raise BadArgument(f"block {k} of the {role} does not run on the output of block {k - 1} "
                                  f"({type(err).__name__}: {str(err)[:200]}); the blocks must compose in forward order") from None
            if not isinstance(h, torch.Tensor):
                raise BadArgument(f"block {k} of the {role} returns a {type(h).__name__}, not a tensor")
            shapes.append(tuple(h.shape))
        if not isinstance(expected, torch.Tensor) or expected.shape != h.shape or not close(h, expected):
            diff = f"max difference {float((h - expected).abs().max()):.3g}" if getattr(expected, "shape", None) == h.shape else \
                f"shape {tuple(h.shape)}, the model's {tuple(getattr(expected, 'shape', ()))}"
            raise BadArgument(f"chaining the {len(blocks)} blocks of the {role} ({type(model).__name__}) does not reproduce "
                              f"its forward ({diff}); the blocks must cover the whole model in forward order, code between "
                              f"modules included (blocks=<model -> list of callables> for such models)")
        return shapes
    finally:
        model.train(was_training)


def close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return bool((a - b).abs().max() <= 1e-4 * b.abs().max() + 1e-6)


def on_device(x: torch.Tensor, model: nn.Module) -> torch.Tensor:
    param = next(model.parameters(), None)
    return x if param is None else x.to(param.device, param.dtype if x.is_floating_point() else x.dtype)


def check_blocks(cut: Cut, twin: nn.Module, partner: nn.Module, x: torch.Tensor, *, guessed: bool = False) -> bool:
    """Raise BadArgument unless the blocks of each model chain to its forward and the twin's
    agree with the partner's in number and output shapes. False when a guessed probe size does
    not fit the partner (the caller checks on a real batch later)."""
    twin = copy.deepcopy(twin)  # running it initialises its quantizers: only a copy runs
    lp, fp = cut(twin), cut(partner)
    if len(lp) != len(fp):
        raise BadArgument(f"the blocks give the twin {len(lp)} blocks and the partner {len(fp)}; "
                          "twin and partner must be cut alike (the same architecture)")
    try:
        fp_shapes = block_shapes(partner, fp, x, "partner", guessed=guessed)
    except ProbeFailed:
        return False
    lp_shapes = block_shapes(twin, lp, x, "twin", guessed=False)
    for k, (a, b) in enumerate(zip(lp_shapes, fp_shapes), 1):
        if a != b:
            raise BadArgument(f"block {k}: the twin's output has shape {a}, the partner's {b}; "
                              "twin and partner must be the same architecture")
    return True


def shared_parameter(twin: nn.Module, partner: nn.Module) -> str | None:
    """The name of a parameter the twin shares with the partner (freezing one would freeze both)."""
    mine = {id(p) for p in partner.parameters()}
    return next((n for n, p in twin.named_parameters() if id(p) in mine), None)
