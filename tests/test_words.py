"""One meaning per word: sizes are (width, height) everywhere, `VideoSize` owns the latent shape and the
token count, the quality report says which expert a short denoise leaves out, and both benchmarks build
their random experts with one builder.

Numbers from DESIGN.md ("latent / sequence"): latents (16, (F-1)/4+1, H/8, W/8); tokens
L = F' * H/16 * W/16: 832x480x81 -> 32,760, 1280x720x81 -> 75,600.
"""

from __future__ import annotations

import argparse

import pytest
import torch

from wan_lite.config import ModelConfig, SamplingConfig, VideoSize, parse_size, size_arg
from wan_lite.pipeline import high_steps, timesteps

# ---------------------------------------------------------------------------------------------
# VideoSize and parse_size


@pytest.mark.parametrize("width, height, latent, tokens", [
    (832, 480, (16, 21, 60, 104), 32_760),  # 480p
    (1280, 720, (16, 21, 90, 160), 75_600),  # 720p
    (720, 1280, (16, 21, 160, 90), 75_600),  # portrait: the same tokens, height and width swapped
])
def test_video_size_latents_and_tokens(width, height, latent, tokens):
    video = VideoSize(width, height, 81)
    assert video.size == (width, height)
    assert video.latent_shape() == latent
    assert video.latent_shape(channels=48)[0] == 48
    assert video.tokens() == tokens == video.tokens(ModelConfig.a14b().patch_size)


def test_planner_tokens_is_video_size():
    from wan_lite.planner import make_plan, tokens

    assert tokens(832, 480, 81, ModelConfig.a14b()) == 32_760
    assert make_plan(1000.0, width=1280, height=720, frames=81, device="cpu").tokens == 75_600


@pytest.mark.parametrize("size, frames", [((50, 32), 5), ((48, 40), 5), ((48, 32), 8), ((0, 32), 5),
                                          ((48, -16), 5), ((48, 32), 0), ((48.0, 32), 5)])
def test_video_size_errors_name_the_fix_as_t2v_validate_does(size, frames):
    """The same words as wan_lite.t2v.validate (which is to use VideoSize): the bad value and what to use."""
    from wan_lite.t2v import validate

    with pytest.raises(ValueError) as ours:
        VideoSize.of(size, frames)
    with pytest.raises(ValueError) as theirs:
        validate("a cat", size, frames)
    assert str(ours.value).startswith(str(theirs.value).split(": use")[0])
    if isinstance(size[0], int) and isinstance(size[1], int):
        assert str(ours.value) == str(theirs.value)


def test_video_size_error_examples():
    with pytest.raises(ValueError, match="^width 50 is not a positive multiple of 16: use 48 or 64$"):
        VideoSize(50, 32, 5)
    with pytest.raises(ValueError, match=r"^frames 8 is not of the form 4n\+1: use 5 or 9 \(81 is the official"):
        VideoSize(48, 32, 8)
    with pytest.raises(ValueError, match=r"size must be \(width, height\)"):
        VideoSize.of((48, 32, 5), 5)


def test_parse_size_is_width_first():
    assert parse_size("1280x720") == (1280, 720)
    assert parse_size("832X480") == (832, 480)
    for bad, message in [("big", "is not WIDTHxHEIGHT"), ("1280x720x81", "is not WIDTHxHEIGHT"),
                         ("-16x32", "is not WIDTHxHEIGHT"), ("50x32", "width 50 is not a positive multiple of 16"),
                         ("48x0", "height 0 is not a positive multiple of 16")]:
        with pytest.raises(ValueError, match=message):
            parse_size(bad)


def test_size_arg_shows_the_message_on_the_command_line(capsys):
    p = argparse.ArgumentParser()
    p.add_argument("--size", type=size_arg)
    assert p.parse_args(["--size", "48x32"]).size == (48, 32)
    with pytest.raises(SystemExit):
        p.parse_args(["--size", "50x32"])
    assert "width 50 is not a positive multiple of 16: use 48 or 64" in capsys.readouterr().err


def test_every_size_flag_is_width_by_height(capsys):
    from calib.collect import main as calib_main
    from wan_lite.generate import build_parser
    from wan_lite.quantize import parse_args

    report = ["--report", "--ckpt", "src", "--quantized", "dst"]
    assert parse_args(report).size == (832, 480)
    assert parse_args(report + ["--size", "48x16"]).size == (48, 16)
    gen = ["--ckpt", "x", "--prompt", "a cat", "--out", "v.mp4"]
    assert build_parser().parse_args(gen + ["--size", "48x16"]).size == (48, 16)
    for parse in (lambda a: parse_args(report + a), lambda a: calib_main(["--ckpt", "x", "--out", "y"] + a)):
        with pytest.raises(SystemExit):
            parse(["--size", "48x20"])
        assert "height 20 is not a positive multiple of 16: use 16 or 32" in capsys.readouterr().err


def test_calibration_takes_width_and_height(official_root, monkeypatch):
    """calib.collect.run(size=(W, H)): the noise is (16, F', H/8, W/8) and the settings name width and height."""
    from calib import collect

    seen = {}
    original = collect.collect

    def spy(*args, **kwargs):
        seen["latent_shape"] = kwargs["latent_shape"]
        return original(*args, **kwargs)

    monkeypatch.setattr(collect, "collect", spy)
    _, settings = collect.run(official_root.root, size=(48, 16), frames=5, steps=4, max_prompts=1,
                              dtype=torch.float32, random_context=True, progress=False)
    assert seen["latent_shape"] == (16, 2, 2, 6)
    assert (settings["width"], settings["height"], settings["frames"]) == (48, 16, 5) and "size" not in settings


# ---------------------------------------------------------------------------------------------
# the quality report says what a short denoise covers


@pytest.fixture(scope="module")
def int8_root(tmp_path_factory, official_root):
    from quant.convert import convert_checkpoint

    return convert_checkpoint(official_root.root, tmp_path_factory.mktemp("q") / "int8", "int8", progress=False)


def test_report_notes_the_expert_a_short_denoise_leaves_out(official_root, int8_root):
    from quant.report import format_report, quality_report

    r = quality_report(official_root.root, int8_root, steps=2, size=(48, 16), frames=5, dtype=torch.float32)
    assert (r["width"], r["height"], r["frames"]) == (48, 16, 5) and r["latent_shape"] == [1, 16, 2, 2, 6]
    high, low = r["summary"]["high"], r["summary"]["low"]
    grid = timesteps(SamplingConfig(steps=2))
    assert high["steps"] == 2 and high["timesteps"] == grid and "note" not in high and high["layers"] > 0
    assert low["steps"] == 0 and low["timesteps"] == [] and "mean" not in low and r["layers"]["low"] == {}
    assert "not covered" in low["note"] and "low-noise expert" in low["note"]
    n = int(low["note"].split("--steps ")[1].split()[0])  # the step count the note suggests runs both experts
    assert 0 < high_steps(SamplingConfig(steps=n)) < n and not 0 < high_steps(SamplingConfig(steps=n - 1)) < n - 1
    printed = format_report(r)
    assert low["note"] in printed and "48x16" in printed

    both = quality_report(official_root.root, int8_root, steps=n, size=(48, 16), frames=5, dtype=torch.float32)
    assert all("note" not in s and s["layers"] > 0 for s in both["summary"].values())
    assert both["summary"]["high"]["steps"] + both["summary"]["low"]["steps"] == n
    assert both["summary"]["high"]["timesteps"] + both["summary"]["low"]["timesteps"] == timesteps(
        SamplingConfig(steps=n))


# ---------------------------------------------------------------------------------------------
# the benchmarks: one short grid, one random-expert builder


@pytest.mark.parametrize("steps", [1, 2, 3, 5, 10, 20])
def test_bench_grid_gives_each_expert_steps(steps):
    from wan_lite.bench import bench_sampling

    sampling = bench_sampling(steps)
    assert sampling.steps == 2 * steps and high_steps(sampling) == steps
    assert sampling.boundary == SamplingConfig().boundary and sampling.solver == SamplingConfig().solver


def test_one_random_expert_builder():
    from wan_lite import bench, bench_parallel

    assert bench_parallel.random_expert is bench.random_expert
    cfg = ModelConfig.tiny()
    a = bench.random_expert(cfg, torch.device("cpu"), torch.float32, seed=1)
    b = bench.random_expert(cfg, torch.device("cpu"), torch.float32, seed=1)
    c = bench.random_expert(cfg, torch.device("cpu"), torch.float32, seed=2)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)  # same seed, same values
    w = "blocks.0.ffn.0.weight"
    assert not torch.equal(sa[w], sc[w])
    assert sa[w].std().item() == pytest.approx(cfg.dim**-0.5, rel=0.2)  # fill_random's scale: activations O(1)
    x = torch.randn(1, cfg.in_dim, 2, 4, 4)
    assert torch.isfinite(a(x, torch.tensor([900]), torch.randn(1, 5, cfg.text_dim))).all()
