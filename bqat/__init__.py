"""bqat: quantization-aware training guided by block replacement (arXiv 2412.15846)."""

__version__ = "0.1.0"
