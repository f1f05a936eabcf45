"""Models: CIFAR ResNets registered into timm, the model factory and block splitting."""

import difflib
import logging

import timm
from omegaconf import DictConfig, OmegaConf
from torch import nn

from bqat.errors import UserError
from bqat.models import cifar_resnet  # noqa: F401  (registers resnet20/32/56 with timm)
from bqat.models.split import Block, check_split, default_boundaries, split_blocks

log = logging.getLogger("bqat")


def build_model(model_cfg, num_classes: int, in_chans: int = 3) -> nn.Module:
    """timm.create_model from the `model` config group."""
    name = model_cfg.name
    if name not in timm.list_models():
        close = difflib.get_close_matches(name, timm.list_models(), n=3, cutoff=0.6)
        hint = f"; did you mean {', '.join(close)}?" if close else "; see timm.list_models()"
        raise UserError(f"unknown model {name!r}{hint} (model.name=<timm name>)")
    kwargs = model_cfg.get("kwargs") or {}
    # Plain lists and dicts: timm checks isinstance(x, (list, tuple)) on some arguments.
    kwargs = OmegaConf.to_container(kwargs, resolve=True) if isinstance(kwargs, DictConfig) else dict(kwargs)
    try:
        return timm.create_model(name, pretrained=False, num_classes=num_classes, in_chans=in_chans, **kwargs)
    except TypeError as err:  # an argument the model's constructor does not take
        raise UserError(f"timm model {name!r} rejects model.kwargs {kwargs} ({err}); fix or drop model.kwargs") from err


def model_boundaries(model: nn.Module, model_cfg, input_size: tuple[int, ...] | None = None) -> list[list[str]]:
    """Explicit `model.blocks` if given, else the split table's (traced at `input_size`)."""
    blocks = model_cfg.get("blocks")
    if blocks:
        boundaries = [[str(n) for n in names] for names in blocks]
    else:
        boundaries = default_boundaries(model, input_size)
    log.info(f"blocks ({len(boundaries)}): " + " | ".join(" ".join(names) for names in boundaries))
    return boundaries


__all__ = ["Block", "build_model", "check_split", "default_boundaries", "model_boundaries", "split_blocks"]
