"""What the app's buttons do, as plain Python: `App` holds the model, the outputs folder and the one GPU.

Everything here runs and is tested without a browser (tests/test_app.py); `app/ui.py` only lays out
components and binds them to these methods. User-facing failures are raised as `gr.Error` with a
message that names the fix; the app keeps running.

A run (`App.generate`):
1. validates the settings (size among the loaded model's presets, frames 4n+1, ...);
2. takes the GPU lock (one video at a time, also across a cancelled run that is still stopping);
3. on CUDA asks the planner how to fit the VRAM profile (a profile too small for the size is refused
   with the planner's message) and hands the plan to the pipeline, which runs the experts as it says
   (resident or streamed) and records it in the sidecar;
4. calls `T2VPipeline`; its per-step callback moves the gr.Progress bar ("high-noise expert 12/26",
   ETA, peak VRAM), records the step for the status line that the ui polls (`App.status`), and raises
   `GenerationCancelled` when this browser session pressed Cancel, so a run stops after its current
   step;
5. returns the mp4 path, the parameters (what the sidecar JSON holds) and the seed used; on cancel or
   error it first moves the models off the GPU and empties the CUDA cache, then says what to change.

Settings are remembered in `<outputs>/settings.json` (written at each run's start), not in the browser:
it is a desktop app, and a file survives a browser change and can be read or deleted by hand.

Files: the gallery lists `*.mp4` in the outputs folder with their `<name>.json` sidecars; a selection
is resolved by file name and refused unless it is an mp4 directly inside the outputs folder.

Deliberately unsupported: more than one loaded model at a time; switching models while a run is in
progress (the load is refused until it ends).
"""

from __future__ import annotations

import dataclasses
import gc
import json
import os
import random
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import gradio as gr
import torch

from wan_lite import planner
from wan_lite.checkpoint import CheckpointError, check_root
from wan_lite.config import SOLVERS, SamplingConfig
from wan_lite.pipeline import high_steps
from wan_lite.t2v import T2VPipeline
from wan_lite.text import DEFAULT_NEGATIVE_PROMPT

from . import demo

SIZE_PRESETS = {  # label -> (width, height): the official Wan2.2 T2V sizes
    "1280x720 (720p landscape)": (1280, 720),
    "720x1280 (720p portrait)": (720, 1280),
    "832x480 (480p landscape)": (832, 480),
    "480x832 (480p portrait)": (480, 832),
}
DEMO_SIZE_PRESETS = {"64x64 (demo)": (64, 64), "96x64 (demo landscape)": (96, 64), "64x96 (demo portrait)": (64, 96)}
VRAM_PROFILES = {"auto": None, "24 GB": 24.0, "16 GB": 16.0, "12 GB": 12.0, "8 GB": 8.0}  # None: free memory now
QUANT_CHOICES = ("auto", "int8", "fp8", "bf16")  # auto: as the checkpoint is stored; bf16: float weights
MAX_SEED = 2**31 - 1
SETTINGS_FILE = "settings.json"
GALLERY_LIMIT = 48
POLL_S = 0.25  # how often a run waiting for the GPU lock checks for Cancel


class GenerationCancelled(Exception):
    """Raised from the pipeline's step callback when the user pressed Cancel."""

    def __init__(self, step: int, total: int):
        super().__init__(f"cancelled after step {step}/{total}")
        self.step, self.total = step, total


@dataclass
class Settings:
    """Everything the controls hold. The field names are the ui's component keys."""

    prompt: str = ""
    negative_prompt: str = DEFAULT_NEGATIVE_PROMPT
    size: str = "1280x720 (720p landscape)"
    frames: int = 81
    steps: int = 40
    guidance_high: float = 4.0  # CFG scale with the high-noise expert
    guidance_low: float = 3.0  # CFG scale with the low-noise expert
    shift: float = 12.0
    solver: str = "unipc"
    random_seed: bool = True
    seed: int = 0  # used when random_seed is off
    quantization: str = "auto"
    vram_profile: str = "auto"

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


@dataclass
class Job:
    """A run in progress: the pipeline's step callback updates it, the status timer and gr.Progress read it."""

    session: str
    steps: int
    high_steps: int  # steps taken by the high-noise expert (t >= boundary)
    progress: object  # gr.Progress (called from the run's own thread)
    cancel: threading.Event = field(default_factory=threading.Event)
    started: float = field(default_factory=time.monotonic)
    first_step_at: float | None = None
    done_steps: int = 0
    expert: str = ""

    def on_step(self, step: int, total: int, t: int, expert: str) -> None:
        """The pipeline's callback(step, total, t, expert), after each denoising step."""
        if self.first_step_at is None:
            self.first_step_at = time.monotonic()
        self.done_steps, self.expert = step + 1, expert
        if self.cancel.is_set():
            raise GenerationCancelled(step + 1, total)
        self.report()

    def report(self) -> None:
        self.progress((self.done_steps, self.steps), desc=f"{self.phase()} · {self.eta()} · {peak_vram()}")

    def phase(self) -> str:
        n, high = self.done_steps, self.high_steps
        if n == 0:
            return "encoding the prompt, loading the experts"
        if n >= self.steps:
            return "decoding the video (VAE)"
        if self.expert == "high":
            return f"high-noise expert {n}/{high}"
        return f"low-noise expert {n - high}/{self.steps - high}"

    def eta(self) -> str:
        n = self.done_steps
        if n < 2 or self.first_step_at is None:
            return "ETA --"
        per_step = (time.monotonic() - self.first_step_at) / (n - 1)
        return f"ETA {_clock(per_step * (self.steps - n))}" + (" + VAE decode" if n < self.steps else "")

    def status_line(self) -> str:
        return f"{self.phase()} · step {self.done_steps}/{self.steps} · {self.eta()} · {peak_vram()}"


def _no_progress(*args, **kwargs) -> None:
    pass


def _clock(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


def peak_vram() -> str:
    if not torch.cuda.is_available():
        return "peak VRAM n/a (CPU)"
    return f"peak VRAM {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB"


def oom_message(s: Settings) -> str:
    return (f"Out of GPU memory at {s.size}, {s.frames} frames with the VRAM profile '{s.vram_profile}' "
            f"and quantization '{s.quantization}'. Change one setting and try again: a lower VRAM profile "
            "(streams the expert's blocks instead of holding it whole), a smaller size (480p), fewer frames, "
            "or int8/fp8 quantization. Memory has been freed.")


# ---------------------------------------------------------------------------------------------------
# The app


class App:
    """The app's state: the loaded model, the outputs folder, the GPU lock and the runs in progress."""

    def __init__(self, outputs: str | os.PathLike = "outputs", *, ckpt: str | os.PathLike | None = None,
                 device: str | None = None, cache_dir: str | os.PathLike | None = None, share: bool = False):
        self.outputs = Path(outputs).expanduser().resolve()
        self.outputs.mkdir(parents=True, exist_ok=True)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.cache_dir = Path(cache_dir).expanduser() if cache_dir else None
        self.share = share  # with a public link, only the listed model roots can be loaded
        self.gpu = threading.Lock()  # held for the whole of a run, also while a cancelled one stops
        self.jobs: dict[str, Job] = {}  # browser session -> its run in progress
        self.last_status: dict[str, str] = {}  # browser session -> how its last run ended
        self.sent_status: dict[str, str] = {}  # browser session -> the status line its timer last showed
        self.pipe: T2VPipeline | None = None
        self.is_demo = False
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
            raise gr.Error("Choose a model folder: a Wan2.2-T2V-A14B root (official or diffusers layout).")
        path = Path(text).expanduser()
        if self.share and self.pipe is not None and str(path) not in self.model_roots():
            raise gr.Error("With --share only the listed model folders can be loaded: start the app with "
                           "--ckpt PATH to add one.")
        if self.jobs:
            raise gr.Error("A video is being generated: wait for it or cancel it, then load the model.")
        if not path.is_dir():
            raise gr.Error(f"No folder {path}: give the folder that holds the downloaded Wan2.2-T2V-A14B files.")
        try:
            check_root(path)
            is_demo = demo.is_demo(path)
            # the tiny demo in float32 on a CPU; on a GPU bf16, which every fused attention kernel takes
            dtype = torch.float32 if is_demo and self.device.type == "cpu" else torch.bfloat16
            pipe = T2VPipeline.from_pretrained(path, device=self.device, dtype=dtype, text_dtype=dtype,
                                               cache_dir=self.cache_dir / "text" if self.cache_dir else None)
        except (CheckpointError, FileNotFoundError, ValueError) as e:
            raise gr.Error(str(e)) from e
        old, self.pipe, self.is_demo = self.pipe, pipe, is_demo
        del old
        free_memory()
        return self.banner()

    def banner(self) -> str:
        if self.is_demo:
            return ("**Demo model.** No checkpoint was given, so this is a tiny built-in model with random weights: "
                    "the whole flow works, but the video is coloured noise, and its VAE is shrunk (base_dim "
                    f"{demo.DEMO_VAE_BASE_DIM} instead of 96) so a CPU decodes it in seconds. For real videos, "
                    "download Wan2.2-T2V-A14B and run `python -m app --ckpt /path/to/Wan2.2-T2V-A14B`, or pick "
                    "its folder under *Model* below.")
        p = self.pipe
        return f"**Model:** `{p.root}` ({p.layout} layout, weights {p.quantization}) on {self.device.type}."

    def size_presets(self) -> dict[str, tuple[int, int]]:
        """The sizes offered for the loaded model: the tiny demo sizes, or the official ones."""
        return DEMO_SIZE_PRESETS if self.is_demo else SIZE_PRESETS

    # --- settings --------------------------------------------------------------------------------

    def settings(self) -> Settings:
        """The remembered settings (the defaults where none are stored or they do not fit this model)."""
        defaults = Settings.defaults(self.is_demo)
        try:
            stored = json.loads((self.outputs / SETTINGS_FILE).read_text())
        except (OSError, ValueError):
            return defaults
        if not isinstance(stored, dict):
            return defaults
        s = dataclasses.replace(defaults, **{k: v for k, v in stored.items() if k in SETTING_NAMES})
        if s.size not in self.size_presets():  # remembered from another model: its frames and steps too
            s = dataclasses.replace(s, size=defaults.size, frames=defaults.frames, steps=defaults.steps)
        return s

    def save_settings(self, s: Settings) -> None:
        path = self.outputs / SETTINGS_FILE
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(dataclasses.asdict(s), ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
        os.replace(tmp, path)

    def validate(self, s: Settings) -> tuple[int, int]:
        """(width, height) of valid settings; gr.Error naming the fix otherwise."""
        if not isinstance(s.prompt, str) or not s.prompt.strip():
            raise gr.Error("The prompt is empty: describe the video to generate.")
        presets = self.size_presets()
        if s.size not in presets:
            raise gr.Error(f"Size {s.size!r} is not offered for this model: choose one of {', '.join(presets)}.")
        checks = [
            (_is_int(s.frames) and s.frames >= 1 and (s.frames - 1) % 4 == 0,
             f"Frames {s.frames} must be 4n+1 (5, 9, ..., 81): 81 frames is 5 s at 16 fps."),
            (_is_int(s.steps) and 1 <= s.steps <= 200, f"Steps {s.steps} must be between 1 and 200 (40 is official)."),
            (_is_num(s.guidance_high) and 0 <= s.guidance_high <= 20,
             f"High-noise guidance {s.guidance_high} must be between 0 and 20 (4.0 is official)."),
            (_is_num(s.guidance_low) and 0 <= s.guidance_low <= 20,
             f"Low-noise guidance {s.guidance_low} must be between 0 and 20 (3.0 is official)."),
            (_is_num(s.shift) and 0 < s.shift <= 100, f"Shift {s.shift} must be above 0 (12.0 is official)."),
            (s.solver in SOLVERS, f"Solver {s.solver!r} is unknown: choose {' or '.join(SOLVERS)}."),
            (s.random_seed or (_is_int(s.seed) and 0 <= s.seed <= MAX_SEED),
             f"Seed {s.seed} must be a whole number from 0 to {MAX_SEED}, or tick 'random seed'."),
            (s.quantization in QUANT_CHOICES, f"Quantization {s.quantization!r} is unknown: choose one of "
                                              f"{', '.join(QUANT_CHOICES)}."),
            (s.vram_profile in VRAM_PROFILES, f"VRAM profile {s.vram_profile!r} is unknown: choose one of "
                                              f"{', '.join(VRAM_PROFILES)}."),
        ]
        for ok, message in checks:
            if not ok:
                raise gr.Error(message)
        s.frames, s.steps, s.seed = int(s.frames), int(s.steps), int(s.seed) if _is_int(s.seed) else 0
        stored = {"none": "bf16"}.get(self.pipe.scheme, self.pipe.scheme)
        if s.quantization not in ("auto", stored):
            raise gr.Error(f"This checkpoint's experts are stored as {stored}; running them as {s.quantization} "
                           f"needs a converted copy: python -m wan_lite.quantize --ckpt {self.pipe.root} --out DST "
                           f"--scheme {s.quantization}, then load DST. Or choose 'auto'.")
        return presets[s.size]

    # --- memory plan -----------------------------------------------------------------------------

    def make_plan(self, s: Settings) -> planner.Plan | None:
        """The planner's choice for valid settings; None on a CPU with the 'auto' profile. Raises PlanError.

        A CPU run with a chosen profile previews the plan for a CUDA card of that size (capability 8.9).
        """
        width, height = self.size_presets()[s.size]
        vram = VRAM_PROFILES[s.vram_profile]
        cuda = self.device.type == "cuda"
        if vram is None and not cuda:
            return None
        scheme = self.pipe.scheme if s.quantization == "auto" else {"bf16": "none"}.get(s.quantization, s.quantization)
        return planner.make_plan(vram, height=height, width=width, frames=int(s.frames),
                                 scheme=planner.budget_scheme(scheme),
                                 device=self.device if cuda else "cuda", cfg=self.pipe.expert_config(),
                                 capability=None if cuda else (8, 9))

    def plan(self, s: Settings) -> str:
        """The planner's choice for these settings, as text (shown beside the VRAM profile)."""
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
            plan = None
            if self.device.type == "cuda":
                try:
                    plan = self.make_plan(s)
                except planner.PlanError as e:
                    raise gr.Error(f"{e}. Or choose a larger VRAM profile.") from None
                except CheckpointError as e:
                    raise gr.Error(str(e)) from None
        except gr.Error as e:  # also kept in the status line: the pop-up goes away
            self.last_status[session] = f"Not started: {e.message}"
            raise
        self.save_settings(s)
        pipe = self.pipe
        seed = random.randint(0, MAX_SEED) if s.random_seed else s.seed
        out = self._output_path(seed)
        job = Job(session, s.steps, high_steps=high_steps(SamplingConfig(steps=s.steps, shift=s.shift,
                                                                         boundary=pipe.boundary)),
                  progress=_no_progress if progress is None else progress)  # a gr.Progress is falsy
        self.jobs[session] = job
        error = None
        try:
            while not self.gpu.acquire(timeout=POLL_S):  # a cancelled run may still be finishing its step
                if job.cancel.is_set():
                    return self._finish(job, Update("Cancelled before it started."))
            try:
                if torch.cuda.is_available():
                    torch.cuda.reset_peak_memory_stats()
                job.report()
                pipe(s.prompt, s.negative_prompt, size=size, frames=s.frames, steps=s.steps, seed=seed, shift=s.shift,
                     guidance_high=s.guidance_high, guidance_low=s.guidance_low, solver=s.solver,
                     callback=job.on_step, out=out, plan=plan, extra_metadata={"vram_profile": s.vram_profile})
            except GenerationCancelled as e:
                error = f"Cancelled after step {e.step}/{e.total}"
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
                self.gpu.release()
        finally:
            self._forget(job)
        elapsed = _clock(time.monotonic() - job.started)
        if error is not None and error.startswith("Cancelled"):
            return self._finish(job, Update(f"{error} ({elapsed}); memory freed."))
        if error is not None:
            self._finish(job, Update(f"Failed: {error}"))
            raise gr.Error(error)
        return self._finish(job, Update(f"Done in {elapsed} · seed {seed} · {peak_vram()} · {out.name}",
                                        video=str(out), params=read_sidecar(out), seed=seed))

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

    def cancel(self, session: str = "local") -> str:
        """Ask this session's run to stop after its current step. A queued run is dropped by the ui."""
        job = self.jobs.get(session)
        if job is None:
            return "No run in progress (a request still waiting in the queue is dropped)."
        job.cancel.set()
        return f"Cancelling: stops after the current step ({job.phase()})."

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
            raise gr.Error("Only videos in the outputs folder can be opened.")
        if not path.is_file():
            raise gr.Error(f"{path.name} is no longer in the outputs folder.")
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


def _is_int(x) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and float(x).is_integer()


def _is_num(x) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and x == x
