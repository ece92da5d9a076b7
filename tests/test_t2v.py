"""Text to video end to end on tiny checkpoints of both full layouts: mp4, seeds, metadata, errors, CLI."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from builders import make_checkpoint_root
from builders_t2v import add_t2v_components
from tolerance import assert_close_fp32

import wan_lite.t2v as t2v
from wan_lite.config import ModelConfig, SamplingConfig, StepCache
from wan_lite.generate import build_parser, main, video_defaults
from wan_lite.pipeline import computed_steps, step_experts, timesteps
from wan_lite.t2v import T2VPipeline, check_root
from wan_lite.text import DEFAULT_NEGATIVE_PROMPT, TextEncoder
from wan_lite.video import read_metadata

SIZE, FRAMES, STEPS = (48, 32), 5, 3  # (width, height): latents (1, 16, 2, 4, 6); t = 999, 959 (high), 856 (low)
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def roots(tmp_path_factory):
    cfg = ModelConfig.tiny()
    out = {}
    for layout in ("official", "diffusers"):
        root = make_checkpoint_root(tmp_path_factory.mktemp(layout), cfg, layout).root
        out[layout] = add_t2v_components(root, layout, cfg.text_dim)
    return out


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("text-cache")


def open_pipe(root, cache):
    return T2VPipeline.from_pretrained(root, device="cpu", dtype=torch.float32, text_dtype=torch.float32,
                                       cache_dir=cache)


def read_frames(path) -> tuple[np.ndarray, av.video.stream.VideoStream]:
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        frames = np.stack([f.to_ndarray(format="rgb24") for f in container.decode(stream)])
        return frames, (stream.codec_context.name, stream.average_rate, stream.width, stream.height)


@pytest.mark.parametrize("layout", ["official", "diffusers"])
def test_mp4_from_each_layout(roots, cache, tmp_path, layout):
    pipe = open_pipe(roots[layout], cache)
    assert pipe.layout == layout
    steps_seen = []
    out = tmp_path / "video.mp4"
    result = pipe("a cat walks on the beach", size=SIZE, frames=FRAMES, steps=STEPS, seed=7, out=out,
                  callback=lambda i, n, t, e: steps_seen.append((i, n, e)),
                  extra_metadata={"memory_plan": {"experts": "cpu"}})
    assert steps_seen == [(0, 3, "high"), (1, 3, "high"), (2, 3, "low")]
    assert result.video.shape == (3, FRAMES, SIZE[1], SIZE[0]) and result.latents.shape == (1, 16, 2, 4, 6)
    assert set(result.timings) == {"text", "load", "denoise", "decode", "write"}

    frames, (codec, fps, width, height) = read_frames(out)
    assert frames.shape == (FRAMES, SIZE[1], SIZE[0], 3)
    assert (codec, fps, width, height) == ("h264", 16, SIZE[0], SIZE[1])
    assert not list(tmp_path.glob("*.part"))

    meta, sidecar = read_metadata(out), json.loads((tmp_path / "video.json").read_text(encoding="utf-8"))
    assert meta == sidecar
    expected = {"prompt": "a cat walks on the beach", "negative_prompt": DEFAULT_NEGATIVE_PROMPT, "seed": 7,
                "width": 48, "height": 32, "frames": FRAMES, "steps": STEPS, "shift": 12.0, "guidance_high": 4.0,
                "guidance_low": 3.0, "solver": "unipc", "quantization": "none", "fps": 16, "layout": layout,
                "memory_plan": {"experts": "cpu"}}  # fmt: skip
    assert expected.items() <= meta.items()
    assert meta["wan_lite_version"]


def test_same_seed_same_frames(roots, cache, tmp_path):
    pipe = open_pipe(roots["official"], cache)
    args = dict(size=SIZE, frames=FRAMES, steps=STEPS, seed=3, solver="euler")
    a = pipe("a dog runs in snow", **args, out=tmp_path / "a.mp4")
    calls = pipe.text.encoder_calls
    b = pipe("a dog runs in snow", **args, out=tmp_path / "b.mp4")
    assert torch.equal(a.latents, b.latents) and torch.equal(a.video, b.video)
    assert np.array_equal(read_frames(tmp_path / "a.mp4")[0], read_frames(tmp_path / "b.mp4")[0])
    assert pipe.text.encoder_calls == calls  # the second run read both prompts from the cache
    assert not torch.equal(pipe.noise(3, SIZE, FRAMES), pipe.noise(4, SIZE, FRAMES))
    unseeded = pipe("a dog runs in snow", size=SIZE, frames=FRAMES, steps=1)
    assert isinstance(unseeded.seed, int) and unseeded.params["seed"] == unseeded.seed


def test_noise_is_the_official_draw(roots, cache):
    """wan/text2video.py: torch.randn(16, F', H/8, W/8, dtype=float32, generator=seed_g, device=device)."""
    pipe = open_pipe(roots["official"], cache)
    g = torch.Generator(device="cpu").manual_seed(42)
    expected = torch.randn(16, 2, 4, 6, dtype=torch.float32, generator=g, device="cpu")
    assert torch.equal(pipe.noise(42, SIZE, FRAMES)[0], expected)


@pytest.mark.parametrize("cache", [None, StepCache.half()], ids=["every-step", "step-cache-50%"])
def test_callback_counts_steps_from_zero_on_the_demo_model(tmp_path_factory, cache):
    """The callback as documented (README "Python API", T2VPipeline.__call__, pipeline.sample): step 0 after
    the first step, total - 1 after the last, total = steps, t the step's timestep, steps the step cache
    skips called back too."""
    from app.demo import ensure_demo_checkpoint

    root = ensure_demo_checkpoint(tmp_path_factory.getbasetemp() / "demo-cache")
    pipe = T2VPipeline.from_pretrained(root, device="cpu", dtype=torch.float32, text_dtype=torch.float32,
                                       cache_dir=tmp_path_factory.getbasetemp() / "demo-text")
    steps, calls = 6, []
    result = pipe("a cat walks on the beach", size=(64, 64), frames=5, steps=steps, seed=1, cache=cache,
                  callback=lambda *args: calls.append(args))
    sampling = SamplingConfig(steps=steps, boundary=pipe.boundary, cache=cache or StepCache())
    assert [c[0] for c in calls] == list(range(steps))  # from 0 to steps - 1
    assert {c[1] for c in calls} == {steps}
    assert [c[2] for c in calls] == timesteps(sampling) and calls[0][2] == 999
    assert [c[3] for c in calls] == step_experts(sampling) and {"high", "low"} <= {c[3] for c in calls}
    if cache is not None:  # fewer steps ran the expert than were called back
        assert sum(result.params["step_cache"]["computed"].values()) == sum(computed_steps(sampling)) < steps


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(size=(50, 32)), "width 50 is not a positive multiple of 16: use 48 or 64"),
        (dict(size=(48, 40)), "height 40 is not a positive multiple of 16"),
        (dict(frames=6), r"frames 6 is not of the form 4n\+1: use 5 or 9"),
        (dict(prompt="  \n "), "prompt is empty"),
        (dict(solver="ddim"), "unknown solver 'ddim'"),
        (dict(steps=0), r"^steps 0 must be a whole number from 1 to 200 \(default 40 as official, 4 with the "),
        (dict(shift=0.0), r"^shift 0.0 must be above 0 and at most 100 \(default 12 as official, 5 with the "),
        (dict(vae_tile=40), "vae_tile must be 'auto', None"),
    ],
)
def test_bad_inputs_fail_before_any_work(roots, cache, kwargs, message):
    pipe = open_pipe(roots["official"], cache)
    args = dict(prompt="a cat", size=SIZE, frames=FRAMES, steps=STEPS, seed=0) | kwargs
    with pytest.raises(ValueError, match=message):
        pipe(**args)
    assert pipe.experts is None and pipe.text.model is None and pipe.vae is None


def test_output_not_writable_fails_first(roots, cache, tmp_path):
    pipe = open_pipe(roots["official"], cache)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        pipe("a cat", size=SIZE, frames=FRAMES, steps=STEPS, out=tmp_path / "nope" / "v.mp4")
    with pytest.raises(ValueError, match=r"\.mp4"):
        pipe("a cat", size=SIZE, frames=FRAMES, steps=STEPS, out=tmp_path / "v.avi")
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    if os.access(locked, os.W_OK):  # root ignores permissions
        pytest.skip("running as root: permissions are not enforced")
    with pytest.raises(PermissionError, match="not writable"):
        pipe("a cat", size=SIZE, frames=FRAMES, steps=STEPS, out=locked / "v.mp4")
    assert pipe.experts is None


@pytest.mark.parametrize(
    "layout, remove, message",
    [
        ("official", ["Wan2.1_VAE.pth", "google/umt5-xxl"], "missing Wan2.1_VAE.pth, google/umt5-xxl/"),
        ("diffusers", ["vae", "tokenizer"], "missing tokenizer/, vae/"),
    ],
)
def test_missing_files_listed(roots, tmp_path, layout, remove, message):
    root = tmp_path / layout
    shutil.copytree(roots[layout], root, symlinks=True)
    for name in remove:
        path = root / name
        path.unlink() if path.is_symlink() or path.is_file() else shutil.rmtree(path)
    with pytest.raises(ValueError, match=message):
        check_root(root)
    with pytest.raises(ValueError, match=message):
        open_pipe(root, tmp_path / "cache")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="not a Wan2.2-T2V-A14B root"):
        check_root(tmp_path / "empty")


def test_hub_id_offline_and_network_failure(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match="HF_HUB_OFFLINE is set: download it first"):
        T2VPipeline.from_pretrained("Wan-AI/Wan2.2-T2V-A14B", device="cpu")
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")

    def no_network(**kwargs):
        raise ConnectionError("network unreachable")

    monkeypatch.setattr("huggingface_hub.snapshot_download", no_network)
    with pytest.raises(FileNotFoundError, match="downloading it from the Hugging Face Hub failed .*hf download"):
        T2VPipeline.from_pretrained("Wan-AI/Wan2.2-T2V-A14B", device="cpu")


def test_failure_mid_run_leaves_no_mp4(roots, cache, tmp_path, monkeypatch):
    pipe = open_pipe(roots["official"], cache)
    out = tmp_path / "v.mp4"

    def broken_sample(*args, **kwargs):
        raise RuntimeError("denoising failed")

    with monkeypatch.context() as m:
        m.setattr(t2v, "sample", broken_sample)
        with pytest.raises(RuntimeError, match="denoising failed"):
            pipe("a cat", size=SIZE, frames=FRAMES, steps=STEPS, seed=0, out=out)
    assert list(tmp_path.iterdir()) == []

    frames_written = []
    real = av.VideoFrame.from_ndarray

    def fail_on_third_frame(array, format):
        frames_written.append(1)
        if len(frames_written) == 3:
            raise OSError("disk full")
        return real(array, format=format)

    monkeypatch.setattr(av.VideoFrame, "from_ndarray", fail_on_third_frame)
    with pytest.raises(OSError, match="disk full"):
        pipe("a cat", size=SIZE, frames=FRAMES, steps=STEPS, seed=0, out=out)
    assert list(tmp_path.iterdir()) == []  # neither v.mp4, v.json nor a .part file


def test_cli_end_to_end(roots, cache, tmp_path, capsys):
    out = tmp_path / "cli.mp4"
    argv = ["--ckpt", str(roots["diffusers"]), "--prompt", "a red fox in snow", "--size", "48x32", "--frames", "5",
            "--steps", "2", "--seed", "11", "--device", "cpu", "--dtype", "fp32", "--solver", "euler",
            "--vae-tile", "0", "--cache-dir", str(cache), "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert "expert" in captured.err  # the progress bar names the active expert
    assert "text" in captured.out and "denoise" in captured.out and "decode" in captured.out
    assert "write" in captured.out and "peak RAM" in captured.out
    frames, (_, fps, width, height) = read_frames(out)
    assert frames.shape[0] == 5 and (fps, width, height) == (16, 48, 32)
    assert read_metadata(out)["seed"] == 11 and read_metadata(out)["solver"] == "euler"


def test_cli_shows_no_transformers_loading_bar(roots, tmp_path, capsys):
    """A diffusers root's umt5 encoder loads through transformers inside the run, while the denoise bar is on
    the terminal: transformers' "Loading weights" bar is off for that load (two bars garbled one line), and
    on again after it."""
    from transformers.utils import logging as hf_logging

    argv = ["--ckpt", str(roots["diffusers"]), "--prompt", "a red fox", "--size", "48x32", "--frames", "5",
            "--steps", "1", "--device", "cpu", "--dtype", "fp32", "--cache-dir", str(tmp_path / "fresh-cache"),
            "--out", str(tmp_path / "v.mp4")]
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert "denoise" in err and "Loading weights" not in err
    assert hf_logging.is_progress_bar_enabled()


def test_cli_defaults_to_a_tiny_video_on_a_test_size_model(roots, cache, tmp_path, capsys):
    """Without --size / --frames a test-size model (the tiny roots, like the app's demo) makes 64x64 x 9, not the
    official 1280x720 x 81 (over ten minutes of noise on a CPU), and says so; a given --frames is kept."""
    out = tmp_path / "tiny.mp4"
    argv = ["--ckpt", str(roots["official"]), "--prompt", "a red fox", "--steps", "1", "--device", "cpu",
            "--dtype", "fp32", "--cache-dir", str(cache), "--out", str(out)]
    assert main([*argv, "--frames", "5"]) == 0
    assert "a test-size model (dim " in capsys.readouterr().err
    frames, (_, _, width, height) = read_frames(out)
    assert frames.shape[0] == 5 and (width, height) == (64, 64)
    args = build_parser().parse_args(["--prompt", "p", "--out", "v.mp4"])
    video_defaults(args, ModelConfig.a14b(), say=False)  # a released model keeps the official video
    assert (args.size, args.frames) == ((1280, 720), 81)


def test_the_api_defaults_follow_the_model(roots, cache):
    """The Python API as the CLI: size / frames left out are the experts' `default_video` (a test-size model:
    64x64 x 9); the text encoder picks the CPU where torch has no CUDA, as the pipeline does."""
    pipe = open_pipe(roots["official"], cache)
    result = pipe("a fox", steps=1, seed=0)
    assert tuple(result.video.shape[-2:]) == (64, 64) and result.video.shape[-3] == 9
    assert (result.params["width"], result.params["height"], result.params["frames"]) == (64, 64, 9)
    encoder = TextEncoder.from_pretrained(roots["official"])
    assert encoder.device.type == ("cuda" if torch.cuda.is_available() else "cpu")


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--size", "50x32"], "width 50 is not a positive multiple of 16"),
        (["--frames", "8"], "frames 8 is not of the form 4n+1"),
        (["--prompt", " "], "prompt is empty"),
        (["--solver", "heun"], "unknown solver 'heun'"),
        (["--size", "big"], "is not WIDTHxHEIGHT"),
        (["--out", "/nonexistent-wan-lite/v.mp4"], "output folder /nonexistent-wan-lite does not exist"),
        (["--steps", "0"], "error: steps 0 must be a whole number from 1 to 200 (default 40 as official, 4 with the "
                           "lightning preset)"),
        (["--preset", "lightning", "--steps", "0"], "steps 0 must be a whole number from 1 to 200 (default 40"),
        (["--shift", "0"], "shift 0.0 must be above 0 and at most 100 (default 12 as official"),
        (["--guidance-high", "30"], "guidance_high 30.0 must be from 0 to 20 (default 4 as official, 1 with the "
                                    "lightning preset: 1 turns classifier-free guidance off)"),
    ],
)
def test_cli_user_errors_are_one_line(roots, tmp_path, capsys, extra, message):
    argv = ["--ckpt", str(roots["official"]), "--prompt", "a cat", "--out", str(tmp_path / "v.mp4")] + extra
    code = run_cli(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2 and message in err and "\n" not in err and "Traceback" not in err
    assert not (tmp_path / "v.mp4").exists()


def run_cli(argv) -> int:
    """main()'s exit code, also when argparse rejects an argument (it exits)."""
    try:
        return main(argv)
    except SystemExit as e:
        return e.code


def test_cli_missing_checkpoint_in_a_subprocess(roots, tmp_path):
    """Through `python -m`, as a user runs it: exit code 2, one line, no traceback."""
    root = tmp_path / "root"
    shutil.copytree(roots["official"], root, symlinks=True)
    (root / "Wan2.1_VAE.pth").unlink()
    cmd = [sys.executable, "-m", "wan_lite.generate", "--ckpt", str(root), "--prompt", "a cat",
           "--out", str(tmp_path / "v.mp4")]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=120)
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error")]
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert lines == [f"error: {root} (official layout) is missing Wan2.1_VAE.pth: download them from "
                     f"Wan-AI/Wan2.2-T2V-A14B into {root}"]
    assert not (tmp_path / "v.mp4").exists()


def test_planned_run_goes_through_the_residency(roots, cache, tmp_path):
    """With a plan (what one GPU always has) the experts run from the residency's host buffers: the
    same latents as the plain run, the plan in the metadata, the experts never loaded as modules."""
    plain = open_pipe(roots["official"], cache)
    ref = plain("a dog runs in snow", size=SIZE, frames=FRAMES, steps=STEPS, seed=5)
    pipe = open_pipe(roots["official"], cache)
    plan = pipe.make_plan(SIZE, FRAMES, vram_gb=24)
    result = pipe("a dog runs in snow", size=SIZE, frames=FRAMES, steps=STEPS, seed=5, plan=plan,
                  out=tmp_path / "planned.mp4")
    assert_close_fp32(result.latents, ref.latents)  # residency's flat buffers vs loaded modules
    assert pipe.experts is None and pipe.hosts is not None
    assert result.params["plan"] == plan.to_dict() and read_metadata(tmp_path / "planned.mp4")["plan"]["mode"]
    assert pipe.text.device.type == plan.text_device == "cpu"


def test_planned_run_with_library_quantized_experts_swaps_modules(roots, cache, tmp_path):
    """optimum-quanto experts hold tensor subclasses the residency's flat buffers cannot pack: a
    planned run swaps them as whole modules and gives the latents of the plain run."""
    pytest.importorskip("optimum.quanto")
    from quant.convert import convert_checkpoint

    root = convert_checkpoint(roots["official"], tmp_path / "quanto", "quanto-int8", progress=False)
    plain = open_pipe(root, cache)
    assert plain.quantization == "quanto-int8"
    ref = plain("a dog runs in snow", size=SIZE, frames=FRAMES, steps=STEPS, seed=5)
    pipe = open_pipe(root, cache)
    result = pipe("a dog runs in snow", size=SIZE, frames=FRAMES, steps=STEPS, seed=5,
                  plan=pipe.make_plan(SIZE, FRAMES, vram_gb=24))
    assert_close_fp32(result.latents, ref.latents)  # residency's flat buffers vs loaded modules
    assert pipe.hosts is None and pipe.experts is not None  # swapped as modules, not packed
