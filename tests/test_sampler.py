"""The sampler: the sigma grid and `sample()` against the official loop of `wan/text2video.py`
(official FlowUniPCMultistepScheduler, official models) and against diffusers' flow-matching Euler
scheduler, on two tiny different experts."""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch
from reference import official
from tolerance import assert_close_fp32

import wan_lite
from wan_lite import SamplingConfig, sample
from wan_lite.scheduler import sigma_grid

TOL = 1e-5
LATENT = (16, 2, 4, 6)  # (C, F, H, W): 2 x 2 x 3 = 12 tokens


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def official_scheduler(steps: int, shift: float):
    """The scheduler exactly as text2video.py builds it for sample_solver='unipc'."""
    sched = official().fm_solvers_unipc.FlowUniPCMultistepScheduler(
        num_train_timesteps=1000, shift=1, use_dynamic_shifting=False
    )
    sched.set_timesteps(steps, device="cpu", shift=shift)
    return sched


@functools.cache
def _load(path):
    return wan_lite.load_expert(path, dtype=torch.float32)


@pytest.fixture
def experts(official_root):
    """(high, low) wan_lite experts loaded from the official layout in fp32."""
    return _load(official_root.high), _load(official_root.low)


def official_unipc_loop(high, low, noise, context, context_null, sampling: SamplingConfig):
    """The denoising loop of wan/text2video.py (WanT2V.generate, CFG branch), one sample.

    noise (16, F, H, W); context / context_null (L, text_dim) -> latents (16, F, H, W).
    """
    sched = official_scheduler(sampling.steps, sampling.shift)
    boundary = sampling.boundary * sampling.num_train_timesteps
    guide_scale = (sampling.guidance_low, sampling.guidance_high)
    f, h, w = noise.shape[1:]
    seq_len = f * (h // 2) * (w // 2)
    latents = [noise]
    arg_c = {"context": [context], "seq_len": seq_len}
    arg_null = {"context": [context_null], "seq_len": seq_len}
    with torch.no_grad():
        for t in sched.timesteps:
            timestep = torch.stack([t])
            model = high if t.item() >= boundary else low
            sample_guide_scale = guide_scale[1] if t.item() >= boundary else guide_scale[0]
            noise_pred_cond = model(latents, t=timestep, **arg_c)[0]
            noise_pred_uncond = model(latents, t=timestep, **arg_null)[0]
            noise_pred = noise_pred_uncond + sample_guide_scale * (noise_pred_cond - noise_pred_uncond)
            temp_x0 = sched.step(noise_pred.unsqueeze(0), t, latents[0].unsqueeze(0), return_dict=False)[0]
            latents = [temp_x0.squeeze(0)]
    return latents[0]


# ---------------------------------------------------------------------------------------------
# the grid


def test_sigma_grid_40_steps_shift_12_is_the_official_grid():
    sigmas, timesteps = sigma_grid(40, 12.0)
    sched = official_scheduler(40, 12.0)
    assert timesteps.dtype == torch.int64 and timesteps.shape == (40,)
    assert torch.equal(timesteps, sched.timesteps)  # integers: the official truncation, exactly
    assert sigmas.shape == (41,) and sigmas[-1] == 0
    assert_close_fp32(sigmas.to(torch.float32), sched.sigmas, rtol=1e-6)  # floats of two code paths
    # what the official scheduler gives: 26 high-noise steps (999 ... 877), 14 low (865 ... 235)
    high, low = timesteps[timesteps >= 875], timesteps[timesteps < 875]
    assert (len(high), len(low)) == (26, 14)
    assert torch.equal(timesteps[:26], high)  # all high-noise steps come first
    assert (high[0].item(), high[-1].item(), low[0].item(), low[-1].item()) == (999, 877, 865, 235)
    assert (timesteps[1:] < timesteps[:-1]).all()


@pytest.mark.parametrize("steps, shift", [(1, 1.0), (10, 5.0), (25, 3.0), (50, 12.0), (40, 1.0)])
def test_sigma_grid_matches_official_scheduler(steps, shift):
    sigmas, timesteps = sigma_grid(steps, shift)
    sched = official_scheduler(steps, shift)
    assert torch.equal(timesteps, sched.timesteps)  # integers: the official truncation, exactly
    assert_close_fp32(sigmas.to(torch.float32), sched.sigmas, rtol=1e-6)


# ---------------------------------------------------------------------------------------------
# UniPC: sample() vs the official loop


@pytest.mark.parametrize(
    "sampling, batch",
    [
        (SamplingConfig(), 1),  # the official default: 40 steps, shift 12, guidance 4 / 3
        (SamplingConfig(steps=12, shift=5.0, boundary=0.9, guidance_high=5.0, guidance_low=2.0), 2),
    ],
    ids=["default-40-steps", "12-steps-shift5-batch2"],
)
def test_unipc_sample_matches_official_loop(experts, reference_experts, tiny_cfg, sampling, batch):
    noise = torch.randn(batch, *LATENT)
    context = torch.randn(batch, 7, tiny_cfg.text_dim)
    context_null = torch.randn(batch, 3, tiny_cfg.text_dim)
    with torch.no_grad():
        got = sample(*experts, noise, context, context_null, sampling)
    want = torch.stack(
        [official_unipc_loop(*reference_experts, noise[i], context[i], context_null[i], sampling) for i in range(batch)]
    )
    assert got.dtype == torch.float32 and got.shape == noise.shape
    assert rel_err(want, noise) > 0.5  # the loop did move the latents
    err = rel_err(got, want)
    assert err < TOL, f"final latents vs official loop: {err:.3e}"


def test_both_experts_are_used(experts, tiny_cfg):
    """Swapping the experts changes the result: the loop uses high above the boundary, low below."""
    noise = torch.randn(1, *LATENT)
    ctx, ctx_null = torch.randn(1, 5, tiny_cfg.text_dim), torch.randn(1, 5, tiny_cfg.text_dim)
    sampling = SamplingConfig(steps=8)
    with torch.no_grad():
        a = sample(experts[0], experts[1], noise, ctx, ctx_null, sampling)
        b = sample(experts[1], experts[0], noise, ctx, ctx_null, sampling)
        only_high = sample(experts[0], experts[0], noise, ctx, ctx_null, sampling)
    assert rel_err(a, b) > 1e-2 and rel_err(a, only_high) > 1e-2


# ---------------------------------------------------------------------------------------------
# Euler: sample(solver="euler") vs diffusers FlowMatchEulerDiscreteScheduler


@pytest.mark.parametrize("steps, shift", [(40, 12.0), (10, 3.0)])
def test_euler_sample_matches_diffusers_scheduler(experts, tiny_cfg, steps, shift):
    from diffusers import FlowMatchEulerDiscreteScheduler

    sampling = SamplingConfig(steps=steps, shift=shift, solver="euler")
    ref_timesteps = official_scheduler(steps, shift).timesteps  # int64(sigma * 1000), the official grid
    sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
    base = np.linspace(0.999, 0.0, steps + 1)[:-1]  # unshifted; the scheduler applies `shift`
    sched.set_timesteps(sigmas=base.tolist(), timesteps=ref_timesteps.tolist())
    sigmas, timesteps = sigma_grid(steps, shift)
    assert torch.equal(timesteps, ref_timesteps)
    assert torch.equal(sched.timesteps.to(torch.int64), timesteps)
    torch.testing.assert_close(sched.sigmas.double(), sigmas, rtol=1e-6, atol=1e-7)

    high, low = experts
    noise = torch.randn(1, *LATENT)
    ctx, ctx_null = torch.randn(1, 7, tiny_cfg.text_dim), torch.randn(1, 2, tiny_cfg.text_dim)
    with torch.no_grad():
        got = sample(high, low, noise, ctx, ctx_null, sampling)
        x = noise.clone()
        for t in sched.timesteps:
            high_noise = t.item() >= sampling.boundary * 1000
            model = high if high_noise else low
            g = sampling.guidance_high if high_noise else sampling.guidance_low
            tb = t.reshape(1).to(torch.int64)
            cond, uncond = model(x, tb, ctx).float(), model(x, tb, ctx_null).float()
            x = sched.step(uncond + g * (cond - uncond), t, x, return_dict=False)[0]
    err = rel_err(got, x)
    assert err < TOL, f"final latents vs diffusers Euler: {err:.3e}"


def test_euler_differs_from_unipc(experts, tiny_cfg):
    noise = torch.randn(1, *LATENT)
    ctx = torch.randn(1, 4, tiny_cfg.text_dim)
    with torch.no_grad():
        u = sample(*experts, noise, ctx, ctx, SamplingConfig(steps=6))
        e = sample(*experts, noise, ctx, ctx, SamplingConfig(steps=6, solver="euler"))
    assert rel_err(u, e) > 1e-3


# ---------------------------------------------------------------------------------------------
# callback and the expert switch


class Recorder:
    def __init__(self):
        self.calls = []

    def __call__(self, step, total, t, expert):
        self.calls.append((step, total, int(t), expert))


@pytest.mark.parametrize("solver", ["unipc", "euler"])
def test_callback_once_per_step_and_one_expert_switch(experts, tiny_cfg, solver):
    sampling = SamplingConfig(solver=solver)
    rec = Recorder()
    noise = torch.randn(1, 16, 1, 2, 2)
    ctx = torch.randn(1, 3, tiny_cfg.text_dim)
    with torch.no_grad():
        sample(*experts, noise, ctx, ctx, sampling, callback=rec)
    _, timesteps = sigma_grid(40, 12.0)
    assert [c[0] for c in rec.calls] == list(range(40))
    assert all(c[1] == 40 for c in rec.calls)
    assert [c[2] for c in rec.calls] == timesteps.tolist()
    experts_seen = [c[3] for c in rec.calls]
    assert experts_seen == ["high"] * 26 + ["low"] * 14
    switches = sum(a != b for a, b in zip(experts_seen, experts_seen[1:]))
    assert switches == 1


def test_boundary_timestep_itself_uses_the_high_expert(experts, tiny_cfg):
    """`t >= boundary`: with boundary 0.877 the step at t = 877 is still high-noise (as official)."""
    rec = Recorder()
    noise = torch.randn(1, 16, 1, 2, 2)
    ctx = torch.randn(1, 3, tiny_cfg.text_dim)
    with torch.no_grad():
        sample(*experts, noise, ctx, ctx, SamplingConfig(boundary=0.877), callback=rec)
    by_t = {t: e for _, _, t, e in rec.calls}
    assert by_t[877] == "high" and by_t[865] == "low"
    assert [e for *_, e in rec.calls].count("high") == 26


def test_schedule_helpers_match_the_loop():
    """pipeline.timesteps / high_steps (used by the residency plan, the bench and the app) are the
    steps sample() takes: 26 of the official 40 on the high-noise expert."""
    from wan_lite.pipeline import high_steps, timesteps

    sampling = SamplingConfig()
    assert timesteps(sampling) == sigma_grid(40, 12.0)[1].tolist()
    assert high_steps(sampling) == 26
    assert high_steps(SamplingConfig(steps=10, shift=3.0)) == sum(t >= 875 for t in sigma_grid(10, 3.0)[1].tolist())
