"""Quantizer registry: `@register_quantizer("name")` on a Quantizer subclass (bqat.registry)."""

from __future__ import annotations

from bqat.registry import Registry

QUANTIZERS = Registry("quant", extra=("none",))  # quant=none: the twin keeps float layers
register_quantizer = QUANTIZERS.register


def get_quantizer(name: str) -> type:
    """The quantizer class registered as `name` (one UserError line naming the choices if none is)."""
    return QUANTIZERS[name]
