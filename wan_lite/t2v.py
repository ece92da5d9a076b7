"""Text to video end to end: `T2VPipeline.from_pretrained(root)(prompt) -> T2VResult` (and an mp4).

The recipe, read top to bottom in `T2VPipeline.__call__`:
1. validate every input (and the output path) before any heavy work;
2. encode prompt + negative prompt (cached on disk), then free the text encoder;
3. draw the noise from the seed, as the official code does: a `torch.Generator` on the run's device,
   fp32, shape (16, (F-1)/4+1, H/8, W/8) (so CUDA and CPU runs of one seed differ, as in the reference);
4. `sample()`: on one GPU through `residency` as the planner says (the active expert in VRAM, the
   other in host RAM, or blocks streamed); on the CPU, or sharded over several GPUs, directly;
5. VAE-decode (tiled to fit the free memory), and write the mp4 when asked.

A model root is either layout of Wan2.2-T2V-A14B (official: high_noise_model/, low_noise_model/,
models_t5_umt5-xxl-enc-bf16.pth, Wan2.1_VAE.pth, google/umt5-xxl/; diffusers: model_index.json,
transformer/, transformer_2/, text_encoder/, tokenizer/, vae/), or a Hugging Face id that is
downloaded with `snapshot_download` when online.

Where weights live is `residency.py`'s business and how the run fits the card `planner.py`'s; this
module only strings the phases together.
"""

from __future__ import annotations

import json
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import __version__
from .checkpoint import QUANT_MARKER, QUANTO_MARKER, CheckpointError, find_experts, load_expert, open_expert
from .config import ModelConfig, SamplingConfig
from .parallel import ParallelContext, load_parallel_experts
from .pipeline import Callback, sample, timesteps
from .planner import QUANTS, Plan, make_plan
from .planner import apply as apply_plan
from .residency import ModuleSwap, Residency, host_experts
from .text import DEFAULT_NEGATIVE_PROMPT, TextEncoder, clean_text
from .vae import STRIDE, VAE
from .video import check_writable, write_mp4

LAYOUT_FILES = {  # what each layout's root must hold (a trailing / marks a folder)
    "official": ["high_noise_model/", "low_noise_model/", "models_t5_umt5-xxl-enc-bf16.pth", "Wan2.1_VAE.pth",
                 "google/umt5-xxl/"],
    "diffusers": ["model_index.json", "transformer/", "transformer_2/", "text_encoder/", "tokenizer/", "vae/"],
}
HUB_IDS = {"official": "Wan-AI/Wan2.2-T2V-A14B", "diffusers": "Wan-AI/Wan2.2-T2V-A14B-Diffusers"}
BOUNDARY = 0.875  # official boundary; a diffusers root's model_index.json boundary_ratio overrides it


# ---------------------------------------------------------------------------------------------------
# Finding the model


def _present(root: Path, entry: str) -> bool:
    return (root / entry).is_dir() if entry.endswith("/") else (root / entry).is_file()


def check_root(root: str | os.PathLike) -> str:
    """The layout of a model root; one CheckpointError listing every missing file otherwise."""
    root = Path(root)
    if not root.is_dir():
        raise CheckpointError(f"model root {root} is not a folder")
    found = {layout: [e for e in files if _present(root, e)] for layout, files in LAYOUT_FILES.items()}
    layout = max(found, key=lambda k: len(found[k]))
    if not found[layout]:
        raise CheckpointError(
            f"{root} is not a Wan2.2-T2V-A14B root: expected {', '.join(LAYOUT_FILES['official'])} (official "
            f"{HUB_IDS['official']}) or {', '.join(LAYOUT_FILES['diffusers'])} ({HUB_IDS['diffusers']})"
        )
    missing = [e for e in LAYOUT_FILES[layout] if e not in found[layout]]
    if missing:
        raise CheckpointError(
            f"{root} ({layout} layout) is missing {', '.join(missing)}: download them from "
            f"{HUB_IDS[layout]} into {root}"
        )
    return layout


def _looks_like_hub_id(name: str) -> bool:
    parts = name.split("/")
    return len(parts) == 2 and all(parts) and not name.startswith((".", "~")) and "\\" not in name


def resolve_root(path_or_hub_id: str | os.PathLike) -> Path:
    """A local folder as is; a Hugging Face id (owner/name) downloaded into the hub cache when online."""
    path = Path(path_or_hub_id).expanduser()
    name = str(path_or_hub_id)
    if path.exists() or not _looks_like_hub_id(name):
        if not path.exists():
            raise FileNotFoundError(f"model root {path} does not exist")
        return path
    how = (f"download it first (`hf download {name} --local-dir DIR`, about 126 GB) and pass that folder "
           "as the model path")
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on"):
        raise FileNotFoundError(f"{name} is not a local folder and HF_HUB_OFFLINE is set: {how}")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id=name))
    except Exception as e:  # network down, unknown or gated repo: all end the same way for the user
        raise FileNotFoundError(
            f"{name} is no local folder, and downloading it from the Hugging Face Hub failed "
            f"({type(e).__name__}: {e}): {how}"
        ) from e


def _quant_scheme(expert_folder: Path) -> str:
    """The expert's quantization: the scheme in wan_lite_quant.json, "quanto-int8" for a bare
    optimum-quanto folder, "none" for float weights."""
    marker = expert_folder / QUANT_MARKER
    if marker.is_file():
        return json.loads(marker.read_text()).get("scheme", "unknown")
    qmap = expert_folder / QUANTO_MARKER
    if qmap.is_file():  # a bare optimum-quanto folder: {module: {"weights": "qint8" | "qfloat8_e4m3fn", ...}}
        weights = {spec.get("weights") for spec in json.loads(qmap.read_text()).values()}
        return "quanto-fp8" if any("float8" in str(w) for w in weights) else "quanto-int8"
    return "none"


def _expert_config(expert_folder: Path) -> ModelConfig:
    """Model dimensions of an expert folder of any layout (quantized ones record theirs)."""
    marker = expert_folder / QUANT_MARKER
    if marker.is_file():
        from quant.format import config_from_dict

        return config_from_dict(json.loads(marker.read_text())["config"])
    if (expert_folder / QUANTO_MARKER).is_file():
        return ModelConfig.a14b()  # bare quanto folders record none; they are A14B experts
    return open_expert(expert_folder).config


LIBRARY_SCHEMES = ("quanto", "nf4")  # quantized by optimum-quanto / bitsandbytes: swapped as whole modules


def _default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


# ---------------------------------------------------------------------------------------------------
# Validation


def validate(prompt: str, size: tuple[int, int], frames: int) -> None:
    """Raise ValueError naming the fix for an empty prompt, a size not a multiple of 16, frames not 4n+1."""
    if not isinstance(prompt, str) or not clean_text(prompt):
        raise ValueError("the prompt is empty: describe the video to generate")
    if len(size) != 2:
        raise ValueError(f"size must be (width, height), got {size!r}")
    for name, value in zip(("width", "height"), size):
        if not isinstance(value, int) or value <= 0 or value % 16:
            lo, hi = max(16, value // 16 * 16), (value // 16 + 1) * 16
            raise ValueError(f"{name} {value} is not a positive multiple of 16: use {lo} or {hi}")
    if not isinstance(frames, int) or frames < 1 or (frames - 1) % 4:
        lo, hi = max(1, (frames - 1) // 4 * 4 + 1), ((frames - 1) // 4 + 1) * 4 + 1
        raise ValueError(f"frames {frames} is not of the form 4n+1: use {lo} or {hi} (81 is the official length)")


# ---------------------------------------------------------------------------------------------------
# The pipeline


@dataclass
class T2VResult:
    video: torch.Tensor  # (3, F, H, W) float32 in [-1, 1], on the CPU
    latents: torch.Tensor  # (1, 16, F', H/8, W/8) float32, on the CPU
    seed: int
    params: dict  # everything that determines the video; written into the mp4 and its sidecar
    timings: dict = field(default_factory=dict)  # seconds per phase: text, denoise, decode, write

    def save(self, path: str | os.PathLike, extra: dict | None = None) -> Path:
        """Write the mp4 (and `<name>.json`) with the parameters plus `extra` (e.g. a memory plan)."""
        start = time.perf_counter()
        out = write_mp4(path, self.video, {**self.params, **(extra or {})})
        self.timings["write"] = time.perf_counter() - start
        return out


class T2VPipeline:
    """Wan2.2-T2V-A14B: prompt -> video. Components load on first use and stay (the encoder does not)."""

    def __init__(self, root: Path, *, model: str, device: torch.device, dtype: torch.dtype,
                 text_device: torch.device, text_dtype: torch.dtype, vae_dtype: torch.dtype,
                 cache_dir: str | os.PathLike | None, parallel: ParallelContext | None = None):
        self.root, self.model_name = root, model
        self.parallel = parallel  # several GPUs (wan_lite.parallel): experts sharded there, rank 0 decodes
        self.layout = check_root(root)
        self.device, self.dtype, self.vae_dtype = device, dtype, vae_dtype
        self.high_path, self.low_path = find_experts(root)
        self.boundary = BOUNDARY
        if self.layout == "diffusers":
            self.boundary = json.loads((root / "model_index.json").read_text()).get("boundary_ratio", BOUNDARY)
        self.text = TextEncoder.from_pretrained(root, device=text_device, dtype=text_dtype, cache_dir=cache_dir)
        self.text_device_from_plan = False  # from_pretrained sets it when no text_device was asked for
        high, low = _quant_scheme(self.high_path), _quant_scheme(self.low_path)
        self.quantization = high if high == low else f"high: {high}, low: {low}"
        self.config: ModelConfig | None = None  # the experts' dimensions, read on first plan
        self.experts: tuple[torch.nn.Module, torch.nn.Module] | None = None  # CPU runs, several GPUs
        self.hosts: tuple | None = None  # one GPU: (template, high, low) in host RAM for the residency
        self.vae: VAE | None = None

    @classmethod
    def from_pretrained(
        cls,
        path_or_hub_id: str | os.PathLike,
        *,
        device: str | torch.device | None = None,
        dtype: torch.dtype = torch.bfloat16,
        text_device: str | torch.device | None = None,
        text_dtype: torch.dtype = torch.bfloat16,
        vae_dtype: torch.dtype = torch.float32,
        cache_dir: str | os.PathLike | None = None,
        parallel: ParallelContext | None = None,
    ) -> T2VPipeline:
        """Open a model root (either layout) or a hub id. `device` defaults to CUDA when present;
        `text_device` (default: `device`) runs the umt5 encoder; `cache_dir` holds prompt embeddings."""
        root = resolve_root(path_or_hub_id)
        device = parallel.device if parallel else torch.device(device) if device is not None else _default_device()
        pipe = cls(root, model=str(path_or_hub_id), device=device, dtype=dtype,
                   text_device=torch.device(text_device) if text_device is not None else device,
                   text_dtype=text_dtype, vae_dtype=vae_dtype, cache_dir=cache_dir, parallel=parallel)
        pipe.text_device_from_plan = text_device is None  # on one GPU the planner may move it to the CPU
        return pipe

    def load_experts(self) -> tuple[torch.nn.Module, torch.nn.Module]:
        """(high, low) experts in host memory, loaded once."""
        if self.experts is None and self.parallel:  # straight into this rank's shards, on its GPU
            self.experts = load_parallel_experts(self.root, self.parallel, dtype=self.dtype)
        if self.experts is None:
            self.experts = (load_expert(self.high_path, dtype=self.dtype), load_expert(self.low_path, dtype=self.dtype))
        return self.experts

    @property
    def plan_quant(self) -> str:
        """The experts' weight format as the planner budgets it: bf16, int8 or fp8 (the library 8-bit
        and 4-bit schemes are budgeted as int8)."""
        q = self.quantization
        return q if q in QUANTS else "bf16" if q == "none" else "int8"

    def expert_config(self) -> ModelConfig:
        """The experts' dimensions, read once."""
        if self.config is None:
            self.config = _expert_config(self.high_path)
        return self.config

    def make_plan(self, size: tuple[int, int], frames: int, vram_gb: float | None = None) -> Plan:
        """How a run of this size fits the GPU (None: its free memory now): residency mode, CFG
        batching, attention kernel, chunking. Raises PlanError naming the smallest budget that works."""
        width, height = size
        return make_plan(vram_gb, height=height, width=width, frames=frames, quant=self.plan_quant,
                         device=self.device, cfg=self.expert_config())

    def residency(self, plan: Plan) -> Residency | ModuleSwap:
        """Both experts in host RAM (read once), run from the GPU as the plan says; experts quantized
        by optimum-quanto or bitsandbytes swap as whole modules instead."""
        if self.quantization.startswith(LIBRARY_SCHEMES):
            if self.experts is None:  # each loaded on the device (nf4 quantizes there), then parked
                self.experts = tuple(load_expert(p, dtype=self.dtype, device=self.device).to("cpu")
                                     for p in (self.high_path, self.low_path))
            return ModuleSwap(*self.experts, device=self.device)
        if self.hosts is None:
            self.hosts = host_experts(self.high_path, self.low_path, dtype=self.dtype)
        template, high, low = self.hosts
        return Residency(template, high, low, device=self.device, mode=plan.mode, cfg_batched=plan.cfg_batched,
                         slots=plan.slots if plan.mode == "streaming" else 2, compile=plan.compile,
                         ffn_chunk=plan.ffn_chunk)

    def noise(self, seed: int, size: tuple[int, int], frames: int) -> torch.Tensor:
        """The official initial noise: (1, 16, (F-1)/4+1, H/8, W/8) fp32 from a generator on the device."""
        width, height = size
        shape = (16, (frames - 1) // STRIDE[0] + 1, height // STRIDE[1], width // STRIDE[2])
        g = torch.Generator(device=self.device).manual_seed(seed)
        return torch.randn(shape, generator=g, dtype=torch.float32, device=self.device).unsqueeze(0)

    @torch.no_grad()
    def __call__(
        self,
        prompt: str,
        negative_prompt: str | None = None,
        size: tuple[int, int] = (1280, 720),
        frames: int = 81,
        steps: int = 40,
        seed: int | None = None,
        shift: float = 12.0,
        guidance_high: float = 4.0,
        guidance_low: float = 3.0,
        solver: str = "unipc",
        callback: Callback | None = None,
        out: str | os.PathLike | None = None,
        extra_metadata: dict | None = None,
        vae_tile: int | None | str = "auto",
        plan: Plan | None = None,
        vram_gb: float | None = None,
    ) -> T2VResult | None:
        """Generate one video. size is (width, height); seed None draws one; `out` also writes the mp4.

        On one GPU the experts run through the residency as `plan` says (default: `make_plan` for
        `vram_gb`, or for the free memory; a plan given on the CPU runs the same path there); the plan
        goes into the metadata.

        callback(step, total, t, expert) runs after each denoising step (expert is "high" or "low").
        Over several GPUs (`parallel`) every rank calls it; only rank 0 decodes, writes and gets a result.
        """
        # 1. everything that can be wrong with the request fails here, before any weights load
        size = tuple(size)
        validate(prompt, size, frames)
        sampling = SamplingConfig(steps=steps, shift=shift, boundary=self.boundary, guidance_high=guidance_high,
                                  guidance_low=guidance_low, solver=solver)
        if out is not None:
            check_writable(out)
        if plan is None and self.device.type == "cuda" and self.parallel is None:
            plan = self.make_plan(size, frames, vram_gb)
        planned = plan is not None and self.parallel is None  # one device, weights placed by the residency
        if vae_tile not in ("auto", None) and (not isinstance(vae_tile, int) or vae_tile <= 0 or vae_tile % 32):
            raise ValueError(f"vae_tile must be 'auto', None (untiled) or a positive multiple of 32, got {vae_tile!r}")
        negative_prompt = DEFAULT_NEGATIVE_PROMPT if negative_prompt is None else negative_prompt
        seed = random.randint(0, 2**31 - 1) if seed is None else int(seed)
        main = self.parallel is None or self.parallel.is_main
        timings = {}

        # 2. text: both prompts in one pass (or from the cache), then the encoder leaves the GPU
        start = time.perf_counter()
        if planned and self.text_device_from_plan:  # umt5-xxl needs 13.5 GB in bf16: the CPU on small cards
            self.text.device = torch.device(plan.text_device)
        try:
            embeddings = [e.cpu() for e in self.text.encode([prompt, negative_prompt])] if main else None
        finally:  # also after an error: 13.5 GB of encoder must not stay on the GPU
            self.text.unload()
        if self.parallel:  # every rank samples from rank 0's seed and prompt embeddings
            seed, embeddings = self.parallel.from_main((seed, embeddings))
        context, context_null = embeddings  # (L, 4096), (L', 4096)
        timings["text"] = time.perf_counter() - start

        # 3-4. noise and denoising
        start = time.perf_counter()
        noise = self.noise(seed, size, frames)  # (1, 16, F', H/8, W/8)
        context, context_null = (c.unsqueeze(0).to(self.device) for c in (context, context_null))  # (1, L, 4096)
        if planned:  # the active expert in VRAM (or streamed), the other in host RAM
            apply_plan(plan)
            residency = self.residency(plan)
            if isinstance(residency, Residency):
                residency.plan_steps(timesteps(sampling), sampling.boundary_timestep)
            try:
                latents = sample(residency.high, residency.low, noise, context, context_null, sampling,
                                 callback=callback).cpu()
            finally:  # also after a cancel or an error: the VAE (or the next run) gets the VRAM
                residency.evict()
        else:  # the CPU, or this rank's shards of both experts
            high, low = self.load_experts()
            latents = sample(high, low, noise, context, context_null, sampling, callback=callback).cpu()
        timings["denoise"] = time.perf_counter() - start
        if not main:
            return None  # rank 0 decodes and writes

        # 5. decode
        start = time.perf_counter()
        if self.vae is None:
            self.vae = VAE.from_pretrained(self.root, device=self.device, dtype=self.vae_dtype)
        self.vae.model.to(self.device)
        if vae_tile == "auto" and plan is not None:  # the plan's tile fits its budget, not the card's
            vae_tile = plan.vae_tile
        try:
            video = self.vae.decode(latents, tile=vae_tile)[0].cpu()  # (3, F, H, W)
        finally:
            if self.device.type == "cuda":
                self.vae.unload()
        timings["decode"] = time.perf_counter() - start

        params = {
            "prompt": prompt, "negative_prompt": negative_prompt, "seed": seed, "width": size[0],
            "height": size[1], "frames": frames, "steps": steps, "shift": shift, "guidance_high": guidance_high,
            "guidance_low": guidance_low, "boundary": self.boundary, "solver": solver,
            "quantization": self.quantization, "dtype": str(self.dtype).removeprefix("torch."),
            "model": self.model_name, "layout": self.layout, "wan_lite_version": __version__,
            "plan": plan.to_dict() if plan is not None else None,
        }  # fmt: skip
        result = T2VResult(video=video, latents=latents, seed=seed, params=params, timings=timings)
        if out is not None:
            result.save(out, extra=extra_metadata)
        return result
