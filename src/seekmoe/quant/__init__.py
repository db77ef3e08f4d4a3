"""Weight-only int8/int4 quantization for decoding on small hardware: formats (formats.py), the products that read
the quantized bytes (kernels.py), quantized modules swapped into a model from outside (modules.py), folders that
reload without requantizing (folder.py), `seekmoe quantize` and the --quantize flags (cli.py)."""

from .formats import DEFAULT_GROUP_SIZE, SCHEMES, QuantSpec, dequantize, quantize
from .modules import (QuantizedEmbedding, QuantizedExperts, QuantizedLinear, configure_quantized, quantize_model,
                      quantized_bytes)

__all__ = ["SCHEMES", "DEFAULT_GROUP_SIZE", "QuantSpec", "quantize", "dequantize", "quantize_model",
           "configure_quantized", "quantized_bytes", "QuantizedLinear", "QuantizedEmbedding", "QuantizedExperts"]
