"""`sample()`: the plain two-expert denoising loop.

Read it top to bottom: the grid, then per step one visible `t >= boundary` choice of expert, two
guided passes (cond, uncond) combined in float32 (one pass, cond alone, when that expert's guidance
is 1.0: uncond + 1 * (cond - uncond) is cond), and the solver step. Where the experts' weights
live is not this loop's business: `high` and `low` are anything callable as `model(x, t, context)`
(a `WanModel`, or a residency wrapper that moves weights around the call).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .config import SamplingConfig
from .scheduler import UniPC, euler_step, lightning_grid, sigma_grid

Callback = Callable[[int, int, float, str], None]  # (step, total, t, expert "high" | "low")


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


def needs_negative_prompt(sampling: SamplingConfig) -> bool:
    """Whether any step runs an uncond pass (else the negative prompt need not be encoded)."""
    high = high_steps(sampling)
    return (high > 0 and calls_per_step(sampling, "high") == 2) or \
        (high < sampling.steps and calls_per_step(sampling, "low") == 2)


def sample(high, low, noise: torch.Tensor, context: torch.Tensor, context_null: torch.Tensor | None,
           sampling: SamplingConfig, callback: Callback | None = None,
           preview: Callable[[torch.Tensor], None] | None = None) -> torch.Tensor:
    """Denoise `noise` (B, 16, F, H, W) into latents with the high- then low-noise expert.

    `context` / `context_null` are (B, L, text_dim) prompt and negative-prompt embeddings; context_null
    may be None when `needs_negative_prompt(sampling)` is False. Returns float32 latents of noise's shape.
    `preview(x)` gets the current latents (B, 16, F, H, W) float32 after each step (the app's live preview).
    """
    sigmas, timesteps = grid(sampling)
    unipc = UniPC(sigmas) if sampling.solver == "unipc" else None
    x = noise.float()
    for i, t in enumerate(timesteps.tolist()):
        if t >= sampling.boundary_timestep:
            expert, model, scale = "high", high, sampling.guidance_high
        else:
            expert, model, scale = "low", low, sampling.guidance_low
        t_batch = torch.full((x.shape[0],), t, dtype=timesteps.dtype)  # on the CPU: reading it never syncs the GPU
        v = guided_velocity(model, x, t_batch, context, context_null, scale)
        x = unipc.step(i, x, v) if unipc else euler_step(x, v, float(sigmas[i]), float(sigmas[i + 1]))
        if callback is not None:
            callback(i, sampling.steps, t, expert)
        if preview is not None:
            preview(x)
    return x
