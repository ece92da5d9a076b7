"""wan-lite: Wan2.2-T2V-A14B on one consumer GPU."""

from .checkpoint import CheckpointError, find_experts, load_expert
from .config import ModelConfig, SamplingConfig
from .model import WanModel
from .pipeline import sample

__version__ = "0.1.0"

__all__ = ["CheckpointError", "ModelConfig", "SamplingConfig", "WanModel", "find_experts", "load_expert",
           "sample", "__version__"]
