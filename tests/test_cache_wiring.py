"""Step caching through the residency and the CLI: the residency plans only the computed steps (a skipped
step makes no call), a threshold cache runs unplanned, and the video's metadata records the passes."""

from __future__ import annotations

import pytest
import torch
from builders_t2v import tiny_official_root
from tolerance import assert_close_fp32

from wan_lite.checkpoint import load_expert
from wan_lite.config import SamplingConfig, StepCache
from wan_lite.generate import cache_arg, main
from wan_lite.pipeline import computed_steps, sample
from wan_lite.residency import Residency, host_experts
from wan_lite.video import read_metadata


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tiny_official_root(tmp_path_factory.mktemp("official"))


def _inputs(cfg):
    g = torch.Generator().manual_seed(5)
    return (torch.randn(1, cfg.in_dim, 2, 4, 6, generator=g), torch.randn(1, 7, cfg.text_dim, generator=g),
            torch.randn(1, 3, cfg.text_dim, generator=g))


@pytest.mark.parametrize("cache", [StepCache.half(), StepCache(mode="threshold", threshold=0.5, warmup=1)])
def test_residency_runs_a_cached_schedule_like_the_plain_loop(root, cache):
    sampling = SamplingConfig(steps=8, shift=3.0, cache=cache)
    tmpl, high, low = host_experts(root / "high_noise_model", root / "low_noise_model", dtype=torch.float32)
    res = Residency(tmpl, high, low, device="cpu")
    res.prepare(sampling)
    planned = len(res.placement.calls)
    x, ctx, ctx_null = _inputs(tmpl.cfg)
    stats = {}
    got = sample(res.high, res.low, x, ctx, ctx_null, sampling, stats=stats)
    ref = sample(load_expert(root / "high_noise_model", dtype=torch.float32),
                 load_expert(root / "low_noise_model", dtype=torch.float32), x, ctx, ctx_null, sampling)
    assert_close_fp32(got, ref)
    runs = sum(stats["computed"].values())
    assert runs < sampling.steps
    if cache.mode == "pattern":
        assert planned == runs == sum(computed_steps(sampling))  # one planned call per computed step
    else:
        assert planned == 0  # decided while sampling: unplanned, still correct


def test_cli_step_cache_in_the_metadata(root, tmp_path):
    out = tmp_path / "c.mp4"
    argv = ["--ckpt", str(root), "--prompt", "a fox", "--size", "48x32", "--frames", "5", "--seed", "1", "--steps",
            "8", "--device", "cpu", "--dtype", "fp32", "--vae-tile", "0", "--cache-dir", str(tmp_path / "c"),
            "--step-cache", "50%", "--out", str(out)]
    assert main(argv) == 0
    meta = read_metadata(out)["step_cache"]
    assert meta["mode"] == "pattern" and meta["pattern"] == "50%"
    expected = sum(computed_steps(SamplingConfig(steps=8, cache=StepCache.half())))  # 50% of each expert, rounded up
    assert 4 <= sum(meta["computed"].values()) == expected < 8
    assert meta["passes"] == {k: 2 * v for k, v in meta["computed"].items()}


@pytest.mark.parametrize("value", ["bogus", "150%", "-1", "nan", "50 %"])
def test_cli_bad_step_cache_is_one_line(root, tmp_path, capsys, value):
    with pytest.raises(SystemExit) as e:
        main(["--ckpt", str(root), "--prompt", "a", "--step-cache", value, "--out", str(tmp_path / "x.mp4")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("--step-cache") == 1  # one sentence, the flag named once (by argparse)
    assert err == (f"error: argument --step-cache: {value!r} is not a step cache setting: use off, N% (0% to 100%, "
                   "e.g. 50%), easycache, or a threshold number of 0 or more (e.g. 0.06) (see --help)\n")


def test_step_cache_forms_the_refusal_names():
    assert cache_arg("off") == StepCache()
    assert cache_arg("50%") == StepCache.half()
    assert cache_arg("easycache") == StepCache.easycache()
    assert cache_arg("0.06") == StepCache(mode="threshold", threshold=0.06)
