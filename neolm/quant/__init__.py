"""Quantization: neolm's own int8/int4 weights, and bitsandbytes 4-bit checkpoints read without bitsandbytes.

    lm = neolm.load("EleutherAI/gpt-neo-125M", quantize="int8")   # on the fly
    neolm quantize MODEL --to int4 --out DIR                       # saved; neolm.load(DIR) needs no flag

Quantization is a module swap applied after the model is built. linear.py: formats and layers;
kernels.py: the packed matmuls; io.py: the saved folder; bnb.py: bitsandbytes 4-bit checkpoints;
quality.py: what it costs; cli.py: `neolm quantize`.
"""

from neolm.quant.io import save_quantized
from neolm.quant.linear import Int4Linear, Int8Linear, QuantLinear, quantize_model

__all__ = ["Int4Linear", "Int8Linear", "QuantLinear", "quantize_model", "save_quantized"]
