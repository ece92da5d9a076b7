"""Step caching in `sample()`: off is today's loop bit for bit; the fixed pattern computes the steps it
names and each expert's first and last; nothing crosses the expert switch; the threshold computes fewer
steps as it grows. Two tiny random experts on the CPU; the cached result's error against the exact one is
measured and printed (`pytest -s`), which says nothing about real video quality."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from builders import random_expert
from tolerance import assert_close_fp32, rel_error

from wan_lite import ModelConfig, SamplingConfig
from wan_lite.config import StepCache
from wan_lite.pipeline import computed_steps, expert_ends, grid, guided_velocity, high_steps, sample, step_experts
from wan_lite.scheduler import UniPC, euler_step

CFG = ModelConfig.tiny()
STEPS = 12  # official grid at shift 12: 8 high-noise steps, then 4 low-noise ones


@pytest.fixture(scope="module")
def experts():
    return random_expert(CFG, 1), random_expert(CFG, 2)


@pytest.fixture(scope="module")
def inputs():
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(1, CFG.in_dim, 2, 4, 6, generator=g)  # (B, C, F, H, W): 12 tokens
    return noise, torch.randn(1, 7, CFG.text_dim, generator=g), torch.randn(1, 3, CFG.text_dim, generator=g)


def sampling(cache: StepCache | None = None, **kw) -> SamplingConfig:
    base = SamplingConfig(steps=STEPS, **kw)
    return base if cache is None else dataclasses.replace(base, cache=cache)


class Counting:
    """An expert that records (expert, t) for every `model(x, t, context)` pass."""

    def __init__(self, model, name: str, log: list):
        self.model, self.name, self.log = model, name, log

    def __call__(self, x, t, context):
        self.log.append((self.name, float(t[0])))
        return self.model(x, t, context)


def run(experts, inputs, s: SamplingConfig):
    """(latents, [(expert, t) per pass], stats) of one `sample` run."""
    log, stats = [], {}
    high, low = (Counting(m, n, log) for m, n in zip(experts, ("high", "low")))
    noise, context, context_null = inputs
    return sample(high, low, noise, context, context_null, s, stats=stats), log, stats


def plain_loop(high, low, noise, context, context_null, s: SamplingConfig) -> torch.Tensor:
    """`sample` as it was before step caching: every step runs its expert."""
    sigmas, timesteps = grid(s)
    unipc = UniPC(sigmas) if s.solver == "unipc" else None
    x = noise.float()
    for i, t in enumerate(timesteps.tolist()):
        model, scale = (high, s.guidance_high) if t >= s.boundary_timestep else (low, s.guidance_low)
        v = guided_velocity(model, x, torch.full((1,), t, dtype=timesteps.dtype), context, context_null, scale)
        x = unipc.step(i, x, v) if unipc else euler_step(x, v, float(sigmas[i]), float(sigmas[i + 1]))
    return x


def steps_of(log) -> list[tuple[str, float]]:
    """The (expert, t) of each computed step from a pass log with two passes (cond, uncond) per step."""
    assert log[::2] == log[1::2]
    return log[::2]


# ---------------------------------------------------------------------------------------------
# off


@pytest.mark.parametrize("solver", ["unipc", "euler"])
def test_off_is_the_plain_loop(experts, inputs, solver):
    exact = plain_loop(*experts, *inputs, sampling(solver=solver))
    default, log, stats = run(experts, inputs, sampling(solver=solver))
    off, _, _ = run(experts, inputs, sampling(StepCache(mode="off"), solver=solver))
    assert torch.equal(default, off)  # the same sampler on the same tensors: off is the default
    assert_close_fp32(off, exact)  # this file's plain loop: another code path, its own arithmetic
    assert len(log) == 2 * STEPS
    n_high = high_steps(sampling())
    assert stats == {"computed_steps": [True] * STEPS, "computed": {"high": n_high, "low": STEPS - n_high},
                     "passes": {"high": 2 * n_high, "low": 2 * (STEPS - n_high)}}


# ---------------------------------------------------------------------------------------------
# the fixed pattern


def test_half_pattern_computes_half_of_each_expert_with_its_ends(experts, inputs):
    s = sampling(StepCache.half())
    _, log, stats = run(experts, inputs, s)
    ts, names = timesteps_and_experts(s)
    n_high = high_steps(s)
    assert (n_high, STEPS - n_high) == (8, 4)
    expected = [0, 2, 5, 7, 8, 11]  # high: 4 of 8 (steps 0-7), low: 2 of 4 (steps 8-11)
    assert [i for i, c in enumerate(computed_steps(s)) if c] == expected
    assert steps_of(log) == [(names[i], ts[i]) for i in expected]  # no pass at a skipped step
    assert all(("high" if t >= s.boundary_timestep else "low") == e for e, t in log)
    assert {0, 7, 8, 11} <= set(expected) and expert_ends(s) == {0, 7, 8, 11}
    assert stats["computed"] == {"high": 4, "low": 2} and stats["passes"] == {"high": 8, "low": 4}
    assert stats["computed_steps"] == computed_steps(s)


def timesteps_and_experts(s: SamplingConfig):
    return [float(t) for t in grid(s)[1]], step_experts(s)


def test_half_pattern_on_the_official_40_steps():
    s = SamplingConfig(cache=StepCache.half())
    computed = computed_steps(s)
    high = [i for i in range(26) if computed[i]]
    low = [i for i in range(26, 40) if computed[i]]
    assert high_steps(s) == 26 and len(high) == 13 and len(low) == 7 and sum(computed) == 20
    assert {0, 25} <= set(high) and {26, 39} <= set(low)
    gaps = [b - a for run in (high, low) for a, b in zip(run, run[1:])]
    assert set(gaps) <= {2, 3}  # at most two skipped steps in a row


@pytest.mark.parametrize(("pattern", "per_expert"), [("100%", (8, 4)), ("0%", (2, 2)), ("30%", (3, 2))])
def test_percentages(pattern, per_expert):
    computed = computed_steps(sampling(StepCache(mode="pattern", pattern=pattern)))
    assert (sum(computed[:8]), sum(computed[8:])) == per_expert
    assert all(computed[i] for i in (0, 7, 8, 11))


def test_explicit_pattern_runs_exactly_those_steps(experts, inputs):
    s = sampling(StepCache(mode="pattern", pattern=[0, 3, 7, 8, 11]))
    _, log, stats = run(experts, inputs, s)
    ts, names = timesteps_and_experts(s)
    assert steps_of(log) == [(names[i], ts[i]) for i in (0, 3, 7, 8, 11)]
    assert stats["computed"] == {"high": 3, "low": 2}


def test_explicit_pattern_must_hold_each_experts_ends():
    with pytest.raises(ValueError, match=r"leaves out step\(s\) \[8\].*add them"):
        computed_steps(sampling(StepCache(mode="pattern", pattern=(0, 2, 7, 11))))
    with pytest.raises(ValueError, match="names step 12, but there are 12 steps"):
        computed_steps(sampling(StepCache(mode="pattern", pattern=(0, 7, 8, 11, 12))))


def test_guidance_one_and_lightning():
    """One pass per step at guidance 1.0; the 4 Lightning steps are all expert ends, so all run."""
    light = dataclasses.replace(SamplingConfig.lightning(), cache=StepCache.half())
    assert computed_steps(light) == [True] * 4


def test_skipped_step_reuses_v_minus_x_of_its_own_expert(inputs):
    """Experts whose velocity is x + c (c differs per expert and per pass): v - x is constant over the
    steps, so reusing it (EasyCache's transformation vector) is exact, while reusing v would not be, and a
    high-noise vector used at a low-noise step would be off by c_high - c_low."""
    noise, context, context_null = inputs

    def offset(c_cond, c_uncond):
        return lambda x, t, ctx: x + (c_cond if ctx is context else c_uncond)

    high, low = offset(1.0, -0.5), offset(-2.0, 0.25)
    for solver in ("euler", "unipc"):
        exact = sample(high, low, noise, context, context_null, sampling(solver=solver))
        stats = {}
        cached = sample(high, low, noise, context, context_null, sampling(StepCache.half(), solver=solver),
                        stats=stats)
        assert sum(stats["computed_steps"]) == 6
        assert_close_fp32(cached, exact)


# ---------------------------------------------------------------------------------------------
# the threshold


def test_threshold_is_not_plannable():
    with pytest.raises(ValueError, match="run the residency without a step plan"):
        computed_steps(sampling(StepCache.easycache()))


def test_threshold_zero_computes_every_step(experts, inputs):
    exact = plain_loop(*experts, *inputs, sampling())
    latents, log, stats = run(experts, inputs, sampling(StepCache(mode="threshold", threshold=0.0, warmup=0)))
    assert len(log) == 2 * STEPS and stats["computed_steps"] == [True] * STEPS
    assert_close_fp32(latents, exact)


def test_threshold_skips_more_as_it_grows(experts, inputs):
    counts = []
    for threshold in (0.0, 0.05, 0.2, 0.5, 2.0, 1e9):
        _, log, stats = run(experts, inputs, sampling(StepCache(mode="threshold", threshold=threshold, warmup=0)))
        assert len(log) == 2 * sum(stats["computed_steps"])
        counts.append(sum(stats["computed_steps"]))
    print(f"\ncomputed steps of {STEPS} at thresholds 0, 0.05, 0.2, 0.5, 2, 1e9: {counts}")
    assert counts == sorted(counts, reverse=True) and counts[0] == STEPS and counts[-1] < counts[0]


def test_threshold_starts_afresh_at_the_switch(experts, inputs):
    """With no limit, each expert computes its first step, its second (the change rate needs two computed
    steps: none is carried over from the other expert) and its last."""
    _, log, stats = run(experts, inputs, sampling(StepCache(mode="threshold", threshold=1e9, warmup=0)))
    assert [i for i, c in enumerate(stats["computed_steps"]) if c] == [0, 1, 7, 8, 9, 11]
    _, _, stats = run(experts, inputs, sampling(StepCache(mode="threshold", threshold=1e9, warmup=5)))
    assert [i for i, c in enumerate(stats["computed_steps"]) if c] == [0, 1, 2, 3, 4, 7, 8, 9, 11]


# ---------------------------------------------------------------------------------------------
# the error of the cached result on the tiny random model (reported, not a quality claim)


def test_cached_error_on_the_tiny_random_model(experts, inputs):
    exact = plain_loop(*experts, *inputs, sampling())
    rows = []
    for cache in (StepCache.half(), StepCache(mode="threshold", threshold=0.2, warmup=0),
                  StepCache(mode="threshold", threshold=0.5, warmup=0)):
        latents, _, stats = run(experts, inputs, sampling(cache))
        err = rel_error(latents, exact)
        assert math.isfinite(err) and (err > 0) == (not all(stats["computed_steps"]))
        rows.append(f"{cache.mode} {cache.pattern if cache.mode == 'pattern' else cache.threshold}: "
                    f"{sum(stats['computed_steps'])}/{STEPS} steps, relative error {err:.3g}")
    print("\n" + "\n".join(rows))


# ---------------------------------------------------------------------------------------------
# the config


@pytest.mark.parametrize(("kw", "message"), [
    (dict(mode="sometimes"), "unknown step cache mode"),
    (dict(threshold=-0.1), "threshold must be >= 0"),
    (dict(warmup=-1), "warmup must be a whole number"),
    (dict(pattern="50"), "not a percentage"),
    (dict(pattern="150%"), "not a percentage"),
    (dict(pattern=(0, -1)), "0-based step indices"),
])
def test_bad_settings_name_the_fix(kw, message):
    with pytest.raises(ValueError, match=message):
        StepCache(**kw)


def test_defaults_are_off():
    assert SamplingConfig().cache == StepCache() and StepCache().mode == "off"
    assert StepCache(mode="pattern", pattern=[7, 0, 3]).pattern == (0, 3, 7)  # hashable, sorted


def test_bench_totals_the_50_percent_cache_from_the_computed_steps():
    """bench's 40-step totals: 26 + 14 steps without a cache, and with StepCache.half() exactly the steps
    `computed_steps` runs (13 high + 7 low); skipped steps add nothing."""
    from wan_lite.bench import extrapolate

    out = extrapolate(high_s=2.0, low_s=1.0, stall_s=0.5)
    assert (out["steps_high"], out["steps_low"], out["denoise_total_s"]) == (26, 14, 26 * 2.0 + 14 * 1.0 + 0.5)
    assert (out["cache50_steps_high"], out["cache50_steps_low"]) == (13, 7)
    assert out["cache50_denoise_total_s"] == 13 * 2.0 + 7 * 1.0 + 0.5
