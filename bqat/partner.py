"""The FP partner, from one of three sources (first that applies):

1. `partner.checkpoint=PATH`: FP weights the user trusts, used as they are: a bqat partner
   file, or a plain state_dict such as a timm or torchvision weights file (`.pth`/`.pt`,
   or `.safetensors`), optionally wrapped in {"state_dict"|"model": ...} or saved from DDP.
2. `model.pretrained=true`: timm's weights from the model hub. Used as they are when
   their classifier fits the data (ImageNet weights on ImageNet); otherwise the backbone
   starts from them and the partner is fine-tuned as in 3.
3. Auto-train: `partner.epochs` of plain FP training, cached under `partner.cache_dir`,
   keyed by model, data, seed and the partner recipe; a file lock makes concurrent runs
   of a sweep train it once (the others wait, then reuse it).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import timm
import timm.optim
import timm.scheduler
import torch
from filelock import FileLock, Timeout
from omegaconf import OmegaConf
from torch import nn

from bqat.config import short_hash
from bqat.engine import atomic_save, evaluate, fit, load_checkpoint
from bqat.errors import UserError
from bqat.task import PartnerTask

log = logging.getLogger("bqat")

# Data settings that change how the data is read, never what the partner learns.
NOT_IN_KEY = ("num_workers", "download", "cache_dir")


def cache_key(cfg) -> str:
    """Everything that changes the trained partner, and nothing else."""
    recipe = {
        "model": OmegaConf.to_container(cfg.model, resolve=True),
        # data.drop_last=true is how partners were always trained: left out, so their caches stay valid.
        "data": {k: v for k, v in OmegaConf.to_container(cfg.data, resolve=True).items()
                 if k not in NOT_IN_KEY and not (k == "drop_last" and v is True)},
        "seed": cfg.seed,
        "partner": {k: cfg.partner[k] for k in ("epochs", "lr", "weight_decay")},
        "limit_train_batches": cfg.trainer.limit_train_batches,
    }
    text = json.dumps(recipe, sort_keys=True, default=str)
    return f"{cfg.model.name}-{cfg.data.name}-s{cfg.seed}-{short_hash(text)}"


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    """A state_dict from any of the usual weight files (see the module docstring)."""
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        if not path.is_file():
            raise UserError(f"checkpoint not found: {path}")
        try:
            obj = load_file(str(path))
        except (SafetensorError, OSError) as err:
            raise UserError(f"cannot load checkpoint {path}: not a safetensors file ({err})") from None
    else:
        obj = load_checkpoint(path)
    if isinstance(obj, dict) and "twin" in obj:
        raise UserError(f"{path} is a bqat twin checkpoint (low-bit), not FP weights; pass the partner's weights instead")
    for key in ("state_dict", "model", "model_state_dict"):  # bqat partner, torchvision references, others
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not obj or not all(torch.is_tensor(v) for v in obj.values()):
        raise UserError(f"{path} holds no state_dict (a mapping of parameter names to tensors); pass a weights file")
    if all(k.startswith("module.") for k in obj):  # saved from DistributedDataParallel
        obj = {k.removeprefix("module."): v for k, v in obj.items()}
    return obj


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


def load_pretrained(model: nn.Module, cfg, num_classes: int, in_chans: int) -> dict:
    """Copy timm's hub weights into `model`; return their pretrained_cfg (source, classes)."""
    name = cfg.model.name
    log.info(f"partner: loading timm's pretrained weights for {name} (Hugging Face hub or its local cache)")
    hub_log = logging.getLogger("huggingface_hub")
    level = hub_log.level
    hub_log.setLevel(logging.ERROR)  # offline, the hub logs every retry; the one line below says it all
    try:
        hub = timm.create_model(name, pretrained=True, num_classes=num_classes, in_chans=in_chans, **dict(cfg.model.get("kwargs") or {}))
    except Exception as err:  # noqa: BLE001 - offline hub, unknown tag, no weights: all end the same way
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"model.pretrained=true: cannot load timm's weights for {name} ({type(err).__name__}: {reason[:200]}); "
                        f"connect to the Hugging Face hub, or download the weights and pass partner.checkpoint=<file> "
                        f"with model.pretrained=false") from None
    finally:
        hub_log.setLevel(level)
    model.load_state_dict(hub.state_dict())
    return dict(hub.pretrained_cfg)


def train_partner(model: nn.Module, data, cfg, device) -> float:
    """Plain FP training with SGD + cosine: the partner's recipe (partner.epochs=0: evaluate only)."""
    task = PartnerTask(model).to(device)
    if cfg.partner.epochs == 0:
        return evaluate(task, data.val, limit=cfg.trainer.limit_val_batches, device=device)["fp"]
    # fused: one kernel per update, and the finite-loss guard decides on the device (bqat.guard): no sync per step.
    optimizer = timm.optim.create_optimizer_v2(model, opt="sgd", lr=cfg.partner.lr, momentum=0.9, weight_decay=cfg.partner.weight_decay,
                                               fused=True)
    n = len(data.train) if cfg.trainer.limit_train_batches is None else min(len(data.train), cfg.trainer.limit_train_batches)
    scheduler, _ = timm.scheduler.create_scheduler_v2(optimizer, sched="cosine", num_epochs=max(cfg.partner.epochs, 1), step_on_epochs=False, updates_per_epoch=n)
    state = fit(task, data, optimizer, scheduler, epochs=cfg.partner.epochs, cfg=cfg.trainer, device=device, metric="fp", desc="partner")
    return state.last_val.get("fp", float("nan"))


def get_partner(model: nn.Module, data, cfg, device) -> tuple[nn.Module, float, str]:
    """Fill `model` with the partner's FP weights; return (model, partner val top-1, source)."""
    if cfg.partner.checkpoint:
        path = Path(cfg.partner.checkpoint)
        load_state_dict_into(model, read_weights(path), f"partner.checkpoint {path}")
        model.to(device)
        top1 = evaluate(PartnerTask(model), data.val, limit=cfg.trainer.limit_val_batches, device=device)["fp"]
        log.info(f"partner: loaded {path} (val top-1 {top1:.2f})")
        return model, top1, str(path)

    if cfg.model.get("pretrained"):
        weights = load_pretrained(model, cfg, data.num_classes, data.input_size[0])
        if weights.get("num_classes") == data.num_classes:
            model.to(device)
            top1 = evaluate(PartnerTask(model), data.val, limit=cfg.trainer.limit_val_batches, device=device)["fp"]
            source = f"timm:{weights.get('hf_hub_id') or cfg.model.name}"
            log.info(f"partner: timm's pretrained {cfg.model.name} as it is (val top-1 {top1:.2f})")
            return model, top1, source
        log.info(f"partner: timm's {cfg.model.name} weights have another classifier; fine-tuning them on {data.name}")

    return cached_partner(model, data, cfg, device)


def cached_partner(model: nn.Module, data, cfg, device) -> tuple[nn.Module, float, str]:
    """Auto-train once per cache key; concurrent runs wait on the lock, then reuse the file."""
    cache = Path(cfg.partner.cache_dir) / f"{cache_key(cfg)}.pt"
    cache.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(cache) + ".lock")
    try:
        lock.acquire(timeout=0)
    except Timeout:
        log.info(f"partner: waiting for another run to finish training it ({lock.lock_file})")
        lock.acquire()
    try:
        if cache.is_file():
            saved = load_checkpoint(cache)
            load_state_dict_into(model, saved["state_dict"], f"cached partner {cache}")
            log.info(f"partner: reusing {cache} (val top-1 {saved['top1']:.2f})")
            return model.to(device), float(saved["top1"]), str(cache)
        log.info(f"partner: training {cfg.model.name} for {cfg.partner.epochs} epochs, cached at {cache}")
        model.to(device)
        top1 = train_partner(model, data, cfg, device)
        atomic_save({"state_dict": model.state_dict(), "top1": top1, "key": cache.stem}, cache,
                    hint=" (the partner trains again), or cache partners elsewhere: partner.cache_dir=<folder>")
    finally:
        lock.release()
    return model, top1, str(cache)
