"""The Lightning preset and LoRAs through the real pipeline and CLI (tiny checkpoints, CPU): one pass
per step, the negative prompt never encoded, the LoRAs merged and recorded in the video's metadata."""

from __future__ import annotations

import pytest
import torch
from builders_t2v import tiny_official_root
from test_lora import BLOCK_LINEARS, random_factors, write_comfyui
from tolerance import assert_close_fp32

from wan_lite.checkpoint import CheckpointError, load_expert
from wan_lite.config import ModelConfig, SamplingConfig
from wan_lite.generate import lora_arg, main
from wan_lite.pipeline import sample
from wan_lite.t2v import T2VPipeline
from wan_lite.video import read_metadata

SIZE, FRAMES = (48, 32), 5


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tiny_official_root(tmp_path_factory.mktemp("official"))


@pytest.fixture(scope="module")
def loras(tmp_path_factory):
    cfg, folder = ModelConfig.tiny(), tmp_path_factory.mktemp("loras")
    return (write_comfyui(folder / "high.safetensors", random_factors(cfg, BLOCK_LINEARS, 4, 8.0, 1)),
            write_comfyui(folder / "low.safetensors", random_factors(cfg, BLOCK_LINEARS, 4, 2.0, 2)))


def test_lora_arg():
    assert lora_arg("a/b.safetensors") == ("a/b.safetensors", 1.0)
    assert lora_arg("a/b.safetensors:0.5") == ("a/b.safetensors", 0.5)
    assert lora_arg("C:/x.safetensors:-1") == ("C:/x.safetensors", -1.0)
    assert lora_arg("a:b.safetensors") == ("a:b.safetensors", 1.0)


def test_lightning_with_loras_is_the_plain_loop_on_merged_experts(root, loras, tmp_path):
    """The pipeline's latents = sample() on load_expert(..., loras=...) with the same context; the negative
    prompt is not encoded (guidance 1.0 on both experts), and each expert ran once per step."""
    pipe = T2VPipeline.from_pretrained(root, device="cpu", dtype=torch.float32, text_dtype=torch.float32,
                                       cache_dir=tmp_path / "cache")
    pipe.set_loras(high=[(loras[0], 1.0)], low=[(loras[1], 0.8)])
    lightning = SamplingConfig.lightning()
    encoded = []
    encode = pipe.text.encode
    pipe.text.encode = lambda prompts: encoded.append(list(prompts)) or encode(prompts)
    result = pipe("a fox", size=SIZE, frames=FRAMES, steps=4, seed=3, shift=5.0, guidance_high=1.0,
                  guidance_low=1.0, solver="euler", grid="lightning", out=tmp_path / "v.mp4")
    assert encoded == [["a fox"]]
    high = load_expert(root / "high_noise_model", dtype=torch.float32, loras=[(loras[0], 1.0)])
    low = load_expert(root / "low_noise_model", dtype=torch.float32, loras=[(loras[1], 0.8)])
    calls = []

    def counted(model, name):
        return lambda x, t, c: calls.append((name, float(t[0]))) or model(x, t, c)

    context = encode(["a fox"])[0].unsqueeze(0)
    ref = sample(counted(high, "high"), counted(low, "low"), pipe.noise(3, SIZE, FRAMES), context, None, lightning)
    assert calls == [("high", 1000.0), ("high", 937.5), ("low", pytest.approx(833.3333, abs=1e-3)), ("low", 625.0)]
    assert_close_fp32(result.latents, ref)
    meta = read_metadata(tmp_path / "v.mp4")
    assert meta["loras"] == {"high": [["high.safetensors", 1.0]], "low": [["low.safetensors", 0.8]]}
    assert meta["grid"] == "lightning" and meta["negative_prompt"] is None


def test_cli_preset_and_loras(root, loras, tmp_path, capsys):
    out = tmp_path / "cli.mp4"
    argv = ["--ckpt", str(root), "--prompt", "a fox", "--size", "48x32", "--frames", "5", "--seed", "1",
            "--device", "cpu", "--dtype", "fp32", "--vae-tile", "0", "--cache-dir", str(tmp_path / "c"),
            "--preset", "lightning", "--lora-high", f"{loras[0]}:1", "--lora-low", str(loras[1]), "--out", str(out)]
    assert main(argv) == 0
    meta = read_metadata(out)
    assert (meta["steps"], meta["shift"], meta["solver"], meta["guidance_high"], meta["grid"]) == \
        (4, 5.0, "euler", 1.0, "lightning")
    assert meta["loras"]["high"] == [["high.safetensors", 1.0]] and meta["loras"]["low"] == [["low.safetensors", 1.0]]


def test_cli_lora_errors_before_any_weight_loads(root, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("wan_lite.checkpoint.load_source", lambda *a, **k: pytest.fail("loaded an expert"))
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file")
    argv = ["--ckpt", str(root), "--prompt", "a fox", "--size", "48x32", "--frames", "5", "--device", "cpu",
            "--lora", str(bad), "--out", str(tmp_path / "x.mp4")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "bad.safetensors" in err
    with pytest.raises(CheckpointError):
        T2VPipeline.from_pretrained(root, device="cpu").set_loras(high=[(bad, 1.0)])
