"""Tiny random Wan experts written in the real on-disk layouts, built from the official modules.

- `make_official_model(cfg, seed)`: the official `WanModel` with every parameter random (its own init
  zeroes the head, which would hide half the model from a parity test).
- `save_official_expert(model, folder)`: what `Wan-AI/Wan2.2-T2V-A14B` ships per expert: sharded
  `diffusion_pytorch_model-0000X-of-0000N.safetensors` + `diffusion_pytorch_model.safetensors.index.json`
  + the official class's `config.json` (which lacks text_dim, patch_size, qk_norm, cross_attn_norm,
  window_size: a loader must read those from tensor shapes).
- `save_diffusers_expert(model, folder)`: the same weights as a diffusers `WanTransformer3DModel`
  folder, through `official_to_diffusers`, a key map written here independently of
  `wan_lite/checkpoint.py` so the tests check the runtime's map rather than repeat it.
- `make_checkpoint_root(root, cfg, layout)`: both experts in the folder structure of the release.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from reference import official
from safetensors.torch import save_file

OFFICIAL_WEIGHTS = "diffusion_pytorch_model.safetensors"
OFFICIAL_INDEX = "diffusion_pytorch_model.safetensors.index.json"
BOUNDARY_RATIO = 0.875


# ---------------------------------------------------------------------------------------------
# the official model, fully random


def _random_like(name: str, p: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """A random value for one parameter, scaled so the tiny model's activations stay O(1)."""
    noise = torch.randn(p.shape, generator=g, dtype=torch.float64)
    if name.endswith("modulation"):  # AdaLN tables (1, 6|2, dim), added to the time projection
        return 0.3 * noise
    if p.ndim == 1 and re.search(r"norm\w*\.weight$", name):  # RMSNorm / affine LayerNorm gains
        return 1.0 + 0.2 * noise
    if p.ndim == 1:  # biases (Linear, Conv3d, LayerNorm)
        return 0.1 * noise
    fan_in = p[0].numel()  # Linear (out, in) and Conv3d (out, in, kt, kh, kw)
    return noise / math.sqrt(fan_in)


def make_official_model(cfg, seed: int):
    """The official `WanModel` in fp32 eval mode, every parameter drawn from `seed`."""
    ref = official().model
    model = ref.WanModel(
        model_type="t2v",
        patch_size=tuple(cfg.patch_size),
        text_len=cfg.text_len,
        in_dim=cfg.in_dim,
        dim=cfg.dim,
        ffn_dim=cfg.ffn_dim,
        freq_dim=cfg.freq_dim,
        text_dim=cfg.text_dim,
        out_dim=cfg.out_dim,
        num_heads=cfg.num_heads,
        num_layers=cfg.num_layers,
        cross_attn_norm=True,
        qk_norm=True,
        eps=cfg.eps,
    )
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(_random_like(name, p, g))
    return model.float().eval().requires_grad_(False)


def official_forward(model, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
    """The official forward on a batch, one sample at a time (its t.expand breaks for B > 1).

    x (B, 16, F, H, W), t (B,), context (B, L, text_dim) unpadded -> (B, 16, F, H, W) float32.
    """
    pt, ph, pw = model.patch_size
    out = []
    for i in range(x.shape[0]):
        f, h, w = x.shape[2:]
        seq_len = (f // pt) * (h // ph) * (w // pw)
        out.append(model([x[i]], t=t[i : i + 1], context=[context[i]], seq_len=seq_len)[0])
    return torch.stack(out)


# ---------------------------------------------------------------------------------------------
# official layout


def _shards(state: dict[str, torch.Tensor], max_shard_bytes: int | None) -> list[dict[str, torch.Tensor]]:
    """Greedy split in state-dict order; a tensor larger than the limit gets a shard of its own."""
    if max_shard_bytes is None:
        return [state]
    shards, current, size = [], {}, 0
    for key, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if current and size + nbytes > max_shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[key] = tensor
        size += nbytes
    if current:
        shards.append(current)
    return shards


def save_official_expert(model, folder, max_shard_bytes: int | None = 64 * 1024) -> Path:
    """Write one expert as the official release does: fp32 safetensors shards + index + config.json.

    With `max_shard_bytes=None` the weights go to one `diffusion_pytorch_model.safetensors` and no
    index is written (the single-file form of the layout).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to(torch.float32).contiguous() for k, v in model.state_dict().items()}
    shards = _shards(state, max_shard_bytes)
    if len(shards) == 1 and max_shard_bytes is None:
        save_file(shards[0], folder / OFFICIAL_WEIGHTS)
    else:
        n = len(shards)
        weight_map = {}
        for i, shard in enumerate(shards, start=1):
            name = f"diffusion_pytorch_model-{i:05d}-of-{n:05d}.safetensors"
            save_file(shard, folder / name)
            weight_map.update({key: name for key in shard})
        total = sum(t.numel() * t.element_size() for t in state.values())
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (folder / OFFICIAL_INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    model.save_config(folder)  # the official class's own config.json (ignore_for_config applies)
    return folder


def official_shard_files(folder) -> list[Path]:
    """The shard files an official index names, in order."""
    index = json.loads((Path(folder) / OFFICIAL_INDEX).read_text())
    return sorted({Path(folder) / name for name in index["weight_map"].values()})


# ---------------------------------------------------------------------------------------------
# diffusers layout

# official module path -> diffusers module path; block-level names are under `blocks.{i}.`
_TOP_LEVEL = {
    "patch_embedding": "patch_embedding",
    "text_embedding.0": "condition_embedder.text_embedder.linear_1",
    "text_embedding.2": "condition_embedder.text_embedder.linear_2",
    "time_embedding.0": "condition_embedder.time_embedder.linear_1",
    "time_embedding.2": "condition_embedder.time_embedder.linear_2",
    "time_projection.1": "condition_embedder.time_proj",
    "head.head": "proj_out",
}
_IN_BLOCK = {
    "self_attn.q": "attn1.to_q",
    "self_attn.k": "attn1.to_k",
    "self_attn.v": "attn1.to_v",
    "self_attn.o": "attn1.to_out.0",
    "self_attn.norm_q": "attn1.norm_q",
    "self_attn.norm_k": "attn1.norm_k",
    "cross_attn.q": "attn2.to_q",
    "cross_attn.k": "attn2.to_k",
    "cross_attn.v": "attn2.to_v",
    "cross_attn.o": "attn2.to_out.0",
    "cross_attn.norm_q": "attn2.norm_q",
    "cross_attn.norm_k": "attn2.norm_k",
    "norm3": "norm2",  # the affine cross-attention LayerNorm: the two codebases swap the names
    "ffn.0": "ffn.net.0.proj",
    "ffn.2": "ffn.net.2",
}


def official_to_diffusers(key: str) -> str:
    """Rename one official checkpoint key to its diffusers `WanTransformer3DModel` key."""
    if key == "head.modulation":
        return "scale_shift_table"
    if m := re.fullmatch(r"blocks\.(\d+)\.modulation", key):
        return f"blocks.{m[1]}.scale_shift_table"
    if m := re.fullmatch(r"blocks\.(\d+)\.(.+)\.(weight|bias)", key):
        return f"blocks.{m[1]}.{_IN_BLOCK[m[2]]}.{m[3]}"
    module, _, leaf = key.rpartition(".")
    return f"{_TOP_LEVEL[module]}.{leaf}"


def diffusers_config(cfg) -> dict:
    """The diffusers `WanTransformer3DModel` config matching a wan_lite ModelConfig."""
    return dict(
        patch_size=tuple(cfg.patch_size),
        num_attention_heads=cfg.num_heads,
        attention_head_dim=cfg.dim // cfg.num_heads,
        in_channels=cfg.in_dim,
        out_channels=cfg.out_dim,
        text_dim=cfg.text_dim,
        freq_dim=cfg.freq_dim,
        ffn_dim=cfg.ffn_dim,
        num_layers=cfg.num_layers,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        eps=cfg.eps,
        rope_max_seq_len=1024,
    )


def make_diffusers_model(official_model, cfg):
    """A diffusers `WanTransformer3DModel` holding the official model's weights (fp32, eval)."""
    from diffusers import WanTransformer3DModel

    model = WanTransformer3DModel(**diffusers_config(cfg))
    state = {official_to_diffusers(k): v for k, v in official_model.state_dict().items()}
    model.load_state_dict(state, strict=True)
    return model.float().eval().requires_grad_(False)


def save_diffusers_expert(official_model, cfg, folder, max_shard_size: str | None = None) -> Path:
    """Write one expert as the `-Diffusers` release does (config.json + safetensors via save_pretrained)."""
    folder = Path(folder)
    model = make_diffusers_model(official_model, cfg)
    kwargs = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    model.save_pretrained(folder, safe_serialization=True, **kwargs)
    return folder


def diffusers_forward(model, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor, text_len: int = 512):
    """diffusers forward with the context zero-padded to `text_len`, as WanPipeline pads prompt embeds."""
    pad = context.new_zeros(context.shape[0], text_len - context.shape[1], context.shape[2])
    out = model(x, timestep=t, encoder_hidden_states=torch.cat([context, pad], dim=1), return_dict=False)
    return out[0].float()


# ---------------------------------------------------------------------------------------------
# both experts


@dataclass(frozen=True)
class CheckpointPaths:
    root: Path
    high: Path  # the high-noise expert's folder (t >= boundary)
    low: Path  # the low-noise expert's folder
    layout: str
    seeds: tuple[int, int]  # (high, low) seeds given to make_official_model


def make_checkpoint_root(root, cfg, layout: str = "official", seeds: tuple[int, int] = (1, 2)) -> CheckpointPaths:
    """Write both experts (only the experts) in the release's folder structure under `root`.

    official: `high_noise_model/`, `low_noise_model/` (sharded); diffusers: `transformer/` (high),
    `transformer_2/` (low) and a `model_index.json` with `boundary_ratio` 0.875.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    high_model, low_model = (make_official_model(cfg, s) for s in seeds)
    if layout == "official":
        high = save_official_expert(high_model, root / "high_noise_model")
        low = save_official_expert(low_model, root / "low_noise_model")
    elif layout == "diffusers":
        high = save_diffusers_expert(high_model, cfg, root / "transformer")
        low = save_diffusers_expert(low_model, cfg, root / "transformer_2")
        index_path = root / "model_index.json"
        index = json.loads(index_path.read_text()) if index_path.exists() else {}
        index.update(
            {
                "_class_name": "WanPipeline",
                "boundary_ratio": BOUNDARY_RATIO,
                "transformer": ["diffusers", "WanTransformer3DModel"],
                "transformer_2": ["diffusers", "WanTransformer3DModel"],
            }
        )
        index_path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    else:
        raise ValueError(f"unknown layout {layout!r}: choose 'official' or 'diffusers'")
    return CheckpointPaths(root=root, high=high, low=low, layout=layout, seeds=tuple(seeds))


def random_expert(cfg, seed: int):
    """A WanModel of `cfg` with every parameter random at a scale that keeps activations O(1) (fp32, eval)."""
    from wan_lite.model import WanModel

    g = torch.Generator().manual_seed(seed)
    model = WanModel(cfg).eval().requires_grad_(False)
    for p in model.parameters():
        p.copy_(torch.randn(p.shape, generator=g) * (0.3 if p.ndim > 1 else 0.1) / max(1, p.shape[-1]) ** 0.25)
    return model
