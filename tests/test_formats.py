"""Single files in every format people have (safetensors fp32/fp16/bf16, fp8 scaled, ComfyUI comfy_quant,
GGUF), all written from one random official expert: identified from the header, opened as an expert
source, loaded, and compared at fp32 with the official forward of the weights the file holds.
Then each file wan-lite must refuse, with its message."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from builders import make_official_model, official_forward, official_to_diffusers
from builders_files import (
    BLOCK_LINEAR,
    official_state,
    pack_q6_k,
    truncate,
    write_fp8_comfy,
    write_fp8_legacy,
    write_gguf,
    write_lora,
    write_safetensors,
    write_skeleton,
    write_t5,
    write_text_encoder,
)
from reference import official
from tolerance import assert_close_fp32, rel_error

from wan_lite.checkpoint import CheckpointError, load_source
from wan_lite.config import ModelConfig
from wan_lite.formats import (
    e5m2_to_e4m3,
    identify,
    open_expert_file,
    read_text_encoder_file,
    read_vae_file,
    umt5_config,
)
from wan_lite.formats.expert import config_from_shapes
from wan_lite.model import WanModel

EIGHT_BIT = (torch.int8, torch.float8_e4m3fn)


@pytest.fixture(scope="module")
def state(reference_experts):
    return official_state(reference_experts[0])


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return tmp_path_factory.mktemp("formats")


def load(source, dtype=torch.float32) -> WanModel:
    """The project's generic loader of an expert source (checkpoint.load_source)."""
    return load_source(source, dtype=dtype)


def assert_official_parity(source, reference_model, intended, cfg):
    """wan-lite's model from `source` vs the official model holding `intended`, fp32, relative error < 1e-5."""
    ref = copy.deepcopy(reference_model)
    ref.load_state_dict(intended, strict=True)
    ours = load(source)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, cfg.in_dim, 1, 4, 6, generator=g)  # (B, C, F, H, W)
    ctx = torch.randn(2, 7, cfg.text_dim, generator=g)
    t = torch.tensor([999.0, 311.0])
    with torch.no_grad():
        assert_close_fp32(ours(x, t, ctx), official_forward(ref, x, t, ctx))


# ---------------------------------------------------------------------------------------------
# experts that load


@pytest.mark.parametrize("dtype,prefix", [(torch.float32, ""), (torch.float16, ""), (torch.bfloat16, ""),
                                          (torch.bfloat16, "model.diffusion_model."),
                                          (torch.float16, "diffusion_model.")])
def test_single_file_float(files, state, reference_experts, tiny_cfg, dtype, prefix):
    path, intended = write_safetensors(state, files / f"single_{dtype}_{bool(prefix)}.safetensors", dtype, prefix)
    info = identify(path)
    assert (info.kind, info.model, info.container, info.scheme) == ("expert", "wan-t2v", "safetensors", "none")
    source = open_expert_file(path)
    assert source.config == tiny_cfg and source.scheme == "none" and source.linears == {}
    assert sorted(source.names()) == sorted(state)
    assert_official_parity(source, reference_experts[0], intended, tiny_cfg)


def test_single_file_diffusers_names(files, state, reference_experts, tiny_cfg):
    renamed = {official_to_diffusers(k): v for k, v in state.items()}
    path, stored = write_safetensors(renamed, files / "diffusers_single.safetensors", torch.float16)
    intended = {k: stored[official_to_diffusers(k)] for k in state}
    source = open_expert_file(path)
    assert source.config == tiny_cfg
    assert_official_parity(source, reference_experts[0], intended, tiny_cfg)


@pytest.mark.parametrize("dtype,other", [(torch.float8_e4m3fn, False), (torch.float8_e5m2, False),
                                         (torch.float8_e4m3fn, True)])
def test_fp8_scaled_legacy(files, state, reference_experts, tiny_cfg, dtype, other):
    path, intended = write_fp8_legacy(state, files / f"fp8_{dtype}_{other}.safetensors", dtype, other,
                                      prefix="model.diffusion_model.")
    assert identify(path).scheme == "fp8-scaled"
    source = open_expert_file(path)
    assert source.scheme == "fp8"
    assert set(source.linears) == {n.removesuffix(".weight") for n in state if BLOCK_LINEAR.match(n)}
    assert all(spec == {"scheme": "fp8", "smooth": False} for spec in source.linears.values())
    w, scale = source.tensor("blocks.1.ffn.0.weight"), source.tensor("blocks.1.ffn.0.weight_scale")
    assert w.dtype == torch.float8_e4m3fn and scale.shape == (tiny_cfg.ffn_dim,) and scale.dtype == torch.float32
    if dtype == torch.float8_e4m3fn:  # the stored weight as is (no rounding again), the scalar broadcast
        from safetensors import safe_open

        with safe_open(path, "pt") as f:
            stored = f.get_tensor("model.diffusion_model.blocks.1.ffn.0.weight")
            stored_scale = f.get_tensor("model.diffusion_model.blocks.1.ffn.0.scale_weight")
        assert torch.equal(w.view(torch.uint8), stored.view(torch.uint8))
        assert torch.equal(scale, stored_scale.expand(tiny_cfg.ffn_dim))
    if other:  # non-block fp8 Linears come out as float
        assert source.tensor("head.head.weight").dtype == torch.float32
    assert_official_parity(source, reference_experts[0], intended, tiny_cfg)


def test_e5m2_to_e4m3_keeps_values():
    """Power-of-two rescale per row: exact for every value within 2^14 of the row's absmax."""
    g = torch.Generator().manual_seed(0)
    w = (torch.randn(64, 256, generator=g) * torch.logspace(-3, 3, 64)[:, None]).to(torch.float8_e5m2)
    scale = torch.rand(64, generator=g) + 0.5
    q, s = e5m2_to_e4m3(w, scale)
    before, after = w.float() * scale[:, None], q.float() * s[:, None]
    big = w.float().abs() >= w.float().abs().amax(dim=1, keepdim=True) * 2.0**-14
    assert torch.equal(after[big], before[big])
    assert rel_error(after, before) < 1e-6


def test_fp8_comfy_quant(files, state, reference_experts, tiny_cfg):
    path, intended = write_fp8_comfy(state, files / "comfy_quant.safetensors")
    assert identify(path).scheme == "comfy-quant"
    source = open_expert_file(path)
    assert source.scheme == "fp8" and len(source.linears) == 10 * tiny_cfg.num_layers
    assert "blocks.0.self_attn.q.comfy_quant" not in source.names()
    assert_official_parity(source, reference_experts[0], intended, tiny_cfg)


def test_fp8_file_as_float_and_int8(files, state, reference_experts, tiny_cfg):
    path, intended = write_fp8_legacy(state, files / "fp8_as.safetensors")
    as_float = open_expert_file(path, scheme="none")
    assert as_float.scheme == "none" and as_float.tensor("blocks.0.self_attn.q.weight").dtype == torch.float32
    assert_official_parity(as_float, reference_experts[0], intended, tiny_cfg)
    assert open_expert_file(path, scheme="int8").tensor("blocks.0.self_attn.q.weight").dtype == torch.int8


def test_q6_k_packing_decodes_to_intended_values():
    import gguf

    x = np.random.default_rng(0).standard_normal((8, 256)).astype(np.float32)
    packed, values = pack_q6_k(x)
    assert packed.shape == (8, 210) and packed.dtype == np.uint8
    decoded = gguf.quants.dequantize(packed, gguf.GGMLQuantizationType.Q6_K)
    assert rel_error(torch.from_numpy(decoded), torch.from_numpy(values)) < 1e-7
    assert rel_error(torch.from_numpy(values), torch.from_numpy(x)) < 2e-2  # a 6-bit code of x


@pytest.mark.parametrize("qtype,q6_k,prefix", [
    ("F32", (), ""), ("F16", (), ""), ("BF16", (), ""), ("Q8_0", (), ""), ("Q4_0", (), ""), ("Q5_0", (), ""),
    ("Q8_0", (), "model.diffusion_model."),
    ("Q4_0", ("blocks.0.ffn.0.weight", "blocks.1.cross_attn.v.weight"), ""),
])
def test_gguf(files, state, reference_experts, tiny_cfg, qtype, q6_k, prefix):
    path, intended = write_gguf(state, files / f"expert_{qtype}_{len(q6_k)}_{bool(prefix)}.gguf", qtype, q6_k=q6_k,
                                prefix=prefix)
    info = identify(path)
    assert (info.kind, info.model, info.container, info.scheme) == ("expert", "wan-t2v", "gguf", "gguf")
    source = open_expert_file(path)
    assert source.config == tiny_cfg and source.scheme == "none"
    assert source.tensor("patch_embedding.weight").shape == (32, 16, 1, 2, 2)  # from comfy.gguf.orig_shape
    assert_official_parity(source, reference_experts[0], intended, tiny_cfg)


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_0"])
def test_gguf_int8_requantization(files, state, reference_experts, tiny_cfg, qtype):
    """scheme="int8": block Linears dequantized then requantized per channel; the added error, measured."""
    path, intended = write_gguf(state, files / f"int8_{qtype}.gguf", qtype)
    source = open_expert_file(path, scheme="int8")
    assert source.scheme == "int8" and len(source.linears) == 10 * tiny_cfg.num_layers
    requantized, errors = dict(intended), []
    for layer in source.linears:
        q, scale = source.tensor(layer + ".weight"), source.tensor(layer + ".weight_scale")
        assert q.dtype == torch.int8 and scale.shape == (q.shape[0],)
        requantized[layer + ".weight"] = q.float() * scale[:, None]
        errors.append(rel_error(requantized[layer + ".weight"], intended[layer + ".weight"]))
    print(f"\nGGUF {qtype} -> int8 per channel: relative weight error mean {np.mean(errors):.2e}, "
          f"max {np.max(errors):.2e} (K = 32/64)")
    assert 0 < np.max(errors) < 1e-2
    assert_official_parity(source, reference_experts[0], requantized, tiny_cfg)  # computes exactly q * scale


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_0"])
def test_int8_requantization_error_at_a14b_width(qtype):
    """The same requantization on rows as long as A14B's (K = 5120, 160 GGUF blocks per row), Gaussian weights."""
    import gguf

    from wan_lite.quantized.linear import quantize_linear_weight

    w = np.random.default_rng(0).standard_normal((64, 5120)).astype(np.float32) / np.sqrt(5120)
    kind = gguf.GGMLQuantizationType[qtype]
    deq = torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(w, kind), kind))
    q, scale = quantize_linear_weight(deq, "int8")
    added, own = rel_error(q.float() * scale[:, None], deq), rel_error(deq, torch.from_numpy(w))
    print(f"\nK=5120 {qtype}: GGUF's own error {own:.2e}, int8 requantization adds {added:.2e}")
    assert added < 1.5e-2


def test_expert_source_contract(files, state, tiny_cfg):
    path, _ = write_fp8_legacy(state, files / "contract.safetensors")
    source = open_expert_file(path)
    names = source.names()
    assert "blocks.0.ffn.2.weight_scale" in names and "blocks.0.ffn.2.bias" in names
    assert not any(n.endswith(("scale_weight", "scale_input")) or n == "scaled_fp8" for n in names)
    assert source.fingerprint() == open_expert_file(path).fingerprint()
    assert source.fingerprint() != open_expert_file(path, scheme="none").fingerprint()
    other, _ = write_fp8_legacy(state, files / "contract_e5m2.safetensors", torch.float8_e5m2)
    assert source.fingerprint() != open_expert_file(other).fingerprint()


def test_num_heads_rule(files, state, tiny_cfg):
    shapes = {"patch_embedding.weight": (5120, 16, 1, 2, 2), "head.head.weight": (64, 5120),
              "blocks.0.ffn.0.weight": (13824, 5120), "time_embedding.0.weight": (5120, 256),
              "text_embedding.0.weight": (5120, 4096)}
    assert config_from_shapes(shapes, {}, None, None).num_heads == 40  # dim // 128
    path, _ = write_gguf(state, files / "no_heads.gguf", "Q8_0", num_heads=False)
    with pytest.raises(CheckpointError, match=r"dim 32 is not a multiple of 128 .* pass num_heads="):
        open_expert_file(path)
    assert open_expert_file(path, num_heads=2).config == tiny_cfg


# ---------------------------------------------------------------------------------------------
# text encoder and VAE files


@pytest.fixture(scope="module")
def t5_official():
    from builders_t2v import make_official_t5

    return make_official_t5(24, seed=0, vocab=64)


@pytest.mark.parametrize("fp8", [False, True])
def test_text_encoder_file(files, t5_official, fp8):
    from transformers import UMT5EncoderModel

    from wan_lite.text import official_to_transformers

    hf_names = official_to_transformers({k: k for k in t5_official.state_dict()})  # HF name -> official name
    path, intended = write_text_encoder(official_to_transformers(t5_official.state_dict()),
                                        files / f"umt5_{fp8}.safetensors", fp8)
    info = identify(path)
    assert (info.kind, info.model, info.scheme) == ("text_encoder", "umt5", "fp8-scaled" if fp8 else "none")
    sd = read_text_encoder_file(path, width=24)
    shapes = {k: tuple(v.shape) for k, v in sd.items()}
    with torch.device("meta"):
        model = UMT5EncoderModel(umt5_config(shapes))
    model.load_state_dict({k: v.float() for k, v in sd.items()}, strict=True, assign=True)
    ref = copy.deepcopy(t5_official)
    ref.load_state_dict({hf_names[k]: v for k, v in intended.items()}, strict=True)
    ids = torch.randint(2, 64, (2, 9), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    with torch.no_grad():
        assert_close_fp32(model.eval()(input_ids=ids, attention_mask=mask).last_hidden_state, ref(ids, mask))


@pytest.fixture(scope="module")
def tiny_vae():
    vae2_1 = official().vae2_1
    model = vae2_1.WanVAE_(dim=8, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2, attn_scales=[],
                           temperal_downsample=[False, True, True], dropout=0.0)
    return {k: v.detach() for k, v in model.state_dict().items()}


def test_vae_file(files, tiny_vae):
    from diffusers import AutoencoderKLWan

    from wan_lite.vae import official_to_diffusers as vae_to_diffusers

    path, intended = write_safetensors(tiny_vae, files / "wan_2.1_vae.safetensors", torch.float16)
    info = identify(path)
    assert (info.kind, info.model) == ("vae", "wan2.1-vae")
    sd = read_vae_file(path)
    assert sd.keys() == intended.keys()
    for k, v in sd.items():
        assert_close_fp32(v.float(), intended[k], rtol=1e-7)  # the stored values read back
    vae = AutoencoderKLWan(base_dim=8, z_dim=16)
    vae.load_state_dict({k: v.float() for k, v in vae_to_diffusers(sd).items()}, strict=True)


def test_vae_file_missing_key(files, tiny_vae):
    partial = {k: v for k, v in tiny_vae.items() if k != "decoder.head.2.bias"}
    path, _ = write_safetensors(partial, files / "vae_partial.safetensors")
    from diffusers import AutoencoderKLWan

    from wan_lite.vae import check_vae_keys

    with torch.device("meta"):
        model = AutoencoderKLWan(base_dim=8, z_dim=16)
    with pytest.raises(CheckpointError, match=r"vae_partial.safetensors does not hold the Wan2.1 VAE.*missing "
                                              r"decoder.conv_out.bias"):
        check_vae_keys(read_vae_file(path), model, path)  # what VAE.from_pretrained checks before loading


# ---------------------------------------------------------------------------------------------
# refusals: what the file is, what to use instead


def test_refuses_i2v_expert(files):
    path = write_skeleton("wan2.2-i2v-a14b", files / "wan2.2_i2v_high_noise_14B_fp16.safetensors")
    assert identify(path).model == "wan2.2-i2v-a14b"
    with pytest.raises(CheckpointError, match=r"this is the Wan2.2 I2V-A14B image-to-video expert.*in_dim 36.*"
                                              r"wan-lite runs Wan2.2 T2V-A14B: use wan2.2_t2v_high_noise_14B_\*"):
        open_expert_file(path)


def test_refuses_ti2v_expert(files):
    path = write_skeleton("wan2.2-ti2v-5b", files / "wan2.2_ti2v_5B_fp16.safetensors")
    with pytest.raises(CheckpointError, match=r"this is the Wan2.2 TI2V-5B model \(dim 3072, in_dim 48.*"
                                              r"use wan2.2_t2v_high_noise_14B_"):
        open_expert_file(path)


def test_wan21_t2v_14b_cannot_be_told_apart(files):
    info = identify(write_skeleton("wan2.1-t2v-14b", files / "wan2.1_t2v_14B.safetensors"))
    assert info.model == "wan2.2-t2v-a14b" and "Wan2.1-T2V-14B: same shapes" in info.describe()


def test_refuses_wan22_vae(files):
    path = write_skeleton("wan2.2-vae", files / "wan2.2_vae.safetensors")
    with pytest.raises(CheckpointError, match=r"Wan2.2 VAE \(z_dim 48\), which is for TI2V-5B; "
                                              r"use wan_2.1_vae.safetensors"):
        read_vae_file(path)


def test_refuses_t5_that_is_not_umt5(files):
    path = write_t5(files / "t5xxl_fp16.safetensors")
    assert identify(path).model == "t5"
    with pytest.raises(CheckpointError, match=r"T5 encoder \(relative attention bias only in block 0\), not UMT5.*"
                                              r"umt5_xxl_fp16.safetensors"):
        read_text_encoder_file(path, width=24)


def test_refuses_text_encoder_of_another_width(files, t5_official):
    from wan_lite.text import official_to_transformers

    path, _ = write_text_encoder(official_to_transformers(t5_official.state_dict()), files / "umt5_24.safetensors",
                                 False)
    with pytest.raises(CheckpointError, match=r"its width is 24, the experts read 4096-wide text"):
        read_text_encoder_file(path)


def test_refuses_other_gguf_architecture(files):
    import gguf

    path = files / "flux1-dev-Q4_0.gguf"
    writer = gguf.GGUFWriter(str(path), "flux")
    writer.add_tensor("double_blocks.0.img_attn.proj.weight", np.zeros((4, 32), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    assert identify(path).model == "gguf:flux"
    with pytest.raises(CheckpointError, match=r"GGUF of architecture 'flux', not a Wan model.*"
                                              r"Wan2.2-T2V-A14B-HighNoise-\*.gguf"):
        open_expert_file(path)


@pytest.mark.parametrize("container", ["safetensors", "gguf"])
def test_refuses_truncated_file(files, state, container):
    if container == "gguf":
        full, _ = write_gguf(state, files / "whole.gguf", "Q8_0")
    else:
        full, _ = write_safetensors(state, files / "whole.safetensors", torch.float16)
    size = full.stat().st_size
    cut = truncate(full, files / f"cut.{container}", size - 100)
    with pytest.raises(CheckpointError, match=rf"cut.{container} is truncated: the header says {size} bytes, the "
                                              rf"file has {size - 100}; download it again"):
        identify(cut)
    with pytest.raises(CheckpointError, match="download it again"):
        identify(truncate(full, files / f"stub.{container}", 6))  # cut inside the header


def test_refuses_an_empty_or_tiny_file(files):
    empty, note = files / "empty.safetensors", files / "note.safetensors"
    empty.write_bytes(b"")
    note.write_text("hello")
    with pytest.raises(CheckpointError, match=r"empty.safetensors is empty: download it again$"):
        identify(empty)
    with pytest.raises(CheckpointError, match=r"note.safetensors \(5 bytes\) is too short to be a safetensors or GGUF "
                                              r"file: pass the weights file"):
        identify(note)


def test_refuses_lora_as_expert(files):
    path = write_lora(files / "wan2.2_t2v_lightx2v_4steps_lora_high_noise.safetensors")
    assert identify(path).kind == "lora"
    with pytest.raises(CheckpointError, match=r"this is a LoRA \(layers 2, rank 4; safetensors\), not an expert: "
                                              r"pass the base expert"):
        open_expert_file(path)


def test_refuses_text_encoder_and_vae_as_expert(files, t5_official, tiny_vae):
    from wan_lite.text import official_to_transformers

    te, _ = write_text_encoder(official_to_transformers(t5_official.state_dict()), files / "te.safetensors", True)
    with pytest.raises(CheckpointError, match=r"this is a UMT5 text encoder .* not a diffusion expert: pass it as "
                                              r"the text encoder"):
        open_expert_file(te)
    vae, _ = write_safetensors(tiny_vae, files / "vae_as_expert.safetensors", torch.float16)
    with pytest.raises(CheckpointError, match=r"this is the Wan2.1 VAE .* not a diffusion expert: pass it as the VAE"):
        open_expert_file(vae)


def test_refuses_unsupported_comfy_format(files, state):
    path, _ = write_fp8_comfy(state, files / "nvfp4.safetensors", fmt="nvfp4")
    with pytest.raises(CheckpointError, match=r"ComfyUI quantized format 'nvfp4', which wan-lite does not read"):
        open_expert_file(path)


def test_refuses_incomplete_expert(files, state):
    partial = {k: v for k, v in state.items() if k != "blocks.1.norm3.bias"}
    path, _ = write_safetensors(partial, files / "partial.safetensors", torch.float16)
    with pytest.raises(CheckpointError, match=r"partial.safetensors does not hold a 2-block Wan2.2 expert: missing "
                                              r"blocks.1.norm3.bias"):
        open_expert_file(path)


def test_refuses_other_wan_expert_of_tiny_size(files):
    cfg = ModelConfig.tiny(in_dim=36)
    path, _ = write_safetensors(official_state(make_official_model(cfg, 5)), files / "i2v_tiny.safetensors")
    with pytest.raises(CheckpointError, match=r"a Wan-family diffusion model of another kind \(dim 32, in_dim 36"):
        open_expert_file(path)


def test_metadata_of_comfy_file_names_layers(files, state):
    path, _ = write_fp8_comfy(state, files / "meta.safetensors")
    from safetensors import safe_open

    with safe_open(path, "pt") as f:
        layers = json.loads(f.metadata()["_quantization_metadata"])["layers"]
    assert "model.diffusion_model.blocks.0.self_attn.q" in layers


def test_a_diffusers_vae_file_is_refused_naming_its_folder(tmp_path):
    """Found by a user trial: `--vae .../vae/diffusion_pytorch_model.safetensors` (diffusers names) was refused
    with "use wan_2.1_vae.safetensors" only, though the folder beside it is taken as it is."""
    from diffusers import AutoencoderKLWan

    AutoencoderKLWan(base_dim=16).save_pretrained(tmp_path / "vae")
    with pytest.raises(CheckpointError, match=r"not the Wan2.1 VAE: use wan_2.1_vae.safetensors \(or a diffusers "
                                              r"vae/ folder: pass the folder, not its file\)"):
        read_vae_file(tmp_path / "vae" / "diffusion_pytorch_model.safetensors")
