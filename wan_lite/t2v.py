"""Text to video end to end: `T2VPipeline.from_pretrained(root)(prompt) -> T2VResult` (and an mp4).

The recipe, read top to bottom in `T2VPipeline.__call__`:
1. validate every input (and the output path) before any heavy work;
2. encode prompt + negative prompt (cached on disk), then free the text encoder;
3. draw the noise from the seed, as the official code does: a `torch.Generator` on the run's device,
   fp32, shape (16, (F-1)/4+1, H/8, W/8) (so CUDA and CPU runs of one seed differ, as in the reference);
4. `sample()`: on one GPU through `residency` as the planner says (the active expert in VRAM, the
   other in host RAM, or blocks streamed); on the CPU, or sharded over several GPUs, directly;
5. VAE-decode (tiled to fit the free memory), and write the mp4 when asked.

The model on disk is `checkpoint.open_root`'s business (a `ModelRoot`), where weights live
`residency.py`'s (every way of holding the experts offers `.high`, `.low`, `prepare`, `release`) and
how the run fits the card `planner.py`'s; a plan is applied in one place (`_apply`). This module only
strings the phases together.
"""

from __future__ import annotations

import dataclasses
import os
import threading
import time
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import torch

from . import __version__, attention
from .checkpoint import (
    BOUNDARY,
    CheckpointError,
    ModelRoot,
    check_root,
    files_bytes,
    load_expert,
    open_expert,
    open_root,
    read_ahead,
    resolve_root,
)
from .checks import resolve_seed, validate, validate_sampling
from .config import ModelConfig, SamplingConfig, StepCache
from .lora import read_lora
from .parallel import ParallelContext, load_parallel_experts
from .pipeline import Callback, Cancelled, computed_steps, needs_negative_prompt, sample
from .planner import GB, TEXT_HOST, Plan, budget_scheme, make_plan
from .residency import Experts, LoadedExperts, ModuleSwap, Residency, host_experts
from .text import DEFAULT_NEGATIVE_PROMPT, TEXT_LEN, TextEncoder, text_layout
from .vae import STRIDE, VAE, check_vae
from .video import check_writable, latents_path, read_latents, save_latents, write_mp4

__all__ = ["BOUNDARY", "CheckpointError", "DecodeError", "T2VPipeline", "T2VResult", "check_root", "decode_latents",
           "resolve_root", "validate", "validate_sampling"]


STARTUP_PARTS = ("open_root", "check_text", "tokenizer", "check_vae")  # T2VPipeline.parts of the constructor


def _default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


# ---------------------------------------------------------------------------------------------------
# The pipeline


@dataclass
class T2VResult:
    video: torch.Tensor  # (3, F, H, W) float32 in [-1, 1], on the CPU
    latents: torch.Tensor  # (1, 16, F', H/8, W/8) float32, on the CPU
    seed: int
    params: dict  # everything that determines the video; written into the mp4 and its sidecar
    timings: dict = field(default_factory=dict)  # seconds per phase: text, load, denoise, decode, write
    parts: dict = field(default_factory=dict)  # seconds of parts of those phases (T2VPipeline.parts), and the
    # first step's: its staging waits and the first compile (residency stats)
    vram_peaks: dict = field(default_factory=dict)  # GiB allocated at most in each phase (CUDA runs)
    vram_held: float | None = None  # GiB still allocated once the experts are released, before the decode
    warnings: list[str] = field(default_factory=list)  # one line each, for the CLI and the app to show

    def save(self, path: str | os.PathLike, extra: dict | None = None) -> Path:
        """Write the mp4 (and `<name>.json`) with the parameters plus `extra` (e.g. a memory plan)."""
        start = time.perf_counter()
        out = write_mp4(path, self.video, {**self.params, **(extra or {})})
        self.timings["write"] = time.perf_counter() - start
        return out


class DecodeError(RuntimeError):
    """The VAE decode (or the mp4 after it) failed after the denoise; the latents are kept in `latents_file`."""

    def __init__(self, latents_file: Path, out: Path, cause: BaseException):
        self.latents_file, self.out = latents_file, out
        cause_text = " ".join(f"{type(cause).__name__}: {cause}".split())[:300]
        super().__init__(
            f"the VAE decode failed after the denoise ({cause_text}); the denoised latents are kept in "
            f"{latents_file}: decode them later with `python -m wan_lite.generate --decode {latents_file} --out "
            f"{out}` and a smaller --vae-tile (e.g. 256) or --device cpu")


class T2VPipeline:
    """Wan2.2-T2V-A14B: prompt -> video. Components load on first use and stay (the encoder does not)."""

    def __init__(self, model: ModelRoot, *, device: torch.device, dtype: torch.dtype,
                 text_device: torch.device, text_dtype: torch.dtype, vae_dtype: torch.dtype,
                 cache_dir: str | os.PathLike | None, parallel: ParallelContext | None = None,
                 prompts: Sequence[str] = ()):
        self.model = model  # the model on disk, described once (checkpoint.open_root)
        self.parallel = parallel  # several GPUs (wan_lite.parallel): experts sharded there, rank 0 decodes
        self.device, self.dtype, self.vae_dtype = device, dtype, vae_dtype
        self.parts: dict[str, float] = {}  # seconds of the start-up's and the last run's parts (`_part`)
        self.part_began: dict[str, float] = {}  # time.perf_counter() at the start of each of them
        self.text = TextEncoder(text_layout(model.text_encoder), model.text_encoder, model.tokenizer,
                                device=text_device, dtype=text_dtype, cache_dir=cache_dir, use_cache=True,
                                width=model.config.text_dim)
        for where in {device, text_device}:
            if where.type == "cuda" and not torch.cuda.is_available():
                why = "no GPU found" if torch.version.cuda else "a build without CUDA"
                raise ValueError(f"CUDA is not available here (torch {torch.__version__}, {why}): use --device cpu")
        # the disk's first job: the encoder's weights, when `prompts` (the coming run's) miss the cache; read
        # while the checks below import transformers and open files, and before the high expert's (`_apply`)
        self.read_ahead_text = read_ahead(model.text_encoder, 2**62) if prompts and self.text.missing(prompts) \
            else None
        self._text_done = threading.Event()  # set once the encoder's weights are in: the disk is the experts' then
        with self._part("check_text"):
            self.text.check()  # width and every tensor name, from headers: before any model loads
        with self._part("tokenizer"):
            self.text.check_tokenizer()  # a single-file encoder's tokenizer found (or downloaded) before anything loads
        with self._part("check_vae"):
            check_vae(model.vae)
        self.text_device_from_plan = False  # from_pretrained sets it when no text_device was asked for
        self.experts: tuple[torch.nn.Module, torch.nn.Module] | None = None  # loaded modules (CPU, GPUs, libraries)
        self.hosts: tuple | None = None  # one GPU: (template, high, low) in host RAM for the residency
        self.residency: Residency | None = None  # the last run's (its `stats`: copies, staging, swap stall)
        self.vae: VAE | None = None
        self._running: Experts | None = None  # the experts of the run in progress (release() frees them)
        self._last_experts: Experts | None = None  # the last run's
        self.loras: dict[str, tuple[tuple[str, float], ...]] = {"high": (), "low": ()}  # merged at load
        self.read_ahead_high = True  # a plan applied starts reading the high expert's files ahead (off: to measure)
        self.read_ahead_thread = None  # the last run's (checkpoint.read_ahead)

    @contextmanager
    def _part(self, name: str):
        """Time a part of the start-up or of a phase into `parts[name]` (seconds)."""
        start = self.part_began[name] = time.perf_counter()
        try:
            yield
        finally:
            self.parts[name] = time.perf_counter() - start

    # the model's description, under the names earlier releases used
    root = property(lambda self: self.model.path)
    model_name = property(lambda self: self.model.name)
    layout = property(lambda self: self.model.layout)
    boundary = property(lambda self: self.model.boundary)
    high_path = property(lambda self: self.model.high)
    low_path = property(lambda self: self.model.low)
    scheme = property(lambda self: self.model.scheme)
    quantization = scheme  # the metadata key of the same fact

    @classmethod
    def from_pretrained(
        cls,
        path_or_hub_id: str | os.PathLike | ModelRoot,
        *,
        device: str | torch.device | None = None,
        dtype: torch.dtype = torch.bfloat16,
        text_device: str | torch.device | None = None,
        text_dtype: torch.dtype = torch.bfloat16,
        vae_dtype: torch.dtype = torch.float32,
        cache_dir: str | os.PathLike | None = None,
        parallel: ParallelContext | None = None,
        prompts: Sequence[str] = (),
    ) -> T2VPipeline:
        """Open a model root (either layout, or a quantized copy), a hub id, or a `ModelRoot` already
        described (e.g. `checkpoint.open_components` / `open_comfyui` for single files). `device` defaults
        to CUDA when present; `text_device` (default: `device`) runs the umt5 encoder; `cache_dir` holds
        prompt embeddings. `prompts`: the first run's (prompt and negative prompt), when known: if the
        encoder will run for them, its weights are read into the page cache from now on (`read_ahead_text`),
        during the checks."""
        start = time.perf_counter()
        model = path_or_hub_id if isinstance(path_or_hub_id, ModelRoot) else open_root(path_or_hub_id)
        opened = time.perf_counter() - start
        device = parallel.device if parallel else torch.device(device) if device is not None else _default_device()
        pipe = cls(model, device=device, dtype=dtype,
                   text_device=torch.device(text_device) if text_device is not None else device,
                   text_dtype=text_dtype, vae_dtype=vae_dtype, cache_dir=cache_dir, parallel=parallel,
                   prompts=prompts)
        pipe.parts, pipe.part_began = {"open_root": opened, **pipe.parts}, {"open_root": start, **pipe.part_began}
        pipe.text_device_from_plan = text_device is None  # on one GPU the planner may move it to the CPU
        return pipe

    def set_loras(self, high: Sequence[tuple[str | os.PathLike, float]] = (),
                  low: Sequence[tuple[str | os.PathLike, float]] = ()) -> None:
        """LoRAs [(file, strength), ...] merged into each expert's weights when they next load (e.g. the
        Lightning pair: its HIGH file on `high`, its LOW file on `low`). Every file is read and checked
        against the model now (wrong model, no matching key: CheckpointError), before any weight loads;
        a change drops the experts already loaded."""
        wanted = {name: tuple((str(Path(f)), float(s)) for f, s in loras) for name, loras in
                  (("high", high), ("low", low))}
        for loras in wanted.values():
            for file, _ in loras:
                read_lora(file, self.model.config)
        if self.model.library_scheme and any(wanted.values()):
            raise CheckpointError(f"{self.model.path} holds {self.model.scheme} experts: LoRAs merge into float, "
                                  "int8 or fp8 weights; convert the float checkpoint to int8 or fp8 instead")
        if wanted != self.loras:
            self.loras, self.experts, self.hosts = wanted, None, None

    def expert_config(self) -> ModelConfig:
        """The experts' dimensions (read when the root was opened)."""
        return self.model.config

    def make_plan(self, size: tuple[int, int], frames: int, vram_gb: float | None = None, *,
                  attention_8bit: bool | None = None, ram_gb: float | None = None, one_run: bool = False) -> Plan:
        """How a run of this size fits the GPU (None: its free memory now): residency mode, CFG
        batching, attention kernel (`attention_8bit`: the FP8 kernel, default with 8-bit weights on
        sm89+), chunking, and where the experts wait in `ram_gb` of host RAM (None: what is available now;
        `one_run`: this pipeline runs once, planner.ONE_RUN). Raises PlanError naming the smallest budget
        that works."""
        width, height = size
        return make_plan(vram_gb, height=height, width=width, frames=frames, scheme=budget_scheme(self.scheme),
                         device=self.device, cfg=self.model.config, ram_gb=ram_gb, text_bytes=self._text_bytes(),
                         attention_8bit=False if self.dtype == torch.float32 else attention_8bit, one_run=one_run)

    def _text_bytes(self) -> int:
        """The text encoder's private RAM on the CPU: its weights as stored (a folder or a single file, read
        into memory), except the official bf16 .pth run in bf16, which `torch.load(mmap=True)` leaves in the
        page cache (file-backed): a whole 480p run with the encoder on the CPU peaked at 2.8 GB private
        (H200 machine, 2026-11-29, BENCHMARKS.md)."""
        if self.text.layout == "official" and self.text.stored_dtype == self.text.dtype:
            return 0
        path = Path(self.model.text_encoder)
        files = path.rglob("*") if path.is_dir() else [path]
        return sum(f.stat().st_size for f in files if f.is_file()) if path.exists() else int(TEXT_HOST)

    def load_experts(self) -> tuple[torch.nn.Module, torch.nn.Module]:
        """(high, low) experts as modules, loaded once: on this rank's GPU (several GPUs), on the device
        then parked on the CPU (library schemes: nf4 quantizes there), else in host memory."""
        if self.experts is None and self.parallel:  # straight into this rank's shards, on its GPU
            self.experts = load_parallel_experts(self.model, self.parallel, dtype=self.dtype, loras=self.loras)
        if self.experts is None and self.model.library_scheme and self.device.type == "cuda":
            self.experts = tuple(load_expert(p, dtype=self.dtype, device=self.device).to("cpu")
                                 for p in (self.model.high, self.model.low))
        if self.experts is None:
            self.experts = (load_expert(self.model.high, dtype=self.dtype, loras=self.loras["high"]),
                            load_expert(self.model.low, dtype=self.dtype, loras=self.loras["low"]))
        return self.experts

    def _apply(self, plan: Plan | None) -> Experts:
        """The one place a plan takes effect: attention kernel, text-encoder device, and how the experts
        are held (residency mode, CFG batching, compiled blocks, FFN chunks; each expert in pinned RAM or
        served from its memory-mapped file, `plan.host`). Runs before the text encoder: the experts' RAM
        is only filled by the residency's `prepare`, once the encoder has been freed; meanwhile a thread reads
        the high expert's files into the page cache (`read_ahead`, after the text encoder's: `_text_first`), as
        much as the memory available holds beside the plan's private peak. Not bounded by the plan's RAM
        budget, which is private memory: the residency reads these same pages through the page cache during
        the first step anyway (from the memory-mapped files, or to fill its pinned buffers); reading them
        ahead lets the disk work while the first step compiles. Without a plan (the CPU, or several GPUs) the
        loaded modules run as they are."""
        if plan is None or self.parallel is not None:
            return LoadedExperts(*self.load_experts())
        attention.set_backend(plan.attention, max_block_bytes=(plan.attention_block_mb or 0) * 2**20 or None)
        if self.device.type == "cuda":  # the budget holds on a larger card too: the allocator is capped to it
            total = torch.cuda.get_device_properties(self.device).total_memory
            index = self.device.index if self.device.index is not None else torch.cuda.current_device()
            torch.cuda.set_per_process_memory_fraction(min(1.0, plan.vram_gb * GB / total), index)
        if self.text_device_from_plan:  # umt5-xxl needs 13.5 GB in bf16: the CPU on small cards
            self.text.device = torch.device(plan.text_device)
        if self.model.library_scheme:  # tensor subclasses: whole modules, swapped at the boundary
            return ModuleSwap(*self.load_experts(), device=self.device)
        in_ram = (plan.host.high == "ram", plan.host.low == "ram")  # else served from the memory-mapped files
        if self.hosts is not None and (tuple(h.in_ram for h in self.hosts[1:]) != in_ram
                                       or not plan.host.keep_between_runs):
            self.hosts = None  # another placement, or the text encoder needs the RAM first: refilled at prepare
            if self.device.type == "cuda":
                torch._C._host_emptyCache()  # freed pinned blocks back to the OS
        if self.read_ahead_high and (self.hosts is None or self.hosts[1].flats is None):  # high expert not in RAM yet
            room = psutil.virtual_memory().available - int(plan.host.peak_gb * GB)  # for the page cache
            nbytes = min(room, files_bytes(self.model.high))
            self.read_ahead_thread = read_ahead(self.model.high, nbytes, after=self._text_first(nbytes, room))
        if self.hosts is None:  # only opened here: `prepare` fills the RAM, after the text encoder is freed
            self.hosts = host_experts(*(open_expert(path, loras=self.loras[name], scheme=self.model.run_scheme)
                                        for name, path in (("high", self.model.high), ("low", self.model.low))),
                                      dtype=self.dtype, in_ram=in_ram, defer=True)
        template, high, low = self.hosts
        self.residency = Residency(template, high, low, device=self.device, mode=plan.mode,
                                   cfg_batched=plan.cfg_batched, slots=plan.slots if plan.mode == "streaming" else 2,
                                   compile=plan.compile, ffn_chunk=plan.ffn_chunk, measure=self.device.type == "cuda")
        return self.residency

    def _text_first(self, expert_bytes: int, room: int) -> tuple:
        """What the high expert's read-ahead waits for: the text encoder's read-ahead (the disk reads its
        weights first), and, where the page cache may not hold both (the encoder's file and `expert_bytes`
        over `room`), the encoder's weights loaded as well, so that the expert's pages do not push out
        encoder pages the load has not read yet."""
        if self.read_ahead_text is None:
            return ()
        text_bytes = files_bytes(self.model.text_encoder)
        return (self.read_ahead_text,) if text_bytes + expert_bytes <= room else (self.read_ahead_text,
                                                                                  self._text_done)

    def release(self) -> None:
        """Take every model of this pipeline off the GPU (after a failed or cancelled run; a finished run
        does this itself). Host copies stay for the next run."""
        if self._running is not None:
            self._running.release()
            self._running = None
        if self.device.type == "cuda" and self.experts is not None and self.parallel is None:
            for model in self.experts:
                model.to("cpu")
        if self.vae is not None:
            self.vae.unload()
        self.text.unload()

    def _vram_peak(self) -> float | None:
        """GiB allocated at most since the last call (the peak counter is reset): one phase's peak."""
        if self.device.type != "cuda":
            return None
        peak = torch.cuda.max_memory_allocated(self.device) / 2**30
        torch.cuda.reset_peak_memory_stats(self.device)
        return round(peak, 3)

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
        size: tuple[int, int] | None = None,
        frames: int | None = None,
        steps: int = 40,
        seed: int | None = None,
        shift: float = 12.0,
        guidance_high: float = 4.0,
        guidance_low: float = 3.0,
        solver: str = "unipc",
        grid: str = "official",
        cache: StepCache | None = None,
        callback: Callback | None = None,
        preview: Callable[[torch.Tensor], None] | None = None,
        out: str | os.PathLike | None = None,
        extra_metadata: dict | None = None,
        vae_tile: int | None | str = "auto",
        plan: Plan | None = None,
        vram_gb: float | None = None,
        keep_latents: bool = False,
    ) -> T2VResult | None:
        """Generate one video. size is (width, height); size / frames None: the experts'
        `ModelConfig.default_video` (1280x720 x 81; 64x64 x 9 for a test-size model such as the app's demo);
        seed None (or negative) draws one (0 .. 2**64-1 are taken as given); `out` also writes the mp4.

        With `out`, the denoised latents are written to `<stem>.latents.safetensors` beside it (the run's
        parameters in the header) before the VAE decode, and removed once the mp4 is written unless
        `keep_latents`: a failed decode raises DecodeError naming that file (`decode_latents` decodes it).
        A prompt over 512 tokens is cut: `result.warnings` says so and the metadata records the count.

        On one GPU the experts run through the residency as `plan` says (default: `make_plan` for
        `vram_gb`, or for the free memory; a plan given on the CPU runs the same path there); the plan
        goes into the metadata.

        callback(step, total, t, expert) runs after each denoising step: `step` counts from 0 (0 after the
        first step, steps - 1 after the last: show step + 1 of total), `total` is `steps` (a step the step
        cache skips is called back too), `t` the step's timestep, `expert` "high" or "low";
        preview(latents) then gets the current latents (1, 16, F', H/8, W/8) float32 on the device.
        Over several GPUs (`parallel`) every rank calls it; only rank 0 decodes, writes and gets a result.
        """
        # 1. everything that can be wrong with the request fails here, before any weights load
        default_size, default_frames = self.expert_config().default_video
        size = tuple(size) if size is not None else default_size
        frames = default_frames if frames is None else frames
        validate(prompt, size, frames)
        validate_sampling(steps=steps, shift=shift, guidance_high=guidance_high, guidance_low=guidance_low,
                          solver=solver, seed=seed)  # the ranges the CLI and the app accept, before SamplingConfig's
        sampling = SamplingConfig(steps=steps, shift=shift, boundary=self.boundary, guidance_high=guidance_high,
                                  guidance_low=guidance_low, solver=solver, grid=grid, cache=cache or StepCache())
        if sampling.cache.mode == "pattern":
            computed_steps(sampling)  # a malformed pattern fails here, before any weights load
        if out is not None:
            check_writable(out)
        if plan is None and self.device.type == "cuda" and self.parallel is None:
            plan = self.make_plan(size, frames, vram_gb)
        if self.parallel is not None:
            plan = None  # several GPUs: the experts are sharded, nothing to plan on one card
        if vae_tile not in ("auto", None) and (not isinstance(vae_tile, int) or vae_tile <= 0 or vae_tile % 32):
            raise ValueError(f"vae_tile must be 'auto', None (untiled) or a positive multiple of 32, got {vae_tile!r}")
        negative_prompt = DEFAULT_NEGATIVE_PROMPT if negative_prompt is None else negative_prompt
        seed = resolve_seed(seed)  # None or negative: drawn here, printed and stored
        main = self.parallel is None or self.parallel.is_main
        timings, peaks = {}, {}
        prompt_tokens = self.text.tokens_if_cut(prompt)  # tokenizer only, and only for a long prompt
        warnings = [self.prompt_warning(prompt_tokens)] if prompt_tokens else []

        # 2. text: both prompts in one pass (or from the cache), then the encoder leaves the GPU; with
        #    guidance 1.0 on both experts (Lightning) no step runs an uncond pass: the prompt alone
        start = time.perf_counter()
        self.parts = {k: v for k, v in self.parts.items() if k in STARTUP_PARTS}  # this run's parts from here
        self._text_done.clear()
        with self._part("apply"):
            experts = self._apply(plan)  # kernels, text device, how the experts are held: before any weights load
        prompts = [prompt, negative_prompt] if needs_negative_prompt(sampling) else [prompt]
        try:
            with self._part("text_load"):  # the weights, from the page cache its read-ahead filled (or the disk)
                if main and self.text.missing(prompts):
                    self.text.load()
            if self.text.device.type != "cpu":  # on the CPU the encode reads the memory-mapped weights
                self._text_done.set()
            with self._part("text_encode"):
                embeddings = [e.cpu() for e in self.text.encode(prompts)] if main else None
        finally:  # also after an error: 13.5 GB of encoder must not stay on the GPU
            self._text_done.set()  # the disk is the high expert's read-ahead's now
            self.text.unload()
        if self.parallel:  # every rank samples from rank 0's seed and prompt embeddings
            seed, embeddings = self.parallel.from_main((seed, embeddings))
        context, context_null = (*embeddings, None)[:2]  # (L, 4096), (L', 4096) or None
        timings["text"] = time.perf_counter() - start
        peaks["text"] = self._vram_peak()

        # 3-4. noise and denoising
        start = time.perf_counter()
        noise = self.noise(seed, size, frames)  # (1, 16, F', H/8, W/8)
        context = context.unsqueeze(0).to(self.device)  # (1, L, 4096)
        context_null = None if context_null is None else context_null.unsqueeze(0).to(self.device)
        self._running = self._last_experts = experts
        stats = {}
        try:
            experts.prepare(sampling)  # the experts held in RAM are filled here
            timings["load"] = time.perf_counter() - start
            peaks["load"] = self._vram_peak()
            start = time.perf_counter()
            latents = sample(experts.high, experts.low, noise, context, context_null, sampling,
                             callback=callback, stats=stats, preview=preview).cpu()
        finally:  # also after a cancel or an error: the VAE (or the next run) gets the VRAM
            experts.release()
            self._running = None
        timings["denoise"] = time.perf_counter() - start
        peaks["denoise"] = self._vram_peak()
        held = torch.cuda.memory_allocated(self.device) / 2**30 if self.device.type == "cuda" else None
        if not main:
            return None  # rank 0 decodes and writes

        # 5. decode: the latents are on disk first, so a failed decode loses no denoising
        params = {
            "prompt": prompt, "negative_prompt": negative_prompt if context_null is not None else None,
            "seed": seed, "width": size[0],
            "height": size[1], "frames": frames, "steps": steps, "shift": shift, "guidance_high": guidance_high,
            "guidance_low": guidance_low, "boundary": self.boundary, "solver": solver, "grid": grid,
            "step_cache": {"mode": "off"} if sampling.cache.mode == "off" else {
                **dataclasses.asdict(sampling.cache), "computed": stats.get("computed"), "passes": stats.get("passes")},
            "loras": {name: [[Path(f).name, st] for f, st in loras] for name, loras in self.loras.items()},
            "quantization": self.quantization, "dtype": str(self.dtype).removeprefix("torch."),
            "model": self.model_name, "layout": self.layout, "wan_lite_version": __version__,
            "model_files": self.model.files(),
            "plan": plan.to_dict() if plan is not None else None,
        }  # fmt: skip
        if prompt_tokens:
            params |= {"prompt_tokens": prompt_tokens, "prompt_cut_to": TEXT_LEN}
        kept = None
        if out is not None:
            kept = save_latents(latents_path(out), latents, {**params, **(extra_metadata or {})},
                                source={"vae": str(self.model.vae), "model": self.model_name})
        if vae_tile == "auto" and plan is not None:  # the plan's tile fits its budget, not the card's
            vae_tile = plan.vae_tile
        start = time.perf_counter()
        try:
            video = self.decode(latents, vae_tile=vae_tile)  # (3, F, H, W)
        except Cancelled:  # asked for, not a failure: nothing of this run stays on disk
            if kept is not None:
                kept.unlink(missing_ok=True)
            raise
        except Exception as e:
            if kept is None:
                raise
            raise DecodeError(kept, Path(out), e) from e
        timings["decode"] = time.perf_counter() - start
        peaks["decode"] = self._vram_peak()
        result = T2VResult(video=video, latents=latents, seed=seed, params=params, timings=timings, warnings=warnings,
                           vram_peaks=peaks, vram_held=held, parts=self._parts_of_run())
        if out is not None:
            try:
                result.save(out, extra=extra_metadata)
            finally:  # written, or the mp4 failed (a full disk): the failure is the error, not the decode
                if not keep_latents:
                    kept.unlink(missing_ok=True)
        return result

    def _parts_of_run(self) -> dict[str, float]:
        """`parts` (start-up and this run), with the first step's from the residency's stats: the calling
        thread's waits for staged units (the high expert read from its files) and the first compiled call."""
        parts = dict(self.parts)
        if self.residency is not None and self.residency is self._last_experts:
            stats = self.residency.stats
            parts["first_step_staging_wait"] = sum(w for c, _, w in stats.host_waits if c == 0)
            if stats.compile_s is not None:
                parts["first_step_compile"] = stats.compile_s
        return {k: round(v, 3) for k, v in parts.items()}

    def decode(self, latents: torch.Tensor, vae_tile: int | None | str = "auto") -> torch.Tensor:
        """Latents (1, 16, F', H/8, W/8) -> video (3, F, H, W) fp32 on the CPU with this root's VAE, on the
        pipeline's device (off the GPU again afterwards)."""
        if self.vae is None:
            self.vae = VAE.from_pretrained(self.model.vae, device=self.device, dtype=self.vae_dtype)
        self.vae.model.to(self.device)
        try:
            return self.vae.decode(latents, tile=vae_tile)[0].cpu()  # (3, F, H, W)
        finally:
            if self.device.type == "cuda":
                self.vae.unload()

    @staticmethod
    def prompt_warning(tokens: int) -> str:
        """The one line shown for a prompt of `tokens` tokens (over 512): what is cut."""
        return (f"the prompt is {tokens} tokens; umt5 reads the first {TEXT_LEN} (the official limit), the last "
                f"{tokens - TEXT_LEN} are cut: shorten it to keep them")


def decode_latents(latents_file: str | os.PathLike, out: str | os.PathLike, *, vae: str | os.PathLike | None = None,
                   device: str | torch.device | None = None, vae_tile: int | None | str = "auto",
                   vae_dtype: torch.dtype = torch.float32) -> Path:
    """Decode the latents a run left (`<stem>.latents.safetensors`) into the mp4 `out`, with the run's
    parameters in its metadata: what a decode that failed after the denoise is finished with, elsewhere
    or later (a smaller `vae_tile`, or device "cpu"). `vae` (a file or folder; `checkpoint.open_root(root).vae`
    for a root) defaults to the VAE the run used, as recorded in the file."""
    latents, params, source = read_latents(latents_file)
    vae = vae if vae is not None else source.get("vae")
    if vae is None:
        raise ValueError(f"{latents_file} does not say which VAE the run used: pass --vae FILE or --ckpt ROOT")
    check_writable(out)
    check_vae(vae)
    model = VAE.from_pretrained(vae, device=torch.device(device) if device is not None else _default_device(),
                                dtype=vae_dtype)
    video = model.decode(latents, tile=vae_tile)[0].cpu()  # (3, F, H, W)
    return write_mp4(out, video, params)
