"""Quantizer registry: `@register_quantizer("name")` on a Quantizer subclass (as timm registers models)."""

from __future__ import annotations

import warnings

from bqat.errors import UserError

QUANTIZERS: dict[str, type] = {}


def register_quantizer(name: str):
    def decorator(cls):
        if name in QUANTIZERS:
            warnings.warn(f"quantizer {name!r} registered twice; the later one wins", stacklevel=2)
        QUANTIZERS[name] = cls
        cls.registered_name = name
        return cls

    return decorator


def get_quantizer(name: str) -> type:
    if name not in QUANTIZERS:
        known = ", ".join(sorted(QUANTIZERS) + ["none"])
        raise UserError(f"unknown quantizer {name!r}; choose one of: {known} (quant=<name>)")
    return QUANTIZERS[name]
