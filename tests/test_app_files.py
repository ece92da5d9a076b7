"""The app's model picker for single files and a ComfyUI models/ folder, and the full-VAE preview, without
a browser (tests/test_app_browser_files.py drives the page).

`make_comfyui_folder` writes a ComfyUI `models/` folder of a tiny model (ModelConfig.tiny() experts as
fp16, fp8 scaled and GGUF Q8_0 files, the demo's umt5 encoder as one file, the real-size random Wan2.1
VAE as wan_2.1_vae.safetensors, plus a LoRA and an I2V skeleton that must be refused as experts); the
tests check that the app opens it exactly as the CLI's flags do (`wan_lite.generate.model_from_args`),
that a run names the files in its metadata, and that wrong files are shown with wan_lite's message.
"""

from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path

import gradio as gr
import numpy as np
import pytest
import torch
from builders import make_official_model
from builders_files import official_state, write_fp8_legacy, write_gguf, write_lora, write_safetensors, write_skeleton
from builders_t2v import vae_files
from safetensors.torch import load_file, save_file

from app import demo
from app.__main__ import main
from app.handlers import App, Settings
from app.models import ModelFiles, comfyui_experts, open_files
from app.preview import latent_to_rgb, vae_preview
from app.ui import _guess, build_ui
from wan_lite.checkpoint import open_comfyui, open_components
from wan_lite.config import ModelConfig
from wan_lite.generate import build_parser, model_from_args
from wan_lite.vae import VAE

HIGH, LOW = "wan2.2_t2v_high_noise_14B_fp16.safetensors", "wan2.2_t2v_low_noise_14B_fp16.safetensors"
FP8 = ("wan2.2_t2v_high_noise_14B_fp8_scaled.safetensors", "wan2.2_t2v_low_noise_14B_fp8_scaled.safetensors")
GGUF = ("wan2.2_t2v_high_noise_14B_Q8_0.gguf", "wan2.2_t2v_low_noise_14B_Q8_0.gguf")
LORA, I2V = "lightning_lora.safetensors", "wan2.2_i2v_high_noise_14B_fp16.safetensors"
TEXT, VAE_FILE = "umt5_xxl_demo.safetensors", "wan_2.1_vae.safetensors"


def make_comfyui_folder(models: Path, cache: Path) -> tuple[Path, Path]:
    """(models/ folder, tokenizer folder): see the module docstring. The experts' text_dim (24) is the demo
    encoder's width, so the demo's tokenizer and encoder serve them."""
    root = demo.ensure_demo_checkpoint(cache)
    experts, texts, vaes = models / "diffusion_models", models / "text_encoders", models / "vae"
    for folder in (experts, texts, vaes):
        folder.mkdir(parents=True, exist_ok=True)
    cfg = ModelConfig.tiny()
    for i, seed in enumerate((1, 2)):
        state = official_state(make_official_model(cfg, seed))
        write_safetensors(state, experts / (HIGH, LOW)[i], dtype=torch.float16, prefix="model.diffusion_model.")
        write_fp8_legacy(state, experts / FP8[i], prefix="model.diffusion_model.")
        write_gguf(state, experts / GGUF[i])
    write_lora(experts / LORA)
    write_skeleton("wan2.2-i2v-a14b", experts / I2V)
    encoder = load_file(root / "text_encoder" / "model.safetensors")  # transformers' UMT5 names, as ComfyUI's
    save_file({k: v.contiguous() for k, v in encoder.items() if k != "encoder.embed_tokens.weight"}, texts / TEXT)
    official_vae = torch.load(vae_files()[0], map_location="cpu", weights_only=True)
    save_file({k: v.contiguous() for k, v in official_vae.items()}, vaes / VAE_FILE)
    return models, root / "tokenizer"


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def comfy(tmp_path_factory, cache):
    return make_comfyui_folder(tmp_path_factory.mktemp("comfyui") / "models", cache)


@pytest.fixture(scope="module")
def files_app(tmp_path_factory, cache, comfy):
    models, tok = comfy
    files = ModelFiles.of(comfyui=str(models), high=HIGH, low=LOW, tokenizer=str(tok))
    return App(tmp_path_factory.mktemp("outputs"), cache_dir=cache, device="cpu", files=files)


def tiny_settings(**changes) -> Settings:
    s = dataclasses.replace(Settings.defaults(is_demo=True), prompt="a red cat walks on the beach", frames=5, steps=2,
                            random_seed=False, seed=11)
    return dataclasses.replace(s, **changes)


def cli_model(*argv: str):
    """The ModelRoot the CLI's flags give (wan_lite.generate), for comparison."""
    return model_from_args(build_parser().parse_args([*argv, "--out", "x.mp4"]))


# ---------------------------------------------------------------------------------------------------
# what a ComfyUI folder offers


def test_comfyui_folder_lists_its_experts(comfy, tmp_path):
    models, _ = comfy
    assert comfyui_experts(models) == sorted([HIGH, LOW, *FP8, *GGUF, LORA, I2V])
    assert _guess(comfyui_experts(models), "high") is None  # several candidates: the person picks
    assert _guess([HIGH, LOW, "notes.safetensors"], "high") == HIGH
    with pytest.raises(ValueError, match="no diffusion_models/ or unet/ in it"):
        comfyui_experts(tmp_path)
    with pytest.raises(ValueError, match="No folder given"):
        comfyui_experts("  ")


def test_the_ui_fills_the_expert_dropdowns(files_app, comfy, tmp_path):
    models, _ = comfy
    fns = {fn.name: fn.fn for fn in build_ui(files_app).fns.values()}
    high, low, line, listed = fns["list_comfyui"](f" {models} ", None)
    assert high.constructor_args["choices"] == comfyui_experts(models) and listed == str(models)
    assert "8 expert file(s)" in line
    assert fns["list_comfyui"](str(models), listed) == (gr.skip(),) * 4  # listed already: the picks stay
    high, low, line, listed = fns["list_comfyui"](str(tmp_path), str(models))
    assert high.constructor_args["choices"] == [] and "no diffusion_models/" in line and listed is None


# ---------------------------------------------------------------------------------------------------
# opening pieces: the CLI's mapping


def test_a_comfyui_folder_opens_as_the_cli_opens_it(files_app, comfy):
    models, tok = comfy
    expected = cli_model("--ckpt", str(models), "--high", HIGH, "--low", LOW, "--tokenizer", str(tok))
    assert files_app.pipe.model == expected
    assert files_app.pipe.model == open_comfyui(models, high=HIGH, low=LOW, tokenizer=tok)
    assert expected.text_encoder.name == TEXT and expected.vae.name == VAE_FILE
    assert files_app.is_small and not files_app.is_demo and "64x64 (demo)" in files_app.size_presets()
    banner = files_app.banner()
    assert all(name in banner for name in (HIGH, LOW, TEXT, VAE_FILE)) and "test-size model" in banner
    fns = {fn.name: fn.fn for fn in build_ui(files_app).fns.values()}
    ready = fns["initial"]()[-1]  # the status line names the expert files, not their folder (diffusion_models)
    assert ready.startswith("Ready:") and HIGH in ready and LOW in ready and "diffusion_models on" not in ready


@pytest.mark.parametrize("pair, scheme, menu", [(FP8, "fp8", "fp8"), (GGUF, "int8", "int8"), ((HIGH, LOW), "none",
                                                                                                "bf16")])
def test_four_files_open_as_the_cli_opens_them(tmp_path, cache, comfy, pair, scheme, menu):
    models, tok = comfy
    paths = [str(models / "diffusion_models" / n) for n in pair]
    text, vae = str(models / "text_encoders" / TEXT), str(models / "vae" / VAE_FILE)
    app = App(tmp_path / "out", cache_dir=cache, device="cpu",
              files=ModelFiles.of(high=paths[0], low=paths[1], text_encoder=text, vae=vae, tokenizer=str(tok)))
    expected = cli_model("--high", paths[0], "--low", paths[1], "--text-encoder", text, "--vae", vae,
                         "--tokenizer", str(tok))
    assert app.pipe.model == expected and expected.scheme == scheme
    assert app.quant_choices() == ["auto", menu]
    plan = app.plan(tiny_settings())
    weights = "float" if scheme == "none" else scheme
    assert f"Model: files ({weights}): high {pair[0]} · low {pair[1]} · text encoder {TEXT} · VAE {VAE_FILE}" in plan
    assert app.root_value() is None  # the model-folder field is left empty: no root is loaded


def test_a_text_encoder_or_vae_named_beside_a_comfyui_folder_replaces_the_found_one(comfy, tmp_path):
    models, tok = comfy
    other = tmp_path / "my_vae.safetensors"
    other.symlink_to(models / "vae" / VAE_FILE)
    model = open_files(ModelFiles.of(comfyui=str(models), high=HIGH, low=LOW, vae=str(other), tokenizer=str(tok)))
    assert model.vae == other and model.text_encoder.name == TEXT and model.high == models / "diffusion_models" / HIGH


# ---------------------------------------------------------------------------------------------------
# wrong pieces: wan_lite's message in the status, the loaded model stays


def formats_message(comfy, high: str) -> str:
    """What wan_lite.checkpoint says about `high` given as the high-noise expert."""
    models, tok = comfy
    with pytest.raises(Exception) as info:  # noqa: B017,PT011 - the message is what is compared
        open_components(models / "diffusion_models" / high, models / "diffusion_models" / LOW,
                        text_encoder=models / "text_encoders" / TEXT, vae=models / "vae" / VAE_FILE, tokenizer=tok)
    return str(info.value)


@pytest.mark.parametrize("high, words", [(LORA, "this is a LoRA"), (I2V, "I2V-A14B image-to-video expert"),
                                         (VAE_FILE, "not a diffusion expert")])
def test_a_wrong_file_is_refused_with_the_formats_message(files_app, comfy, high, words):
    models, tok = comfy
    loaded = files_app.pipe.model
    path = models / ("vae" if high == VAE_FILE else "diffusion_models") / high
    files = ModelFiles.of(high=str(path), low=str(models / "diffusion_models" / LOW),
                          text_encoder=str(models / "text_encoders" / TEXT), vae=str(models / "vae" / VAE_FILE),
                          tokenizer=str(tok))
    with pytest.raises(gr.Error) as info:
        files_app.load_files(files)
    assert words in info.value.message and info.value.print_exception is False
    if high != VAE_FILE:
        assert info.value.message == formats_message(comfy, high)
    assert files_app.pipe.model == loaded  # the loaded model stays


@pytest.mark.parametrize("files, message", [
    (dict(comfyui="{models}", high="missing.safetensors", low=LOW), "no expert file 'missing.safetensors'"),
    (dict(comfyui="{models}", high=HIGH, low=""), "Choose both experts in"),
    (dict(comfyui="/nowhere/models", high=HIGH, low=LOW), "No folder /nowhere/models"),
    (dict(high="/nowhere/high.safetensors", low="/nowhere/low.safetensors", text_encoder="{models}/text_encoders/"
          + TEXT, vae="{models}/vae/" + VAE_FILE),
     "the high-noise expert file /nowhere/high.safetensors does not exist"),
    (dict(high="{models}/diffusion_models/" + HIGH, low="{models}/diffusion_models/" + LOW),
     "also give the text encoder and the VAE file"),
    (dict(high="{models}/diffusion_models/" + HIGH, low="{models}/diffusion_models/" + FP8[1],
          text_encoder="{models}/text_encoders/" + TEXT, vae="{models}/vae/" + VAE_FILE), "different formats"),
    (dict(comfyui="{models}", high=HIGH, low=LOW, tokenizer="/nowhere/tok"), "tokenizer folder /nowhere/tok"),
])  # fmt: skip
def test_missing_pieces_are_named(files_app, comfy, files, message):
    models, _ = comfy
    loaded = files_app.pipe.model
    with pytest.raises(gr.Error, match=message):
        files_app.load_files(ModelFiles.of(**{k: v.format(models=models) for k, v in files.items()}))
    assert files_app.pipe.model == loaded


def test_a_failed_load_in_the_ui_keeps_the_typed_paths(files_app, comfy):
    """The load's outputs do not include the path fields (they keep what was typed); the status says why."""
    models, tok = comfy
    blocks = build_ui(files_app)
    fns = {fn.name: fn for fn in blocks.fns.values()}
    out = fns["load_comfyui"].fn(str(models), LORA, LOW, str(tok))
    assert out[:7] == (gr.skip(),) * 7 and out[7].startswith("Model not loaded: ") and "this is a LoRA" in out[7]
    path_fields = {c._id for c in fns["load_comfyui"].inputs}
    assert not path_fields & {c._id for c in fns["load_comfyui"].outputs}
    assert not path_fields & {c._id for c in fns["load_files"].outputs}


def test_share_loads_only_the_files_it_was_started_with(tmp_path, cache, comfy):
    models, tok = comfy
    files = ModelFiles.of(comfyui=str(models), high=HIGH, low=LOW, tokenizer=str(tok))
    app = App(tmp_path / "out", cache_dir=cache, device="cpu", files=files, share=True)
    with pytest.raises(gr.Error, match="only the model the app was started with"):
        app.load_files(dataclasses.replace(files, high=FP8[0], low=FP8[1]))
    with pytest.raises(gr.Error, match="only the ComfyUI folder the app was started with"):
        app.comfyui_experts(tmp_path)
    assert app.comfyui_experts(str(models)) == comfyui_experts(models)


# ---------------------------------------------------------------------------------------------------
# a run names its files


def test_a_run_names_the_files_in_its_metadata(files_app, comfy):
    models, tok = comfy
    update = files_app.generate(tiny_settings(), session="f")
    assert update.status.startswith("Done")
    p = update.params
    assert p["layout"] == "files" and p["model"] == f"{models} ({HIGH} + {LOW})"
    assert p["model_files"] == {"high": str(models / "diffusion_models" / HIGH),
                                "low": str(models / "diffusion_models" / LOW),
                                "text_encoder": str(models / "text_encoders" / TEXT),
                                "vae": str(models / "vae" / VAE_FILE), "tokenizer": str(tok)}
    assert (p["width"], p["height"], p["frames"]) == (64, 64, 5)


# ---------------------------------------------------------------------------------------------------
# command line


@pytest.fixture
def started(monkeypatch):
    """Runs app.__main__.main without serving; returns the App it built (or None)."""
    import app.ui

    built = {}
    monkeypatch.setattr(gr.Blocks, "launch", lambda self, **kw: None)
    real = app.ui.build_ui

    def build(a):
        built["app"] = a
        return real(a)

    monkeypatch.setattr(app.ui, "build_ui", build)
    return built


def test_main_takes_the_cli_model_flags(started, tmp_path, cache, comfy, capsys):
    models, tok = comfy
    common = ["--outputs", str(tmp_path / "out"), "--cache-dir", str(cache), "--device", "cpu"]
    assert main(["--ckpt", str(models), "--high", HIGH, "--low", LOW, "--tokenizer", str(tok), *common]) == 0
    assert started["app"].pipe.model == open_comfyui(models, high=HIGH, low=LOW, tokenizer=tok)
    assert f"wan-lite app: {models} ({HIGH} + {LOW}) on cpu" in capsys.readouterr().out
    pieces = ["--high", str(models / "diffusion_models" / GGUF[0]), "--low", str(models / "diffusion_models" / GGUF[1]),
              "--text-encoder", str(models / "text_encoders" / TEXT), "--vae", str(models / "vae" / VAE_FILE),
              "--tokenizer", str(tok)]
    with warnings.catch_warnings():  # expert paths (no --ckpt) fill the files tab, not the ComfyUI dropdowns
        warnings.simplefilter("error", UserWarning)  # gradio warned of a value missing from their choices
        assert main([*pieces, *common]) == 0
    assert started["app"].pipe.model == cli_model(*pieces) and started["app"].pipe.scheme == "int8"


def test_main_names_a_wrong_expert(started, tmp_path, cache, comfy, capsys):
    models, tok = comfy
    common = ["--outputs", str(tmp_path / "out"), "--cache-dir", str(cache), "--device", "cpu"]
    assert main(["--ckpt", str(models), "--high", LORA, "--low", LOW, *common]) == 2
    assert "this is a LoRA" in capsys.readouterr().err
    assert main(["--high", str(models / "diffusion_models" / HIGH), *common]) == 2
    assert "Choose both experts" in capsys.readouterr().err
    assert main(["--vae", str(models / "vae" / VAE_FILE), *common]) == 2
    assert "go with --high and --low" in capsys.readouterr().err
    assert "app" not in started


def test_help_names_the_model_flags(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    for flag in ("--high", "--low", "--text-encoder", "--vae", "--tokenizer", "ComfyUI models/ folder"):
        assert flag in text


# ---------------------------------------------------------------------------------------------------
# the full-VAE preview


@pytest.fixture(scope="module")
def demo_app(tmp_path_factory, cache):
    return App(tmp_path_factory.mktemp("outputs"), cache_dir=cache, device="cpu")


def test_vae_preview_decodes_each_picked_frame(demo_app):
    vae = VAE.from_pretrained(demo_app.pipe.model.vae, device="cpu")
    x0 = torch.randn(1, 16, 5, 4, 6, generator=torch.Generator().manual_seed(0))
    picture = vae_preview(vae, x0, frames=3)
    assert picture.shape == (32, 3 * 48, 3) and picture.dtype == np.uint8  # 4x6 latents: 32x48 pixels, not scaled
    for i, frame in enumerate((0, 2, 4)):  # evenly spaced, first and last: each one decoded alone
        alone = vae.decode(x0[:, :, frame:frame + 1], tile=None)[0, :, 0]  # (3, H, W)
        expected = ((alone + 1) / 2).clamp(0, 1).mul(255).round().permute(1, 2, 0).numpy()
        assert np.abs(picture[:, 48 * i:48 * (i + 1)].astype(float) - expected).max() <= 1  # batch of 3 vs 1
    small = vae_preview(vae, x0, frames=2, height=16)
    assert small.shape == (16, 2 * 24, 3)  # scaled down, aspect kept


def test_full_vae_preview_every_n_steps(demo_app, capsys):
    s = tiny_settings(steps=4, frames=9, vae_preview_every=2)
    assert "preview: full VAE every 2 steps" in demo_app.plan(s)
    assert "preview: latents as RGB" in demo_app.plan(tiny_settings())
    pictures, lines, calls = [], [], []

    def progress(position, desc):
        calls.append((position, desc))
        picture = demo_app.vae_preview("v")
        if picture is not None:
            pictures.append(picture)
            lines.append(demo_app.status("v"))

    update = demo_app.generate(s, session="v", progress=progress)
    assert update.status.startswith("Done") and update.params["vae_preview_every"] == 2
    # step 2 only: step 4 is the last, whose decode is the video itself
    assert len(pictures) == 1 and pictures[0].dtype == np.uint8 and pictures[0].shape == (64, 3 * 64, 3)
    assert "full VAE preview at step 2: " in lines[0]
    assert "full VAE preview at step 2: " in capsys.readouterr().out  # its cost, in the terminal too
    decode = [position for position, desc in calls if "frame" in desc]
    assert decode[0] == (0, 3) and decode[-1] == (3, 3)  # the preview's decoder call is not the video's decode
    assert pictures[0].shape != latent_to_rgb(torch.zeros(1, 16, 3, 8, 8)).shape  # a decode, not latents as RGB


def test_out_of_memory_in_the_vae_preview_turns_it_off(demo_app, monkeypatch):
    def oom(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr("app.handlers.vae_preview", oom)
    lines = []
    update = demo_app.generate(tiny_settings(steps=4, vae_preview_every=1), session="o",
                               progress=lambda *a, **k: lines.append(demo_app.jobs["o"].status_line()))
    assert update.status.startswith("Done")  # the run goes on without it
    assert any("full VAE preview off: out of GPU memory" in line for line in lines)


def test_bad_preview_interval_is_a_clear_message(demo_app):
    with pytest.raises(gr.Error, match="Full VAE preview every 99 steps: give 0"):
        demo_app.generate(tiny_settings(vae_preview_every=99), session="b")


def test_a_comfyui_folder_that_does_not_exist_is_named(tmp_path):
    from app.models import comfyui_experts

    with pytest.raises(ValueError, match=f"^No folder {tmp_path / 'nowhere'}: check the path"):
        comfyui_experts(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="no diffusion_models/ or unet/ in it"):
        comfyui_experts(tmp_path)
