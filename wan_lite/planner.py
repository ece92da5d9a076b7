"""Choose how to run in a VRAM budget and a host-RAM budget: residency mode, CFG batching, attention
kernel, FFN chunking, VAE tile, text encoder placement, and where the experts wait on the host. One
frozen `Plan` (its host side a `HostPlan`), printed as a readable block and stored in the run's
metadata (`plan.to_dict()`).

The arithmetic (DESIGN.md section 3), all in bytes, fitted to H100 measurements of
`python -m wan_lite.bench` (int8 w8a8 experts, blocks compiled, 81 frames; BENCHMARKS.md):
- weights: the exact bytes of one expert's tensors, summed from the model's own layout (meta
  device) for the scheme: bf16, or 8-bit block Linears with float32 per-channel scales (14.9 GB for
  int8: the float32 time projection alone is 0.63 GB). Resident mode holds one expert; streaming
  holds the embed and head units plus `slots` blocks.
- activations: `ACT_PEAK` bytes per token x channel for one pass (the float32 residual stream and
  a block's transients) + `FIXED`; an unchunked FFN adds `FFN_PEAK`; block-major sequential CFG
  (streaming) adds `STREAM_EXTRA` (the second pass's residual streams); one batch of 2 doubles it.
- the budget is compared with the *reserved* memory the caching allocator will hold:
  `FRAGMENTATION` x allocated + `SLACK` (expandable segments on; measured 1.02-1.10x). A budget in
  GB (1e9) on a card sold in GiB leaves the CUDA context its ~0.5 GB; a measured free-memory budget
  has it taken out already.

Choices, in order: resident if one expert and one pass's activations fit, else streaming (block-major,
batched CFG if two passes fit, else sequential); a fused attention kernel where the device has one, the
block-wise path elsewhere; the VAE tile from `vae.tile_for_memory`; the text encoder on the GPU when its
bf16 weights fit (it runs before the expert is loaded), else on the CPU.

Host RAM (`HostPlan`), private (anonymous) memory only: the page cache a memory-mapped checkpoint
is read through is file-backed and reclaimable, so it is reported, not budgeted. Per expert, from the
same unit layouts as the VRAM plan: E = embed + blocks + head bytes, as pinned RAM holds them (packed
in power-of-two blocks, `residency.pack_pinned`: 1.04x the bytes for int8 A14B); an expert served from its
file passes through `residency.STAGING` pinned staging buffers of the largest unit (U, rounded up to a
power of two as PyTorch's pinned allocator does; packed like the experts' units, which saves nothing while
the largest unit, the embedding at 0.83 GB for int8 A14B, is over half a power of two). Choices, fastest
first, the first whose peak fits: "pinned" (both experts in pinned RAM: 2E), "mapped" (the low-noise
expert pinned, read into RAM on a thread while the high-noise steps run, so its swap copies straight from
pinned RAM; the high-noise one read from its memory-mapped file through the staging buffers when it is
loaded: E + STAGING x U), "streamed" (both from the files: STAGING x U; in streaming mode
every step then reads the experts through the page cache). Pinning the high-noise expert instead would
buy nothing in resident mode: it is copied to the GPU once, at the start, when nothing waits on it but
the first step, while the low-noise expert's copies must keep ahead of the last high-noise call. The
umt5 encoder on the CPU (`TEXT_HOST`) runs and is freed before the experts' buffers fill, so the peak
is HOST_FIXED + the larger of the two phases, not their sum.
"""

from __future__ import annotations

import functools
import math
from dataclasses import asdict, dataclass

import psutil
import torch

from . import attention
from .config import ModelConfig, VideoSize
from .quantized.format import quantized_linears
from .residency import STAGING, layouts_of, pinned_bytes, template

GB = 1e9
SCHEMES = ("int8", "fp8", "none")  # weight formats budgeted: 8-bit block Linears, or float (held in bf16)
RESOLUTIONS = {"480p": (480, 832), "720p": (720, 1280)}  # (height, width), the official landscape sizes
# Peak bytes per (token x channel) of one pass, FFN chunked, by whether the blocks are compiled.
# Compiled: fitted to the 480p and 720p resident runs of 2026-11-26 (in-place residual, element-wise
# RoPE: 2.47 and 5.57 GB over the weights -> 14.15 B x L x dim + 0.10 GB). The peak is the fused q/k
# norm + RoPE kernel: the float32 stream (4), the modulated input (2), raw and rotated q and k (8).
# Eager: one int8 block at 720p measured 18.2 B over the stream (compiled: 10.0), so 22.2 + the 0.15
# the whole model adds over one block compiled.
ACT_PEAK = {False: 22.4, True: 14.15}
FIXED = 0.10 * GB  # latents, text context, RoPE tables, workspaces (the fit's intercept)
FFN_CHUNK = 8192  # tokens per FFN chunk when the model supports it (GEMMs of 8192 rows stay efficient)
FFN_PEAK = 6.3  # what an unchunked FFN adds (measured before the in-place residual: 25.0 vs 18.7 B x L x dim)
STREAM_EXTRA = 4.13  # block-major sequential CFG: the second pass's float32 stream (480p streaming, 8 GB cap)
# reserved <= FRAGMENTATION x allocated + SLACK (worst seen: 480p batched streaming, 7.01 vs 6.38 GB)
FRAGMENTATION, SLACK = 1.075, 0.15 * GB
TEXT_PARAMS = 6.73e9  # umt5-xxl encoder as transformers builds it (measured 13.5 GB in bf16)
STREAM_SLOTS = 2
# Private host RAM of umt5-xxl in bf16 on the CPU when its file is not known (an upper bound: TEXT_PARAMS
# counts the tied embedding twice, the official .pth is 11.4 GB; a load that needs no cast keeps it
# memory-mapped, file-backed). T2VPipeline passes the size of its encoder's files instead.
TEXT_HOST = 2 * TEXT_PARAMS
# Private host RAM besides the weights: torch and the CUDA runtime, latents, prompt embeddings (an
# estimate, to be fitted on the full-size run), plus the decoded video (`decode_host_bytes`).
HOST_FIXED = 1.5 * GB
HOST_MODES = ("pinned", "mapped", "streamed")
# ONE_RUN: for a command that runs once (`python -m wan_lite.generate`) with the experts resident in VRAM,
# both experts are read from their memory-mapped files ("streamed"), whatever the RAM budget: pinned RAM
# only pays across runs (the app). Measured on the H200 machine, 720p, Lightning, int8, 24 GB VRAM, page
# cache warm (BENCHMARKS.md, session 3): "streamed" reached the end of the first step at 46.2 s with 7.8 GB
# private + pinned RAM, "mapped" (the low-noise expert pinned) at 57.4 s with 23.2 GB; the steps around the
# swap took 10.4 + 8.6 s against 10.2 + 8.6 s. In streaming (VRAM) mode every step reads the experts again,
# so there the budget decides as usual.


class PlanError(ValueError):
    """No plan fits the budget; the message names the smallest budget that works."""


@dataclass(frozen=True)
class HostPlan:
    """Where the experts wait on the host, and the private host RAM the run takes (GB = 1e9 bytes)."""

    ram_gb: float  # the host-RAM budget planned for
    mode: str  # pinned | mapped | streamed (HOST_MODES)
    high: str  # the high-noise expert: "ram" (pinned buffers, filled once) | "file" (memory-mapped, staged)
    low: str  # the low-noise expert, likewise
    staging: int  # pinned staging buffers the experts served from files pass through (0: none)
    experts_gb: float  # private RAM of the experts' host side: pinned buffers + staging buffers
    mapped_gb: float  # checkpoint bytes served through the page cache (file-backed, not private)
    text_gb: float  # private RAM of the text phase (umt5 on the CPU), freed before the experts fill
    peak_gb: float  # estimated peak private RAM: HOST_FIXED + decoded video + max(text, experts)
    keep_between_runs: bool  # the experts' RAM may stay filled while the next run's text encoder runs

    def describe(self) -> str:
        where = {"pinned": "both experts in pinned RAM",
                 "mapped": "low-noise expert in pinned RAM (read during the high-noise steps), high-noise expert "
                           "from its memory-mapped file",
                 "streamed": "both experts from their memory-mapped files"}[self.mode]
        staged = f" ({self.staging} pinned staging buffers, read ahead)" if self.staging else ""
        return (f"  host RAM     {where}{staged}\n"
                f"               {self.experts_gb:.1f} GB experts, text encoder {self.text_gb:.1f} GB before them: "
                f"{self.peak_gb:.1f} GB peak private of {self.ram_gb:.1f} GB (estimated); "
                f"{self.mapped_gb:.1f} GB through the page cache")


@dataclass(frozen=True)
class Plan:
    vram_gb: float  # the budget planned for (GB = 1e9 bytes)
    height: int
    width: int
    frames: int
    tokens: int  # L: video tokens the DiT attends over
    scheme: str  # weight format: int8 | fp8 | none (float, held in bf16)
    mode: str  # resident | streaming
    slots: int  # streaming: device block buffers (resident: one per unit)
    cfg_batched: bool  # cond and uncond as one batch of 2
    compile: bool  # torch.compile each block (model.compile_blocks): less activation memory, faster
    attention: str  # attention kernel (attention.BACKENDS)
    attention_block_mb: int | None  # block-wise attention: scores per block
    ffn_chunk: int | None  # tokens per FFN chunk (None: whole sequence)
    vae_tile: int | None  # VAE decode tile side in pixels (None: whole frame)
    text_device: str  # where the umt5 encoder runs: cuda | cpu
    weights_gb: float  # VRAM the DiT weights take in this mode
    activations_gb: float  # estimated peak activations of the denoising loop
    estimated_peak_gb: float  # weights + activations + fixed
    host_gb: float  # private host RAM the experts take in this plan (host.experts_gb)
    host: HostPlan  # where the experts wait on the host (the host-RAM budget)

    def to_dict(self) -> dict:
        return asdict(self)

    def describe(self) -> str:
        cfg = "one batch of 2" if self.cfg_batched else ("block-major, one after the other"
                                                           if self.mode == "streaming" else "two passes")
        mode = (f"streaming (blocks cycle through {self.slots} device buffers)" if self.mode == "streaming"
                else "resident (active expert in VRAM, the other in host RAM, swapped at t = 875)")
        attn = self.attention + (f" ({self.attention_block_mb} MB blocks)" if self.attention_block_mb else "")
        lines = [
            f"plan for {self.vram_gb:.1f} GB: {self.width}x{self.height}, {self.frames} frames, "
            f"{self.tokens:,} tokens, {self.scheme if self.scheme != 'none' else 'bf16'} weights",
            f"  experts      {mode}",
            f"  CFG          {cfg}",
            f"  blocks       {'torch.compile' if self.compile else 'eager'}",
            f"  attention    {attn}",
            f"  FFN          {f'{self.ffn_chunk} tokens a chunk' if self.ffn_chunk else 'whole sequence'}",
            f"  VAE decode   {f'{self.vae_tile} px tiles' if self.vae_tile else 'whole frame'}",
            f"  text encoder {self.text_device}",
            f"  VRAM         {self.weights_gb:.1f} GB weights + {self.activations_gb:.1f} GB activations "
            f"= {self.estimated_peak_gb:.1f} GB peak (estimated)",
            self.host.describe(),
        ]
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# memory arithmetic


def tokens(width: int, height: int, frames: int, cfg: ModelConfig) -> int:
    """L = F' * H/16 * W/16 (VideoSize.tokens with the model's patch); raises ValueError for a bad size."""
    return VideoSize(width, height, frames).tokens(cfg.patch_size)


def budget_scheme(scheme: str) -> str:
    """The format a model's weight scheme is budgeted as: library 8-bit and 4-bit schemes as int8 (an
    upper bound for nf4), float as "none"."""
    return scheme if scheme in SCHEMES else "int8"


@functools.cache
def unit_bytes(cfg: ModelConfig, scheme: str) -> tuple[int, int, int]:
    """(embed, one block, head) bytes of one expert with this weight format, from the model's layout."""
    if scheme not in SCHEMES:
        raise ValueError(f"unknown weight format {scheme!r}: choose one of {', '.join(SCHEMES)}")
    lay = layouts_of(template(cfg, torch.bfloat16, quantized_linears(cfg, scheme)))
    return lay["embed"].nbytes, lay["blocks.0"].nbytes, lay["head"].nbytes


def ffn_chunking() -> bool:
    """Whether this model.py can run its FFN over token chunks (`Block.ffn_chunk`)."""
    from .model import Block

    return hasattr(Block, "ffn_chunk")


def activation_bytes(L: int, cfg: ModelConfig, mode: str, cfg_batched: bool, batch: int = 1,
                     compiled: bool = True, ffn_chunk: int | None = FFN_CHUNK) -> float:
    """Peak activation bytes of one guided step (see the module docstring)."""
    per_token_dim = ACT_PEAK[compiled] + (FFN_PEAK if ffn_chunk is None else 0.0)
    per_pass = per_token_dim * L * cfg.dim * batch
    if cfg_batched:
        return 2 * per_pass
    if mode == "streaming":  # block-major: two residual streams, one pass's transients
        return per_pass + STREAM_EXTRA * L * cfg.dim * batch
    return per_pass


def _estimate(L: int, cfg: ModelConfig, scheme: str, mode: str, cfg_batched: bool, compiled: bool,
              ffn_chunk: int | None) -> tuple:
    embed, block, head = unit_bytes(cfg, scheme)
    weights = embed + head + block * (cfg.num_layers if mode == "resident" else STREAM_SLOTS)
    act = activation_bytes(L, cfg, mode, cfg_batched, compiled=compiled, ffn_chunk=ffn_chunk)
    return weights, act, weights + act + FIXED


def decode_host_bytes(width: int, height: int, frames: int) -> int:
    """The decoded video on the host: float32 (3, F, H, W) and its uint8 copy for the mp4."""
    return 3 * frames * height * width * (4 + 1)


def host_plan(cfg: ModelConfig, scheme: str, ram_gb: float | None, *, text_device: str,
              video_bytes: int = 0, text_bytes: float = TEXT_HOST, one_run: bool = False) -> HostPlan:
    """The fastest host placement of the experts whose peak private RAM fits `ram_gb` (None: what the
    machine has available now, psutil); see the module docstring. `text_bytes`: the text encoder's
    weights on the CPU. `one_run` (a command that runs once and exits, with the experts resident in VRAM):
    "streamed", whatever the budget (ONE_RUN below). Raises PlanError naming the smallest budget that works."""
    if ram_gb is None:
        ram_gb = psutil.virtual_memory().available / GB
    embed, block, head = unit_bytes(cfg, scheme)
    expert = embed + head + cfg.num_layers * block  # E, as stored (what a memory-mapped expert maps)
    units = {"embed": embed, "head": head} | {f"blocks.{i}": block for i in range(cfg.num_layers)}
    pinned = pinned_bytes(units)  # E in pinned RAM: packed in power-of-two blocks (residency.pack_pinned)
    ring = pinned_bytes({f"staging{i}": max(embed, block, head) for i in range(STAGING)})  # as _Prefetch allocates them
    text = text_bytes if text_device == "cpu" else 0.0
    other = HOST_FIXED + video_bytes
    options = {"pinned": ("ram", "ram", 0, 2 * pinned), "mapped": ("file", "ram", STAGING, pinned + ring),
               "streamed": ("file", "file", STAGING, ring)}
    if one_run:
        options = {"streamed": options["streamed"]}
    for mode, (high, low, staging, experts) in options.items():
        peak = other + max(text, experts)
        if peak <= ram_gb * GB:
            return HostPlan(ram_gb=round(ram_gb, 2), mode=mode, high=high, low=low, staging=staging,
                            experts_gb=round(experts / GB, 2),
                            mapped_gb=round(expert * [high, low].count("file") / GB, 2),
                            text_gb=round(text / GB, 2), peak_gb=round(peak / GB, 2),
                            keep_between_runs=other + text + experts <= ram_gb * GB)
    smallest = math.ceil((other + max(text, ring)) / GB * 10) / 10
    fix = ("free host RAM, or let the text encoder run on the GPU (a larger --vram-gb)" if text > ring
           else "free host RAM")
    raise PlanError(f"{ram_gb:.1f} GB of host RAM is too small for {scheme if scheme != 'none' else 'bf16'} experts"
                    + (f" with the text encoder on the CPU ({text / GB:.1f} GB)" if text_device == "cpu" else "")
                    + f": the smallest budget that works is {smallest:.1f} GB (both experts served from their "
                    f"memory-mapped files); {fix}")


# ---------------------------------------------------------------------------------------------
# the plan


def make_plan(vram_gb: float | None = None, *, height: int, width: int, frames: int, scheme: str = "int8",
              device: torch.device | str | None = None, cfg: ModelConfig | None = None,
              mode: str | None = None, capability: tuple[int, int] | None = None,
              compile: bool | None = None, attention_8bit: bool | None = None,
              ram_gb: float | None = None, text_bytes: float = TEXT_HOST, one_run: bool = False) -> Plan:
    """The plan for this budget (None: the free memory of `device` now) and `ram_gb` of host RAM (None:
    what the machine has available now; `host_plan`; `text_bytes`: the text encoder's weights, held in
    RAM when it runs on the CPU; `one_run`: a command that runs once, see ONE_RUN). `mode` forces resident or
    streaming; `capability` plans for a CUDA card that is not here; `compile` (default: on CUDA)
    whether the blocks run through torch.compile; `attention_8bit` (default: with 8-bit weights) the FP8
    attention kernel on cards with FP8 tensor cores (sm89+). Raises PlanError naming the smallest budget
    (VRAM or host RAM) that works when nothing fits."""
    cfg = cfg or ModelConfig.a14b()
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if vram_gb is None:
        if device.type != "cuda":
            raise PlanError("no CUDA device to measure free memory on: pass the budget (--vram-gb)")
        vram_gb = torch.cuda.mem_get_info(device)[0] / GB
    if height % 16 or width % 16 or (frames - 1) % 4:
        raise PlanError(f"{width}x{height}x{frames}: width and height must be multiples of 16, frames 4n+1")
    L = tokens(width, height, frames, cfg)
    usable = (vram_gb * GB - SLACK) / FRAGMENTATION  # what may be allocated

    candidates = [("resident", False), ("streaming", True), ("streaming", False)]
    if mode is not None:
        candidates = [c for c in candidates if c[0] == mode]
    compiled = device.type == "cuda" if compile is None else compile
    ffn_chunk = FFN_CHUNK if ffn_chunking() and L > FFN_CHUNK else None
    fits = [(m, b, *_estimate(L, cfg, scheme, m, b, compiled, ffn_chunk)) for m, b in candidates]
    chosen = next((c for c in fits if c[4] <= usable), None)
    if chosen is None:
        smallest = min(c[4] for c in fits) * FRAGMENTATION + SLACK
        raise PlanError(
            f"{vram_gb:.1f} GB is too small for {width}x{height}x{frames} ({L:,} tokens) with {scheme} weights"
            + (f" in {mode} mode" if mode else "")
            + f": the smallest budget that works is {math.ceil(smallest / GB * 10) / 10:.1f} GB "
            "(streaming, sequential CFG); use fewer frames or a smaller size, or free GPU memory")
    m, batched, weights, act, peak = chosen

    attn = attention.device_default(device, capability)
    if attention_8bit is None:  # with 8-bit weights the user has chosen 8-bit arithmetic: attention too
        attention_8bit = scheme in ("int8", "fp8")
    cap = capability or (torch.cuda.get_device_capability(device) if device.type == "cuda" else (0, 0))
    if attention_8bit and device.type == "cuda" and cap >= attention.FP8_MIN_CAPABILITY:
        attn = attention.FP8  # FP8 e4m3 attention (attention8.py): 1.2-1.4x cuDNN on an H200
    block_mb = None
    if attn == "blockwise":  # no fused kernel: keep a block's scores within a slice of what is left
        block_mb = int(max(16, min(1024, (usable - peak) / 4 / 2**20)))

    from .vae import tile_for_memory

    try:  # the pipeline decodes in float32 (4 bytes), after the experts have left the GPU
        vae_tile = tile_for_memory(height, width, frames, int(usable), 4)
    except MemoryError as e:
        raise PlanError(f"{vram_gb:.1f} GB: {e}") from e
    text_device = "cuda" if device.type == "cuda" and 2 * TEXT_PARAMS + GB <= usable else "cpu"
    host = host_plan(cfg, scheme, ram_gb, text_device=text_device, text_bytes=text_bytes,
                     video_bytes=decode_host_bytes(width, height, frames), one_run=one_run and m == "resident")
    return Plan(
        vram_gb=round(vram_gb, 2), height=height, width=width, frames=frames, tokens=L, scheme=scheme, mode=m,
        slots=STREAM_SLOTS if m == "streaming" else cfg.num_layers + 2, cfg_batched=batched, compile=compiled,
        attention=attn, attention_block_mb=block_mb, ffn_chunk=ffn_chunk, vae_tile=vae_tile,
        text_device=text_device, weights_gb=round(weights / GB, 2), activations_gb=round(act / GB, 2),
        estimated_peak_gb=round(peak / GB, 2), host_gb=host.experts_gb, host=host,
    )
