"""Every check of a request that needs no model and no torch: the CLI runs these before the heavy
imports (an argument error answers in well under a second), the pipeline and the app run the same ones.

- `validate(prompt, size, frames)`: a non-empty prompt, (width, height) multiples of 16, 4n+1 frames;
- `validate_sampling(steps=, shift=, guidance_high=, guidance_low=, solver=, seed=)`: the ranges the
  CLI and the app both accept (one function, so the two cannot disagree); each refusal names the range
  and the default (`defaults`);
- `resolve_seed(seed)`: None or a negative seed draws one (as the official generate.py does), anything
  outside what `torch.Generator.manual_seed` takes (0 .. 2**64-1) is refused up front;
- `clean_text(text)`: the official prompt cleaning (ftfy, HTML unescape, whitespace);
- `looks_like_hub_id(name)`: whether a --ckpt is a Hugging Face id (owner/name) rather than a local path.
"""

from __future__ import annotations

import html
import numbers
import random
from pathlib import Path

import ftfy
import regex as re

from .config import SOLVERS, SamplingConfig, VideoSize

MAX_STEPS = 200  # more is never useful (the official run is 40); a typo like 4000 would run for days
MAX_GUIDANCE = 20.0  # CFG scales above this only burn the image; 0 .. 20 as the app offers
MAX_SHIFT = 100.0
MAX_SEED = 2**64 - 1  # torch.Generator.manual_seed takes 0 .. 2**64-1 (a larger int: "Overflow when unpacking")
RANDOM_SEEDS = 2**31 - 1  # a drawn seed is below this (short enough to type back in)
PRESETS = {"official": SamplingConfig(), "lightning": SamplingConfig.lightning()}  # --preset; refusals name them


def clean_text(text: str) -> str:
    """The official clean='whitespace': ftfy, HTML unescape (twice), collapse whitespace, strip."""
    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    return re.sub(r"\s+", " ", text).strip()


def validate(prompt: str, size: tuple[int, int], frames: int) -> None:
    """Raise ValueError naming the fix for an empty prompt, a size not a multiple of 16, frames not 4n+1."""
    if not isinstance(prompt, str) or not clean_text(prompt):
        raise ValueError("the prompt is empty: describe the video to generate")
    if len(size) != 2:
        raise ValueError(f"size must be (width, height), got {size!r}")
    VideoSize(*size, frames)  # raises naming the nearest valid sides / frame counts


def _is_number(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and value == value  # not NaN


def defaults(name: str) -> str:
    """How a refusal names a sampling setting's default, from the presets themselves:
    defaults("steps") -> "default 40 as official, 4 with the lightning preset"."""
    official, lightning = (getattr(PRESETS[p], name) for p in ("official", "lightning"))
    return f"default {official:g} as official, {lightning:g} with the lightning preset"


def validate_sampling(*, steps: int, shift: float, guidance_high: float, guidance_low: float,
                      solver: str = "unipc", seed: int | None = None) -> None:
    """Raise ValueError naming the accepted range for a sampling setting outside it (the CLI and the app
    both call this): steps 1..200, shift in (0, 100], guidance 0..20 per expert, a known solver, and a
    seed that `resolve_seed` takes. Call it before building a SamplingConfig (whose own checks are terse)."""
    if not isinstance(steps, int) or isinstance(steps, bool) or not 1 <= steps <= MAX_STEPS:
        raise ValueError(f"steps {steps!r} must be a whole number from 1 to {MAX_STEPS} ({defaults('steps')})")
    if not _is_number(shift) or not 0 < shift <= MAX_SHIFT:
        raise ValueError(f"shift {shift!r} must be above 0 and at most {MAX_SHIFT:g} ({defaults('shift')})")
    for name, value in (("guidance_high", guidance_high), ("guidance_low", guidance_low)):
        if not _is_number(value) or not 0 <= value <= MAX_GUIDANCE:
            raise ValueError(f"{name} {value!r} must be from 0 to {MAX_GUIDANCE:g} ({defaults(name)}: "
                             "1 turns classifier-free guidance off)")
    if solver not in SOLVERS:
        raise ValueError(f"unknown solver {solver!r}: choose one of {', '.join(SOLVERS)}")
    if seed is not None:
        resolve_seed(seed)


def resolve_seed(seed: int | None) -> int:
    """The seed a run uses: `seed` itself (0 .. 2**64-1), or a random one in 0 .. 2**31-1 for None or a
    negative seed (the official generate.py's `seed if seed >= 0 else random`). Raises ValueError for a
    seed the generator cannot take."""
    if seed is not None and (not isinstance(seed, numbers.Integral) or isinstance(seed, bool)):
        raise ValueError(f"seed {seed!r} must be a whole number from 0 to {MAX_SEED} (negative: random)")
    if seed is None or seed < 0:
        return random.randint(0, RANDOM_SEEDS)
    if seed > MAX_SEED:
        raise ValueError(f"seed {seed} is too large: use a whole number from 0 to {MAX_SEED} (2**64-1), "
                         "or a negative seed for a random one")
    return int(seed)


def looks_like_hub_id(name: str) -> bool:
    """owner/name (word characters, '.', '-'), unless `owner` is a local folder: then it is a mistyped local
    path, reported as missing rather than sent to the hub."""
    return (re.fullmatch(r"[\w.-]+/[\w.-]+", name) is not None and not name.startswith(".")
            and not Path(name.split("/")[0]).is_dir())
