"""wan-lite's offline quantization toolchain: conversion, SmoothQuant folding, the quality report.

- `convert_checkpoint(src, dst, scheme)` (quant.convert) turns a model root into 8-bit (int8, fp8),
  optimum-quanto (quanto-int8, quanto-fp8) or bitsandbytes 4-bit (nf4) experts, streaming and
  resumable; `python -m wan_lite.quantize` is its command line.
- `quant.smooth` folds SmoothQuant factors into the weights; `quant.report` measures the error.

The runtime half (the format reader, `QuantLinear`, its kernels, the library backends) lives in
`wan_lite.quantized`: the toolchain imports the runtime, never the other way round. The names below
are re-exported from there for scripts written against earlier releases.
"""

from wan_lite.quantized import kernels
from wan_lite.quantized.format import SCHEMES, QuantFormatError, is_quantized_folder, read_meta
from wan_lite.quantized.kernels import select_kernel
from wan_lite.quantized.linear import QuantLinear, convert_for_runtime, quantize_linear_weight

from .convert import convert_checkpoint

__all__ = ["SCHEMES", "QuantFormatError", "QuantLinear", "convert_checkpoint", "convert_for_runtime",
           "is_quantized_folder", "kernels", "quantize_linear_weight", "read_meta", "select_kernel"]
