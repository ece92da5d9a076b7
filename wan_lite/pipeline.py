"""`sample()`: the plain two-expert denoising loop.

Read it top to bottom: the grid, then per step one visible `t >= boundary` choice of expert, two
guided passes (cond, uncond) combined in float32, and the solver step. Where the experts' weights
live is not this loop's business: `high` and `low` are anything callable as `model(x, t, context)`
(a `WanModel`, or a residency wrapper that moves weights around the call).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .config import SamplingConfig
from .scheduler import UniPC, euler_step, sigma_grid

Callback = Callable[[int, int, int, str], None]  # (step, total, t, expert "high" | "low")


def combine_guidance(cond: torch.Tensor, uncond: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance, the one place it is written: uncond + s * (cond - uncond), float32."""
    cond, uncond = cond.float(), uncond.float()
    return uncond + scale * (cond - uncond)


def guided_velocity(model, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor,
                    context_null: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance in float32: uncond + s * (cond - uncond), from two passes.

    An expert that schedules the two passes itself (block-major under streaming residency, on two
    GPUs under CFG parallelism) offers `.guided(x, t, context, context_null, scale)` computing the same.
    """
    if hasattr(model, "guided"):
        return model.guided(x, t, context, context_null, scale)
    return combine_guidance(model(x, t, context), model(x, t, context_null), scale)


def timesteps(sampling: SamplingConfig) -> list[int]:
    """The timesteps `sample` runs, in order (the residency plans its swap from them)."""
    return sigma_grid(sampling.steps, sampling.shift, sampling.num_train_timesteps)[1].tolist()


def high_steps(sampling: SamplingConfig) -> int:
    """How many of those steps the high-noise expert takes (26 of the official 40)."""
    return sum(t >= sampling.boundary_timestep for t in timesteps(sampling))


def sample(high, low, noise: torch.Tensor, context: torch.Tensor, context_null: torch.Tensor,
           sampling: SamplingConfig, callback: Callback | None = None) -> torch.Tensor:
    """Denoise `noise` (B, 16, F, H, W) into latents with the high- then low-noise expert.

    `context` / `context_null` are (B, L, text_dim) prompt and negative-prompt embeddings.
    Returns float32 latents of noise's shape.
    """
    sigmas, timesteps = sigma_grid(sampling.steps, sampling.shift, sampling.num_train_timesteps)
    unipc = UniPC(sigmas) if sampling.solver == "unipc" else None
    x = noise.float()
    for i, t in enumerate(timesteps.tolist()):
        if t >= sampling.boundary_timestep:
            expert, model, scale = "high", high, sampling.guidance_high
        else:
            expert, model, scale = "low", low, sampling.guidance_low
        t_batch = torch.full((x.shape[0],), t, dtype=torch.int64)  # on the CPU: reading it never syncs the GPU
        v = guided_velocity(model, x, t_batch, context, context_null, scale)
        x = unipc.step(i, x, v) if unipc else euler_step(x, v, float(sigmas[i]), float(sigmas[i + 1]))
        if callback is not None:
            callback(i, sampling.steps, t, expert)
    return x
