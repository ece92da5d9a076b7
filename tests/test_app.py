"""The app's handlers on the built-in demo model, without a browser (tests/test_app_browser.py drives the page).

One module-scoped app generates one real video (64x64, 9 frames, 8 steps); the other tests check input
validation, cancel, out-of-memory and missing-file messages, the gallery and the path checks.
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
import pytest
import torch

from app import demo
from app.__main__ import main
from app.handlers import App, Settings
from app.ui import build_ui
from wan_lite.t2v import T2VPipeline, check_root


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
    steps = [a[0] for a, _ in calls]
    descs = [k["desc"] for _, k in calls]
    assert steps[0] == (0, 8) and steps[-1] == (8, 8)  # with shift 12: 6 high-noise steps, 2 low-noise
    assert steps == sorted(steps)
    assert descs[0].startswith("encoding the prompt")
    assert any(d.startswith("high-noise expert 1/6") for d in descs)
    assert any(d.startswith("low-noise expert 1/2") for d in descs)
    assert descs[-1].startswith("decoding the video")
    assert all("ETA" in d and "peak VRAM" in d for d in descs)


def test_random_seed_is_reported(demo_app):
    update = demo_app.generate(tiny_settings(random_seed=True, seed=0, steps=1, frames=1), session="random")
    assert update.seed == update.params["seed"] and f"seed {update.seed}" in update.status
    assert count_frames(update.video) == 1


@pytest.mark.parametrize("changes, message", [
    (dict(prompt="   "), "prompt is empty"),
    (dict(frames=10), r"4n\+1"),
    (dict(size="1280x720 (720p landscape)"), "not offered for this model"),
    (dict(steps=0), "between 1 and 200"),
    (dict(guidance_high=-1.0), "High-noise guidance"),
    (dict(shift=0.0), "Shift"),
    (dict(solver="ddim"), "unknown"),
    (dict(seed=-5), "Seed -5"),
    (dict(seed=None), "random seed"),
    (dict(vram_profile="3 GB"), "VRAM profile"),
    (dict(quantization="int8"), "python -m wan_lite.quantize"),
])  # fmt: skip
def test_bad_input_is_a_clear_message(demo_app, changes, message):
    before = mp4s(demo_app.outputs)
    with pytest.raises(gr.Error, match=message):
        demo_app.generate(tiny_settings(**changes), session="bad")
    assert mp4s(demo_app.outputs) == before and not demo_app.jobs
    assert demo_app.status("bad").startswith("Not started: ")


# ---------------------------------------------------------------------------------------------------
# cancel, one run at a time, out of memory


def test_cancel_stops_after_the_current_step(demo_app):
    assert demo_app.cancel("c") == "No run in progress (a request still waiting in the queue is dropped)."
    before = mp4s(demo_app.outputs)
    thread, box = run_in_thread(demo_app, tiny_settings(steps=200, seed=7), "c")
    wait_for(lambda: "c" in demo_app.jobs and demo_app.jobs["c"].done_steps >= 1)
    assert demo_app.status("c").startswith("high-noise expert")
    assert demo_app.cancel("c").startswith("Cancelling")
    thread.join(60)
    status = box["update"].status
    assert status.startswith("Cancelled after step") and "memory freed" in status
    assert int(status.split("step ")[1].split("/")[0]) < 200
    assert box["update"].video is None and mp4s(demo_app.outputs) == before
    assert not demo_app.jobs and demo_app.gpu.acquire(blocking=False)  # the GPU lock was released
    demo_app.gpu.release()
    assert demo_app.status("c") == status and demo_app.status("c") is None  # sent once


def test_one_run_at_a_time(demo_app):
    """A run waits for the GPU lock (held here as by a cancelled run that is still stopping)."""
    demo_app.gpu.acquire()
    try:
        thread, box = run_in_thread(demo_app, tiny_settings(steps=1, frames=1), "w")
        wait_for(lambda: "w" in demo_app.jobs)
        time.sleep(0.3)
        assert demo_app.jobs["w"].done_steps == 0 and "update" not in box
    finally:
        demo_app.gpu.release()
    thread.join(60)
    assert box["update"].status.startswith("Done")


def test_cancel_while_waiting_for_the_gpu(demo_app):
    demo_app.gpu.acquire()
    try:
        thread, box = run_in_thread(demo_app, tiny_settings(), "q")
        wait_for(lambda: "q" in demo_app.jobs)
        demo_app.cancel("q")
        thread.join(10)
    finally:
        demo_app.gpu.release()
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
    assert demo_app.gpu.acquire(blocking=False)  # the app can run again
    demo_app.gpu.release()
    assert demo_app.status("oom").startswith("Failed: Out of GPU memory")


def test_pipeline_error_is_shown_and_the_app_keeps_running(demo_app, monkeypatch):
    def broken(self, *args, **kwargs):
        raise FileNotFoundError("no VAE in /models/x: expected Wan2.1_VAE.pth")

    monkeypatch.setattr(T2VPipeline, "__call__", broken)
    with pytest.raises(gr.Error, match="no VAE in /models/x"):
        demo_app.generate(tiny_settings(), session="broken")
    assert not demo_app.jobs and demo_app.gpu.acquire(blocking=False)
    demo_app.gpu.release()


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
    assert text.startswith("Memory plan") and "24" in text


# ---------------------------------------------------------------------------------------------------
# ui and command line


def test_ui_runs_one_generation_at_a_time(demo_app):
    blocks = build_ui(demo_app)
    fns = {fn.name: fn for fn in blocks.fns.values()}
    assert fns["run"].concurrency_limit == 1
    assert fns["stop"].concurrency_limit is None and fns["poll"].concurrency_limit is None


def test_main_binds_localhost_and_serves_only_outputs(tmp_path, cache, monkeypatch):
    launched = {}
    monkeypatch.setattr(gr.Blocks, "launch", lambda self, **kw: launched.update(kw))
    assert main(["--outputs", str(tmp_path / "out"), "--cache-dir", str(cache), "--port", "7999",
                 "--device", "cpu"]) == 0
    assert launched["server_name"] == "127.0.0.1" and launched["server_port"] == 7999
    assert launched["share"] is False
    assert launched["allowed_paths"] == [str((tmp_path / "out").resolve())]


def test_main_rejects_a_bad_checkpoint(tmp_path, cache, capsys):
    assert main(["--ckpt", str(tmp_path), "--outputs", str(tmp_path / "out"), "--cache-dir", str(cache)]) == 2
    assert "not a Wan2.2-T2V-A14B root" in capsys.readouterr().err
