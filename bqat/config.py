"""Config helpers: the run-name resolver and validation of a composed config."""

from __future__ import annotations

import hashlib
import re

from omegaconf import DictConfig, OmegaConf

from bqat.errors import UserError


def short_hash(text: str) -> str:
    """A stable 6-hex-digit digest (run folders and cache keys)."""
    return hashlib.sha1(str(text).encode()).hexdigest()[:6]


# Used by conf/train.yaml's run_name; must exist before Hydra composes.
if not OmegaConf.has_resolver("bqat_hash"):
    OmegaConf.register_new_resolver("bqat_hash", short_hash)


def _check_bits(value, key: str, allow=()) -> None:
    # 2 to 8: at 1 bit the signed grid is [-1, 0] and LSQ's Qp = 0 leaves no step to learn.
    if str(value) in allow:
        return
    if isinstance(value, bool) or not isinstance(value, int) or not 2 <= value <= 8:
        extra = f" or {'/'.join(allow)}" if allow else ""
        raise UserError(f"{key} must be an integer from 2 to 8{extra}, got {value!r}")


def _check_int(value, key: str, minimum: int, what: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise UserError(f"{key} must be {what}, got {value!r}")


def validate(cfg: DictConfig) -> None:
    """Reject values that would fail later or train nonsense, with one clear line."""
    _check_bits(cfg.bits.w, "bits.w")
    _check_bits(cfg.bits.a, "bits.a")
    _check_bits(cfg.bits.first_last, "bits.first_last", allow=("fp", "same"))
    _check_bits(cfg.bits.get("depthwise", "same"), "bits.depthwise", allow=("fp", "same"))
    from bqat.quant.mixed import layer_patterns  # here: torch is not needed to compose a config

    layer_patterns(cfg.bits)  # bits.layers values; its globs are checked against the model's names
    per_channel = cfg.quant.get("per_channel", False)
    if not isinstance(per_channel, bool) and per_channel != "auto":
        raise UserError(f"quant.per_channel must be true, false or auto, got {per_channel!r}")
    for key, value in (("trainer.compile", cfg.trainer.get("compile", "auto")), ("quant.compile", cfg.quant.get("compile", False))):
        if not isinstance(value, bool) and value != "auto":
            raise UserError(f"{key} must be true, false or auto, got {value!r}")
    clip = cfg.trainer.get("clip_grad")
    if clip is not None and (isinstance(clip, bool) or not isinstance(clip, (int, float)) or not clip > 0):
        raise UserError(f"trainer.clip_grad must be a positive number or null, got {clip!r}")
    resume = cfg.get("resume", True)
    if not isinstance(resume, bool) and resume != "best":
        raise UserError(f"resume must be true, false or best, got {resume!r}")
    _check_int(cfg.trainer.epochs, "trainer.epochs", 0, "an integer >= 0")
    _check_int(cfg.partner.epochs, "partner.epochs", 0, "an integer >= 0")
    _check_int(cfg.data.batch_size, "data.batch_size", 1, "an integer of at least 1")
    _check_int(cfg.seed, "seed", 0, "an integer >= 0")
    from bqat.objective import Objective  # here: this module stays light (no torch) for scripts
    from bqat.replace import batch_paths_setting

    # Before any work (a partner may train for minutes first).
    Objective.from_cfg(cfg.loss)
    batch_paths_setting(cfg.schedule)
    for key in ("limit_train_batches", "limit_val_batches"):
        value = cfg.trainer[key]
        if value is not None:
            _check_int(value, f"trainer.{key}", 1, "a positive number of batches or null")


_NUMBER = r"[-+]?[0-9][0-9.eE+-]*"
_NUMERIC_GROUP = re.compile(rf"^(\+{{0,2}}bits)=({_NUMBER}(?:,{_NUMBER})*)$")


_LAYERS_OVERRIDE = re.compile(r"^(\+{0,2}bits\.layers=)(.*)$", re.S)
_QUOTED_KEY = re.compile(r"""(["'])([^"']*)\1(\s*:)""")


def unquote_layer_globs(argv: list[str]) -> list[str]:
    """`+bits.layers={"layer1.*": {w: 4}}` -> `+bits.layers={layer1.*: {w: 4}}`.

    Hydra's override grammar takes dict keys unquoted only (`*`, `?`, `.` are allowed
    there), while a glob reads naturally in quotes; both spellings work.
    """
    out = []
    for arg in argv:
        m = _LAYERS_OVERRIDE.match(arg)
        out.append(m.group(1) + _QUOTED_KEY.sub(r"\2\3", m.group(2)) if m else arg)
    return out


def quote_numeric_groups(argv: list[str]) -> list[str]:
    """`bits=2` / `bits=2,3,4` -> `bits='2'` / `bits='2','3','4'`.

    Hydra parses 2 as an int, and a config-group override must be a string; quoting
    keeps the natural spelling working for runs and sweeps alike (and makes bits=2.5 or
    bits=-1 reach the one-line "bits must be an integer from 2 to 8").
    """
    out = []
    for arg in argv:
        m = _NUMERIC_GROUP.match(arg)
        out.append(f"{m.group(1)}=" + ",".join(f"'{v}'" for v in m.group(2).split(",")) if m else arg)
    return out
