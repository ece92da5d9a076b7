"""The app's handlers on the built-in demo model, without a browser (tests/test_app_browser.py drives the page).

One module-scoped app generates one real video (64x64, 9 frames, 8 steps); the other tests check input
validation, the queue, cancel (while queued, denoising and decoding), decode progress, the live preview,
presets, LoRAs, exact attention, out-of-memory and missing-file messages, the gallery and the path checks.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import threading
import time
from pathlib import Path

import av
import gradio as gr
import numpy as np
import pytest
import torch

from app import demo
from app.__main__ import main
from app.handlers import DEMO_SIZE_PRESETS, MAX_FRAMES, App, Settings
from app.jobs import Job, decoder_calls, watch_decode
from app.options import PRESETS
from app.preview import WAN21_RGB_BIAS, WAN21_RGB_FACTORS, Preview, latent_to_rgb
from app.ui import build_ui
from wan_lite import planner
from wan_lite.config import SamplingConfig
from wan_lite.t2v import T2VPipeline, check_root
from wan_lite.vae import VAE


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def demo_app(tmp_path_factory, cache):
    return App(tmp_path_factory.mktemp("outputs"), cache_dir=cache, device="cpu")


def tiny_settings(**changes) -> Settings:
    s = dataclasses.replace(Settings.defaults(is_demo=True), prompt="a red cat walks on the beach", frames=9, steps=4,
                            random_seed=False, seed=123)
    return dataclasses.replace(s, **changes)


@pytest.fixture(scope="module")
def first_run(demo_app):
    calls = []
    update = demo_app.generate(tiny_settings(steps=8), session="first", progress=lambda *a, **k: calls.append((a, k)))
    return update, calls


def count_frames(path) -> int:
    with av.open(str(path)) as container:
        return sum(1 for _ in container.decode(video=0))


def mp4s(folder: Path) -> set[str]:
    return {p.name for p in folder.glob("*.mp4")}


def run_in_thread(app: App, s: Settings, session: str):
    """Start app.generate in a thread; returns (thread, box) where box gets 'update' or 'error'."""
    box = {}

    def target():
        try:
            box["update"] = app.generate(s, session=session)
        except Exception as e:  # noqa: BLE001 - handed to the test
            box["error"] = e

    thread = threading.Thread(target=target)
    thread.start()
    return thread, box


def wait_for(predicate, timeout=60.0):
    end = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.01)


# ---------------------------------------------------------------------------------------------------
# demo model


def test_demo_checkpoint_is_a_complete_root(demo_app, cache):
    root = demo.ensure_demo_checkpoint(cache)
    assert demo.ensure_demo_checkpoint(cache) == root  # built once
    assert check_root(root) == "diffusers"
    assert demo.is_demo(root) and demo_app.is_demo
    assert "Demo model" in demo_app.banner() and "python -m app --ckpt" in demo_app.banner()
    assert "base_dim 16" in demo_app.banner()  # the shrunk VAE is said


def test_building_the_demo_draws_no_progress_bar(tmp_path, capfd):
    """The app's first start builds the demo: transformers' "Writing model shards" bar is not printed
    above the app's own lines."""
    demo.ensure_demo_checkpoint(tmp_path)
    out, err = capfd.readouterr()
    assert "Writing model shards" not in out + err and "it/s]" not in out + err


# ---------------------------------------------------------------------------------------------------
# a run


def test_generate_writes_the_video(first_run, demo_app):
    update, _ = first_run
    assert update.status.startswith("Done") and "seed 123" in update.status
    path = Path(update.video)
    assert path.parent == demo_app.outputs and path.suffix == ".mp4"
    assert count_frames(path) == 9
    assert update.seed == 123
    assert update.params == json.loads(path.with_suffix(".json").read_text())
    assert update.params["seed"] == 123 and update.params["frames"] == 9
    assert (update.params["width"], update.params["height"]) == (64, 64)
    assert update.params["vram_profile"] == "auto"


def test_progress_names_the_phase(first_run):
    _, calls = first_run
    descs = [k["desc"] for _, k in calls]
    denoise = [a[0] for (a, k) in calls if "frame" not in k["desc"]]
    decode = [a[0] for (a, k) in calls if "frame" in k["desc"]]
    assert denoise[0] == (0, 8) and denoise[-1] == (8, 8)  # with shift 12: 6 high-noise steps, 2 low-noise
    assert denoise == sorted(denoise)
    assert descs[0].startswith("encoding the prompt")
    assert any(d.startswith("high-noise expert 1/6") for d in descs)
    assert any(d.startswith("low-noise expert 1/2") for d in descs)
    # the decode has its own progress: 9 frames are 3 latent frames, one decoder call each (untiled on a CPU)
    assert decode[0] == (0, 3) and decode[-1] == (3, 3) and decode == sorted(decode)
    assert descs[-1].startswith("decoding the video (VAE) frame 3/3")
    assert all("ETA" in d and "peak VRAM" in d for d in descs)


def test_eta_includes_the_decode(first_run, demo_app):
    """After a run the app knows its decode rate: the next run's ETA counts the decode in."""
    assert demo_app.decode_rate is not None and demo_app.decode_rate > 0
    calls = []
    demo_app.generate(tiny_settings(steps=3), session="eta", progress=lambda *a, **k: calls.append(k["desc"]))
    assert any("incl. ~" in d and "VAE decode" in d for d in calls if d.startswith("high-noise expert 2/"))
    job = Job("j", steps=10, high_steps=6, decode_estimate=30.0)
    job.first_step_at, job.done_steps, job.expert = time.monotonic() - 9.0, 10 - 1, "low"  # ~1 s per step
    assert job.eta().startswith("ETA 0:3") and job.eta().endswith("(incl. ~0:30 VAE decode)")  # 1 step + 30 s


def test_random_seed_is_reported(demo_app):
    update = demo_app.generate(tiny_settings(random_seed=True, seed=0, steps=1, frames=1), session="random")
    assert update.seed == update.params["seed"] and f"seed {update.seed}" in update.status
    assert count_frames(update.video) == 1


@pytest.mark.parametrize("changes, message", [
    (dict(prompt="   "), "prompt is empty"),
    (dict(frames=10), r"4n\+1 \(1, 5, 9, \.\.\., 161\)"),
    (dict(frames=MAX_FRAMES + 4), "161"),
    (dict(preset="turbo"), "Preset"),
    (dict(lora_high=["x.safetensors"]), "--loras DIR"),
    (dict(lora_low_strength=9.0), "Low-noise LoRA strength"),
    (dict(size="1280x720 (720p landscape)"), "not offered for this model"),
    (dict(steps=0), r"Steps 0 must be a whole number from 1 to 200 \(default 40 as official, 4 with the lightning"),
    (dict(guidance_high=-1.0), "High-noise guidance"),
    (dict(shift=0.0), "Shift"),
    (dict(solver="ddim"), "unknown"),
    (dict(seed=-5), "Seed -5"),
    (dict(seed=None), "random seed"),
    (dict(vram_profile="3 GB"), "VRAM profile"),
    (dict(quantization="int8"), "stored as bf16.*python -m wan_lite.quantize"),
])  # fmt: skip
def test_bad_input_is_a_clear_message(demo_app, changes, message):
    before = mp4s(demo_app.outputs)
    with pytest.raises(gr.Error, match=message) as info:
        demo_app.generate(tiny_settings(**changes), session="bad")
    assert info.value.print_exception is False  # no traceback in the terminal
    assert mp4s(demo_app.outputs) == before and not demo_app.jobs
    assert demo_app.status("bad").startswith("Not started: ")


@pytest.mark.parametrize("field, flag, value", [("steps", "--steps", 0), ("steps", "--steps", 201),
                                                ("shift", "--shift", 0.0), ("guidance_high", "--guidance-high", 21.0),
                                                ("guidance_low", "--guidance-low", -1.0)])
def test_sampling_refusals_say_what_the_cli_says(demo_app, field, flag, value):
    from wan_lite.generate import build_parser, sampling_from_args

    with pytest.raises(ValueError) as cli:
        sampling_from_args(build_parser().parse_args(["--out", "v.mp4", flag, str(value)]))
    with pytest.raises(gr.Error) as app:
        demo_app.generate(tiny_settings(**{field: value}), session="bad")
    said = str(cli.value)
    assert said.startswith(f"{field} {value} must be ") and "(default " in said  # the range, then the default
    label = {"steps": "Steps", "shift": "Shift", "guidance_high": "High-noise guidance",
             "guidance_low": "Low-noise guidance"}[field]
    assert app.value.message == f"{label}{said.removeprefix(field)}."  # the same words, under the app's label


# ---------------------------------------------------------------------------------------------------
# cancel, one run at a time, out of memory


def test_cancel_stops_after_the_current_step(demo_app):
    assert demo_app.cancel("c") == "No run in progress."
    before = mp4s(demo_app.outputs)
    thread, box = run_in_thread(demo_app, tiny_settings(steps=200, seed=7), "c")
    wait_for(lambda: "c" in demo_app.jobs and demo_app.jobs["c"].done_steps >= 1)
    assert demo_app.status("c").startswith("high-noise expert")
    assert demo_app.cancel("c").startswith("Cancelling: stops after the current step")
    thread.join(60)
    status = box["update"].status
    assert status.startswith("Cancelled after step") and "nothing written, memory freed" in status
    assert int(status.split("step ")[1].split("/")[0]) < 200
    assert box["update"].video is None and mp4s(demo_app.outputs) == before
    assert not demo_app.jobs and not demo_app.line.busy()  # the GPU is free again
    assert demo_app.status("c") == status and demo_app.status("c") is None  # sent once


def test_cancel_during_the_decode_writes_nothing(demo_app):
    """Cancel between two decoded frames: the run stops there and no mp4 / sidecar is written."""
    before = set(demo_app.outputs.iterdir())
    answers = []

    def progress(position, desc):  # runs in the run's thread: press Cancel once the second frame is decoding
        if desc.startswith("decoding the video (VAE) frame 1/") and not answers:
            answers.append(demo_app.cancel("dec"))

    update = demo_app.generate(tiny_settings(steps=2, frames=21), session="dec", progress=progress)
    assert answers == ["Cancelling: stops before the next decoded frame; nothing is written."]
    assert update.status.startswith("Cancelled during the VAE decode (frame 1/6)") and update.video is None
    assert set(demo_app.outputs.iterdir()) == before  # no mp4, no sidecar, no temporary file
    assert not demo_app.line.busy()


def test_a_second_run_queues_with_its_position(demo_app):
    """A run waits its turn (here behind a run that holds the GPU) and says where it stands."""
    holder = Job("holder", steps=1, high_steps=1)
    assert demo_app.line.enter(holder)
    try:
        thread, box = run_in_thread(demo_app, tiny_settings(steps=1, frames=1), "w")
        wait_for(lambda: "w" in demo_app.jobs and demo_app.jobs["w"].ahead == 1)
        assert demo_app.status("w") == "queued: position 1 (waiting for the run ahead) · Cancel leaves the queue"
        time.sleep(0.3)
        assert demo_app.jobs["w"].done_steps == 0 and "update" not in box
    finally:
        demo_app.line.leave(holder)
    thread.join(60)
    assert box["update"].status.startswith("Done")


def test_the_line_is_first_come_first_served():
    from app.jobs import GpuLine

    line, order = GpuLine(), []
    first = Job("a", 1, 1)
    assert line.enter(first)
    jobs = [Job(name, 1, 1) for name in "bcd"]
    threads = []
    for job in jobs:
        threads.append(threading.Thread(target=lambda j=job: (line.enter(j), order.append(j.session), line.leave(j))))
        threads[-1].start()
        wait_for(lambda j=job: j.ahead > 0)
    assert [j.ahead for j in jobs] == [1, 2, 3]
    line.leave(first)
    for t in threads:
        t.join(10)
    assert order == ["b", "c", "d"] and not line.busy()


def test_cancel_while_queued(demo_app):
    holder = Job("holder", steps=1, high_steps=1)
    assert demo_app.line.enter(holder)
    try:
        thread, box = run_in_thread(demo_app, tiny_settings(), "q")
        wait_for(lambda: "q" in demo_app.jobs and demo_app.jobs["q"].ahead == 1)
        assert demo_app.cancel("q") == "Cancelling: leaving the queue."
        thread.join(10)
    finally:
        demo_app.line.leave(holder)
    assert box["update"].status == "Cancelled before it started."


def test_out_of_memory_names_the_setting_to_change(demo_app, monkeypatch):
    def oom(self, *args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(T2VPipeline, "__call__", oom)
    with pytest.raises(gr.Error) as info:
        demo_app.generate(tiny_settings(), session="oom")
    message = info.value.message
    for words in ("Out of GPU memory", "lower VRAM profile", "smaller size", "fewer frames", "64x64 (demo)"):
        assert words in message
    assert info.value.print_exception is False
    assert not demo_app.line.busy()  # the app can run again
    assert demo_app.status("oom").startswith("Failed: Out of GPU memory")


def test_pipeline_error_is_shown_and_the_app_keeps_running(demo_app, monkeypatch):
    def broken(self, *args, **kwargs):
        raise FileNotFoundError("no VAE in /models/x: expected Wan2.1_VAE.pth")

    monkeypatch.setattr(T2VPipeline, "__call__", broken)
    with pytest.raises(gr.Error, match="no VAE in /models/x"):
        demo_app.generate(tiny_settings(), session="broken")
    assert not demo_app.jobs and not demo_app.line.busy()


# ---------------------------------------------------------------------------------------------------
# model folders


def test_missing_files_are_named(demo_app, tmp_path, cache):
    loaded = demo_app.pipe.root
    with pytest.raises(gr.Error, match="No folder"):
        demo_app.load_model(tmp_path / "nowhere")
    with pytest.raises(gr.Error, match="Choose a model folder"):
        demo_app.load_model("  ")
    broken = Path(shutil.copytree(demo.demo_root(cache), tmp_path / "broken"))
    shutil.rmtree(broken / "vae")
    with pytest.raises(gr.Error, match="missing vae/"):
        demo_app.load_model(broken)
    with pytest.raises(gr.Error, match="not a Wan2.2-T2V-A14B root"):
        demo_app.load_model(tmp_path)
    assert demo_app.pipe.root == loaded  # the loaded model stays
    assert str(loaded) in demo_app.model_roots()


def test_load_another_root(tmp_path, cache):
    app = App(tmp_path / "out", cache_dir=cache, device="cpu")
    copy = Path(shutil.copytree(demo.demo_root(cache), tmp_path / "copy"))
    assert "Demo model" in app.load_model(copy)
    assert app.pipe.root == copy


def test_a_quantized_copy_of_the_demo_is_named_by_its_folder(tmp_path, cache):
    """`python -m wan_lite.quantize` links the demo's marker file into its copy; the copy is not "the
    built-in model" of the banner ("No checkpoint was given"): it is named by its folder and weights, and
    keeps the demo's small sizes (a test-size model)."""
    from quant.convert import convert_checkpoint

    quantized = convert_checkpoint(demo.ensure_demo_checkpoint(cache), tmp_path / "demo-int8", "int8", progress=False)
    assert demo.is_demo(quantized)  # the marker came along
    app = App(tmp_path / "out", cache_dir=cache, device="cpu")
    banner = app.load_model(quantized)
    assert "Demo model" not in banner and str(quantized) in banner and "int8" in banner
    assert "test-size model" in banner  # why only the demo sizes are offered
    assert not app.is_demo and app.size_presets() == DEMO_SIZE_PRESETS


def test_share_allows_only_listed_roots(tmp_path, cache):
    app = App(tmp_path / "out", cache_dir=cache, device="cpu", share=True)
    copy = Path(shutil.copytree(demo.demo_root(cache), tmp_path / "copy"))
    with pytest.raises(gr.Error, match="only the listed model folders"):
        app.load_model(copy)


# ---------------------------------------------------------------------------------------------------
# outputs: gallery, path checks, remembered settings


def test_gallery_reads_the_sidecars(first_run, demo_app):
    update, _ = first_run
    items = dict(demo_app.gallery())
    assert update.video in items
    assert items[update.video] == "a red cat walks on the beach · seed 123"
    path, params = demo_app.open_output(Path(update.video).name)
    assert path == update.video and params == update.params


def test_gallery_without_sidecar(tmp_path, cache):
    app = App(tmp_path / "out", cache_dir=cache, device="cpu")
    (app.outputs / "other.mp4").write_bytes(b"")
    assert app.gallery() == [(str(app.outputs / "other.mp4"), "(no parameters file)")]
    assert app.open_output("other.mp4")[1] == {}


@pytest.mark.parametrize("name", ["../secret.mp4", "/etc/passwd", "settings.json", "sub/../../secret.mp4",
                                  "..", "", "link.mp4"])
def test_paths_outside_outputs_are_refused(demo_app, tmp_path, name):
    outside = tmp_path / "secret.mp4"
    outside.write_bytes(b"not yours")
    link = demo_app.outputs / "link.mp4"
    if not link.is_symlink():
        os.symlink(outside, link)
    with pytest.raises(gr.Error, match="Only videos in the outputs folder"):
        demo_app.open_output(name)


def test_missing_output_is_a_clear_message(demo_app):
    with pytest.raises(gr.Error, match="no longer in the outputs folder"):
        demo_app.open_output("gone.mp4")


def test_settings_are_remembered(first_run, demo_app, tmp_path, cache):
    stored = json.loads((demo_app.outputs / "settings.json").read_text())
    assert stored["prompt"] == "a red cat walks on the beach"
    again = App(demo_app.outputs, cache_dir=cache, device="cpu").settings()
    assert again.prompt == stored["prompt"] and again.seed == stored["seed"]
    # settings from a real model do not carry a size the demo cannot make
    other = App(tmp_path / "out", cache_dir=cache, device="cpu")
    (other.outputs / "settings.json").write_text(json.dumps({"size": "1280x720 (720p landscape)", "frames": 81,
                                                             "prompt": "kept"}))
    s = other.settings()
    assert (s.size, s.frames, s.prompt) == ("64x64 (demo)", 9, "kept")
    (other.outputs / "settings.json").write_text("{broken")
    assert other.settings() == Settings.defaults(is_demo=True)


def test_memory_plan_is_shown(demo_app):
    assert "Memory plan" in demo_app.plan(tiny_settings(vram_profile="auto"))
    text = demo_app.plan(tiny_settings(vram_profile="24 GB"))
    assert text.startswith("Sampler: official preset, official grid · 4 steps unipc · shift 12.0 · guidance 4.0 / 3.0")
    assert "\nMemory plan" in text and "24" in text


# ---------------------------------------------------------------------------------------------------
# decode progress and the live preview


@pytest.mark.parametrize("tile", [None, 64, 96])
def test_decoder_calls_are_counted_as_diffusers_makes_them(demo_app, tile):
    """The decode's total (latent frames x tiles) equals the decoder calls diffusers really makes."""
    vae = VAE.from_pretrained(demo_app.pipe.model.vae, device="cpu")
    latents = torch.randn(1, 16, 2, 12, 16)  # 128x96 pixels: 2x3 tiles of 64, 2x2 of 96 (stride 3/4 of a tile)
    seen = []
    with watch_decode(vae.model, tuple(latents.shape), lambda done, total: seen.append((done, total))):
        vae.decode(latents, tile=tile)
    calls = {None: 2, 64: 2 * 2 * 3, 96: 2 * 2 * 2}[tile]
    assert seen[-1] == (calls, calls) and decoder_calls(vae.model, tuple(latents.shape)) == calls
    assert [done for done, _ in seen] == sorted(done for done, _ in seen)
    assert not vae.model.decoder._forward_pre_hooks and not vae.model.decoder._forward_hooks  # removed


def test_latent_to_rgb_uses_the_wan21_factors():
    z = torch.zeros(1, 16, 5, 2, 3)
    z[0, 2, :, 0, 0] = 1.0  # channel 2 alone at one latent pixel
    picture = latent_to_rgb(z, frames=4)
    k = 96 // 2  # enlarged to about 96 pixels high
    assert picture.shape == (2 * k, 4 * 3 * k, 3) and picture.dtype == np.uint8
    bias, factors = torch.tensor(WAN21_RGB_BIAS), torch.tensor(WAN21_RGB_FACTORS)
    expected = ((torch.stack([bias + factors[2], bias]) + 1) / 2 * 255).round().to(torch.uint8).numpy()
    assert (picture[0, 0] == expected[0]).all() and (picture[0, k] == expected[1]).all()
    with pytest.raises(ValueError, match=r"\(B, 16"):
        latent_to_rgb(torch.zeros(1, 48, 1, 2, 2))


def test_preview_shows_the_denoised_estimate():
    """With the Euler step x' = x + (s' - s) v, the estimate is exactly x - s v (the model's x0)."""
    grid = torch.tensor([1.0, 0.9, 0.6, 0.3, 0.0])
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(1, 16, 2, 3, 4, generator=g), torch.randn(1, 16, 2, 3, 4, generator=g)
    preview, x = Preview(grid), noise
    for i in range(4):
        v = noise - x0 + 0.1 * i  # a velocity that changes from step to step
        after = x + (grid[i + 1] - grid[i]) * v
        estimate = preview.estimate(after)
        if i == 0:
            assert torch.equal(estimate, after)  # nothing before the first step: the latents themselves
        else:
            assert torch.allclose(estimate, x - grid[i] * v, atol=1e-5)
        x = after
    assert torch.equal(estimate, x)  # sigma 0 at the end: the latents are the estimate


def test_the_preview_follows_the_run(demo_app):
    pictures = []

    def progress(position, desc):
        picture = demo_app.preview("pv")
        if picture is not None:
            pictures.append(picture)

    demo_app.generate(tiny_settings(steps=4, frames=9), session="pv", progress=progress)
    assert len(pictures) >= 3  # a new picture at (nearly) every step, each handed out once
    assert all(p.shape == pictures[0].shape and p.shape[2] == 3 and p.dtype == np.uint8 for p in pictures)
    assert any(not np.array_equal(a, b) for a, b in zip(pictures, pictures[1:]))


# ---------------------------------------------------------------------------------------------------
# what the menus offer: quantization, presets, LoRAs, exact attention


def test_quantization_offers_what_the_model_runs(demo_app, monkeypatch):
    assert demo_app.quant_choices() == ["auto", "bf16"]  # a float root
    demo_app.validate(tiny_settings(quantization="bf16"))
    with pytest.raises(gr.Error, match="stored as bf16"):
        demo_app.validate(tiny_settings(quantization="fp8"))
    monkeypatch.setattr(T2VPipeline, "scheme", property(lambda self: "int8"))  # as an int8 root reads
    assert demo_app.quant_choices() == ["auto", "int8"]
    with pytest.raises(gr.Error, match="stored as int8"):
        demo_app.validate(tiny_settings(quantization="bf16"))


def test_remembered_settings_fit_the_model(tmp_path, cache):
    app = App(tmp_path / "out", cache_dir=cache, device="cpu")
    (app.outputs / "settings.json").write_text(json.dumps({"quantization": "int8", "preset": "turbo",
                                                           "lora_high": ["gone.safetensors"], "prompt": "kept"}))
    s = app.settings()
    assert (s.quantization, s.preset, s.lora_high, s.prompt) == ("auto", "official", [], "kept")


def test_presets_fill_the_sampler():
    assert PRESETS["official"].fills() == dict(steps=40, shift=12.0, guidance_high=4.0, guidance_low=3.0,
                                               solver="unipc")
    lightning = SamplingConfig.lightning()
    assert PRESETS["lightning"].fills() == dict(steps=4, shift=lightning.shift, guidance_high=1.0, guidance_low=1.0,
                                                solver="euler")
    assert PRESETS["lightning"].sampling.grid == "lightning"


def write_attention_lora(path: Path, dim: int, rank: int = 4) -> Path:
    """A ComfyUI-style LoRA on the first block's self-attention q of a model `dim` wide (tiny: 32)."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(dim)
    layer = "diffusion_model.blocks.0.self_attn.q"
    save_file({f"{layer}.lora_down.weight": torch.randn(rank, dim, generator=g),
               f"{layer}.lora_up.weight": torch.randn(dim, rank, generator=g),
               f"{layer}.alpha": torch.tensor(float(rank))}, str(path))
    return path


@pytest.fixture(scope="module")
def lora_app(tmp_path_factory, cache):
    folder = tmp_path_factory.mktemp("loras")
    for name, dim in (("lightning_high", 32), ("lightning_low", 32), ("other_model", 48)):  # 48: another model's
        write_attention_lora(folder / f"{name}.safetensors", dim)
    (folder / "notes.txt").write_text("not a LoRA")
    return App(tmp_path_factory.mktemp("out"), cache_dir=cache, device="cpu", loras=folder)


def test_lightning_with_loras_and_exact_attention_is_stored(lora_app):
    assert lora_app.loras.names() == ["lightning_high.safetensors", "lightning_low.safetensors",
                                      "other_model.safetensors"]
    s = tiny_settings(preset="lightning", **PRESETS["lightning"].fills(), lora_high=["lightning_high.safetensors"],
                      lora_high_strength=0.5, lora_low=["lightning_low.safetensors"], exact_attention=True)
    text = lora_app.plan(s)
    assert "lightning preset, lightning grid · 4 steps euler" in text
    assert "high: lightning_high.safetensors x0.5 · low: lightning_low.safetensors x1.0" in text
    assert "Attention: exact" in text
    update = lora_app.generate(s, session="l")
    assert update.status.startswith("Done")
    p = update.params
    assert (p["grid"], p["steps"], p["solver"], p["guidance_high"], p["preset"]) == ("lightning", 4, "euler", 1.0,
                                                                                     "lightning")
    assert p["loras"] == {"high": [["lightning_high.safetensors", 0.5]], "low": [["lightning_low.safetensors", 1.0]]}
    assert p["exact_attention"] is True and p["negative_prompt"] is None  # no CFG: no negative prompt
    assert lora_app.pipe.loras["high"][0][1] == 0.5


def test_lora_errors_are_shown(lora_app):
    with pytest.raises(gr.Error, match="not in .*pick one of the listed files"):
        lora_app.generate(tiny_settings(lora_low=["../escape.safetensors"]), session="le")
    with pytest.raises(gr.Error) as info:
        lora_app.generate(tiny_settings(steps=1, lora_high=["other_model.safetensors"]), session="le")
    assert "other_model.safetensors" in info.value.message and info.value.print_exception is False
    assert lora_app.status("le").startswith("Failed: ") and not lora_app.line.busy()


def test_exact_attention_turns_the_fp8_kernel_off(demo_app, monkeypatch):
    monkeypatch.setattr(T2VPipeline, "scheme", property(lambda self: "int8"))
    s = tiny_settings(quantization="int8", vram_profile="24 GB")
    assert demo_app.make_plan(s).attention == "fp8"  # 8-bit weights on an sm89 card: FP8 attention
    exact = demo_app.make_plan(dataclasses.replace(s, exact_attention=True))
    assert exact.attention != "fp8" and "exact" in demo_app.plan(dataclasses.replace(s, exact_attention=True))
    assert exact.attention == planner.make_plan(24.0, height=64, width=64, frames=9, scheme="int8", device="cuda",
                                                cfg=demo_app.pipe.expert_config(), capability=(8, 9),
                                                attention_8bit=False).attention


# ---------------------------------------------------------------------------------------------------
# ui and command line


def test_ui_hands_every_run_to_the_apps_line(demo_app):
    """Runs enter App.generate at once (its line queues them with positions); nothing waits in gradio."""
    blocks = build_ui(demo_app)
    fns = {fn.name: fn for fn in blocks.fns.values()}
    assert all(fns[name].concurrency_limit is None for name in ("run", "busy", "stop", "poll", "load_model"))
    assert not any(fn.cancels for fn in blocks.fns.values())  # Cancel reaches the run, never drops its result


def test_main_binds_localhost_and_serves_only_outputs(tmp_path, cache, monkeypatch):
    launched = {}
    monkeypatch.setattr(gr.Blocks, "launch", lambda self, **kw: launched.update(kw))
    assert main(["--outputs", str(tmp_path / "out"), "--cache-dir", str(cache), "--port", "7999",
                 "--device", "cpu"]) == 0
    assert launched["server_name"] == "127.0.0.1" and launched["server_port"] == 7999
    assert launched["share"] is False
    assert launched["allowed_paths"] == [str((tmp_path / "out").resolve())]
    assert launched["quiet"] is True  # gradio's own start-up lines would say "set share=True in launch()"


def test_main_start_up_line_names_our_flag(tmp_path, cache, monkeypatch, capsys):
    monkeypatch.setattr(gr.Blocks, "launch", lambda self, **kw: None)
    main(["--outputs", str(tmp_path / "out"), "--cache-dir", str(cache), "--port", "7998", "--device", "cpu"])
    out = capsys.readouterr().out
    assert "http://127.0.0.1:7998" in out and "--share" in out and "share=True" not in out


def test_help_says_what_ckpt_takes(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "official or diffusers layout, or a quantized copy" in text and "--loras DIR" in text


def test_main_rejects_a_bad_checkpoint(tmp_path, cache, capsys):
    assert main(["--ckpt", str(tmp_path), "--outputs", str(tmp_path / "out"), "--cache-dir", str(cache)]) == 2
    assert "not a Wan2.2-T2V-A14B root" in capsys.readouterr().err


def test_step_cache_choice_runs_and_is_stored(demo_app):
    """The step-cache control: shown in the plan text, passed to the pipeline, the passes in the sidecar."""
    s = tiny_settings(step_cache="50% of the steps", steps=8)
    assert "step cache 50% of the steps" in demo_app.plan(s)
    update = demo_app.generate(s, session="cache")
    assert update.status.startswith("Done")
    meta = update.params["step_cache"]
    assert meta["mode"] == "pattern" and sum(meta["computed"].values()) < 8
    with pytest.raises(gr.Error, match="Step cache 'sometimes' is unknown"):
        demo_app.generate(tiny_settings(step_cache="sometimes"), session="cache")
