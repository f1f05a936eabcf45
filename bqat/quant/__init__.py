"""Quantizers, quantized modules and the twin builder.

Importing this package registers the built-in quantizers.
"""

from bqat.quant import lsq  # noqa: F401  (registers "lsq")
from bqat.quant.base import Quantizer
from bqat.quant.modules import QConv2d, QLinear
from bqat.quant.registry import QUANTIZERS, get_quantizer, register_quantizer
from bqat.quant.twin import make_twin

__all__ = ["QUANTIZERS", "QConv2d", "QLinear", "Quantizer", "get_quantizer", "make_twin", "register_quantizer"]
