"""wan-lite: Wan2.2-T2V-A14B on one consumer GPU.

The names below load on first use (PEP 562), so `python -m wan_lite.generate` checks its arguments
before torch is imported.
"""

import importlib
import logging

__version__ = "0.1.0"

# bitsandbytes, which diffusers imports whenever it is installed (the [bnb] and [test] extras), warns on every
# import on a CPU with AVX512-BF16 that its CPU 4-bit kernel could not be fetched from the hub, and suggests
# trust_remote_code. wan-lite never runs bitsandbytes on the CPU (nf4 is CUDA only): that line is noise on
# every run, and the advice is not one to take (found by a user trial).
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)

_LAZY = {"CheckpointError": ".checkpoint", "find_experts": ".checkpoint", "load_expert": ".checkpoint",
         "ModelConfig": ".config", "SamplingConfig": ".config", "WanModel": ".model", "sample": ".pipeline"}

__all__ = ["CheckpointError", "ModelConfig", "SamplingConfig", "WanModel", "find_experts", "load_expert",
           "sample", "__version__"]


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
