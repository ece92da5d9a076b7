"""The runtime half of quantization: reading our quantized format, `QuantLinear` and its kernels, and
the library backends (optimum-quanto, bitsandbytes). Imports nothing from the offline toolchain in the
top-level `quant/` (conversion, SmoothQuant, report), which writes what this reads.
"""
