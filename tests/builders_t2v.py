"""The text-to-video components around the experts, built locally in both release layouts.

- `make_tokenizer(folder)`: a small Unigram `T5Tokenizer` (pad 0, </s> 1, <unk> 2, like umt5's),
  trained on nothing: its vocabulary is the ASCII characters, the characters of the official
  negative prompt and a few words, so `AutoTokenizer.from_pretrained(folder)` loads it offline.
- `make_official_t5(text_dim, vocab, seed)`: the official `T5Encoder` (wan/modules/t5.py) with tiny
  dimensions and every parameter random; `save_official_t5` / `save_diffusers_t5` write it as
  `models_t5_umt5-xxl-enc-bf16.pth` + `google/umt5-xxl/`, or `text_encoder/` + `tokenizer/`.
- `make_official_vae(seed)`: the official `WanVAE_` at its REAL architecture (dim 96, z 16,
  mult [1, 2, 4, 4], 127M parameters, ~508 MB in fp32) with every parameter random. The real size
  is kept on purpose: the key map and the decode path are only checked on the real structure. It is
  built and written once per test process (about 5 s) and linked into every root that needs it.
  The diffusers `vae/` folder is converted with diffusers' own `convert_wan_vae_to_diffusers`, so it
  checks wan_lite's key map instead of repeating it.
- `add_t2v_components(root, layout)`: completes a root that holds the experts (tests/builders.py
  `make_checkpoint_root`) with text encoder, tokenizer and VAE.
"""

from __future__ import annotations

import atexit
import functools
import json
import math
import os
import shutil
import tempfile
from pathlib import Path

import torch
from reference import official

from wan_lite.checkpoint import TEXT_WEIGHTS as OFFICIAL_WEIGHTS
from wan_lite.checkpoint import TOKENIZER as OFFICIAL_TOKENIZER
from wan_lite.text import official_to_transformers, write_small_tokenizer

T5_DIMS = dict(dim_ffn=48, num_heads=4, num_layers=2, num_buckets=32)  # dim = the DiT's text_dim
WORDS = "a cat dog walks runs on the beach in snow at sunset video of red blue small big".split()


# ---------------------------------------------------------------------------------------------
# tokenizer


def make_tokenizer(folder) -> Path:
    """A small umt5-like Unigram tokenizer saved for `AutoTokenizer.from_pretrained(folder)`."""
    write_small_tokenizer(folder, WORDS)
    return Path(folder)


@functools.cache
def tokenizer_vocab_size() -> int:
    from transformers import AutoTokenizer

    with tempfile.TemporaryDirectory() as d:
        return len(AutoTokenizer.from_pretrained(make_tokenizer(d)))


# ---------------------------------------------------------------------------------------------
# text encoder


def make_official_t5(text_dim: int, seed: int = 0, vocab: int | None = None):
    """The official `T5Encoder` (shared_pos=False, as umt5-xxl) with tiny dims, every parameter random."""
    t5 = official().t5
    model = t5.T5Encoder(
        vocab=vocab or tokenizer_vocab_size(), dim=text_dim, dim_attn=text_dim, shared_pos=False, dropout=0.0,
        **T5_DIMS,
    )  # fmt: skip
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if name.endswith("norm1.weight") or name.endswith("norm2.weight") or name == "norm.weight":
                p.copy_(1.0 + 0.2 * noise)
            elif name.endswith("embedding.weight"):  # token and relative-position tables
                p.copy_(noise)
            else:
                p.copy_(noise / math.sqrt(p.shape[1]))
    return model.float().eval().requires_grad_(False)


def save_official_t5(model, root) -> Path:
    """`models_t5_umt5-xxl-enc-bf16.pth` (a plain state_dict, as released) + `google/umt5-xxl/`."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), root / OFFICIAL_WEIGHTS)
    make_tokenizer(root / OFFICIAL_TOKENIZER)
    return root


def save_diffusers_t5(model, root) -> Path:
    """`text_encoder/` (UMT5EncoderModel.save_pretrained) + `tokenizer/`."""
    from transformers import UMT5EncoderModel

    from wan_lite.text import config_from_official

    root = Path(root)
    sd = model.state_dict()
    enc = UMT5EncoderModel(config_from_official(sd))
    enc.load_state_dict(official_to_transformers(sd), strict=True)
    enc.save_pretrained(root / "text_encoder")
    make_tokenizer(root / "tokenizer")
    return root


# ---------------------------------------------------------------------------------------------
# VAE


def make_official_vae(seed: int = 0):
    """The official `WanVAE_` with the Wan2.1 configuration and every parameter random (fp32, eval)."""
    vae2_1 = official().vae2_1
    model = vae2_1.WanVAE_(
        dim=96, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2, attn_scales=[],
        temperal_downsample=[False, True, True], dropout=0.0,
    )  # fmt: skip
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if name.endswith("gamma"):  # RMS_norm gains
                p.copy_(1.0 + 0.2 * noise)
            elif p.ndim == 1:  # conv biases
                p.copy_(0.05 * noise)
            else:  # conv weights (out, in, k...): unit-variance outputs
                p.copy_(noise / math.sqrt(p[0].numel()))
    return model.float().eval().requires_grad_(False)


@functools.cache
def vae_files() -> tuple[Path, Path]:
    """(official `Wan2.1_VAE.pth`, diffusers `vae/` folder) of `make_official_vae(0)`, written once per process."""
    from diffusers import AutoencoderKLWan
    from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers

    folder = Path(tempfile.mkdtemp(prefix="wan-lite-vae-"))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    sd = make_official_vae(0).state_dict()
    torch.save(sd, folder / "Wan2.1_VAE.pth")
    vae = AutoencoderKLWan()
    vae.load_state_dict(convert_wan_vae_to_diffusers(sd), strict=True)
    vae.save_pretrained(folder / "vae")
    return folder / "Wan2.1_VAE.pth", folder / "vae"


# ---------------------------------------------------------------------------------------------
# a complete root


def add_t2v_components(root, layout: str, text_dim: int, seed: int = 0) -> Path:
    """Add text encoder, tokenizer and VAE to a root holding the experts, in `layout`."""
    root = Path(root)
    t5 = make_official_t5(text_dim, seed)
    official_vae, diffusers_vae = vae_files()
    if layout == "official":
        save_official_t5(t5, root)
        os.symlink(official_vae, root / "Wan2.1_VAE.pth")
    elif layout == "diffusers":
        save_diffusers_t5(t5, root)
        os.symlink(diffusers_vae, root / "vae", target_is_directory=True)
        index_path = root / "model_index.json"
        index = json.loads(index_path.read_text()) if index_path.exists() else {}
        index.update(
            text_encoder=["transformers", "UMT5EncoderModel"],
            tokenizer=["transformers", "T5TokenizerFast"],
            vae=["diffusers", "AutoencoderKLWan"],
        )
        index_path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    else:
        raise ValueError(f"unknown layout {layout!r}: choose 'official' or 'diffusers'")
    return root


def tiny_official_root(folder) -> Path:
    """A whole tiny official-layout root in `folder`: random experts (ModelConfig.tiny()), umt5 encoder,
    tokenizer and VAE, as several test modules' fixtures use it."""
    from builders import make_checkpoint_root

    from wan_lite.config import ModelConfig

    cfg = ModelConfig.tiny()
    return add_t2v_components(make_checkpoint_root(folder, cfg, "official").root, "official", cfg.text_dim)
