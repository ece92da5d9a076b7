"""python -m wan_lite.bench_generate on the CPU with the tiny model: a random root written in the official
layout, quantized by the real command, generated from disk by the real command, its --stats read back."""

import json

import pytest
import torch

from wan_lite import bench_generate
from wan_lite.checkpoint import TEXT_WEIGHTS, load_source, open_expert, open_root
from wan_lite.config import ModelConfig
from wan_lite.t2v import T2VPipeline
from wan_lite.vae import official_to_diffusers


def test_vae_renaming_inverts_the_loader_renaming():
    from diffusers import AutoencoderKLWan

    sd = AutoencoderKLWan(base_dim=16).state_dict()
    official = bench_generate.diffusers_to_official_vae(sd)
    back = official_to_diffusers(official)
    assert set(back) == set(sd)
    assert all(back[k] is sd[k] for k in sd)  # a renaming: the same tensors


def test_random_root_is_a_valid_official_root(tmp_path):
    cfg = ModelConfig.tiny(text_dim=bench_generate.UMT5_TINY["dim"])
    root = bench_generate.write_random_root(tmp_path / "root", cfg, t5=bench_generate.UMT5_TINY,
                                            experts_dir=tmp_path / "shm")
    model = open_root(root)
    assert model.layout == "official" and model.config == cfg
    assert (root / "high_noise_model").is_symlink()
    high = load_source(open_expert(model.high), dtype=torch.float32)
    assert all(torch.isfinite(t).all() for t in high.state_dict().values())
    # the official bf16 .pth run in bf16 stays file-backed (mmap): no private RAM planned for it on the CPU;
    # run in fp32 it is converted, a private copy of its stored size
    pth = root / TEXT_WEIGHTS
    bf16 = T2VPipeline.from_pretrained(root, device="cpu", dtype=torch.bfloat16, text_dtype=torch.bfloat16)
    assert bf16._text_bytes() == 0
    fp32 = T2VPipeline.from_pretrained(root, device="cpu", dtype=torch.float32, text_dtype=torch.float32)
    assert fp32._text_bytes() == pth.stat().st_size


@pytest.mark.parametrize("skip_quantize", [False, True], ids=["quantized-by-the-command", "written-directly"])
def test_end_to_end_tiny(tmp_path, skip_quantize):
    out = tmp_path / "e2e.json"
    rc = bench_generate.main(["--work", str(tmp_path / "work"), "--config", "tiny", "--run", "64x64",
                              "--frames", "5", "--json", str(out)] + ["--skip-quantize"] * skip_quantize)
    assert rc == 0
    results = json.loads(out.read_text())
    assert (results["quantize"]["rc"] == 0) if not skip_quantize else ("quantize" not in results)
    (run,) = results["runs"]
    assert run["rc"] == 0 and run["cache"] == "cold"
    assert len(run["step_ends_s"]) == 4  # the lightning preset: 4 steps
    assert run["first_step_done_s"] == run["step_ends_s"][0] < run["total_s"]
    assert set(run["phases_s"]) >= {"text", "denoise", "decode"}
    assert run["host_peak"]["private_gb"] > 0
    assert run["params"]["quantization"] == "int8"
    fraction = run["resident_before"]
    assert fraction is None or 0.0 <= fraction <= 1.0
    assert not (tmp_path / "work" / "quantized-int8").exists()  # removed without --keep


def test_run_options_and_the_read_ahead_switch(tmp_path, monkeypatch):
    """--run WxH:read_ahead=off runs generate with --no-read-ahead (the cold start measured without it), labelled."""
    import argparse

    assert bench_generate.parse_run("1280x720:vram=24:ram=20:cache=cold:read_ahead=off") == {
        "size": "1280x720", "vram": "24", "ram": "20", "cache": "cold", "read_ahead": "off"}
    assert bench_generate.parse_run("1280x720:steps=40:step_cache=50%") == {
        "size": "1280x720", "steps": "40", "step_cache": "50%"}
    for bad in ("1280x720:read_ahead=no", "1280x720:cache=hot", "1280x720:turbo=1", "1280x720:steps=0",
                "1280x720:step_cache=150%"):
        with pytest.raises(argparse.ArgumentTypeError, match="read_ahead=on\\|off"):
            bench_generate.parse_run(bad)
    argv = []
    monkeypatch.setattr(bench_generate, "_python", lambda *args, log: (argv.append(args), (1, 0.0))[1])
    (tmp_path / "64x64-cold.log").write_text("")  # what the mocked run wrote
    for run in ("64x64:read_ahead=off", "64x64"):
        argv.clear()
        bench_generate.run_generate(tmp_path, tmp_path, bench_generate.parse_run(run), label="64x64-cold",
                                    preset="lightning", frames=5)
        assert ("--no-read-ahead" in argv[0]) == run.endswith("off")
    argv.clear()
    bench_generate.run_generate(tmp_path, tmp_path, bench_generate.parse_run("64x64:steps=40:step_cache=50%"),
                                label="64x64-cold", preset="official", frames=5)
    assert argv[0][-4:] == ("--steps", "40", "--step-cache", "50%")
