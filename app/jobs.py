"""A run as the person sees it: its place in the line for the GPU, its phase, ETA, decode progress,
live preview and Cancel. Plain Python, no gradio (the `progress` callable is a gr.Progress in the app).

- `GpuLine`: one run at a time, first come first served; a waiting run knows how many are ahead of it
  and leaves the line at once when cancelled.
- `Job`: one run. The pipeline's step callback (`on_step`) and preview (`on_preview`) and the VAE
  decoder hook (`on_decode`) update it from the run's thread; the ui's timer reads `status_line()`
  and `take_preview()`. Each of them raises `GenerationCancelled` once Cancel was pressed, so a run
  stops after its current step, or between two decoded frames (then nothing is written).
- `watch_decode`: counts the VAE decoder's calls (one per latent frame per tile, as diffusers'
  `AutoencoderKLWan` decodes) for the decode's progress and Cancel; a full-VAE preview decodes
  inside its `paused()` so that it is not counted as the video's decode.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch

from wan_lite.pipeline import Cancelled

POLL_S = 0.25  # how often a waiting run checks for Cancel


class GenerationCancelled(Cancelled):
    """Raised from the run's callbacks when the person pressed Cancel."""

    def __init__(self, where: str):
        super().__init__(f"cancelled {where}")
        self.where = where  # "after step 3/40", "during the VAE decode (frame 2/21)"


def clock(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


def peak_vram() -> str:
    if not torch.cuda.is_available():
        return "peak VRAM n/a (CPU)"
    return f"peak VRAM {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB"


@dataclass
class Job:
    """A run in progress (queued, denoising or decoding)."""

    session: str
    steps: int
    high_steps: int  # steps taken by the high-noise expert (t >= boundary)
    progress: Callable | None = None  # gr.Progress (called from the run's own thread; it is falsy)
    decode_estimate: float | None = None  # seconds the decode should take (from the last run), None: unknown
    cancel: threading.Event = field(default_factory=threading.Event)
    started: float = field(default_factory=time.monotonic)
    ahead: int = 0  # runs ahead of this one in the line for the GPU (0: it has the GPU)
    first_step_at: float | None = None
    done_steps: int = 0
    expert: str = ""
    decode_started: float | None = None
    decoded: int = 0  # decoder calls done (latent frames x tiles)
    decode_total: int = 0
    preview: np.ndarray | None = None  # (h, w, 3) uint8 of the latest step
    preview_step: int = 0  # the step that picture shows; `take_preview` hands each one out once
    preview_taken: int = 0
    vae_preview: np.ndarray | None = None  # (h, w, 3) uint8: the latest full-VAE preview (app.preview.vae_preview)
    vae_preview_step: int = 0
    vae_preview_taken: int = 0
    vae_note: str = ""  # "full VAE preview at step 8: 2.3 s" (its cost), or why it was turned off

    # --- called from the run's thread ---------------------------------------------------------

    def on_step(self, step: int, total: int, t: float, expert: str) -> None:
        """The pipeline's callback(step, total, t, expert), after each denoising step."""
        if self.first_step_at is None:
            self.first_step_at = time.monotonic()
        self.done_steps, self.expert = step + 1, expert
        if self.cancel.is_set():
            raise GenerationCancelled(f"after step {step + 1}/{total}")
        self.report()

    def on_preview(self, picture: np.ndarray) -> None:
        self.preview, self.preview_step = picture, self.done_steps

    def on_vae_preview(self, picture: np.ndarray, seconds: float) -> None:
        """A full-VAE preview of the current step, and what it cost (shown in the status line)."""
        self.vae_preview, self.vae_preview_step = picture, self.done_steps
        self.vae_note = f"full VAE preview at step {self.done_steps}: {seconds:.1f} s"

    def on_decode(self, done: int, total: int) -> None:
        """Before each decoder call: `done` of `total` calls are finished."""
        if self.decode_started is None:
            self.decode_started = time.monotonic()
        self.decoded, self.decode_total = done, total
        if self.cancel.is_set():
            raise GenerationCancelled(f"during the VAE decode (frame {done}/{total})")
        self.report()

    def report(self) -> None:
        if self.progress is None:
            return
        if self.decode_total:
            position = (self.decoded, self.decode_total)
        else:
            position = (self.done_steps, self.steps)
        self.progress(position, desc=f"{self.phase()} · {self.eta()} · {peak_vram()}")

    # --- read by the ui ---------------------------------------------------------------------------

    def phase(self) -> str:
        n, high = self.done_steps, self.high_steps
        if self.ahead:
            return f"queued: position {self.ahead} (waiting for the run{'s' if self.ahead > 1 else ''} ahead)"
        if self.decode_total:
            return f"decoding the video (VAE) frame {self.decoded}/{self.decode_total}"
        if n == 0:
            return "encoding the prompt, loading the experts"
        if n >= self.steps:
            return "decoding the video (VAE)"
        if self.expert == "high":
            return f"high-noise expert {n}/{high}"
        return f"low-noise expert {n - high}/{self.steps - high}"

    def eta(self) -> str:
        """Time left, the decode included: from the decode's own rate once two frames are done, else
        from the last run's decode time (or said to be unknown)."""
        decode = "" if self.decode_estimate is None else f" (incl. ~{clock(self.decode_estimate)} VAE decode)"
        if self.decode_total:
            elapsed = time.monotonic() - self.decode_started
            if self.decoded >= 1:
                return f"ETA {clock(elapsed / self.decoded * (self.decode_total - self.decoded))}"
            if self.decode_estimate is not None:
                return f"ETA {clock(max(0.0, self.decode_estimate - elapsed))}"
            return "ETA --"
        n = self.done_steps
        if n < 2 or self.first_step_at is None:
            return "ETA --"
        per_step = (time.monotonic() - self.first_step_at) / (n - 1)
        if self.decode_estimate is None:
            return f"ETA {clock(per_step * (self.steps - n))} + VAE decode"
        return f"ETA {clock(per_step * (self.steps - n) + self.decode_estimate)}{decode}"

    def status_line(self) -> str:
        if self.ahead:
            return f"{self.phase()} · Cancel leaves the queue"
        note = f" · {self.vae_note}" if self.vae_note else ""
        return f"{self.phase()} · step {self.done_steps}/{self.steps} · {self.eta()} · {peak_vram()}{note}"

    def take_preview(self) -> np.ndarray | None:
        """The newest preview picture, once; None when there is none newer."""
        if self.preview is None or self.preview_step == self.preview_taken:
            return None
        self.preview_taken = self.preview_step
        return self.preview

    def take_vae_preview(self) -> np.ndarray | None:
        """The newest full-VAE preview, once; None when there is none newer."""
        if self.vae_preview is None or self.vae_preview_step == self.vae_preview_taken:
            return None
        self.vae_preview_taken = self.vae_preview_step
        return self.vae_preview


class GpuLine:
    """One run at a time, in the order they came (a threading.Lock is not fair and has no positions)."""

    def __init__(self):
        self._changed = threading.Condition()
        self._line: list[Job] = []  # [0] holds the GPU

    def enter(self, job: Job) -> bool:
        """Wait until `job` is first in line: True; False when it was cancelled while waiting."""
        with self._changed:
            self._line.append(job)
            self._renumber()
            while self._line[0] is not job:
                if job.cancel.is_set():
                    self._leave(job)
                    return False
                job.report()
                self._changed.wait(POLL_S)
            return True

    def leave(self, job: Job) -> None:
        with self._changed:
            self._leave(job)

    def busy(self) -> bool:
        return bool(self._line)

    def _leave(self, job: Job) -> None:
        if job in self._line:
            self._line.remove(job)
        self._renumber()
        self._changed.notify_all()

    def _renumber(self) -> None:
        for i, job in enumerate(self._line):
            job.ahead = i


def decoder_calls(vae_model, latents_shape: tuple[int, ...]) -> int:
    """How many times diffusers' AutoencoderKLWan calls its decoder for latents (B, 16, F', h, w):
    once per latent frame, per spatial tile when tiling is on and the frame exceeds one tile
    (`_decode` / `tiled_decode`: tiles start every tile_sample_stride / 8 latent pixels)."""
    _, _, frames, height, width = latents_shape
    ratio = vae_model.spatial_compression_ratio
    tiled = vae_model.use_tiling and (width > vae_model.tile_sample_min_width // ratio
                                      or height > vae_model.tile_sample_min_height // ratio)
    if not tiled:
        return frames
    rows = len(range(0, height, vae_model.tile_sample_stride_height // ratio))
    cols = len(range(0, width, vae_model.tile_sample_stride_width // ratio))
    return frames * rows * cols


class DecodeWatch:
    """What `watch_decode` yields: `paused()` is a context in which the decoder's calls are not counted."""

    def __init__(self):
        self.done, self.total, self.pause = 0, 0, False

    @contextmanager
    def paused(self) -> Iterator[None]:
        self.pause = True
        try:
            yield
        finally:
            self.pause = False


@contextmanager
def watch_decode(vae_model, latents_shape: tuple[int, ...],
                 on_call: Callable[[int, int], None]) -> Iterator[DecodeWatch]:
    """While inside: `on_call(done, total)` before and after each of the VAE decoder's calls (it may raise
    to stop the decode), except inside the yielded watch's `paused()`. `vae_model` is a diffusers
    AutoencoderKLWan about to decode latents of `latents_shape`; the total is read at the first counted
    call, when the decode has set its tiling."""
    state = DecodeWatch()

    def before(module, args):
        if state.pause:
            return
        if not state.total:
            state.total = decoder_calls(vae_model, latents_shape)
        on_call(state.done, state.total)

    def after(module, args, output):
        if state.pause:
            return
        state.done += 1
        on_call(state.done, state.total)

    hooks = [vae_model.decoder.register_forward_pre_hook(before), vae_model.decoder.register_forward_hook(after)]
    try:
        yield state
    finally:
        for hook in hooks:
            hook.remove()
