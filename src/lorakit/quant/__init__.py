"""4-bit NormalFloat (NF4) storage of frozen base weights, bit-exact with bitsandbytes (QLoRA)."""

from lorakit.quant.linear import CastLinear, NF4Linear, quantize_model
from lorakit.quant.nf4 import NF4_CODE, NF4State, dequantize_nf4, dynamic_map_signed, quantize_nf4
from lorakit.quant.stream import StreamedLoad, load_quantized_model, precision_report

__all__ = [
    "CastLinear",
    "StreamedLoad",
    "load_quantized_model",
    "precision_report",
    "NF4_CODE",
    "NF4Linear",
    "NF4State",
    "dequantize_nf4",
    "dynamic_map_signed",
    "quantize_model",
    "quantize_nf4",
]
