"""Text encoder and VAE single files (ComfyUI's `umt5_xxl_*.safetensors`, `wan_2.1_vae.safetensors`).

- text encoder: transformers `UMT5EncoderModel` key names (`shared.weight`,
  `encoder.block.N.layer.0.SelfAttention.q.weight`, ...), fp16/bf16/fp32 or fp8 scaled (dequantized
  here to float32, as `w.float() * scale`). The tied `encoder.embed_tokens.weight` is added when the
  file leaves it out. A `spiece_model` tensor (ComfyUI may embed the tokenizer's bytes) is skipped:
  the tokenizer is `google/umt5-xxl` through transformers. Build the model with
  `UMT5EncoderModel(umt5_config(...))` and `load_state_dict(sd, strict=True, assign=True)`.
- VAE: the official `WanVAE_` key names (wan/modules/vae2_1.py), as in `Wan2.1_VAE.pth`; the result
  goes through `wan_lite.vae.official_to_diffusers` into diffusers' `AutoencoderKLWan`.
"""

from __future__ import annotations

import re

import torch

from wan_lite.keys import CheckpointError

from .expert import SafetensorsWeights, _check_comfy_formats, _fp8_layers, _is_marker
from .headers import check_keys
from .identify import USE_TEXT, refuse, scan

UMT5_XXL_WIDTH = 4096  # the expert's text_dim
SKIPPED = ("spiece_model",)


def umt5_config(shapes: dict[str, tuple]):
    """A transformers UMT5Config from the encoder's tensor shapes (HF names), settings as text.config_from_official."""
    from transformers import UMT5Config

    vocab, d_model = shapes["shared.weight"]
    inner = shapes["encoder.block.0.layer.0.SelfAttention.q.weight"][0]
    buckets, heads = shapes["encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"]
    d_ff = shapes["encoder.block.0.layer.1.DenseReluDense.wi_0.weight"][0]
    layers = sum(1 for n in shapes if re.fullmatch(r"encoder\.block\.\d+\.layer\.0\.SelfAttention\.q\.weight", n))
    return UMT5Config(
        vocab_size=vocab, d_model=d_model, d_kv=inner // heads, d_ff=d_ff,
        num_layers=layers, num_decoder_layers=layers, num_heads=heads, relative_attention_num_buckets=buckets,
        relative_attention_max_distance=128, dropout_rate=0.0, layer_norm_epsilon=1e-6,
        feed_forward_proj="gated-gelu", is_encoder_decoder=False, use_cache=False, tie_word_embeddings=False,
        pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
    )  # fmt: skip


def read_text_encoder_file(path, *, width: int = UMT5_XXL_WIDTH) -> dict[str, torch.Tensor]:
    """A UMT5 encoder single file -> {UMT5EncoderModel name: tensor} (float; fp8 dequantized to float32).

    width: the d_model the experts read (their text_dim; 4096 for umt5-xxl).
    Raises CheckpointError naming the file for a T5 that is not UMT5, another width, another kind of
    file, missing/extra tensors or a truncated file, all before any weight is read.
    """
    info, header, names = scan(path)
    refuse(info, "text_encoder")
    if info.facts["d_model"] != width:
        raise CheckpointError(f"{header.path}: this is {info.describe()}: its width is {info.facts['d_model']}, the "
                              f"experts read {width}-wide text (umt5-xxl): {USE_TEXT}")
    fp8 = _fp8_layers(header, names)
    _check_comfy_formats(header, names, fp8)
    params = {n: s for n, s in names.items() if not _is_marker(n, fp8) and n not in SKIPPED}
    shapes = {n: header.tensors[s].shape for n, s in params.items()}
    shapes.setdefault("encoder.embed_tokens.weight", shapes["shared.weight"])  # tied to shared
    from transformers import UMT5EncoderModel

    with torch.device("meta"):
        expected = UMT5EncoderModel(umt5_config(shapes)).state_dict()
    check_keys(expected, shapes, header.path, f"a {info.facts['layers']}-layer UMT5 encoder")
    weights = SafetensorsWeights(header.path, header, params, fp8)
    sd = {n: weights.float_tensor(n) for n in params}
    sd.setdefault("encoder.embed_tokens.weight", sd["shared.weight"])
    return sd


def read_vae_file(path) -> dict[str, torch.Tensor]:
    """A Wan2.1 VAE single file -> {official WanVAE_ name: tensor} as stored (fp8, if any, dequantized).

    Raises CheckpointError naming the file for the Wan2.2 VAE (z_dim 48, for TI2V-5B), any other
    file kind or a truncated file, before any weight is read. The key set is checked where the names
    are mapped to the model (`wan_lite.vae.VAE.from_pretrained`), which names missing keys.
    """
    info, header, names = scan(path)
    refuse(info, "vae")
    fp8 = _fp8_layers(header, names)
    params = {n: s for n, s in names.items() if not _is_marker(n, fp8)}
    weights = SafetensorsWeights(header.path, header, params, fp8)
    return {n: weights.float_tensor(n) for n in params}
