"""Reading the single files people already have: which model a file holds, and its weights.

- `identify(path) -> FileInfo`: expert / text encoder / VAE / LoRA / unknown, the model, the container
  (safetensors or GGUF) and the weight scheme, from the header only; `refuse(info, wanted)` raises a
  CheckpointError that names what the file is and which file to use instead.
- `open_expert_file(path, scheme=None) -> ExpertFile`: one expert (fp32/fp16/bf16, fp8 scaled legacy
  or ComfyUI comfy_quant, GGUF) as an expert source: `config`, `scheme`, `linears`, `names()`,
  `tensor(name)`, `fingerprint()`.
- `read_text_encoder_file(path)`: a umt5-xxl single file as transformers `UMT5EncoderModel` tensors;
  `read_vae_file(path)`: a Wan2.1 VAE single file as official `WanVAE_` tensors.
"""

from .components import read_text_encoder_file, read_vae_file, umt5_config
from .expert import ExpertFile, e5m2_to_e4m3, open_expert_file
from .headers import check_keys, read_header
from .identify import FileInfo, identify, refusal, refuse

__all__ = ["ExpertFile", "FileInfo", "check_keys", "e5m2_to_e4m3", "identify", "open_expert_file", "read_header",
           "read_text_encoder_file", "read_vae_file", "refusal", "refuse", "umt5_config"]
