"""Single files as a whole model: a ComfyUI `models/` folder (two expert files, the umt5 encoder file, the
Wan2.1 VAE file) gives the video of the same weights in the official layout; bad pieces are refused by
name before any weight loads."""

from __future__ import annotations

import json

import pytest
import torch
from builders import make_checkpoint_root
from builders_t2v import add_t2v_components, make_tokenizer
from safetensors.torch import load_file, save_file
from tolerance import assert_close_fp32

from wan_lite.checkpoint import CheckpointError, open_comfyui, open_components, open_root
from wan_lite.config import ModelConfig
from wan_lite.generate import main
from wan_lite.t2v import T2VPipeline
from wan_lite.text import official_to_transformers
from wan_lite.video import read_metadata

SIZE, FRAMES = (48, 32), 5


@pytest.fixture(scope="module")
def roots(tmp_path_factory):
    """(official root, ComfyUI models/ folder with the same weights as single fp32 files, tokenizer folder)."""
    cfg = ModelConfig.tiny()
    root = add_t2v_components(make_checkpoint_root(tmp_path_factory.mktemp("official"), cfg, "official").root,
                              "official", cfg.text_dim)
    models = tmp_path_factory.mktemp("comfyui") / "models"
    for sub in ("diffusion_models", "text_encoders", "vae"):
        (models / sub).mkdir(parents=True)
    for name in ("high", "low"):
        state = {}
        for f in sorted((root / f"{name}_noise_model").glob("*.safetensors")):
            state.update(load_file(f))
        save_file({f"model.diffusion_model.{k}": v.contiguous() for k, v in state.items()},
                  models / "diffusion_models" / f"wan2.2_t2v_{name}_noise_14B_fp32.safetensors",
                  metadata={"wan_lite.num_heads": str(cfg.num_heads)})  # tiny dims: head count not dim // 128
    t5 = torch.load(root / "models_t5_umt5-xxl-enc-bf16.pth", map_location="cpu", weights_only=True)
    hf = {k: v.float().contiguous() for k, v in official_to_transformers(t5).items()
          if k != "encoder.embed_tokens.weight"}
    save_file(hf, models / "text_encoders" / "umt5_xxl_fp32.safetensors")
    vae = torch.load(root / "Wan2.1_VAE.pth", map_location="cpu", weights_only=True)
    save_file({k: v.contiguous() for k, v in vae.items()}, models / "vae" / "wan_2.1_vae.safetensors")
    return root, models, make_tokenizer(tmp_path_factory.mktemp("tok") / "tokenizer")


def _pipe(model, cache):
    return T2VPipeline.from_pretrained(model, device="cpu", dtype=torch.float32, text_dtype=torch.float32,
                                       cache_dir=cache)


def test_comfyui_folder_makes_the_video_of_the_official_root(roots, tmp_path):
    root, models, tok = roots
    model = open_comfyui(models, high="wan2.2_t2v_high_noise_14B_fp32.safetensors",
                         low="wan2.2_t2v_low_noise_14B_fp32.safetensors", tokenizer=tok)
    assert model.layout == "files" and model.scheme == "none" and model.config == open_root(root).config
    assert model.text_encoder.name == "umt5_xxl_fp32.safetensors" and model.vae.name == "wan_2.1_vae.safetensors"
    kw = dict(size=SIZE, frames=FRAMES, steps=3, seed=7)
    ref = _pipe(root, tmp_path / "a")("a red fox", **kw)
    got = _pipe(model, tmp_path / "b")("a red fox", **kw)
    assert_close_fp32(got.latents, ref.latents)
    assert_close_fp32(got.video, ref.video, rtol=1e-4)  # the VAE's fp32 decode over many layers


def test_cli_takes_the_four_pieces(roots, tmp_path):
    root, models, tok = roots
    out = tmp_path / "v.mp4"
    argv = ["--high", str(models / "diffusion_models" / "wan2.2_t2v_high_noise_14B_fp32.safetensors"),
            "--low", str(models / "diffusion_models" / "wan2.2_t2v_low_noise_14B_fp32.safetensors"),
            "--text-encoder", str(models / "text_encoders" / "umt5_xxl_fp32.safetensors"),
            "--vae", str(models / "vae" / "wan_2.1_vae.safetensors"), "--tokenizer", str(tok),
            "--prompt", "a fox", "--size", "48x32", "--frames", "5", "--steps", "2", "--seed", "1", "--device", "cpu",
            "--dtype", "fp32", "--vae-tile", "0", "--cache-dir", str(tmp_path / "c"), "--out", str(out)]
    assert main(argv) == 0
    assert read_metadata(out)["layout"] == "files"


def test_a_vae_passed_as_an_expert_is_refused_by_name(roots):
    root, models, tok = roots
    with pytest.raises(CheckpointError, match="VAE"):
        open_components(models / "vae" / "wan_2.1_vae.safetensors",
                        models / "diffusion_models" / "wan2.2_t2v_low_noise_14B_fp32.safetensors",
                        text_encoder=models / "text_encoders" / "umt5_xxl_fp32.safetensors",
                        vae=models / "vae" / "wan_2.1_vae.safetensors")


def test_comfyui_folder_without_a_vae_says_what_to_put_there(roots, tmp_path):
    _, models, _ = roots
    empty = tmp_path / "models"
    (empty / "diffusion_models").mkdir(parents=True)
    for f in (models / "diffusion_models").iterdir():
        (empty / "diffusion_models" / f.name).symlink_to(f)
    with pytest.raises(FileNotFoundError, match="wan_2.1_vae.safetensors"):
        open_comfyui(empty, high="wan2.2_t2v_high_noise_14B_fp32.safetensors",
                     low="wan2.2_t2v_low_noise_14B_fp32.safetensors")


def test_a_quantized_copy_of_a_diffusers_root_opens(tmp_path_factory):
    """quantize writes high_noise_model/ + low_noise_model/ beside the diffusers text_encoder/, tokenizer/ and
    vae/ it links: that root is complete (a new user's first quantize of the demo model hit this)."""
    from quant.convert import convert_checkpoint

    cfg = ModelConfig.tiny()
    src = add_t2v_components(make_checkpoint_root(tmp_path_factory.mktemp("diffusers"), cfg, "diffusers").root,
                             "diffusers", cfg.text_dim)
    dst = convert_checkpoint(src, tmp_path_factory.mktemp("q") / "int8", "int8", progress=False)
    model = open_root(dst)
    assert model.layout == "diffusers" and model.scheme == "int8" and model.high.name == "high_noise_model"
    assert model.text_encoder == dst / "text_encoder" and model.vae == dst / "vae"


# ---------------------------------------------------------------------------------------------
# what a fresh-user trial ran into (2026-11-29)


def test_a_comfyui_folder_as_ckpt_says_to_name_the_experts(roots):
    _, models, _ = roots
    with pytest.raises(CheckpointError, match=r"ComfyUI models folder: name the two experts.*--high NAME --low NAME"
                                              r".*wan2\.2_t2v_high_noise_14B_fp32\.safetensors"):
        open_root(models)


def test_cuda_asked_without_cuda_is_one_clear_line(roots, tmp_path, capsys, monkeypatch):
    root, _, _ = roots
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    argv = ["--ckpt", str(root), "--prompt", "a fox", "--size", "48x32", "--frames", "5", "--device", "cuda",
            "--out", str(tmp_path / "v.mp4")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "CUDA is not available here" in err and "use --device cpu" in err and "Traceback" not in err
    assert not (tmp_path / "v.mp4").exists()


def test_the_model_files_and_the_run_are_recorded(roots, tmp_path, capsys):
    """The sidecar names the four files; --stats refuses the sidecar's name; the file names warn when swapped."""
    _, models, tok = roots
    high = models / "diffusion_models" / "wan2.2_t2v_high_noise_14B_fp32.safetensors"
    low = models / "diffusion_models" / "wan2.2_t2v_low_noise_14B_fp32.safetensors"
    out = tmp_path / "v.mp4"
    common = ["--text-encoder", str(models / "text_encoders" / "umt5_xxl_fp32.safetensors"),
              "--vae", str(models / "vae" / "wan_2.1_vae.safetensors"), "--tokenizer", str(tok),
              "--prompt", "a fox", "--size", "48x32", "--frames", "5", "--steps", "2", "--seed", "1",
              "--device", "cpu", "--dtype", "fp32", "--vae-tile", "0", "--cache-dir", str(tmp_path / "c")]
    assert main(["--high", str(low), "--low", str(high), *common, "--out", str(out), "--stats",
                 str(tmp_path / "v.json")]) == 2
    assert "would overwrite the video or its .json sidecar" in capsys.readouterr().err
    assert main(["--high", str(low), "--low", str(high), *common, "--out", str(out), "--stats",
                 str(tmp_path / "run.stats.json")]) == 0
    err = capsys.readouterr().err
    assert "the file names say the experts are swapped" in err
    meta = read_metadata(out)
    assert meta["model_files"]["high"] == str(low) and meta["model_files"]["tokenizer"] == str(tok)
    stats = json.loads((tmp_path / "run.stats.json").read_text())
    assert len(stats["step_ends_s"]) == 2 and stats["params"]["model_files"] == meta["model_files"]


def test_a_lora_strength_that_is_not_a_number_is_named(roots, tmp_path, capsys):
    root, _, _ = roots
    lora = tmp_path / "some_lora.safetensors"
    lora.write_bytes(b"")
    argv = ["--ckpt", str(root), "--prompt", "a fox", "--lora", f"{lora}:abc", "--out", str(tmp_path / "v.mp4")]
    with pytest.raises(SystemExit):
        main(argv)
    assert "the strength 'abc' is not a number" in capsys.readouterr().err


def test_an_uncached_hub_tokenizer_offline_fails_at_once(monkeypatch, capsys):
    """Found by a user trial: offline, without --tokenizer, huggingface_hub retried the name lookup for about a
    minute before the error. Now an unreachable hub means no download attempt at all."""
    import types

    import transformers

    from wan_lite import text

    calls = []

    def from_pretrained(path, local_files_only=False, **kw):
        calls.append(local_files_only)
        raise OSError("not cached")

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", from_pretrained)
    monkeypatch.setattr(text, "_hub_reachable", lambda timeout=3.0: False)
    enc = types.SimpleNamespace(tokenizer=None, tokenizer_path="google/umt5-xxl")
    with pytest.raises(FileNotFoundError, match=r"pass --tokenizer DIR"):
        text.TextEncoder._load_tokenizer(enc)
    assert calls == [True]  # the local cache only: no download tried
    assert "downloading" not in capsys.readouterr().err  # nothing announced that is not tried


def test_hub_offline_setting_is_honoured(monkeypatch):
    from wan_lite import text

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert text._hub_reachable() is False


def test_a_folder_of_the_two_experts_only_says_how_to_run_it(tmp_path):
    """Found by a user trial: quantize's output from single files (two expert folders, nothing else) given as
    --ckpt was told to download the text encoder into it; it is told the --high/--low/--text-encoder form."""
    from wan_lite.checkpoint import open_root
    from wan_lite.keys import CheckpointError

    for name in ("high_noise_model", "low_noise_model"):
        (tmp_path / name).mkdir()
    with pytest.raises(CheckpointError, match=r"holds the two experts only .* pass --high .*high_noise_model "
                                              r"--low .*low_noise_model --text-encoder FILE --vae FILE"):
        open_root(tmp_path)


def test_a_folder_without_tokenizer_files_is_named_as_such(tmp_path):
    """Found by a user trial: --tokenizer pointing at a folder without tokenizer files (a VAE folder) ended with
    transformers' "You need to have sentencepiece or tiktoken installed", with sentencepiece installed. The
    error now names the folder and what it must hold."""
    from wan_lite import text

    folder = tmp_path / "vae"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (tmp_path / "umt5.safetensors").write_bytes(b"0" * 64)  # never read: only the tokenizer loads
    enc = text.TextEncoder("file", tmp_path / "umt5.safetensors", folder, device="cpu", dtype=torch.float32,
                           cache_dir=tmp_path / "cache", use_cache=False)
    with pytest.raises(FileNotFoundError, match=r"vae is not a umt5 tokenizer folder .*pass --tokenizer DIR"):
        enc.check_tokenizer()
    make_tokenizer(tmp_path / "tok")  # a real tokenizer folder still loads
    enc = text.TextEncoder("file", tmp_path / "umt5.safetensors", tmp_path / "tok", device="cpu",
                           dtype=torch.float32, cache_dir=tmp_path / "cache", use_cache=False)
    enc.check_tokenizer()
    assert enc.tokenizer is not None
