"""Quantized frozen bases (NF4 / FP4 / int8, bitsandbytes' numbers) and LoftQ initialisation."""

from jpeft.quant.formats import (
    DYNAMIC_CODE,
    FP4_CODE,
    NF4_CODE,
    QUANT_TYPES,
    QuantizedArray,
    is_quantized,
    quantize,
)
from jpeft.quant.loftq import loftq_init, low_rank
from jpeft.quant.model import quantize_model
from jpeft.quant.params import (
    DEFAULT_SKIP_MODULES,
    QuantizationConfig,
    dequantize_params,
    is_skipped,
    quantize_params,
    quantized_leaves,
    quantized_nbytes,
)

__all__ = [
    "DEFAULT_SKIP_MODULES",
    "DYNAMIC_CODE",
    "FP4_CODE",
    "NF4_CODE",
    "QUANT_TYPES",
    "QuantizationConfig",
    "QuantizedArray",
    "dequantize_params",
    "is_quantized",
    "is_skipped",
    "loftq_init",
    "low_rank",
    "quantize",
    "quantize_model",
    "quantize_params",
    "quantized_leaves",
    "quantized_nbytes",
]
