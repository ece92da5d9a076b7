"""Model dimensions and sampling settings as frozen dataclasses, with the official presets.

`ModelConfig.a14b()` is one Wan2.2-T2V-A14B expert (both experts share it); `ModelConfig.tiny()` is
the 2-layer, 2-head model the tests build on the CPU. `SamplingConfig()` holds the official
text-to-video defaults of `wan/configs/wan_t2v_A14B.py`; `SamplingConfig.lightning()` the 4-step
Lightning recipe.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field

SOLVERS = ("unipc", "euler")
GRIDS = ("official", "lightning")


@dataclass(frozen=True)
class ModelConfig:
    dim: int = 5120  # hidden width of the residual stream
    ffn_dim: int = 13824  # FFN hidden width (GELU-tanh)
    num_heads: int = 40  # attention heads; head_dim = dim / num_heads = 128
    num_layers: int = 40  # transformer blocks
    freq_dim: int = 256  # sinusoidal timestep embedding width
    text_dim: int = 4096  # umt5-xxl hidden size
    text_len: int = 512  # prompts are zero-padded to this many tokens inside the DiT
    in_dim: int = 16  # latent channels in
    out_dim: int = 16  # latent channels out
    patch_size: tuple[int, int, int] = (1, 2, 2)  # (t, h, w) patchify of the latents
    eps: float = 1e-6  # LayerNorm / RMSNorm epsilon
    rope_theta: float = 10000.0
    rope_max_len: int = 1024  # positions per axis in the RoPE table (official value)

    def __post_init__(self):
        if self.dim % self.num_heads:
            raise ValueError(f"dim {self.dim} is not divisible by num_heads {self.num_heads}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim {self.head_dim} must be even for RoPE")

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    @property
    def rope_split(self) -> tuple[int, int, int]:
        """Channels of each head given to the t / h / w rotary axes (44 / 42 / 42 for head_dim 128)."""
        d = self.head_dim
        return d - 4 * (d // 6), 2 * (d // 6), 2 * (d // 6)

    @classmethod
    def a14b(cls) -> ModelConfig:
        """One expert of Wan2.2-T2V-A14B (the high- and low-noise experts have the same shape)."""
        return cls()

    @classmethod
    def tiny(cls, **overrides) -> ModelConfig:
        """A 2-layer, 2-head model with the real structure, for CPU tests."""
        base = dict(dim=32, ffn_dim=64, num_heads=2, num_layers=2, freq_dim=16, text_dim=24, text_len=512)
        base.update(overrides)
        return cls(**base)


@dataclass(frozen=True)
class SamplingConfig:
    steps: int = 40  # denoising steps
    shift: float = 12.0  # flow-matching timestep shift: sigma' = s*sigma / (1 + (s-1)*sigma)
    boundary: float = 0.875  # the high-noise expert runs while t >= boundary * 1000
    guidance_high: float = 4.0  # CFG scale with the high-noise expert
    guidance_low: float = 3.0  # CFG scale with the low-noise expert
    solver: str = "unipc"  # "unipc" (official default, bh2 order 2) or "euler"
    # "official": sigmas from 0.999, timesteps truncated to integers (wan/text2video.py: 999, 937, 833, 624
    # for 4 steps at shift 5); "lightning": sigmas from 1.0, float timesteps (Wan2.2-Lightning's
    # EulerScheduler: 1000, 937.5, 833.33, 625), the grid the 4-step LoRAs were distilled on.
    grid: str = "official"
    num_train_timesteps: int = field(default=1000, repr=False)

    def __post_init__(self):
        if self.solver not in SOLVERS:
            raise ValueError(f"unknown solver {self.solver!r}: choose one of {', '.join(SOLVERS)}")
        if self.grid not in GRIDS:
            raise ValueError(f"unknown sigma grid {self.grid!r}: choose one of {', '.join(GRIDS)}")
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        if self.shift <= 0:
            raise ValueError(f"shift must be > 0, got {self.shift}")
        if not 0.0 <= self.boundary <= 1.0:
            raise ValueError(f"boundary must be in [0, 1], got {self.boundary}")

    @classmethod
    def lightning(cls) -> SamplingConfig:
        """The 4-step Wan2.2-Lightning recipe (lightx2v/Wan2.2-Lightning, T2V-A14B-4steps LoRAs): Euler at
        shift 5 on the float grid from sigma 1.0, no CFG (guidance 1.0: one pass per step), boundary 0.875:
        timesteps 1000, 937.5 (high-noise expert), 833.33, 625 (low-noise expert)."""
        return cls(steps=4, shift=5.0, boundary=0.875, guidance_high=1.0, guidance_low=1.0, solver="euler",
                   grid="lightning")

    @property
    def boundary_timestep(self) -> float:
        """The timestep at which the low-noise expert takes over (875 for A14B)."""
        return self.boundary * self.num_train_timesteps


# ---------------------------------------------------------------------------------------------
# the video size: (width, height) in pixels and frames, and what the latents and the DiT see

VAE_STRIDE = (4, 8, 8)  # (t, h, w) compression of the Wan2.1 VAE (DESIGN.md: stride 4x8x8)


def _fix(value, step: int, offset: int, least: int) -> str:
    """': use A or B', the valid values (offset + k * step, at least `least`) around a wrong `value`."""
    if not isinstance(value, int):
        return ": use a whole number"
    below = (value - offset) // step * step + offset
    return f": use {max(least, below)} or {below + step}"


@dataclass(frozen=True)
class VideoSize:
    """A video's size, always (width, height): pixels and frames, validated, with the latent shape and the
    number of tokens the DiT attends over (480p: 832x480x81 -> 32,760; 720p: 1280x720x81 -> 75,600).

    Raises ValueError naming the nearest valid values for a width or height that is not a positive
    multiple of 16 (the VAE's 8 x the patch's 2) or a frame count not of the form 4n+1.
    """

    width: int  # pixels, a positive multiple of 16
    height: int  # pixels, a positive multiple of 16
    frames: int  # 4n+1 (81 at 16 fps is the official length)

    def __post_init__(self):
        for name, value in (("width", self.width), ("height", self.height)):
            if not isinstance(value, int) or value <= 0 or value % 16:
                raise ValueError(f"{name} {value} is not a positive multiple of 16{_fix(value, 16, 0, 16)}")
        if not isinstance(self.frames, int) or self.frames < 1 or (self.frames - 1) % 4:
            raise ValueError(f"frames {self.frames} is not of the form 4n+1{_fix(self.frames, 4, 1, 1)} "
                             "(81 is the official length)")

    @classmethod
    def of(cls, size: tuple[int, int], frames: int) -> VideoSize:
        """From a (width, height) pair and a frame count."""
        if len(size) != 2:
            raise ValueError(f"size must be (width, height), got {size!r}")
        return cls(size[0], size[1], frames)

    @property
    def size(self) -> tuple[int, int]:
        """(width, height) in pixels."""
        return self.width, self.height

    def latent_shape(self, channels: int = 16) -> tuple[int, int, int, int]:
        """(C, F', H/8, W/8) with F' = (F-1)/4 + 1: the VAE latents of this video (no batch axis)."""
        st, sh, sw = VAE_STRIDE
        return channels, (self.frames - 1) // st + 1, self.height // sh, self.width // sw

    def tokens(self, patch: tuple[int, int, int] = (1, 2, 2)) -> int:
        """L = F' * H/16 * W/16: the video tokens after the DiT's (t, h, w) patchify (ModelConfig.patch_size)."""
        _, f, h, w = self.latent_shape()
        pt, ph, pw = patch
        return f // pt * (h // ph) * (w // pw)


def parse_size(text: str) -> tuple[int, int]:
    """'1280x720' -> (1280, 720): the one parser of WIDTHxHEIGHT, width first.

    Raises ValueError naming the fix for text that is not WIDTHxHEIGHT or a side that is not a positive
    multiple of 16 (checked by VideoSize). On the command line use `size_arg`, which argparse reports.
    """
    parts = text.lower().split("x")
    if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
        raise ValueError(f"size {text!r} is not WIDTHxHEIGHT, e.g. 1280x720")
    width, height = int(parts[0]), int(parts[1])
    VideoSize(width, height, 1)  # raises for a side that is not a positive multiple of 16
    return width, height


def size_arg(text: str) -> tuple[int, int]:
    """`parse_size` as an argparse `type=`: its ValueError becomes an ArgumentTypeError, whose message
    argparse prints as is (it would print only "invalid value" for a ValueError)."""
    try:
        return parse_size(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
