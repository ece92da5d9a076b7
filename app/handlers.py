"""What the app's buttons do, as plain Python: `App` holds the model, the outputs folder and the one GPU.

Everything here runs and is tested without a browser (tests/test_app.py); `app/ui.py` only lays out
components and binds them to these methods; `app/jobs.py` follows one run (queue position, phase, ETA,
decode progress, Cancel), `app/preview.py` draws the live preview, `app/options.py` holds the presets
and the LoRA folder. User-facing failures are raised as `gr.Error` with a message that names the fix
(never with a traceback in the terminal); the ui shows them as a notice and in the status line, and the
app keeps running.

A run (`App.generate`):
1. validates the settings (size among the loaded model's presets, frames 4n+1, the quantization the
   loaded model can run, LoRAs from the LoRA folder, ...);
2. waits its turn in the line for the GPU (one video at a time, first come first served; the status
   line shows its position; Cancel leaves the line);
3. on CUDA asks the planner how to fit the VRAM profile (a profile too small for the size is refused
   with the planner's message; "exact attention" turns the FP8 attention kernel off) and hands the plan
   to the pipeline, which records it in the sidecar;
4. sets the LoRAs on the pipeline and calls it with the preset's grid; its per-step callback moves the
   gr.Progress bar and the status line, its preview hook draws the live preview, and a hook on the VAE
   decoder reports the decode frame by frame. Cancel stops the run after its current step or before
   the next decoded frame: then nothing is written. A run that finished its decode finishes.
5. returns the mp4 path, the parameters (what the sidecar JSON holds) and the seed used; on cancel or
   error it first moves the models off the GPU and empties the CUDA cache, then says what to change.

Settings are remembered in `<outputs>/settings.json` (written at each run's start), not in the browser:
it is a desktop app, and a file survives a browser change and can be read or deleted by hand.

Files: the gallery lists `*.mp4` in the outputs folder with their `<name>.json` sidecars; a selection
is resolved by file name and refused unless it is an mp4 directly inside the outputs folder.

Deliberately unsupported: more than one loaded model at a time; switching models while a run is in
progress or queued (the load is refused until it ends); converting a float model to int8/fp8 from the
app (`python -m wan_lite.quantize` does it; the app offers only what the loaded model can run).
"""

from __future__ import annotations

import dataclasses
import gc
import json
import os
import random
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import gradio as gr
import numpy as np
import torch

from wan_lite import planner
from wan_lite.checkpoint import CheckpointError, ModelRoot, check_root
from wan_lite.checks import validate_sampling
from wan_lite.config import SOLVERS, SamplingConfig
from wan_lite.pipeline import grid, high_steps
from wan_lite.t2v import T2VPipeline
from wan_lite.text import DEFAULT_NEGATIVE_PROMPT
from wan_lite.vae import VAE

from . import demo
from .jobs import GenerationCancelled, GpuLine, Job, clock, peak_vram, watch_decode
from .models import ModelFiles, comfyui_experts, describe_files, open_files
from .options import PRESETS, STEP_CACHES, LoraFolder
from .preview import Preview, latent_to_rgb, vae_preview

SIZE_PRESETS = {  # label -> (width, height): the official Wan2.2 T2V sizes
    "1280x720 (720p landscape)": (1280, 720),
    "720x1280 (720p portrait)": (720, 1280),
    "832x480 (480p landscape)": (832, 480),
    "480x832 (480p portrait)": (480, 832),
}
DEMO_SIZE_PRESETS = {"64x64 (demo)": (64, 64), "96x64 (demo landscape)": (96, 64), "64x96 (demo portrait)": (64, 96)}
VRAM_PROFILES = {"auto": None, "24 GB": 24.0, "16 GB": 16.0, "12 GB": 12.0, "8 GB": 8.0}  # None: free memory now
FILE_WEIGHTS = {"none": "float"}  # a stored scheme as the banner and plan text name single files' weights
SCHEME_LABELS = {"none": "bf16"}  # the menu's name of a stored scheme; others are called as stored (int8, fp8)
MAX_FRAMES = 161  # the frames slider's end: 10 s at 16 fps
MAX_LORA_STRENGTH = 4.0
MAX_SEED = 2**31 - 1
MAX_VAE_PREVIEW_EVERY = 50  # the full-VAE preview slider's end (steps)
SETTINGS_FILE = "settings.json"
LABELS = {"steps": "Steps", "shift": "Shift", "guidance_high": "High-noise guidance",
          "guidance_low": "Low-noise guidance"}  # validate_sampling's names as the settings are labelled here
GALLERY_LIMIT = 48


def user_error(message: str) -> gr.Error:
    """A failure the person can fix: shown in the browser, no traceback in the terminal."""
    return gr.Error(message, print_exception=False)


@dataclass
class Settings:
    """Everything the controls hold. The field names are the ui's component keys."""

    prompt: str = ""
    negative_prompt: str = DEFAULT_NEGATIVE_PROMPT
    size: str = "1280x720 (720p landscape)"
    frames: int = 81
    preset: str = "official"  # PRESETS key: its grid is used, and picking it fills steps .. solver
    steps: int = 40
    guidance_high: float = 4.0  # CFG scale with the high-noise expert
    guidance_low: float = 3.0  # CFG scale with the low-noise expert
    shift: float = 12.0
    solver: str = "unipc"
    random_seed: bool = True
    seed: int = 0  # used when random_seed is off
    lora_high: list[str] = field(default_factory=list)  # file names in the LoRA folder
    lora_high_strength: float = 1.0
    lora_low: list[str] = field(default_factory=list)
    lora_low_strength: float = 1.0
    quantization: str = "auto"
    exact_attention: bool = False  # True: never the FP8 attention kernel
    step_cache: str = "off"  # STEP_CACHES key
    vram_profile: str = "auto"
    vae_preview_every: int = 0  # steps between full-VAE previews of the denoised estimate; 0: off

    @classmethod
    def defaults(cls, is_demo: bool) -> Settings:
        """Official defaults; the demo model gets a tiny size and few steps so a CPU answers in seconds."""
        if is_demo:
            return cls(prompt="a red cat walks on the beach at sunset", size="64x64 (demo)", frames=9, steps=8)
        return cls()


SETTING_NAMES = [f.name for f in dataclasses.fields(Settings)]


@dataclass
class Update:
    """One message of a run to the browser: the status line, and at the end the result."""

    status: str
    video: str | None = None  # mp4 path
    params: dict | None = None  # what the sidecar holds
    seed: int | None = None


def oom_message(s: Settings) -> str:
    return (f"Out of GPU memory at {s.size}, {s.frames} frames with the VRAM profile '{s.vram_profile}' "
            f"and quantization '{s.quantization}'. Change one setting and try again: a lower VRAM profile "
            "(streams the expert's blocks instead of holding it whole), a smaller size (480p), fewer frames, "
            "or an int8/fp8 copy of the model. Memory has been freed.")


# ---------------------------------------------------------------------------------------------------
# The app


class App:
    """The app's state: the loaded model, the outputs folder, the line for the GPU and the runs in it."""

    def __init__(self, outputs: str | os.PathLike = "outputs", *, ckpt: str | os.PathLike | None = None,
                 device: str | None = None, cache_dir: str | os.PathLike | None = None, share: bool = False,
                 loras: str | os.PathLike | None = None, files: ModelFiles | None = None):
        self.outputs = Path(outputs).expanduser().resolve()
        self.outputs.mkdir(parents=True, exist_ok=True)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.cache_dir = Path(cache_dir).expanduser() if cache_dir else None
        self.share = share  # with a public link, only the listed model roots can be loaded
        self.loras = LoraFolder(loras)
        self.line = GpuLine()  # one run at a time, in order; a cancelled run holds it until it has stopped
        self.jobs: dict[str, Job] = {}  # browser session -> its run (queued or running)
        self.last_status: dict[str, str] = {}  # browser session -> how its last run ended
        self.sent_status: dict[str, str] = {}  # browser session -> the status line its timer last showed
        self.decode_rate: float | None = None  # seconds per decoded pixel x frame, from the last run
        self.pipe: T2VPipeline | None = None
        self.is_demo = False
        self.files: ModelFiles | None = None  # the pieces the loaded model was opened from (None: a root)
        self.start_files = files  # with --share, the only pieces that can be loaded
        if files is not None:
            self.load_files(files)
        else:
            self.load_model(ckpt if ckpt is not None else demo.ensure_demo_checkpoint(cache_dir))

    # --- model -----------------------------------------------------------------------------------

    def model_roots(self) -> list[str]:
        """Model roots offered in the picker: the loaded one, the demo, ./models/* and the Hugging Face cache."""
        found = [self.pipe.root] if self.pipe else []
        found.append(demo.demo_root(self.cache_dir))
        hub = Path(os.environ.get("HF_HUB_CACHE", "~/.cache/huggingface/hub")).expanduser()
        found += sorted(Path.cwd().glob("models/*")) + sorted(hub.glob("models--Wan-AI--Wan2.2-T2V-A14B*/snapshots/*"))
        roots = []
        for root in found:
            if str(root) not in roots and _is_root(root):
                roots.append(str(root))
        return roots

    def load_model(self, root: str | os.PathLike | None) -> str:
        """Open a model root (validated: every file of its layout present). Returns the banner text."""
        text = str(root or "").strip()
        if not text:
            raise user_error("Choose a model folder: a Wan2.2-T2V-A14B root (official or diffusers layout, or a "
                             "quantized copy).")
        path = Path(text).expanduser()
        if self.share and self.pipe is not None and str(path) not in self.model_roots():
            raise user_error("With --share only the listed model folders can be loaded: start the app with "
                             "--ckpt PATH to add one.")
        if self.jobs:
            raise user_error("A video is being generated or queued: wait for it or cancel it, then load the model.")
        if not path.is_dir():
            raise user_error(f"No folder {path}: give the folder that holds the downloaded Wan2.2-T2V-A14B files.")
        try:
            check_root(path)
        except CheckpointError as e:
            raise user_error(str(e)) from None
        return self._open(path, None)

    def load_files(self, files: ModelFiles) -> str:
        """Open a model given as pieces (`app.models.ModelFiles`: two expert files with the text encoder and
        VAE, or a ComfyUI models/ folder with the experts named), checked from headers before any weight
        loads. Returns the banner text; gr.Error with wan_lite's message naming the wrong file otherwise."""
        if self.share and self.pipe is not None and files != self.start_files:
            raise user_error("With --share only the model the app was started with can be loaded: start it with "
                             "--high/--low (and --ckpt COMFYUI/models or --text-encoder/--vae) to use other files.")
        if self.jobs:
            raise user_error("A video is being generated or queued: wait for it or cancel it, then load the model.")
        try:
            model = open_files(files)
        except (CheckpointError, FileNotFoundError, ValueError) as e:
            raise user_error(str(e)) from None
        return self._open(model, files)

    def comfyui_experts(self, folder: str | os.PathLike) -> list[str]:
        """The expert file names a ComfyUI models/ folder offers (the two dropdowns); gr.Error otherwise."""
        if self.share and (self.start_files is None or str(folder).strip() != self.start_files.comfyui):
            raise user_error("With --share only the ComfyUI folder the app was started with (--ckpt) is listed.")
        try:
            return comfyui_experts(folder)
        except (OSError, ValueError) as e:
            raise user_error(str(e)) from None

    def _open(self, model: Path | ModelRoot, files: ModelFiles | None) -> str:
        """Make the pipeline of a checked root folder or ModelRoot and make it the loaded model."""
        is_demo = isinstance(model, Path) and demo.is_demo(model)
        config = model.config if isinstance(model, ModelRoot) else None
        small = is_demo or (config is not None and config.is_test_size)
        # a tiny model in float32 on a CPU; on a GPU bf16, which every fused attention kernel takes
        dtype = torch.float32 if small and self.device.type == "cpu" else torch.bfloat16
        try:
            pipe = T2VPipeline.from_pretrained(model, device=self.device, dtype=dtype, text_dtype=dtype,
                                               cache_dir=self.cache_dir / "text" if self.cache_dir else None)
        except (CheckpointError, FileNotFoundError, ValueError) as e:
            raise user_error(str(e)) from None
        is_demo = is_demo and pipe.scheme == "none"  # a quantized copy links the marker but is its own model
        old, self.pipe, self.is_demo, self.files, self.decode_rate = self.pipe, pipe, is_demo, files, None
        del old
        free_memory()
        return self.banner()

    @property
    def is_small(self) -> bool:
        """A demo / test-size model (narrower than any released Wan expert): the tiny demo sizes are offered."""
        return self.is_demo or self.pipe.expert_config().is_test_size

    def root_value(self) -> str | None:
        """The model-folder field's value: the loaded root, or None when the model was opened from files."""
        return None if self.files is not None else str(self.pipe.root)

    def banner(self) -> str:
        if self.is_demo:
            return ("**Demo model.** No checkpoint was given, so this is a tiny built-in model with random weights: "
                    "the whole flow works, but the video is coloured noise, and its VAE is shrunk (base_dim "
                    f"{demo.DEMO_VAE_BASE_DIM} instead of 96) so a CPU decodes it in seconds. For real videos, "
                    "download Wan2.2-T2V-A14B and run `python -m app --ckpt /path/to/Wan2.2-T2V-A14B`, or pick "
                    "its folder under *Model* below.")
        p = self.pipe
        small = " A test-size model (narrower than any released expert): the demo sizes are offered." \
            if self.is_small else ""  # e.g. a quantized copy of the demo
        if self.files is not None:
            return (f"**Model:** single files, {FILE_WEIGHTS.get(p.scheme, p.scheme)} weights, on {self.device.type}: "
                    f"{describe_files(p.model)}.{small}")
        return f"**Model:** `{p.root}` ({p.layout} layout, weights {p.quantization}) on {self.device.type}.{small}"

    def size_presets(self) -> dict[str, tuple[int, int]]:
        """The sizes offered for the loaded model: the tiny demo sizes, or the official ones."""
        return DEMO_SIZE_PRESETS if self.is_small else SIZE_PRESETS

    def quant_choices(self) -> list[str]:
        """What the loaded model can run: 'auto' (as stored) and the stored scheme by name (bf16 for float
        weights, int8 / fp8 for our converted copies, or a library scheme); converting is the quantizer's job."""
        return ["auto", SCHEME_LABELS.get(self.pipe.scheme, self.pipe.scheme)]

    # --- settings --------------------------------------------------------------------------------

    def settings(self) -> Settings:
        """The remembered settings (the defaults where none are stored or they do not fit this model)."""
        defaults = Settings.defaults(self.is_small)
        try:
            stored = json.loads((self.outputs / SETTINGS_FILE).read_text())
        except (OSError, ValueError):
            return defaults
        if not isinstance(stored, dict):
            return defaults
        s = dataclasses.replace(defaults, **{k: v for k, v in stored.items() if k in SETTING_NAMES})
        if s.size not in self.size_presets():  # remembered from another model: its frames and steps too
            s = dataclasses.replace(s, size=defaults.size, frames=defaults.frames, steps=defaults.steps)
        listed = self.loras.names()
        return dataclasses.replace(
            s, quantization=s.quantization if s.quantization in self.quant_choices() else "auto",
            preset=s.preset if s.preset in PRESETS else defaults.preset,
            lora_high=[n for n in _names(s.lora_high) if n in listed],
            lora_low=[n for n in _names(s.lora_low) if n in listed])

    def save_settings(self, s: Settings) -> None:
        path = self.outputs / SETTINGS_FILE
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(dataclasses.asdict(s), ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
        os.replace(tmp, path)

    def validate(self, s: Settings) -> tuple[int, int]:
        """(width, height) of valid settings; gr.Error naming the fix otherwise."""
        if not isinstance(s.prompt, str) or not s.prompt.strip():
            raise user_error("The prompt is empty: describe the video to generate.")
        presets = self.size_presets()
        if s.size not in presets:
            raise user_error(f"Size {s.size!r} is not offered for this model: choose one of {', '.join(presets)}.")
        strength = f"must be between -{MAX_LORA_STRENGTH:g} and {MAX_LORA_STRENGTH:g} (1.0: as trained)"
        checks = [
            (_is_int(s.frames) and 1 <= s.frames <= MAX_FRAMES and (s.frames - 1) % 4 == 0,
             f"Frames {s.frames} must be 4n+1 (1, 5, 9, ..., {MAX_FRAMES}): 81 frames is 5 s at 16 fps."),
            (s.preset in PRESETS, f"Preset {s.preset!r} is unknown: choose {' or '.join(PRESETS)}."),
            (s.step_cache in STEP_CACHES, f"Step cache {s.step_cache!r} is unknown: choose one of "
                                          f"{', '.join(STEP_CACHES)}."),
            (s.solver in SOLVERS, f"Solver {s.solver!r} is unknown: choose {' or '.join(SOLVERS)}."),
            (s.random_seed or (_is_int(s.seed) and 0 <= s.seed <= MAX_SEED),
             f"Seed {s.seed} must be a whole number from 0 to {MAX_SEED}, or tick 'random seed'."),
            (_is_num(s.lora_high_strength) and abs(s.lora_high_strength) <= MAX_LORA_STRENGTH,
             f"High-noise LoRA strength {s.lora_high_strength} {strength}."),
            (_is_num(s.lora_low_strength) and abs(s.lora_low_strength) <= MAX_LORA_STRENGTH,
             f"Low-noise LoRA strength {s.lora_low_strength} {strength}."),
            (s.vram_profile in VRAM_PROFILES, f"VRAM profile {s.vram_profile!r} is unknown: choose one of "
                                              f"{', '.join(VRAM_PROFILES)}."),
            (_is_int(s.vae_preview_every) and 0 <= s.vae_preview_every <= MAX_VAE_PREVIEW_EVERY,
             f"Full VAE preview every {s.vae_preview_every} steps: give 0 (off) to {MAX_VAE_PREVIEW_EVERY}."),
        ]
        for ok, message in checks:
            if not ok:
                raise user_error(message)
        try:  # steps, shift, guidance: the CLI's check and words (one function: a value one accepts the other does)
            validate_sampling(steps=s.steps, shift=s.shift, guidance_high=s.guidance_high,
                              guidance_low=s.guidance_low, solver=s.solver, seed=None if s.random_seed else s.seed)
        except ValueError as e:  # "steps 0 must be ..." -> "Steps 0 must be ...."
            name, _, rest = str(e).partition(" ")
            raise user_error(f"{LABELS.get(name, name[:1].upper() + name[1:])} {rest}.") from None
        if s.quantization not in self.quant_choices():
            stored = self.quant_choices()[1]
            raise user_error(f"This model's experts are stored as {stored}, so it runs them as {stored} ('auto'). "
                             f"For {s.quantization}, convert a copy once (python -m wan_lite.quantize --ckpt "
                             f"{self.pipe.root} --out DST --scheme {s.quantization}) and load DST under Model.")
        try:
            self.lora_files(s)
        except ValueError as e:
            raise user_error(str(e)) from None
        s.frames, s.steps, s.seed = int(s.frames), int(s.steps), int(s.seed) if _is_int(s.seed) else 0
        s.vae_preview_every = int(s.vae_preview_every)
        return presets[s.size]

    def lora_files(self, s: Settings) -> dict[str, list[tuple[Path, float]]]:
        """{"high": [(file, strength)], "low": [...]} from the pickers; ValueError for a file not listed."""
        return {"high": [(self.loras.path(n), float(s.lora_high_strength)) for n in _names(s.lora_high)],
                "low": [(self.loras.path(n), float(s.lora_low_strength)) for n in _names(s.lora_low)]}

    # --- what a run will do ----------------------------------------------------------------------

    def make_plan(self, s: Settings) -> planner.Plan | None:
        """The planner's choice for valid settings; None on a CPU with the 'auto' profile. Raises PlanError.

        A CPU run with a chosen profile previews the plan for a CUDA card of that size (capability 8.9).
        """
        width, height = self.size_presets()[s.size]
        vram = VRAM_PROFILES[s.vram_profile]
        cuda = self.device.type == "cuda"
        if vram is None and not cuda:
            return None
        return planner.make_plan(vram, height=height, width=width, frames=int(s.frames),
                                 scheme=planner.budget_scheme(self.pipe.scheme),
                                 device=self.device if cuda else "cuda", cfg=self.pipe.expert_config(),
                                 capability=None if cuda else (8, 9),
                                 attention_8bit=False if s.exact_attention else None)

    def plan(self, s: Settings) -> str:
        """What a run with these settings will do, as text: sampler, LoRAs, attention, the memory plan."""
        return f"{self.recipe(s)}\n{self.model_line()}\n{self.memory_plan(s)}"

    def model_line(self) -> str:
        """The plan text's line naming what is loaded: the root, or each file of a model given as pieces."""
        p = self.pipe
        if self.files is not None:
            return f"Model: files ({FILE_WEIGHTS.get(p.scheme, p.scheme)}): {describe_files(p.model)}"
        return f"Model: {p.root} ({p.layout} layout, {p.quantization})"

    def recipe(self, s: Settings) -> str:
        preset = PRESETS.get(s.preset)
        grid_name = preset.sampling.grid if preset else "?"
        loras = " · ".join(f"{name}: " + (", ".join(f"{n} x{strength}" for n in _names(names)) or "none")
                           for name, names, strength in (("high", s.lora_high, s.lora_high_strength),
                                                         ("low", s.lora_low, s.lora_low_strength)))
        attention = "exact (FP8 attention off)" if s.exact_attention else "FP8 kernel allowed (8-bit models, sm89+)"
        every = s.vae_preview_every
        vae = f"full VAE every {every} steps" if _is_int(every) and every > 0 else "latents as RGB"
        return (f"Sampler: {s.preset} preset, {grid_name} grid · {s.steps} steps {s.solver} · shift {s.shift} · "
                f"guidance {s.guidance_high} / {s.guidance_low} · step cache {s.step_cache}\nLoRAs: {loras}\n"
                f"Attention: {attention} · preview: {vae}")

    def memory_plan(self, s: Settings) -> str:
        if s.size not in self.size_presets() or not _is_int(s.frames) or (s.frames - 1) % 4 \
                or s.vram_profile not in VRAM_PROFILES:
            return "Memory plan: choose a size, 4n+1 frames and a VRAM profile."
        try:
            p = self.make_plan(s)
        except (planner.PlanError, CheckpointError, ValueError) as e:
            return f"Memory plan: {e}"
        if p is None:
            return f"Memory plan: running on the {self.device.type} (no VRAM to plan); pick a profile to preview one."
        preview = "" if self.device.type == "cuda" else " (a preview for a CUDA card: this app runs on the CPU)"
        return f"Memory plan, the planner's choice{preview}:\n" + p.describe()

    # --- a run -----------------------------------------------------------------------------------

    def generate(self, s: Settings, session: str = "local", progress=None) -> Update:
        """Run one video and return its `Update` (see the module docstring). `progress` is a gr.Progress."""
        try:
            size = self.validate(s)
            plan = self._cuda_plan(s)
        except gr.Error as e:  # also kept in the status line: the notice goes away
            self.last_status[session] = f"Not started: {e.message}"
            raise
        self.save_settings(s)
        seed = random.randint(0, MAX_SEED) if s.random_seed else s.seed
        sampling = SamplingConfig(steps=s.steps, shift=s.shift, boundary=self.pipe.boundary,
                                  grid=PRESETS[s.preset].sampling.grid)
        job = Job(session, s.steps, high_steps=high_steps(sampling), decode_estimate=self._decode_estimate(size, s),
                  progress=progress)
        self.jobs[session] = job
        try:
            if not self.line.enter(job):
                return self._finish(job, Update("Cancelled before it started."))
            try:
                out, error = self._run(job, s, size, seed, plan, sampling)
            finally:
                self.line.leave(job)
        finally:
            self._forget(job)
        elapsed = clock(time.monotonic() - job.started)
        if isinstance(error, GenerationCancelled):
            return self._finish(job, Update(f"Cancelled {error.where} ({elapsed}); nothing written, memory freed."))
        if error is not None:
            self._finish(job, Update(f"Failed: {error}"))
            raise user_error(error)
        return self._finish(job, Update(f"Done in {elapsed} · seed {seed} · {peak_vram()} · {out.name}",
                                        video=str(out), params=read_sidecar(out), seed=seed))

    def _cuda_plan(self, s: Settings) -> planner.Plan | None:
        if self.device.type != "cuda":
            return None
        try:
            return self.make_plan(s)
        except planner.PlanError as e:
            raise user_error(f"{e}. Or choose a larger VRAM profile.") from None
        except CheckpointError as e:
            raise user_error(str(e)) from None

    def _run(self, job: Job, s: Settings, size: tuple[int, int], seed: int, plan, sampling: SamplingConfig):
        """The pipeline call, holding the GPU: (mp4 path, None) or (None, the error: a message or the cancel)."""
        pipe, out, error = self.pipe, self._output_path(seed), None
        preview = Preview(grid(sampling)[0])
        latents = (1, 16, (s.frames - 1) // 4 + 1, size[1] // 8, size[0] // 8)
        try:
            if torch.cuda.is_available():
                torch.cuda.reset_peak_memory_stats()
            job.report()
            pipe.set_loras(**self.lora_files(s))
            vae = self._vae()
            with watch_decode(vae.model, latents, job.on_decode) as watch:
                result = pipe(s.prompt, s.negative_prompt, size=size, frames=s.frames, steps=s.steps, seed=seed,
                              shift=s.shift, guidance_high=s.guidance_high, guidance_low=s.guidance_low,
                              solver=s.solver, grid=sampling.grid, cache=STEP_CACHES[s.step_cache],
                              callback=job.on_step, preview=self._previewer(job, s, preview, watch, plan),
                              out=out, plan=plan,
                              extra_metadata={"vram_profile": s.vram_profile, "preset": s.preset,
                                              "exact_attention": s.exact_attention,
                                              "vae_preview_every": s.vae_preview_every,
                                              "model_files": pipe.model.files()})
            self.decode_rate = result.timings["decode"] / (size[0] * size[1] * s.frames)
        except GenerationCancelled as e:
            error = e
        except torch.cuda.OutOfMemoryError:
            error = oom_message(s)
        except (ValueError, MemoryError, OSError, CheckpointError) as e:  # messages that name the fix
            error = str(e)
        except Exception as e:
            traceback.print_exc()
            error = f"Generation failed ({type(e).__name__}: {e}). The app is still running; the terminal " \
                    "has the traceback."
        finally:  # outside the except blocks: no traceback keeps the run's tensors alive
            if error is not None:
                pipe.release()
            free_memory()
        return (None, error) if error is not None else (out, None)

    def _previewer(self, job: Job, s: Settings, preview: Preview, watch, plan):
        """The pipeline's preview hook: the latents-as-RGB picture after every step, and every
        `s.vae_preview_every` steps (not the last: the video's own decode follows) the full-VAE preview of
        the same estimate, its cost in the status line and the terminal. Out of GPU memory turns the full
        preview off for the rest of the run instead of failing it."""
        every, tile = s.vae_preview_every, plan.vae_tile if plan is not None else "auto"

        def on_latents(x: torch.Tensor) -> None:
            x0 = preview.estimate(x)  # (B, 16, F', h, w) on the CPU
            job.on_preview(latent_to_rgb(x0))
            step = job.done_steps
            if not every or step % every or step >= s.steps or job.vae_note.startswith("full VAE preview off"):
                return
            start, picture = time.monotonic(), None
            try:
                with watch.paused():
                    picture = vae_preview(self.pipe.vae, x0, tile=tile)
            except torch.cuda.OutOfMemoryError:
                job.vae_note = "full VAE preview off: out of GPU memory at this size"
            if picture is None:
                free_memory()
                return
            job.on_vae_preview(picture, time.monotonic() - start)
            print(f"{job.vae_note} (of {s.steps})", flush=True)

        return on_latents

    def _vae(self) -> VAE:
        """The pipeline's VAE, loaded now as T2VPipeline loads it at its first decode (so that the decode can
        be watched), and left off the GPU until then."""
        pipe = self.pipe
        if pipe.vae is None:
            pipe.vae = VAE.from_pretrained(pipe.model.vae, device=pipe.device, dtype=pipe.vae_dtype)
            if pipe.device.type == "cuda":
                pipe.vae.unload()
        return pipe.vae

    def _decode_estimate(self, size: tuple[int, int], s: Settings) -> float | None:
        return None if self.decode_rate is None else self.decode_rate * size[0] * size[1] * s.frames

    def _finish(self, job: Job, update: Update) -> Update:
        self.last_status[job.session] = update.status
        return update

    def status(self, session: str = "local") -> str | None:
        """The session's status line when it changed since the last call (polled by the ui's timer), else None."""
        job = self.jobs.get(session)
        line = job.status_line() if job is not None else self.last_status.get(session)
        if line is None or line == self.sent_status.get(session):
            return None
        self.sent_status[session] = line
        return line

    def preview(self, session: str = "local") -> np.ndarray | None:
        """The newest live-preview picture of the session's run, once (None: nothing new)."""
        job = self.jobs.get(session)
        return None if job is None else job.take_preview()

    def vae_preview(self, session: str = "local") -> np.ndarray | None:
        """The newest full-VAE preview of the session's run, once (None: nothing new)."""
        job = self.jobs.get(session)
        return None if job is None else job.take_vae_preview()

    def cancel(self, session: str = "local") -> str:
        """Stop this session's run: out of the queue at once, else after its current step or decoded frame."""
        job = self.jobs.get(session)
        if job is None:
            return "No run in progress."
        job.cancel.set()
        if job.ahead:
            return "Cancelling: leaving the queue."
        if job.decode_total:
            return "Cancelling: stops before the next decoded frame; nothing is written."
        return f"Cancelling: stops after the current step ({job.phase()}); nothing is written."

    def _forget(self, job: Job) -> None:
        if self.jobs.get(job.session) is job:
            del self.jobs[job.session]

    def _output_path(self, seed: int) -> Path:
        stem = time.strftime("%Y%m%d-%H%M%S") + f"-s{seed}"
        path, n = self.outputs / f"{stem}.mp4", 1
        while path.exists():
            n += 1
            path = self.outputs / f"{stem}-{n}.mp4"
        return path

    # --- earlier outputs -------------------------------------------------------------------------

    def gallery(self) -> list[tuple[str, str]]:
        """(mp4 path, caption) of earlier outputs, newest first, captioned from their sidecars."""
        dated = []
        for path in self.outputs.glob("*.mp4"):
            try:  # a dangling link, or a file deleted since the glob, is skipped
                dated.append((path.stat().st_mtime, path))
            except OSError:
                continue
        items = []
        for _, path in sorted(dated, reverse=True)[:GALLERY_LIMIT]:
            params = read_sidecar(path)
            prompt = str(params.get("prompt", "(no parameters file)"))
            caption = (prompt[:60] + "...") if len(prompt) > 60 else prompt
            if "seed" in params:
                caption += f" · seed {params['seed']}"
            items.append((str(path), caption))
        return items

    def open_output(self, name: str) -> tuple[str, dict]:
        """(mp4 path, parameters) of an earlier output, by file name; refuses anything outside outputs."""
        path = (self.outputs / str(name)).resolve()
        if path.parent != self.outputs or path.suffix.lower() != ".mp4":
            raise user_error("Only videos in the outputs folder can be opened.")
        if not path.is_file():
            raise user_error(f"{path.name} is no longer in the outputs folder.")
        return str(path), read_sidecar(path)


# ---------------------------------------------------------------------------------------------------
# helpers


def read_sidecar(mp4: Path) -> dict:
    """The parameters stored beside an mp4 (`<name>.json`); {} when missing or unreadable."""
    try:
        params = json.loads(Path(mp4).with_suffix(".json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return params if isinstance(params, dict) else {}


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _is_root(path: Path) -> bool:
    try:
        check_root(path)
    except CheckpointError:
        return False
    return True


def _names(x) -> list[str]:
    """A picker's value as a list of names (gradio gives a list, None, or a single string)."""
    if x is None:
        return []
    return [x] if isinstance(x, str) else [str(n) for n in x]


def _is_int(x) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and float(x).is_integer()


def _is_num(x) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and x == x
