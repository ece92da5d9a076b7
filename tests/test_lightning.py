"""The 4-step Lightning mode: the float sigma grid, one model pass per step at guidance 1.0 (plain loop and
CFG parallel), and `sample` against the loop of Wan2.2-Lightning's text2video.py on the official models."""

from __future__ import annotations

import functools
import os

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from builders import official_forward
from reference import official
from test_parallel import free_port, tiny_expert
from tolerance import assert_close_fp32

import wan_lite
from wan_lite import SamplingConfig, parallel, sample
from wan_lite.model import sinusoidal_embedding
from wan_lite.pipeline import calls_per_step, grid, guided_velocity, high_steps, needs_negative_prompt, timesteps
from wan_lite.scheduler import sigma_grid

LATENT = (1, 16, 2, 4, 6)  # (B, C, F, H, W): 12 tokens
LIGHTNING_T = [1000.0, 937.5, float(np.float32(2500 / 3)), 625.0]  # float32 833.3333129882812


def _inputs(text_dim: int):
    g = torch.Generator().manual_seed(11)
    return (torch.randn(LATENT, generator=g), torch.randn(1, 7, text_dim, generator=g),
            torch.randn(1, 5, text_dim, generator=g))


@functools.cache
def _load(path):
    return wan_lite.load_expert(path, dtype=torch.float32)


class Counting:
    """An expert that counts its passes; `.guided` is there (as on residency and parallel experts) and
    fails if the loop calls it."""

    def __init__(self, model):
        self.model, self.calls, self.ts = model, 0, []

    def __call__(self, x, t, context):
        self.calls += 1
        self.ts.append(t.clone())
        return self.model(x, t, context)

    def guided(self, *args):
        raise AssertionError("guidance 1.0 must not go through .guided")


# ---------------------------------------------------------------------------------------------
# the grid


def test_lightning_preset():
    s = SamplingConfig.lightning()
    assert (s.steps, s.shift, s.guidance_high, s.guidance_low, s.solver, s.boundary, s.grid) == \
        (4, 5.0, 1.0, 1.0, "euler", 0.875, "lightning")
    assert SamplingConfig().grid == "official"
    with pytest.raises(ValueError, match="sigma grid"):
        SamplingConfig(grid="karras")


def test_lightning_timesteps_are_floats_from_sigma_one():
    s = SamplingConfig.lightning()
    assert timesteps(s) == LIGHTNING_T
    sigmas, ts = grid(s)
    assert ts.dtype == torch.float32
    assert sigmas.tolist() == [1.0, 0.9375, float(np.float32(5 / 6)), 0.625, 0.0]
    assert high_steps(s) == 2  # 1000, 937.5 >= 875: two high-noise steps, two low-noise steps
    # the official grid for the same settings is unchanged: from 0.999, truncated (what the issue saw)
    assert sigma_grid(4, 5.0)[1].tolist() == [999, 937, 833, 624]
    assert timesteps(SamplingConfig(steps=4, shift=5.0, solver="euler")) == [999, 937, 833, 624]


def test_lightning_grid_is_the_reference_schedulers():
    """Wan2.2-Lightning's EulerScheduler: linspace(1000, 0, n + 1) float32 / 1000, shifted in float32."""
    for steps, shift in ((4, 5.0), (6, 3.0), (8, 8.0)):
        t = torch.from_numpy(np.linspace(1000, 0, steps + 1, dtype=np.float32)) / 1000
        ref = shift * t / (1 + (shift - 1) * t)  # float32 tensor ops, as the reference
        sigmas, ts = grid(SamplingConfig(steps=steps, shift=shift, grid="lightning"))
        assert_close_fp32(sigmas.float(), ref, rtol=1e-6)  # the same float32 formula: rounding apart at most
        assert_close_fp32(ts, (ref * 1000)[:-1], rtol=1e-6)


def test_time_embedding_of_float_timesteps_matches_official(tiny_cfg):
    t = torch.tensor(LIGHTNING_T, dtype=torch.float32)
    ref = official().model.sinusoidal_embedding_1d(tiny_cfg.freq_dim, t).float()
    assert_close_fp32(sinusoidal_embedding(tiny_cfg.freq_dim, t), ref, rtol=1e-6)  # sin / cos of two code paths
    assert not torch.equal(ref[1], official().model.sinusoidal_embedding_1d(tiny_cfg.freq_dim,
                                                                           torch.tensor([937])).float()[0])


# ---------------------------------------------------------------------------------------------
# one pass per step at guidance 1.0


def test_guidance_one_is_one_pass_per_step_and_equals_cond_alone(official_root, tiny_cfg):
    high, low = Counting(_load(official_root.high)), Counting(_load(official_root.low))
    noise, ctx, _ = _inputs(tiny_cfg.text_dim)
    s = SamplingConfig.lightning()
    with torch.no_grad():
        got = sample(high, low, noise, ctx, None, s)  # no negative prompt needed
    assert (high.calls, low.calls) == (2, 2)
    assert [t.tolist() for t in high.ts + low.ts] == [[t] for t in LIGHTNING_T]
    assert all(t.dtype == torch.float32 for t in high.ts + low.ts)
    x = noise.float()  # the cond-only Euler loop, by hand
    sigmas = grid(s)[0].tolist()
    with torch.no_grad():
        for i, t in enumerate(LIGHTNING_T):
            model = high.model if t >= 875 else low.model
            x = x + (sigmas[i + 1] - sigmas[i]) * model(x, torch.tensor([t]), ctx).float()
    assert_close_fp32(got, x)  # the sampler's loop against this one: the same model calls, its own arithmetic


def test_one_expert_at_guidance_one(official_root, tiny_cfg):
    """Guidance 1.0 on the high expert only: one pass there, CFG (two passes) on the low expert."""
    s = SamplingConfig(steps=4, shift=5.0, guidance_high=1.0, guidance_low=3.0, solver="euler", grid="lightning")
    assert (calls_per_step(s, "high"), calls_per_step(s, "low")) == (1, 2)
    assert needs_negative_prompt(s) and not needs_negative_prompt(SamplingConfig.lightning())
    assert needs_negative_prompt(SamplingConfig())
    # all steps on the low expert: the high expert's guidance does not matter
    assert not needs_negative_prompt(SamplingConfig(steps=2, shift=1.0, boundary=1.0, guidance_high=4.0,
                                                    guidance_low=1.0))
    high = Counting(_load(official_root.high))
    low = _load(official_root.low)
    calls = []
    noise, ctx, ctx_null = _inputs(tiny_cfg.text_dim)

    def counted_low(x, t, context):
        calls.append(context is ctx_null)
        return low(x, t, context)

    with torch.no_grad():
        sample(high, counted_low, noise, ctx, ctx_null, s)
    assert high.calls == 2 and calls == [False, True, False, True]
    with pytest.raises(ValueError, match="context_null"):
        sample(high, low, noise, ctx, None, s)
    with pytest.raises(ValueError, match="'high' or 'low'"):
        calls_per_step(s, "both")


def test_guided_velocity_at_one_skips_guided_and_uncond(official_root, tiny_cfg):
    model = Counting(_load(official_root.high))
    x, ctx, _ = _inputs(tiny_cfg.text_dim)
    t = torch.tensor([937.5])
    with torch.no_grad():
        assert torch.equal(guided_velocity(model, x, t, ctx, None, 1.0), model.model(x, t, ctx))
    assert model.calls == 1


def test_lightning_sample_matches_the_reference_loop(official_root, reference_experts, tiny_cfg):
    """Wan2.2-Lightning text2video.py (euler, guide_scale 1.0: cond only) on the official models, one sample:
    float32 timesteps, x += (sigma_next - sigma) * v."""
    noise, ctx, _ = _inputs(tiny_cfg.text_dim)
    t = torch.from_numpy(np.linspace(1000, 0, 5, dtype=np.float32)) / 1000
    sigmas = 5.0 * t / (1 + 4.0 * t)
    ts = (sigmas * 1000)[:-1]
    x = noise.float()
    with torch.no_grad():
        for i, step_t in enumerate(ts):
            model = reference_experts[0] if step_t.item() >= 875 else reference_experts[1]
            v = official_forward(model, x, step_t[None], ctx)
            x = x + (sigmas[i + 1] - sigmas[i]) * v
        got = sample(_load(official_root.high), _load(official_root.low), noise, ctx, None, SamplingConfig.lightning())
    assert_close_fp32(got, x)


# ---------------------------------------------------------------------------------------------
# CFG parallel at guidance 1.0: one pass on every rank


def _cfg_worker(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE="2")
    torch.set_num_threads(1)
    ctx = parallel.setup_from_env("cfg", fsdp=False)
    high, low = parallel.wrap_experts(tiny_expert(11), tiny_expert(12), ctx)
    calls = {"forward": 0, "all_gather": 0}
    forward, gather = parallel.ParallelExpert.forward, dist.all_gather_into_tensor

    def counted_forward(self, *args):
        calls["forward"] += 1
        return forward(self, *args)

    def counted_gather(*args, **kwargs):
        calls["all_gather"] += 1
        return gather(*args, **kwargs)

    parallel.ParallelExpert.forward, parallel.dist.all_gather_into_tensor = counted_forward, counted_gather
    noise, context, _ = _inputs(24)
    with torch.no_grad():
        out = {"sample": sample(high, low, noise, context, None, SamplingConfig.lightning()), "calls": dict(calls)}
        t = torch.tensor([937.5])
        out["guided"] = high.guided(noise, t, context, None, 1.0)
        out["forward"] = high(noise, t, context)
    torch.save(out, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


def test_cfg_parallel_at_guidance_one_runs_one_pass_per_rank(tmp_path):
    mp.spawn(_cfg_worker, args=(free_port(), str(tmp_path)), nprocs=2)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    noise, context, _ = _inputs(24)
    with torch.no_grad():
        want = sample(tiny_expert(11), tiny_expert(12), noise, context, None, SamplingConfig.lightning())
    for out in ranks:
        assert out["calls"] == {"forward": 4, "all_gather": 0}  # 4 steps, one pass each, no CFG exchange
        assert_close_fp32(out["sample"], want)
        assert torch.equal(out["guided"], out["forward"])
