"""The Wan2.2 diffusion transformer (one A14B expert), top to bottom: rope, embeddings, block, model.

Computes the function of the official `wan/modules/model.py` with three deliberate differences in
how, not what:
- one timestep per sample, so the modulation is (B, 6, C), never the official per-token
  (B, L, 6, C) tensor (9.3 GB at 720p);
- RoPE tables are computed in float64 as the official ones, then applied in float32 (the official
  code rotates in float64 and casts the result to float32);
- the residual stream, modulation, norms, time embedding and head run in float32 whatever the
  weight dtype, which is what the official code does under its fp32 autocast regions.

Parameter names are the official checkpoint keys, so the official layout loads without renaming.
No device logic lives here: where weights sit is `residency.py`'s business.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from .attention import attention
from .config import ModelConfig

# where torch.compile's kernels are kept between runs (compile_blocks); WAN_LITE_CACHE moves it with the rest
COMPILE_CACHE = Path(os.environ.get("WAN_LITE_CACHE", "~/.cache/wan-lite")).expanduser() / "inductor"

# ---------------------------------------------------------------------------------------------
# primitives


def sinusoidal_embedding(dim: int, t: torch.Tensor) -> torch.Tensor:
    """Timestep embedding, cos then sin, computed in float64: (B,) -> (B, dim) float32."""
    half = dim // 2
    t = t.to(torch.float64)
    freqs = torch.pow(10000.0, -torch.arange(half, dtype=torch.float64, device=t.device) / half)
    angles = torch.outer(t, freqs)  # (B, half)
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=1).float()


def rope_tables(cfg: ModelConfig, grid: tuple[int, int, int], device) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of the 3-D rotary angles for a (F, H, W) token grid: each (L, 1, head_dim/2) float32.

    The head's channel pairs are split t / h / w (22 / 21 / 21 pairs for head_dim 128); pair j of
    an axis with width d rotates by position * theta^(-2j/d). Angles are float64 as in the official.
    """
    f, h, w = grid
    angles = []
    for axis_len, width in zip((f, h, w), cfg.rope_split):
        inv_freq = cfg.rope_theta ** (-torch.arange(0, width, 2, dtype=torch.float64, device=device) / width)
        angles.append(torch.outer(torch.arange(axis_len, dtype=torch.float64, device=device), inv_freq))
    at, ah, aw = angles  # (f, 22), (h, 21), (w, 21)
    grid_angles = torch.cat(
        [
            at[:, None, None, :].expand(f, h, w, -1),
            ah[None, :, None, :].expand(f, h, w, -1),
            aw[None, None, :, :].expand(f, h, w, -1),
        ],
        dim=-1,
    ).reshape(f * h * w, 1, -1)  # (L, 1, head_dim/2)
    return torch.cos(grid_angles).float(), torch.sin(grid_angles).float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved channel pairs (2j, 2j+1) of x (B, L, H, D) by the angles whose cos and sin are
    given (L, 1, D/2), in float32; returns x's dtype.

    Written as (x1, x0) * (-s, s) + x * (c, c) per pair: element-wise and index work only, so a compiled
    block writes the rotated q and k straight in x's dtype (stacking the two halves made inductor keep a
    float32 copy of k: 1.5 GB at 720p). Bitwise the same products and sums as x0 c - x1 s, x0 s + x1 c.
    """
    xf = x.float()
    cos2 = cos.repeat_interleave(2, dim=-1)  # (L, 1, D)
    sin2 = torch.stack([-sin, sin], dim=-1).flatten(-2)  # (L, 1, D): (-s, s) per pair
    out = xf.unflatten(-1, (-1, 2)).flip(-1).flatten(-2).mul_(sin2)  # (x1, x0) * (-s, s): flip made a copy
    out += xf * cos2  # in place: eager keeps three float32 copies of q or k, not five
    return out.to(x.dtype)


class RMSNorm(nn.Module):
    """RMSNorm over the last dim, computed in float32 (q/k norm over all heads' channels)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight).to(x.dtype)


def layer_norm(x: torch.Tensor, eps: float) -> torch.Tensor:
    """Non-affine LayerNorm in float32 (norm1, norm2 and the head's norm)."""
    return F.layer_norm(x.float(), x.shape[-1:], eps=eps)


def compute_dtype(module: nn.Module) -> torch.dtype:
    """The dtype a Linear computes in: its bias's. Every Wan Linear has a bias, and every backend (plain,
    quant/'s QuantLinear, optimum-quanto, bitsandbytes) keeps it in the compute dtype."""
    return module.bias.dtype


def linear(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Run a (plain or quantized) Linear on x cast to its compute dtype (a no-op when it already is)."""
    return module(x.to(compute_dtype(module)))


@dataclass
class Conditioning:
    """Per-forward tensors every block reads; built once by `WanModel.embed`."""

    mod: torch.Tensor  # (B, 6, C) float32: time projection, added to each block's modulation table
    time: torch.Tensor  # (B, C) float32: time embedding, for the head
    context: torch.Tensor  # (B, text_len, C): embedded text, zero-padded prompt
    rope: tuple[torch.Tensor, torch.Tensor]  # cos, sin: (L, 1, head_dim/2) float32
    grid: tuple[int, int, int]  # (F, H, W) token grid after patchify
    # attention over the video tokens; sequence parallelism (parallel.py) swaps in its own
    self_attention: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor] = attention


# ---------------------------------------------------------------------------------------------
# the block


class SelfAttention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        c = cfg.dim
        self.num_heads = cfg.num_heads
        self.q, self.k, self.v, self.o = (nn.Linear(c, c) for _ in range(4))
        self.norm_q = RMSNorm(c, cfg.eps)
        self.norm_k = RMSNorm(c, cfg.eps)

    def forward(self, x: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        b, n = x.shape[0], self.num_heads
        q = apply_rope(self.norm_q(linear(self.q, x)).unflatten(2, (n, -1)), *cond.rope)  # (B, L, H, D)
        k = apply_rope(self.norm_k(linear(self.k, x)).unflatten(2, (n, -1)), *cond.rope)  # (B, L, H, D)
        v = linear(self.v, x).unflatten(2, (n, -1))  # (B, L, H, D)
        out = cond.self_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))  # (B, H, L, D)
        return linear(self.o, out.transpose(1, 2).reshape(b, -1, n * out.shape[-1]))  # (B, L, C)


class CrossAttention(SelfAttention):
    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        b, n = x.shape[0], self.num_heads
        q = self.norm_q(linear(self.q, x)).unflatten(2, (n, -1)).transpose(1, 2)  # (B, H, L, D)
        k = self.norm_k(linear(self.k, context)).unflatten(2, (n, -1)).transpose(1, 2)  # (B, H, 512, D)
        v = linear(self.v, context).unflatten(2, (n, -1)).transpose(1, 2)  # (B, H, 512, D)
        out = attention(q, k, v)  # (B, H, L, D)
        return linear(self.o, out.transpose(1, 2).reshape(b, -1, n * out.shape[-1]))  # (B, L, C)


class Block(nn.Module):
    """AdaLN-modulated self-attention, cross-attention to the text, FFN; residual adds in float32."""

    ffn_chunk: int | None = None  # tokens per FFN chunk (bounds the (L, ffn_dim) hidden); None: all at once

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.eps = cfg.eps
        self.self_attn = SelfAttention(cfg)
        self.norm3 = nn.LayerNorm(cfg.dim, eps=cfg.eps)  # affine norm before cross-attention
        self.cross_attn = CrossAttention(cfg)
        self.ffn = nn.Sequential(nn.Linear(cfg.dim, cfg.ffn_dim), nn.GELU(approximate="tanh"),
                                 nn.Linear(cfg.ffn_dim, cfg.dim))
        self.modulation = nn.Parameter(torch.zeros(1, 6, cfg.dim))  # this block's table, float32

    def forward(self, x: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """x (B, L, C) float32 residual stream, updated in place and returned.

        In place because the stream is the largest tensor alive (4 bytes x L x dim: 1.55 GB at 720p) and
        `x = x + y` holds two of it at once; the caller owns x (WanModel.embed made it)."""
        shift1, scale1, gate1, shift2, scale2, gate2 = (self.modulation + cond.mod).unsqueeze(2).unbind(1)
        dtype = compute_dtype(self.ffn[0])  # the Linears' input dtype: cast once, keep no float32 copy alive
        x.addcmul_(self.self_attn((layer_norm(x, self.eps) * (1 + scale1) + shift1).to(dtype), cond), gate1)
        x += self.cross_attn(self.norm3(x).to(dtype), cond.context)
        chunk = self.ffn_chunk or x.shape[1]
        for start in range(0, x.shape[1], chunk):  # slices of x (not split: autograd forbids its views in place)
            self.ffn_residual(x[:, start : start + chunk], shift2, scale2, gate2)
        return x

    def ffn_residual(self, x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor,
                     gate: torch.Tensor) -> None:
        """x += gate * FFN(modulated norm(x)), in place; every token on its own, so chunks over tokens
        are exact."""
        h = (layer_norm(x, self.eps) * (1 + scale) + shift).to(compute_dtype(self.ffn[0]))
        x.addcmul_(linear(self.ffn[2], self.ffn[1](linear(self.ffn[0], h))), gate)


# ---------------------------------------------------------------------------------------------
# the model


class Head(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.eps = cfg.eps
        self.head = nn.Linear(cfg.dim, math.prod(cfg.patch_size) * cfg.out_dim)
        self.modulation = nn.Parameter(torch.zeros(1, 2, cfg.dim))

    def forward(self, x: torch.Tensor, time: torch.Tensor) -> torch.Tensor:
        shift, scale = (self.modulation + time.unsqueeze(1)).unsqueeze(2).unbind(1)  # each (B, 1, C)
        return F.linear(layer_norm(x, self.eps) * (1 + scale) + shift, self.head.weight.float(),
                        self.head.bias.float())  # (B, L, p*out)


class WanModel(nn.Module):
    """One Wan2.2 expert. `model(x, t, context)` -> flow velocity, float32.

    Inference only: the blocks update the residual stream in place (it is the largest tensor alive), so
    autograd cannot run backward through them.
    """

    # Tensors held in the run's dtype (bf16 by default); every other tensor stays float32, because the
    # official model computes it in float32 (time embedding, modulation, norms, head). Cf. diffusers'
    # `_keep_in_fp32_modules`: the model class says it, loaders and the residency read it here.
    LOW_PRECISION = re.compile(r"^(patch_embedding|text_embedding\.\d|blocks\.\d+\.(self_attn|cross_attn)\.[qkvo]"
                               r"|blocks\.\d+\.ffn\.\d)\.(weight|bias)$")

    @classmethod
    def param_dtype(cls, name: str, dtype: torch.dtype) -> torch.dtype:
        """The dtype the tensor `name` (state_dict key) is held in when the model runs in `dtype`."""
        return dtype if cls.LOW_PRECISION.match(name) else torch.float32

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        c = cfg.dim
        self.patch_embedding = nn.Conv3d(cfg.in_dim, c, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.text_embedding = nn.Sequential(nn.Linear(cfg.text_dim, c), nn.GELU(approximate="tanh"),
                                            nn.Linear(c, c))
        self.time_embedding = nn.Sequential(nn.Linear(cfg.freq_dim, c), nn.SiLU(), nn.Linear(c, c))
        self.time_projection = nn.Sequential(nn.SiLU(), nn.Linear(c, 6 * c))
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.num_layers))
        self.head = Head(cfg)

    def forward(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """x (B, in, F, H, W) latents, t (B,) timesteps, context (B, L<=text_len, text_dim) -> (B, out, F, H, W)."""
        h, cond = self.embed(x, t, context)
        for block in self.blocks:
            h = block(h, cond)
        return self.unembed(h, cond)

    def embed(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> tuple[torch.Tensor, Conditioning]:
        """Patchify the latents and build what the blocks share: -> (B, L, C) float32 stream, Conditioning."""
        self.check_inputs(x, t, context)
        w = self.patch_embedding.weight
        h = self.patch_embedding(x.to(w.dtype))  # (B, C, F, H/2, W/2)
        grid = tuple(h.shape[2:])
        h = h.flatten(2).transpose(1, 2).to(torch.float32, memory_format=torch.contiguous_format)  # (B, L, C), owned

        time = self.time_embedding(sinusoidal_embedding(self.cfg.freq_dim, t.to(x.device)))  # (B, C) float32
        mod = self.time_projection(time).unflatten(1, (6, self.cfg.dim))  # (B, 6, C) float32

        context = F.pad(context, (0, 0, 0, self.cfg.text_len - context.shape[1]))  # (B, text_len, text_dim)
        context = linear(self.text_embedding[2], self.text_embedding[1](linear(self.text_embedding[0], context)))
        return h, Conditioning(mod=mod, time=time, context=context, rope=rope_tables(self.cfg, grid, x.device),
                               grid=grid)

    def unembed(self, h: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """Head and unpatchify: (B, L, C) -> (B, out, F, H, W) float32."""
        out = self.head(h, cond.time)  # (B, L, pt*ph*pw*out)
        (f, hh, ww), (pt, ph, pw) = cond.grid, self.cfg.patch_size
        out = out.view(out.shape[0], f, hh, ww, pt, ph, pw, self.cfg.out_dim)  # (B, f, h, w, pt, ph, pw, c)
        out = out.permute(0, 7, 1, 4, 2, 5, 3, 6)  # (B, c, f, pt, h, ph, w, pw)
        return out.reshape(out.shape[0], self.cfg.out_dim, f * pt, hh * ph, ww * pw)

    def check_inputs(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> None:
        cfg = self.cfg
        if x.dim() != 5 or x.shape[1] != cfg.in_dim:
            raise ValueError(f"latents must be (B, {cfg.in_dim}, F, H, W), got {tuple(x.shape)}")
        for name, size, p in zip(("frames", "height", "width"), x.shape[2:], cfg.patch_size):
            if size % p:
                raise ValueError(f"latent {name} {size} is not a multiple of the patch size {p}: "
                                 f"use a video {name} that gives an even latent size (pixels a multiple of 16)")
        if t.shape != (x.shape[0],):
            raise ValueError(f"t must have shape ({x.shape[0]},), one timestep per sample, got {tuple(t.shape)}")
        if context.dim() != 3 or context.shape[0] != x.shape[0] or context.shape[2] != cfg.text_dim:
            raise ValueError(f"context must be (B={x.shape[0]}, L, {cfg.text_dim}), got {tuple(context.shape)}")
        if context.shape[1] > cfg.text_len:
            raise ValueError(f"context has {context.shape[1]} tokens, more than the model's {cfg.text_len}: "
                             f"truncate the prompt to {cfg.text_len} tokens (the text encoder does this)")


def compile_blocks(model: WanModel) -> WanModel:
    """torch.compile every block in place; returns the model.

    Fuses the float32 modulation, norm, RoPE and gating work between the matmuls. Measured on an
    H100 at 720p (one int8 block, 2026-11-26): 296 -> 257 ms and 7.0 -> 3.9 GB of activations.

    The compiled kernels are cached in `COMPILE_CACHE` (Inductor's TORCHINDUCTOR_CACHE_DIR, unless the
    environment sets it): Inductor's default, /tmp/torchinductor_<user>, is emptied by a reboot on many
    systems, and the next run would compile again (H100, 480p, 2026-12-06: a warm-up pass of 28.8 s with
    an empty cache against 4.4 s with it filled; BENCHMARKS.md, session 4).
    """
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(COMPILE_CACHE))
    for block in model.blocks:
        block.compile()
    return model
