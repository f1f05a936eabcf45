"""Models: CIFAR ResNets registered into timm, the model factory and block splitting."""

import difflib

import timm
from torch import nn

from bqat.errors import UserError
from bqat.models import cifar_resnet  # noqa: F401  (registers resnet20/32/56 with timm)
from bqat.models.split import Block, check_split, default_boundaries, split_blocks


def build_model(model_cfg, num_classes: int, in_chans: int = 3) -> nn.Module:
    """timm.create_model from the `model` config group."""
    name = model_cfg.name
    if name not in timm.list_models():
        close = difflib.get_close_matches(name, timm.list_models(), n=3, cutoff=0.6)
        hint = f"; did you mean {', '.join(close)}?" if close else "; see timm.list_models()"
        raise UserError(f"unknown model {name!r}{hint} (model.name=<timm name>)")
    kwargs = dict(model_cfg.get("kwargs") or {})
    return timm.create_model(name, pretrained=False, num_classes=num_classes, in_chans=in_chans, **kwargs)


def model_boundaries(model: nn.Module, model_cfg) -> list[list[str]]:
    """Explicit `model.blocks` if given, else the split table's."""
    blocks = model_cfg.get("blocks")
    if blocks:
        return [[str(n) for n in names] for names in blocks]
    return default_boundaries(model)


__all__ = ["Block", "build_model", "check_split", "default_boundaries", "model_boundaries", "split_blocks"]
