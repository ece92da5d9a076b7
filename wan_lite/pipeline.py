"""`sample()`: the plain two-expert denoising loop.

Read it top to bottom: the grid, then per step one visible `t >= boundary` choice of expert, two
guided passes (cond, uncond) combined in float32 (one pass, cond alone, when that expert's guidance
is 1.0: uncond + 1 * (cond - uncond) is cond), and the solver step. Where the experts' weights
live is not this loop's business: `high` and `low` are anything callable as `model(x, t, context)`
(a `WanModel`, or a residency wrapper that moves weights around the call).

With step caching on (`sampling.cache`, see `StepCache`) a skipped step runs no expert: the velocity is
the current latent plus the transformation vector v - x of that expert's last computed step (`Reuse`).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from .config import SamplingConfig, StepCache
from .scheduler import UniPC, euler_step, lightning_grid, sigma_grid


class Cancelled(Exception):
    """Raise it from a callback (or a decode hook) to stop a run: `T2VPipeline` removes what it wrote for
    the run (the saved latents too) and re-raises it unchanged, never as a failure."""


# callback(step, total, t, expert) after each step: step counts from 0 (0 after the first, total - 1 after
# the last: show step + 1 of total), total = sampling.steps, t the step's timestep, expert "high" | "low".
Callback = Callable[[int, int, float, str], None]


def combine_guidance(cond: torch.Tensor, uncond: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance, the one place it is written: uncond + s * (cond - uncond), float32."""
    cond, uncond = cond.float(), uncond.float()
    return uncond + scale * (cond - uncond)


def guided_velocity(model, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor,
                    context_null: torch.Tensor | None, scale: float) -> torch.Tensor:
    """Classifier-free guidance in float32: uncond + s * (cond - uncond), from two passes.

    Guidance 1.0 is the cond pass alone, one `model(x, t, context)` call on every kind of expert
    (`context_null` may then be None). An expert that schedules the two passes itself (block-major
    under streaming residency, on two GPUs under CFG parallelism) offers
    `.guided(x, t, context, context_null, scale)` computing the same.
    """
    if scale == 1.0:
        return model(x, t, context).float()
    if context_null is None:
        raise ValueError(f"guidance {scale} needs the negative prompt's embedding: pass context_null "
                         "(only guidance 1.0 runs without it)")
    if hasattr(model, "guided"):
        return model.guided(x, t, context, context_null, scale)
    return combine_guidance(model(x, t, context), model(x, t, context_null), scale)


def grid(sampling: SamplingConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """(sigmas (steps + 1,), timesteps (steps,)) of `sampling.grid`: int64 timesteps on the official grid,
    float32 on the Lightning grid."""
    make = lightning_grid if sampling.grid == "lightning" else sigma_grid
    return make(sampling.steps, sampling.shift, sampling.num_train_timesteps)


def timesteps(sampling: SamplingConfig) -> list[float]:
    """The timesteps `sample` runs, in order (the residency plans its swap from them): ints on the
    official grid, floats (937.5) on the Lightning grid."""
    return grid(sampling)[1].tolist()


def high_steps(sampling: SamplingConfig) -> int:
    """How many of those steps the high-noise expert takes (26 of the official 40)."""
    return sum(t >= sampling.boundary_timestep for t in timesteps(sampling))


def calls_per_step(sampling: SamplingConfig, expert: str) -> int:
    """Model passes `sample` makes per step with `expert` ("high" | "low"): 1 at guidance 1.0, else 2."""
    if expert not in ("high", "low"):
        raise ValueError(f"expert must be 'high' or 'low', got {expert!r}")
    scale = sampling.guidance_high if expert == "high" else sampling.guidance_low
    return 1 if scale == 1.0 else 2


def step_experts(sampling: SamplingConfig) -> list[str]:
    """The expert of each step, "high" or "low", as `sample` picks it (`t >= boundary`)."""
    return ["high" if t >= sampling.boundary_timestep else "low" for t in timesteps(sampling)]


def expert_ends(sampling: SamplingConfig) -> set[int]:
    """The steps step caching always computes: each expert's first and last step."""
    experts = step_experts(sampling)
    n = len(experts)
    return {i for i in range(n) if i in (0, n - 1) or experts[i - 1] != experts[i] or experts[i + 1] != experts[i]}


def computed_steps(sampling: SamplingConfig) -> list[bool]:
    """Per step, whether `sample` runs the expert (True) or reuses its last computed step (False), for a
    step cache fixed in advance: "off" (all True) or "pattern". The residency plans its copies from the
    computed steps' timesteps only (a skipped step makes no call).

    "threshold" mode decides from the latents while sampling, so it raises ValueError: run the residency
    without a plan there. Also raises ValueError for an explicit pattern that names a step past the last
    or leaves out an expert's first or last step.
    """
    cache, experts = sampling.cache, step_experts(sampling)
    if cache.mode == "off":
        return [True] * len(experts)
    if cache.mode == "threshold":
        raise ValueError("threshold step caching picks its steps from the latents while sampling, so they cannot "
                         "be planned: run the residency without a step plan, or use a fixed pattern "
                         "(StepCache(mode='pattern', ...))")
    if isinstance(cache.pattern, str):
        keep = set()
        for start, stop in _runs(experts):
            keep |= _spread(start, stop - start, cache.fraction)
    else:
        keep = set(cache.pattern)
        _check_pattern(keep, experts, expert_ends(sampling))
    return [i in keep for i in range(len(experts))]


def _runs(experts: list[str]) -> list[tuple[int, int]]:
    """[start, stop) of each run of one expert's steps: [(0, 26), (26, 40)] for the official 40."""
    starts = [i for i in range(len(experts)) if i == 0 or experts[i] != experts[i - 1]]
    return list(zip(starts, starts[1:] + [len(experts)]))


def _spread(start: int, n: int, fraction) -> set[int]:
    """ceil(n * fraction) of the n steps from `start` (at least the first and the last), evenly spaced."""
    m = max(min(n, 2), math.ceil(n * fraction))
    if m == 1:
        return {start}
    return {start + (2 * i * (n - 1) + m - 1) // (2 * (m - 1)) for i in range(m)}  # round(i * (n-1)/(m-1))


def _check_pattern(keep: set[int], experts: list[str], ends: set[int]) -> None:
    if keep and max(keep) >= len(experts):
        raise ValueError(f"step cache pattern names step {max(keep)}, but there are {len(experts)} steps "
                         f"(0 to {len(experts) - 1})")
    if missing := sorted(ends - keep):
        raise ValueError(f"step cache pattern leaves out step(s) {missing}: each expert's first and last steps are "
                         f"always computed (here {sorted(ends)}); add them to the pattern")


class Reuse:
    """Step caching during one `sample` run: which steps compute, and the velocity of a skipped one.

    Per expert it holds the last computed step's latent x_c and velocity v_c; a skipped step's velocity is
    x + (v_c - x_c) (EasyCache's transformation vector; guidance is linear, so caching the guided v - x equals
    caching the cond and uncond passes' own v - x, as EasyCache does, combined with this expert's scale).
    All of it is dropped at an expert's first step, so nothing crosses the switch.

    "threshold" mode (EasyCache's criterion, on the guided velocity): after two computed steps c' < c of an
    expert the transformation rate is k = mean|v_c - v_c'| / mean|x_c - x_c'|; each later step adds
    k * mean|x_i - x_(i-1)| / mean|v_c| to an accumulated relative change, and the step is skipped while
    that stays below the threshold (computing resets it to 0). Costs one GPU sync per step for the means.
    """

    def __init__(self, sampling: SamplingConfig):
        self.cache: StepCache = sampling.cache
        self.ends = expert_ends(sampling)
        self.fixed = None if self.cache.mode == "threshold" else computed_steps(sampling)
        self.computed: list[bool] = []  # per step so far
        self._start(None)

    def _start(self, expert: str | None) -> None:
        """Begin `expert`'s steps with nothing from the other expert."""
        self.expert = expert
        self.x_c = self.v_c = None  # the last computed step's latent and guided velocity (B, 16, F, H, W)
        self.rate: float | None = None  # k: mean|dv| / mean|dx| between the last two computed steps
        self.v_mean = 1.0  # mean|v_c|
        self.x_prev: torch.Tensor | None = None  # the previous step's latent
        self.change = 0.0  # the accumulated relative change since the last computed step

    def compute(self, i: int, expert: str, x: torch.Tensor) -> bool:
        """Whether step i (latent x) runs `expert`; False: call `velocity(x)` instead."""
        if expert != self.expert:  # this expert's first step
            self._start(expert)
        run = self.fixed[i] if self.fixed is not None else self._decide(i, x)
        self.computed.append(run)
        return run

    def _decide(self, i: int, x: torch.Tensor) -> bool:
        step = None if self.x_prev is None else _mean_abs(x - self.x_prev)  # the input's change since step i-1
        self.x_prev = x
        if i in self.ends or i < self.cache.warmup or self.rate is None:
            self.change = 0.0
            return True
        self.change += self.rate * step / self.v_mean
        if self.change < self.cache.threshold:
            return False
        self.change = 0.0
        return True

    def store(self, x: torch.Tensor, v: torch.Tensor) -> None:
        """Keep a computed step's latent x and guided velocity v (nothing when caching is off)."""
        if self.cache.mode == "off":
            return
        if self.cache.mode == "threshold":
            if self.x_c is not None:
                self.rate = _mean_abs(v - self.v_c) / max(_mean_abs(x - self.x_c), 1e-12)
            self.v_mean = max(_mean_abs(v), 1e-12)
        self.x_c, self.v_c = x, v

    def velocity(self, x: torch.Tensor) -> torch.Tensor:
        """A skipped step's velocity: x plus the last computed step's v - x, float32."""
        return x + (self.v_c - self.x_c)

    def stats(self, sampling: SamplingConfig) -> dict:
        """{"computed_steps": [bool per step], "computed": {expert: steps run}, "passes": {expert: model
        passes}} (a pass is one `model(x, t, context)`: two per step under guidance, one at guidance 1.0)."""
        experts = step_experts(sampling)[: len(self.computed)]
        computed = {e: sum(c for c, x in zip(self.computed, experts) if x == e) for e in ("high", "low")}
        passes = {e: n * calls_per_step(sampling, e) for e, n in computed.items()}
        return {"computed_steps": list(self.computed), "computed": computed, "passes": passes}


def _mean_abs(t: torch.Tensor) -> float:
    return t.abs().mean().item()


def needs_negative_prompt(sampling: SamplingConfig) -> bool:
    """Whether any step runs an uncond pass (else the negative prompt need not be encoded)."""
    high = high_steps(sampling)
    return (high > 0 and calls_per_step(sampling, "high") == 2) or \
        (high < sampling.steps and calls_per_step(sampling, "low") == 2)


def sample(high, low, noise: torch.Tensor, context: torch.Tensor, context_null: torch.Tensor | None,
           sampling: SamplingConfig, callback: Callback | None = None, stats: dict | None = None,
           preview: Callable[[torch.Tensor], None] | None = None) -> torch.Tensor:
    """Denoise `noise` (B, 16, F, H, W) into latents with the high- then low-noise expert.

    `context` / `context_null` are (B, L, text_dim) prompt and negative-prompt embeddings; context_null
    may be None when `needs_negative_prompt(sampling)` is False. Returns float32 latents of noise's shape.
    A `stats` dict gets the steps and model passes each expert computed (`Reuse.stats`).
    `callback(step, total, t, expert)` runs after each step, `step` counting from 0: 0 after the first step,
    total - 1 after the last (a progress display shows step + 1 of total). `total` is `sampling.steps`, and
    a step the step cache skips is called back too; `t` is the step's timestep (999 first on the official
    grid), `expert` "high" or "low".
    `preview(x)` gets the current latents (B, 16, F, H, W) float32 after each step (the app's live preview).
    """
    sigmas, timesteps = grid(sampling)
    unipc = UniPC(sigmas) if sampling.solver == "unipc" else None
    reuse = Reuse(sampling)
    x = noise.float()
    for i, t in enumerate(timesteps.tolist()):
        if t >= sampling.boundary_timestep:
            expert, model, scale = "high", high, sampling.guidance_high
        else:
            expert, model, scale = "low", low, sampling.guidance_low
        t_batch = torch.full((x.shape[0],), t, dtype=timesteps.dtype)  # on the CPU: reading it never syncs the GPU
        if reuse.compute(i, expert, x):
            v = guided_velocity(model, x, t_batch, context, context_null, scale)
            reuse.store(x, v)
        else:
            v = reuse.velocity(x)
        x = unipc.step(i, x, v) if unipc else euler_step(x, v, float(sigmas[i]), float(sigmas[i + 1]))
        if callback is not None:
            callback(i, sampling.steps, t, expert)
        if preview is not None:
            preview(x)
    if stats is not None:
        stats.update(reuse.stats(sampling))
    return x
