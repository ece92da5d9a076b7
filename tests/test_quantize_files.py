"""python -m wan_lite.quantize from the single files people have (issue 12): fp32/fp16/bf16 experts, fp8 scaled
(legacy and ComfyUI comfy_quant), GGUF; a ComfyUI models/ folder; the output run by python -m wan_lite.generate.

Tolerances: as tests/test_quant.py (one forward of the tiny expert, W8A16 in float32 on the CPU: int8 ~0.4%,
asserted < 1%; fp8 ~1.6%, asserted < 3%). An fp8-scaled file converted to fp8 keeps its weights: its forward
is the official forward of the file's dequantized weights at fp32 (assert_close_fp32).
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from builders import official_forward, official_to_diffusers
from builders_files import (
    BLOCK_LINEAR,
    official_state,
    write_fp8_comfy,
    write_fp8_legacy,
    write_gguf,
    write_lora,
    write_safetensors,
    write_skeleton,
)
from safetensors import safe_open
from test_components import roots  # noqa: F401  (the ComfyUI models/ folder fixture: same weights as a root)
from tolerance import assert_close_fp32

import wan_lite
from quant.convert import convert_expert, convert_files
from wan_lite.formats import e5m2_to_e4m3, open_expert_file
from wan_lite.quantize import main as quantize
from wan_lite.quantized.format import META_FILE, read_meta

TOLERANCE = {"int8": 1e-2, "fp8": 3e-2}
PREFIX = "model.diffusion_model."


def _inputs(cfg, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(1, cfg.in_dim, 2, 8, 8, generator=g), torch.tensor([900.0]),
            torch.randn(1, 7, cfg.text_dim, generator=g))


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def _forward(path, cfg):
    with torch.no_grad():
        return wan_lite.load_expert(path, dtype=torch.float32, device="cpu")(*_inputs(cfg))


def _stored(folder) -> dict[str, torch.Tensor]:
    """Every tensor of a converted expert folder, as stored."""
    out = {}
    for entry in read_meta(folder)["shards"]:
        with safe_open(folder / entry["file"], framework="pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})
    return out


def _file_tensors(path) -> dict[str, torch.Tensor]:
    with safe_open(path, framework="pt") as f:
        return {k.removeprefix(PREFIX): f.get_tensor(k) for k in f.keys()}


def _block_layers(state):
    return [n.removesuffix(".weight") for n in state if BLOCK_LINEAR.match(n)]


@pytest.fixture(scope="module")
def high_state(reference_experts):
    return official_state(reference_experts[0])


# ---------------------------------------------------------------------------------------------
# float files


@pytest.mark.parametrize("scheme", ["int8", "fp8"])
def test_fp32_file_converts_exactly_as_the_official_root(tmp_path, official_root, high_state, tiny_cfg, scheme):
    """The same fp32 weights as a ComfyUI-prefixed single file and as the root's expert folder give the same
    stored tensors (per-channel absmax and elementwise rounding: no summation order involved)."""
    path, _ = write_safetensors(high_state, tmp_path / "high_fp32.safetensors", prefix=PREFIX)
    dst = convert_files({"high": path}, tmp_path / "q", scheme, progress=False)
    convert_expert(official_root.high, tmp_path / "ref", scheme, progress=False)
    got, ref = _stored(dst / "high_noise_model"), _stored(tmp_path / "ref")
    assert set(got) == set(ref)
    assert all(torch.equal(got[k], ref[k]) for k in ref)
    assert sorted(p.name for p in dst.iterdir()) == ["high_noise_model"]  # one expert given, one written
    assert _rel(_forward(dst / "high_noise_model", tiny_cfg), _forward(path, tiny_cfg)) < TOLERANCE[scheme]


@pytest.mark.parametrize(("dtype", "naming"), [(torch.float16, "native"), (torch.bfloat16, "diffusers")])
def test_half_precision_files_convert_within_the_scheme_error(tmp_path, high_state, tiny_cfg, dtype, naming):
    state = {official_to_diffusers(k): v for k, v in high_state.items()} if naming == "diffusers" else high_state
    path, _ = write_safetensors(state, tmp_path / "high.safetensors", dtype=dtype)
    dst = convert_files({"high": path}, tmp_path / "q", "int8", progress=False)
    err = _rel(_forward(dst / "high_noise_model", tiny_cfg), _forward(path, tiny_cfg))
    assert err < TOLERANCE["int8"], f"{dtype} {naming}: {err:.4f}"
    source = read_meta(dst / "high_noise_model")["source"]
    assert source["file"] == "high.safetensors" and source["stored"] == "none" and source["layout"] == "file"


# ---------------------------------------------------------------------------------------------
# fp8 scaled: the file's own weights, not rounded again


@pytest.mark.parametrize("form", ["legacy", "legacy-all-linears", "comfy"])
def test_fp8_scaled_file_to_fp8_keeps_its_bytes_and_scales(tmp_path, reference_experts, high_state, tiny_cfg, form,
                                                           capsys):
    file = tmp_path / "wan2.2_t2v_high_noise_14B_fp8_scaled.safetensors"
    if form == "comfy":
        path, intended = write_fp8_comfy(high_state, file)
    else:
        path, intended = write_fp8_legacy(high_state, file, quantize_other=form == "legacy-all-linears",
                                          prefix=PREFIX)
    dst = tmp_path / "q"
    assert quantize(["--high", str(path), "--out", str(dst), "--scheme", "fp8", "--quiet"]) == 0
    assert "block Linears kept" in capsys.readouterr().err
    src, got = _file_tensors(path), _stored(dst / "high_noise_model")
    for layer in _block_layers(high_state):
        w, scale = got[layer + ".weight"], got[layer + ".weight_scale"]
        assert w.dtype == torch.float8_e4m3fn
        assert torch.equal(w.view(torch.uint8), src[layer + ".weight"].view(torch.uint8))  # the same e4m3 bytes
        stored_scale = src[layer + (".weight_scale" if form == "comfy" else ".scale_weight")]
        assert torch.equal(scale, stored_scale.float().expand(w.shape[0]))  # a scalar broadcast per channel
    ref = copy.deepcopy(reference_experts[0])
    ref.load_state_dict(intended)
    with torch.no_grad():
        assert_close_fp32(_forward(dst / "high_noise_model", tiny_cfg), official_forward(ref, *_inputs(tiny_cfg)))
    meta = read_meta(dst / "high_noise_model")
    assert meta["scheme"] == "fp8"
    assert meta["source"]["file"] == file.name
    assert meta["source"]["stored"] == ("comfy-quant" if form == "comfy" else "fp8-scaled")
    assert any("kept" in n for n in meta["source"]["notes"])


def test_e5m2_file_to_fp8_is_rescaled_as_the_runtime_reads_it(tmp_path, high_state, tiny_cfg, capsys):
    path, _ = write_fp8_legacy(high_state, tmp_path / "high_e5m2_scaled_KJ.safetensors", dtype=torch.float8_e5m2)
    dst = convert_files({"high": path}, tmp_path / "q", "fp8", progress=False)
    src, got = _file_tensors(path), _stored(dst / "high_noise_model")
    for layer in _block_layers(high_state):
        w = src[layer + ".weight"]
        q, scale = e5m2_to_e4m3(w, src[layer + ".scale_weight"].float().expand(w.shape[0]))
        assert torch.equal(got[layer + ".weight"].view(torch.uint8), q.view(torch.uint8))
        assert torch.equal(got[layer + ".weight_scale"], scale)
    assert_close_fp32(_forward(dst / "high_noise_model", tiny_cfg), _forward(path, tiny_cfg))
    assert any("e5m2" in n for n in read_meta(dst / "high_noise_model")["source"]["notes"])


def test_fp8_scaled_file_to_int8_says_it_rounds_twice(tmp_path, high_state, tiny_cfg, capsys):
    path, _ = write_fp8_legacy(high_state, tmp_path / "high_fp8_scaled.safetensors", prefix=PREFIX)
    dst = tmp_path / "q"
    assert quantize(["--high", str(path), "--out", str(dst), "--scheme", "int8", "--quiet"]) == 0
    assert "rounded twice" in capsys.readouterr().err
    assert _stored(dst / "high_noise_model")["blocks.0.ffn.0.weight"].dtype == torch.int8
    assert _rel(_forward(dst / "high_noise_model", tiny_cfg), _forward(path, tiny_cfg)) < TOLERANCE["int8"]


# ---------------------------------------------------------------------------------------------
# GGUF


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_0"])
def test_gguf_to_int8_is_what_the_runtime_computes_at_load(tmp_path, high_state, tiny_cfg, qtype, capsys):
    """A GGUF expert runs as int8 on a GPU (requantized at load); converting stores that same int8 once."""
    path, _ = write_gguf(high_state, tmp_path / f"Wan2.2-T2V-A14B-HighNoise-{qtype}.gguf", qtype=qtype)
    dst = tmp_path / "q"
    assert quantize(["--high", str(path), "--out", str(dst), "--scheme", "int8", "--quiet"]) == 0
    assert "rounded a second time" in capsys.readouterr().err
    got, at_load = _stored(dst / "high_noise_model"), open_expert_file(path, scheme="int8")
    for layer in _block_layers(high_state):
        for leaf in ("weight", "weight_scale"):
            assert torch.equal(got[f"{layer}.{leaf}"], at_load.tensor(f"{layer}.{leaf}"))
    assert _rel(_forward(dst / "high_noise_model", tiny_cfg), _forward(path, tiny_cfg)) < TOLERANCE["int8"]
    assert read_meta(dst / "high_noise_model")["source"]["container"] == "gguf"


def test_gguf_to_fp8_notes_the_second_rounding_without_int8s_figure(tmp_path, high_state, capsys):
    """The 9e-3 figure was measured for int8: a GGUF converted to fp8 is told of the second rounding only."""
    path, _ = write_gguf(high_state, tmp_path / "Wan2.2-T2V-A14B-HighNoise-Q8_0.gguf", qtype="Q8_0")
    assert quantize(["--high", str(path), "--out", str(tmp_path / "q"), "--scheme", "fp8", "--quiet"]) == 0
    err = capsys.readouterr().err
    assert "quantized to fp8: they are rounded a second time" in err and "int8" not in err


# ---------------------------------------------------------------------------------------------
# a ComfyUI models/ folder, end to end through generate


HIGH, LOW = "wan2.2_t2v_high_noise_14B_fp32.safetensors", "wan2.2_t2v_low_noise_14B_fp32.safetensors"


def test_comfyui_folder_quantized_then_generated(roots, tmp_path, capsys):  # noqa: F811
    """quantize --ckpt COMFYUI/models --high NAME --low NAME, then the printed generate command's pieces make
    the video of the official root converted the same way."""
    from quant.convert import convert_checkpoint
    from wan_lite.checkpoint import open_components
    from wan_lite.generate import main as generate
    from wan_lite.t2v import T2VPipeline
    from wan_lite.video import read_metadata

    root, models, tok = roots
    dst = tmp_path / "q"
    argv = ["--ckpt", str(models), "--high", HIGH, "--low", LOW, "--out", str(dst), "--scheme", "int8", "--quiet"]
    assert quantize(argv) == 0
    printed = capsys.readouterr().out
    text, vae = models / "text_encoders" / "umt5_xxl_fp32.safetensors", models / "vae" / "wan_2.1_vae.safetensors"
    assert (f"python -m wan_lite.generate --high {dst / 'high_noise_model'} --low {dst / 'low_noise_model'} "
            f"--text-encoder {text} --vae {vae}") in printed
    for key, name in (("high", HIGH), ("low", LOW)):
        assert read_meta(dst / f"{key}_noise_model")["source"]["file"] == name

    out = tmp_path / "v.mp4"
    assert generate(["--high", str(dst / "high_noise_model"), "--low", str(dst / "low_noise_model"),
                     "--text-encoder", str(text), "--vae", str(vae), "--tokenizer", str(tok), "--prompt", "a fox",
                     "--size", "48x32", "--frames", "5", "--steps", "2", "--seed", "1", "--device", "cpu",
                     "--dtype", "fp32", "--vae-tile", "0", "--cache-dir", str(tmp_path / "c"), "--out", str(out)]) == 0
    assert read_metadata(out)["layout"] == "files"

    ref_root = convert_checkpoint(root, tmp_path / "ref", "int8", progress=False)
    files = open_components(dst / "high_noise_model", dst / "low_noise_model", text_encoder=text, vae=vae,
                            tokenizer=tok)
    assert files.scheme == "int8"
    kw = dict(size=(48, 32), frames=5, steps=3, seed=7)
    got, ref = (T2VPipeline.from_pretrained(m, device="cpu", dtype=torch.float32, text_dtype=torch.float32,
                                            cache_dir=tmp_path / c)("a red fox", **kw)
                for m, c in ((files, "a"), (ref_root, "b")))
    assert_close_fp32(got.latents, ref.latents)


# ---------------------------------------------------------------------------------------------
# refusals and usage errors, before any weight is read


def _refused(tmp_path, capsys, argv, match):
    dst = tmp_path / "q"
    assert quantize([*argv, "--out", str(dst), "--scheme", "int8", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert match in err, err
    assert not dst.exists() and not (tmp_path / "q.partial").exists()  # nothing converted
    return err


@pytest.mark.parametrize(("kind", "match"), [("lora", "LoRA"), ("i2v", "image-to-video"),
                                             ("text", "not a diffusion expert"), ("vae", "not a diffusion expert"),
                                             ("ti2v", "TI2V-5B")])
def test_wrong_files_are_refused_by_name(roots, tmp_path, high_state, capsys, kind, match):  # noqa: F811
    _, models, _ = roots
    good, _ = write_safetensors(high_state, tmp_path / "high.safetensors")
    bad = {"lora": lambda: write_lora(tmp_path / "lora.safetensors"),
           "i2v": lambda: write_skeleton("wan2.2-i2v-a14b", tmp_path / "i2v.safetensors"),
           "ti2v": lambda: write_skeleton("wan2.2-ti2v-5b", tmp_path / "ti2v.safetensors"),
           "text": lambda: models / "text_encoders" / "umt5_xxl_fp32.safetensors",
           "vae": lambda: models / "vae" / "wan_2.1_vae.safetensors"}[kind]()
    err = _refused(tmp_path, capsys, ["--high", str(good), "--low", str(bad)], match)
    assert str(bad) in err


def test_usage_errors(tmp_path, high_state, capsys):
    path, _ = write_safetensors(high_state, tmp_path / "high.safetensors")
    _refused(tmp_path, capsys, ["--high", str(path), "--experts", "low"], "--low FILE")
    _refused(tmp_path, capsys, ["--high", str(tmp_path / "nope.safetensors")], "does not exist")
    with pytest.raises(SystemExit) as e:
        quantize(["--high", str(path), "--out", str(tmp_path / "q"), "--scheme", "int8", "--calib", "x.txt"])
    assert e.value.code == 2 and "--calib works from a model root" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        quantize(["--ckpt", str(tmp_path), "--high", "a.safetensors", "--out", str(tmp_path / "q"), "--scheme", "int8"])
    assert "name both experts" in capsys.readouterr().err


def test_force_never_deletes_the_source_folder(tmp_path, high_state, capsys):
    (tmp_path / "models").mkdir()
    path, _ = write_safetensors(high_state, tmp_path / "models" / "high.safetensors")
    argv = ["--high", str(path), "--out", str(tmp_path / "models"), "--scheme", "int8", "--force", "--quiet"]
    assert quantize(argv) == 2
    assert "holds the source" in capsys.readouterr().err and path.is_file()


def test_meta_is_plain_json(tmp_path, high_state):
    path, _ = write_safetensors(high_state, tmp_path / "high.safetensors", dtype=torch.float16)
    dst = convert_files({"low": path}, tmp_path / "q", "fp8", progress=False)
    meta = json.loads((dst / "low_noise_model" / META_FILE).read_text())
    assert meta["scheme"] == "fp8" and meta["source"]["path"] == str(path.resolve())
    assert meta["source"]["notes"] == [f"high.safetensors: float weights quantized to fp8 ({meta['weights']})"]


def test_one_expert_of_a_pair_runs_beside_the_other_file(roots, tmp_path, reference_experts, high_state,  # noqa: F811
                                                         capsys):
    """--experts high converts only the high-noise file; the printed command pairs it with the given low file,
    which generate accepts (both run as fp8)."""
    from wan_lite.checkpoint import open_components

    _, models, tok = roots
    high, _ = write_fp8_legacy(high_state, tmp_path / "high_fp8.safetensors", prefix=PREFIX)
    low, _ = write_fp8_legacy(official_state(reference_experts[1]), tmp_path / "low_fp8.safetensors", prefix=PREFIX)
    dst = tmp_path / "q"
    argv = ["--high", str(high), "--low", str(low), "--experts", "high", "--out", str(dst), "--scheme", "fp8",
            "--quiet"]
    assert quantize(argv) == 0
    assert f"--high {dst / 'high_noise_model'} --low {low} " in capsys.readouterr().out
    assert sorted(p.name for p in dst.iterdir()) == ["high_noise_model"]
    model = open_components(dst / "high_noise_model", low, text_encoder=models / "text_encoders" /
                            "umt5_xxl_fp32.safetensors", vae=models / "vae" / "wan_2.1_vae.safetensors", tokenizer=tok)
    assert model.scheme == "fp8"


def test_library_scheme_from_a_file_reads_it_as_float(tmp_path, high_state, tiny_cfg):
    """quanto-int8 quantizes float weights itself: a file is read dequantized (here fp16) and converted as a root's
    expert would be (tolerance as tests/test_quant.py's quanto-int8, < 2%)."""
    pytest.importorskip("optimum.quanto")
    path, _ = write_safetensors(high_state, tmp_path / "high.safetensors", dtype=torch.float16, prefix=PREFIX)
    dst = convert_files({"high": path}, tmp_path / "q", "quanto-int8", progress=False)
    assert read_meta(dst / "high_noise_model")["scheme"] == "quanto-int8"
    assert _rel(_forward(dst / "high_noise_model", tiny_cfg), _forward(path, tiny_cfg)) < 2e-2
