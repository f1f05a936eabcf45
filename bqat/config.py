"""Config helpers: where conf/ is, the run-name resolver, validation of a composed config, and
the plain arguments of the Python API (`schedule="prefix"`, `loss={...}`, `bits=2`) turned into
the same configs, with conf/'s defaults: every default lives in one place, conf/.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from bqat.errors import BadArgument, UserError


def conf_dir() -> Path:
    """conf/: the copy the wheel ships inside the package (bqat/conf), else the repository's
    top-level conf/, which a clone and an editable install read in place."""
    package = Path(__file__).resolve().parent
    shipped = package / "conf"
    return shipped if (shipped / "train.yaml").is_file() else package.parent / "conf"


CONF_DIR = conf_dir()


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


def check_bits(bits) -> None:
    """The `bits` group: w and a from 2 to 8, first_last and depthwise also fp or same."""
    _check_bits(bits.w, "bits.w")
    _check_bits(bits.a, "bits.a")
    _check_bits(bits.first_last, "bits.first_last", allow=("fp", "same"))
    _check_bits(bits.get("depthwise", "same"), "bits.depthwise", allow=("fp", "same"))


def validate(cfg: DictConfig) -> None:
    """Reject values that would fail later or train nonsense, with one clear line."""
    check_bits(cfg.bits)
    from bqat.quant.mixed import layer_patterns  # here: torch is not needed to compose a config

    layer_patterns(cfg.bits)  # bits.layers values; its globs are checked against the model's names
    residual = (cfg.get("twin") or {}).get("residual_bits")
    if residual is not None:
        _check_bits(residual, "twin.residual_bits", allow=("auto",))
    from bqat.quant.integer_bias import frozen_epochs

    frozen_epochs(cfg.get("twin") or {})  # twin.integer_bias and twin.integer_bias_epochs
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


# --- the Python API's plain arguments ------------------------------------------------------


def conf_option(group: str, name) -> DictConfig | None:
    """conf/<group>/<name>.yaml (`quant/lsq`, `schedule/sampled`), or None if the group has no such option."""
    path = CONF_DIR / group / f"{name}.yaml"
    return OmegaConf.load(path) if path.is_file() else None


def train_defaults() -> DictConfig:
    """conf/train.yaml itself (not composed): its `loss` section and its defaults list."""
    return OmegaConf.load(CONF_DIR / "train.yaml")


def default_option(group: str) -> str:
    """The option of `group` that conf/train.yaml's defaults list picks (bits: "2")."""
    for entry in train_defaults().defaults:
        if isinstance(entry, Mapping) and group in entry:
            return str(entry[group])
    raise KeyError(group)


def _mapping(value, what: str) -> DictConfig:
    if isinstance(value, DictConfig):
        return value
    if isinstance(value, Mapping):
        return OmegaConf.create(dict(value))
    raise BadArgument(f"{what} must be a name, a dict or a DictConfig, got {type(value).__name__}")


def named_config(group: str, value, what: str) -> DictConfig:
    """A group's config from a name ('sampled') or a mapping with a `name`, over the option's yaml.

    A DictConfig (what bqat-train composed) is taken as it is.
    """
    if isinstance(value, DictConfig):
        return value
    given = OmegaConf.create({"name": value}) if isinstance(value, str) else _mapping(value, what)
    if "name" not in given:
        raise BadArgument(f"{what} {OmegaConf.to_container(given)} has no 'name'; e.g. {what}={{'name': ...}}")
    return OmegaConf.merge(conf_option(group, given.name) or {}, given)


def loss_config(loss=None) -> DictConfig:
    """`loss`: None (conf/train.yaml's loss), or a dict / DictConfig of some of its keys over it."""
    defaults = train_defaults().loss
    if loss is None:
        return defaults
    given = _mapping(loss, "loss")
    unknown = sorted(set(given) - set(defaults))
    if unknown:
        raise BadArgument(f"loss has no key {', '.join(map(repr, unknown))}; its keys are {', '.join(defaults)} (conf/train.yaml)")
    return OmegaConf.merge(defaults, given)


def bits_config(bits) -> DictConfig:
    """`bits`: an int (W and A alike), a conf/bits option name ('w2a4'), or a dict / DictConfig
    of w, a, first_last, depthwise (missing keys from the default option, conf/bits/2.yaml)."""
    if isinstance(bits, DictConfig):
        cfg = bits
    elif isinstance(bits, int) and not isinstance(bits, bool):
        cfg = OmegaConf.merge(conf_option("bits", default_option("bits")), {"w": bits, "a": bits})
    elif isinstance(bits, str):
        cfg = conf_option("bits", bits)
        if cfg is None:
            options = sorted(p.stem for p in (CONF_DIR / "bits").glob("*.yaml"))
            raise BadArgument(f"bits={bits!r} names no option of conf/bits ({', '.join(options)}); or pass an int or {{'w': .., 'a': ..}}")
    else:
        cfg = OmegaConf.merge(conf_option("bits", default_option("bits")), _mapping(bits, "bits"))
    try:
        check_bits(cfg)
    except UserError as err:
        raise BadArgument(str(err)) from None
    return cfg
