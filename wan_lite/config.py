"""Model dimensions and sampling settings as frozen dataclasses, with the official presets.

`ModelConfig.a14b()` is one Wan2.2-T2V-A14B expert (both experts share it); `ModelConfig.tiny()` is
the 2-layer, 2-head model the tests build on the CPU. `SamplingConfig()` holds the official
text-to-video defaults of `wan/configs/wan_t2v_A14B.py`; `SamplingConfig.lightning()` the 4-step
Lightning recipe. `StepCache` (a field of `SamplingConfig`, off by default) says which steps may reuse the
last computed step's output instead of running the expert.
"""

from __future__ import annotations

import argparse
import re
from dataclasses import dataclass, field
from fractions import Fraction

SOLVERS = ("unipc", "euler")
GRIDS = ("official", "lightning")
CACHE_MODES = ("off", "threshold", "pattern")


SMALLEST_RELEASED_DIM = 1536  # Wan2.1-T2V-1.3B's width; A14B's experts are 5,120 wide
VIDEO_DEFAULT = (1280, 720), 81  # (width, height), frames: the official 720p video
TEST_SIZE_VIDEO_DEFAULT = (64, 64), 9  # the same for a test-size model: its random weights make noise at any size


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
    def is_test_size(self) -> bool:
        """Narrower than any released Wan expert (Wan2.1-T2V-1.3B, dim 1,536, is the narrowest): a test or demo
        model, whose random weights make noise at any size, so the CLI and the app default to a tiny video."""
        return self.dim < SMALLEST_RELEASED_DIM

    @property
    def default_video(self) -> tuple[tuple[int, int], int]:
        """((width, height), frames) when a caller gives none: the official 1280x720 x 81, or 64x64 x 9 for a
        test-size model (a 720p run of the app's demo on a CPU took over ten minutes of noise)."""
        return TEST_SIZE_VIDEO_DEFAULT if self.is_test_size else VIDEO_DEFAULT

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


def _percentage(pattern) -> Fraction:
    """"50%" -> Fraction(1, 2), exact (so 30% of 10 steps is 3, not 3.0000000000000004 rounded up)."""
    text = pattern if isinstance(pattern, str) else ""
    if not re.fullmatch(r"\d+(\.\d+)?%", text) or Fraction(text[:-1]) > 100:
        raise ValueError(f"step cache pattern {pattern!r} is not a percentage from 0% to 100%, e.g. '50%' (or "
                         "give the computed step indices)")
    return Fraction(text[:-1]) / 100


@dataclass(frozen=True)
class StepCache:
    """Step caching: on a skipped step `pipeline.sample` runs no expert and estimates the guided velocity as
    v = x + (v_c - x_c), reusing the transformation vector v - x of that expert's last computed step c
    (EasyCache, arXiv:2507.02860: the model output minus its input, taken end to end over the model).

    Each expert's first and last steps are always computed and nothing crosses the expert switch: the
    low-noise expert never reuses a high-noise vector, and the change-rate estimate starts afresh.
    "pattern" fixes the computed steps in advance (for benchmarks, and what the residency can plan);
    "threshold" decides per step from the latents (EasyCache's criterion), so which steps run is known
    only while sampling. Raises ValueError naming the fix for an unknown mode or a malformed setting.
    """

    # "off": every step runs its expert (the default). "threshold": skip while the accumulated estimate
    # of the velocity's relative change since the last computed step stays below `threshold`.
    # "pattern": compute exactly the steps `pattern` names.
    mode: str = "off"
    # "threshold" mode, the one knob: the accumulated relative change (mean |dv| / mean |v|) tolerated
    # before the expert runs again; 0 computes every step, larger skips more. 0.06 is EasyCache's
    # Wan2.2 T2V-A14B setting (EasyCache4Wan2.2/easycache_generate.py, --thresh_t2v).
    threshold: float = 0.06
    # "threshold" mode: the run's first `warmup` steps are always computed (EasyCache's ret_steps, 7 for
    # Wan2.2 T2V-A14B: the early steps change the most).
    warmup: int = 7
    # "pattern" mode: "N%" computes N% of each expert's steps (rounded up, at least its first and last),
    # evenly spaced from its first step to its last ("50%": 13 of 26 high and 7 of 14 low steps of the
    # official 40); or the computed step indices themselves (0-based; must hold each expert's first and last).
    pattern: str | tuple[int, ...] = "50%"

    def __post_init__(self):
        if self.mode not in CACHE_MODES:
            raise ValueError(f"unknown step cache mode {self.mode!r}: choose one of {', '.join(CACHE_MODES)}")
        if not self.threshold >= 0:
            raise ValueError(f"step cache threshold must be >= 0 (0 computes every step), got {self.threshold}")
        if not isinstance(self.warmup, int) or self.warmup < 0:
            raise ValueError(f"step cache warmup must be a whole number of steps >= 0, got {self.warmup!r}")
        if isinstance(self.pattern, str):
            _percentage(self.pattern)  # raises for anything but "N%" with 0 <= N <= 100
        else:
            steps = tuple(self.pattern)
            if not all(isinstance(i, int) and i >= 0 for i in steps):
                raise ValueError(f"step cache pattern {self.pattern!r}: give 0-based step indices (whole numbers "
                                 "from 0) or a percentage such as '50%'")
            object.__setattr__(self, "pattern", tuple(sorted(set(steps))))  # a list becomes a hashable tuple

    @property
    def fraction(self) -> Fraction:
        """A percentage pattern as an exact fraction: "50%" -> 1/2. Raises ValueError for another pattern."""
        return _percentage(self.pattern)

    @classmethod
    def half(cls) -> StepCache:
        """The fixed benchmark pattern: half of each expert's steps computed, first and last included."""
        return cls(mode="pattern", pattern="50%")

    @classmethod
    def easycache(cls) -> StepCache:
        """EasyCache's published Wan2.2 T2V-A14B setting (threshold 0.06, 7 warm-up steps; reported ~2.2x
        at 720p on an H20 by H-EmbodVis/EasyCache, EasyCache4Wan2.2): the setting to start from."""
        return cls(mode="threshold", threshold=0.06, warmup=7)


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
    # Which steps run the expert and which reuse the last computed one (StepCache; off: all run). Here
    # rather than an argument of `sample`, so that what plans per step from the sampling settings (the
    # residency's `prepare(sampling)`, `pipeline.computed_steps`) sees the same steps the loop runs.
    cache: StepCache = StepCache()

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


def nearest_valid(value, step: int, offset: int, least: int) -> str:
    """': use A or B', the valid values (offset + k * step, at least `least`) around a wrong `value`."""
    if not isinstance(value, int):
        return ": use a whole number"
    below = (value - offset) // step * step + offset
    if below < least:
        return f": use {least} or more"
    return f": use {below} or {below + step}"


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
                raise ValueError(f"{name} {value} is not a positive multiple of 16{nearest_valid(value, 16, 0, 16)}")
        if not isinstance(self.frames, int) or self.frames < 1 or (self.frames - 1) % 4:
            raise ValueError(f"frames {self.frames} is not of the form 4n+1{nearest_valid(self.frames, 4, 1, 1)} "
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
