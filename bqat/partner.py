"""The FP partner: loaded from a checkpoint, or auto-trained once and cached.

Auto-trained partners are cached under `partner.cache_dir`, keyed by model, data, seed and
the partner recipe; a file lock makes concurrent runs of a sweep train it once.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import timm.optim
import timm.scheduler
from filelock import FileLock
from omegaconf import OmegaConf
from torch import nn

from bqat.config import short_hash
from bqat.engine import atomic_save, evaluate, fit, load_checkpoint
from bqat.errors import UserError
from bqat.replace import Classifier

log = logging.getLogger("bqat")


def cache_key(cfg) -> str:
    """Everything that changes the trained partner, and nothing else."""
    recipe = {
        "model": OmegaConf.to_container(cfg.model, resolve=True),
        "data": {k: v for k, v in OmegaConf.to_container(cfg.data, resolve=True).items() if k not in ("num_workers",)},
        "seed": cfg.seed,
        "partner": {k: cfg.partner[k] for k in ("epochs", "lr", "weight_decay")},
        "limit_train_batches": cfg.trainer.limit_train_batches,
    }
    text = json.dumps(recipe, sort_keys=True, default=str)
    return f"{cfg.model.name}-{cfg.data.name}-s{cfg.seed}-{short_hash(text)}"


def load_state_dict_into(model: nn.Module, state: dict, source: str, hint: str = "check model= and the checkpoint") -> None:
    """Load weights, naming mismatching keys in one line when they do not fit."""
    if not isinstance(state, dict):
        raise UserError(f"{source} holds no state_dict; {hint}")
    if "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shape = sorted(k for k in set(own) & set(state) if hasattr(own[k], "shape") and tuple(own[k].shape) != tuple(getattr(state[k], "shape", ())))
    if missing or unexpected or shape:
        parts = []
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", shape)):
            if keys:
                parts.append(f"{label}: {', '.join(keys[:4])}{' ...' if len(keys) > 4 else ''}")
        raise UserError(f"{source} does not fit model {type(model).__name__} ({'; '.join(parts)}); {hint}")
    model.load_state_dict(state)


def train_partner(model: nn.Module, data, cfg, device) -> float:
    """Plain FP training with SGD + cosine: the partner's recipe."""
    task = Classifier(model).to(device)
    optimizer = timm.optim.create_optimizer_v2(model, opt="sgd", lr=cfg.partner.lr, momentum=0.9, weight_decay=cfg.partner.weight_decay)
    n = len(data.train) if cfg.trainer.limit_train_batches is None else min(len(data.train), cfg.trainer.limit_train_batches)
    scheduler, _ = timm.scheduler.create_scheduler_v2(optimizer, sched="cosine", num_epochs=max(cfg.partner.epochs, 1), step_on_epochs=False, updates_per_epoch=n)
    state = fit(task, data, optimizer, scheduler, epochs=cfg.partner.epochs, cfg=cfg.trainer, device=device, metric="fp", desc="partner")
    return state.last_val.get("fp", float("nan"))


def get_partner(model: nn.Module, data, cfg, device) -> tuple[nn.Module, float, str]:
    """Fill `model` with the partner's FP weights; return (model, partner val top-1, source)."""
    if cfg.partner.checkpoint:
        path = Path(cfg.partner.checkpoint)
        load_state_dict_into(model, load_checkpoint(path), f"partner.checkpoint {path}")
        model.to(device)
        top1 = evaluate(Classifier(model), data.val, limit=cfg.trainer.limit_val_batches, device=device)["fp"]
        return model, top1, str(path)

    cache = Path(cfg.partner.cache_dir) / f"{cache_key(cfg)}.pt"
    cache.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(cache) + ".lock"):
        if cache.is_file():
            saved = load_checkpoint(cache)
            load_state_dict_into(model, saved["state_dict"], f"cached partner {cache}")
            log.info(f"partner: reusing {cache} (val top-1 {saved['top1']:.2f})")
            return model.to(device), float(saved["top1"]), str(cache)
        log.info(f"partner: training {cfg.model.name} for {cfg.partner.epochs} epochs, cached at {cache}")
        model.to(device)
        top1 = train_partner(model, data, cfg, device)
        atomic_save({"state_dict": model.state_dict(), "top1": top1, "key": cache.stem}, cache)
    return model, top1, str(cache)
