"""wan-lite's quantization toolchain: two verbs and a runtime Linear.

- offline: `convert_checkpoint(src, dst, scheme)` (quant.convert) turns a model root into 8-bit
  (int8, fp8), optimum-quanto (quanto-int8, quanto-fp8) or bitsandbytes 4-bit (nf4) experts,
  streaming and resumable; `python -m wan_lite.quantize` is its command line.
- runtime: `load_quantized_expert(path)` (quant.format) builds the model on the meta device,
  `convert_for_runtime` swaps the block Linears for `QuantLinear` (quant.linear), and the weights are
  assigned from the shards. `QuantLinear` runs the kernel `select_kernel` picks (quant.kernels).
"""

from .format import SCHEMES, QuantFormatError, is_quantized_folder, load_quantized_expert, read_meta
from .kernels import select_kernel
from .linear import QuantLinear, convert_for_runtime, quantize_linear_weight

__all__ = ["SCHEMES", "QuantFormatError", "QuantLinear", "convert_checkpoint", "convert_for_runtime",
           "is_quantized_folder", "load_quantized_expert", "quantize_linear_weight", "read_meta", "select_kernel"]


def convert_checkpoint(*args, **kwargs):
    """See quant.convert.convert_checkpoint (imported lazily: the runtime needs no converter)."""
    from .convert import convert_checkpoint as convert

    return convert(*args, **kwargs)
