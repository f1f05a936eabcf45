"""Quantizers, quantized modules and the twin builder.

Every module of this package is imported here, so a quantizer registers itself just by
existing: adding one is one module in bqat/quant/ plus one conf/quant/<name>.yaml (README).
"""

import importlib
import pkgutil

from bqat.quant.base import Quantizer, keep_scales_positive, quantizer_regularization
from bqat.quant.integer_bias import attach_integer_bias
from bqat.quant.modules import QConv2d, QLinear
from bqat.quant.registry import QUANTIZERS, get_quantizer, register_quantizer
from bqat.quant.twin import add_residual_quantizers, make_twin, residual_bits_of, set_bn_eps, twin_from_config

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["QUANTIZERS", "QConv2d", "QLinear", "Quantizer", "add_residual_quantizers", "attach_integer_bias", "get_quantizer", "keep_scales_positive", "make_twin", "quantizer_regularization",
           "register_quantizer", "residual_bits_of", "set_bn_eps", "twin_from_config"]
