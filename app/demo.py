"""The built-in demo checkpoint: a complete, tiny, random-weight Wan2.2 T2V model root, made on first use.

It lets `python -m app` show the whole flow (prompt -> two experts -> VAE -> mp4) with no download.
Its output is coloured noise: every weight is random. The root is in the diffusers layout of
`Wan-AI/Wan2.2-T2V-A14B-Diffusers`, written with the diffusers / transformers classes' own
`save_pretrained`, so the runtime reads it exactly as it reads the real release:

- `transformer/`, `transformer_2/`: `WanTransformer3DModel` with the dimensions of
  `ModelConfig.tiny()` (2 layers, dim 32, text_dim 24);
- `text_encoder/` + `tokenizer/`: a 2-layer `UMT5EncoderModel` with d_model 24 and a small Unigram
  tokenizer (ASCII, a few words and the characters of the default negative prompt);
- `vae/`: `AutoencoderKLWan` with base_dim 16 instead of the real 96 (same strides 4x8x8, same 16
  latent channels), so decoding is quick on a CPU. The app's banner says so.

The folder is written once into a temporary sibling and renamed into place, so two app starts
never see a half-written root. `DEMO_MARKER` identifies it.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from wan_lite.config import ModelConfig
from wan_lite.text import without_progress_bar, write_small_tokenizer

DEMO_VERSION = 1  # bump when the demo's contents change: a new cache folder is built
DEMO_MARKER = "wan_lite_demo.json"
DEFAULT_CACHE = Path("~/.cache/wan-lite")
DEMO_VAE_BASE_DIM = 16  # the real Wan2.1 VAE has 96
WORDS = "a cat dog walks runs on the beach in snow at sunset video of red blue small big".split()


def demo_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """Where the demo checkpoint lives: `<cache>/demo-v<N>` (default cache `~/.cache/wan-lite`)."""
    return Path(cache_dir or os.environ.get("WAN_LITE_CACHE") or DEFAULT_CACHE).expanduser() / f"demo-v{DEMO_VERSION}"


def is_demo(root: str | os.PathLike) -> bool:
    return (Path(root) / DEMO_MARKER).is_file()


def ensure_demo_checkpoint(cache_dir: str | os.PathLike | None = None) -> Path:
    """The demo model root, built on first use (about a second)."""
    root = demo_root(cache_dir)
    if is_demo(root):
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".demo-", dir=root.parent))
    try:
        write_demo_checkpoint(tmp)
        try:
            os.rename(tmp, root)
        except OSError:  # another process finished first (the target exists and is not empty)
            if not is_demo(root):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root


def write_demo_checkpoint(root: Path, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    cfg = ModelConfig.tiny()
    for folder in ("transformer", "transformer_2"):
        _write_expert(cfg, root / folder)
    tokenizer = write_small_tokenizer(root / "tokenizer", WORDS)
    _write_text_encoder(len(tokenizer), cfg.text_dim, root / "text_encoder")
    _write_vae(root / "vae")
    index = {"_class_name": "WanPipeline", "boundary_ratio": 0.875,
             "transformer": ["diffusers", "WanTransformer3DModel"],
             "transformer_2": ["diffusers", "WanTransformer3DModel"],
             "text_encoder": ["transformers", "UMT5EncoderModel"], "tokenizer": ["transformers", "T5Tokenizer"],
             "vae": ["diffusers", "AutoencoderKLWan"]}
    (root / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    meta = {"demo_version": DEMO_VERSION, "vae_base_dim": DEMO_VAE_BASE_DIM,
            "note": "random weights: the output is noise; for real videos run python -m app --ckpt <Wan2.2-T2V-A14B>"}
    (root / DEMO_MARKER).write_text(json.dumps(meta, indent=2) + "\n")
    return root


def _write_expert(cfg: ModelConfig, folder: Path) -> None:
    from diffusers import WanTransformer3DModel

    model = WanTransformer3DModel(
        patch_size=cfg.patch_size, num_attention_heads=cfg.num_heads, attention_head_dim=cfg.head_dim,
        in_channels=cfg.in_dim, out_channels=cfg.out_dim, text_dim=cfg.text_dim, freq_dim=cfg.freq_dim,
        ffn_dim=cfg.ffn_dim, num_layers=cfg.num_layers, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
        eps=cfg.eps)  # fmt: skip
    model.save_pretrained(folder)


def _write_text_encoder(vocab: int, dim: int, folder: Path) -> None:
    from transformers import UMT5Config, UMT5EncoderModel

    config = UMT5Config(vocab_size=vocab, d_model=dim, d_kv=dim // 4, d_ff=2 * dim, num_layers=2, num_heads=4,
                        relative_attention_num_buckets=32, feed_forward_proj="gated-gelu", dropout_rate=0.0,
                        is_encoder_decoder=False, use_cache=False, tie_word_embeddings=False)
    without_progress_bar(UMT5EncoderModel(config).save_pretrained, folder)  # no "Writing model shards" bar


def _write_vae(folder: Path) -> None:
    from diffusers import AutoencoderKLWan

    AutoencoderKLWan(base_dim=DEMO_VAE_BASE_DIM).save_pretrained(folder)
