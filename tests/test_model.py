"""Forward parity of `wan_lite.WanModel` with the official model and with diffusers, loaded from both
on-disk layouts (tiny random experts, fp32 on the CPU)."""

from __future__ import annotations

import functools
import os

import pytest
import torch
from builders import diffusers_forward, make_diffusers_model, official_forward, save_diffusers_expert

import wan_lite
from wan_lite.config import ModelConfig
from wan_lite.model import WanModel

TOL_FP32 = 1e-5
TOL_BF16 = 2e-2


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@functools.cache
def _load(path, dtype=torch.float32):
    return wan_lite.load_expert(path, dtype=dtype)


@pytest.fixture(params=["official", "diffusers"])
def layout_root(request):
    return request.getfixturevalue(f"{request.param}_root")


# (batch, frames, height, width) of the latents, context length, one timestep per sample
CASES = {
    "b2-nonsquare-ctx7": ((2, 1, 4, 6), 7, (999.0, 3.0)),
    "b2-f3-tall-ctx1": ((2, 3, 6, 4), 1, (877.0, 500.0)),
    "b1-f2-ctx512": ((1, 2, 4, 4), 512, (235.0,)),
    "b2-f2-wide-ctx512-int": ((2, 2, 2, 8), 512, (0, 1000)),
}


def _inputs(cfg, case):
    (b, f, h, w), ctx_len, timesteps = CASES[case]
    x = torch.randn(b, cfg.in_dim, f, h, w)
    ctx = torch.randn(b, ctx_len, cfg.text_dim)
    dtype = torch.int64 if isinstance(timesteps[0], int) else torch.float32
    return x, torch.tensor(timesteps, dtype=dtype), ctx


def test_official_layout_restores_config_from_shapes(official_root, official_single_file, tiny_cfg):
    """config.json lacks text_dim/patch_size/...; the loader must still rebuild the tiny config."""
    for path in (official_root.high, official_root.low, official_single_file):
        model = _load(path)
        assert isinstance(model, WanModel)
        assert model.cfg == tiny_cfg, path
        assert model.cfg.text_dim == 24 and tuple(model.cfg.patch_size) == (1, 2, 2)


def test_diffusers_layout_restores_config(diffusers_root, tiny_cfg):
    for path in (diffusers_root.high, diffusers_root.low):
        assert _load(path).cfg == tiny_cfg


def test_parameter_names_are_official_keys(tiny_cfg, reference_experts):
    ours = WanModel(tiny_cfg)
    ref_state = reference_experts[0].state_dict()
    assert set(ours.state_dict()) == set(ref_state)
    ours.load_state_dict(ref_state, strict=True)
    x, t, ctx = _inputs(tiny_cfg, "b2-nonsquare-ctx7")
    with torch.no_grad():
        assert rel_err(ours.eval()(x, t, ctx), official_forward(reference_experts[0], x, t, ctx)) < TOL_FP32


@pytest.mark.parametrize("case", list(CASES))
def test_forward_matches_official_and_diffusers(layout_root, reference_experts, tiny_cfg, case):
    model = _load(layout_root.high)
    ref = reference_experts[0]
    x, t, ctx = _inputs(tiny_cfg, case)
    with torch.no_grad():
        got = model(x, t, ctx)
        want = official_forward(ref, x, t, ctx)
        want_diffusers = diffusers_forward(make_diffusers_model(ref, tiny_cfg), x, t.float(), ctx)
    assert got.dtype == torch.float32 and got.shape == x.shape
    err, err_d = rel_err(got, want), rel_err(got, want_diffusers)
    assert err < TOL_FP32, f"vs official: {err:.3e}"
    assert err_d < TOL_FP32, f"vs diffusers: {err_d:.3e}"


def test_low_expert_is_the_low_noise_folder(layout_root, reference_experts, tiny_cfg):
    x, t, ctx = _inputs(tiny_cfg, "b2-nonsquare-ctx7")
    with torch.no_grad():
        got = _load(layout_root.low)(x, t, ctx)
        assert rel_err(got, official_forward(reference_experts[1], x, t, ctx)) < TOL_FP32
        assert rel_err(got, official_forward(reference_experts[0], x, t, ctx)) > 0.1


def test_batch_matches_samples_one_at_a_time(official_root, tiny_cfg):
    model = _load(official_root.high)
    x, t, ctx = _inputs(tiny_cfg, "b2-f3-tall-ctx1")
    with torch.no_grad():
        batched = model(x, t, ctx)
        single = torch.cat([model(x[i : i + 1], t[i : i + 1], ctx[i : i + 1]) for i in range(2)])
    assert rel_err(batched, single) < 1e-6
    assert rel_err(batched[0], batched[1]) > 0.1  # different timesteps and inputs give different outputs


def test_padded_context_positions_are_not_masked(official_root, tiny_cfg):
    """The model zero-pads to 512 itself: an unpadded prompt equals the same prompt padded by hand
    (the padded positions are attended, as in the official model; parity with it is checked above)."""
    model = _load(official_root.high)
    x, t, ctx = _inputs(tiny_cfg, "b2-nonsquare-ctx7")
    padded = torch.cat([ctx, ctx.new_zeros(2, 512 - 7, tiny_cfg.text_dim)], dim=1)
    with torch.no_grad():
        assert rel_err(model(x, t, ctx), model(x, t, padded)) < 1e-6


def test_diffusers_sharded_layout_loads(tmp_path, reference_experts, tiny_cfg):
    folder = save_diffusers_expert(reference_experts[1], tiny_cfg, tmp_path / "transformer_2", max_shard_size="40KB")
    assert len(list(folder.glob("*.safetensors"))) > 1 and list(folder.glob("*.index.json"))
    model = wan_lite.load_expert(folder, dtype=torch.float32)
    x, t, ctx = _inputs(tiny_cfg, "b1-f2-ctx512")
    with torch.no_grad():
        assert rel_err(model(x, t, ctx), official_forward(reference_experts[1], x, t, ctx)) < TOL_FP32


@pytest.mark.parametrize("case", ["b2-nonsquare-ctx7", "b1-f2-ctx512"])
def test_bf16_load(layout_root, reference_experts, tiny_cfg, case):
    """bf16: Linear weights held in bf16, output float32 and close to the fp32 official forward."""
    model = _load(layout_root.high, torch.bfloat16)
    for i in range(tiny_cfg.num_layers):
        block = model.blocks[i]
        for linear in (block.self_attn.q, block.self_attn.o, block.cross_attn.k, block.ffn[0], block.ffn[2]):
            assert linear.weight.dtype == torch.bfloat16
    x, t, ctx = _inputs(tiny_cfg, case)
    with torch.no_grad():
        got = model(x, t, ctx)
        want = official_forward(reference_experts[0], x, t, ctx)
    assert got.dtype == torch.float32
    err = rel_err(got, want)
    assert 0 < err < TOL_BF16, f"bf16 vs fp32 official: {err:.3e}"


def test_tiny_preset_is_the_documented_one():
    cfg = ModelConfig.tiny()
    dims = (cfg.dim, cfg.ffn_dim, cfg.num_heads, cfg.num_layers, cfg.freq_dim, cfg.text_dim, cfg.text_len)
    assert dims == (32, 64, 2, 2, 16, 24, 512)


@pytest.mark.parametrize("layout", ["official", "diffusers"])
def test_other_dimensions_round_trip(tmp_path, layout):
    """Nothing is hard-coded to the tiny preset: 4 heads of 12, 3 layers, other widths and eps."""
    from builders import make_official_model, save_official_expert

    cfg = ModelConfig.tiny(dim=48, ffn_dim=80, num_heads=4, num_layers=3, freq_dim=32, text_dim=20, eps=1e-5)
    ref = make_official_model(cfg, 7)
    if layout == "official":
        folder = save_official_expert(ref, tmp_path / "high_noise_model")
    else:
        folder = save_diffusers_expert(ref, cfg, tmp_path / "transformer")
    model = wan_lite.load_expert(folder, dtype=torch.float32)
    assert model.cfg == cfg
    x, t, ctx = torch.randn(2, 16, 2, 4, 6), torch.tensor([950.0, 120.0]), torch.randn(2, 9, 20)
    with torch.no_grad():
        assert rel_err(model(x, t, ctx), official_forward(ref, x, t, ctx)) < TOL_FP32


def test_ffn_chunking_matches_whole_ffn():
    """Block.ffn_chunk splits the FFN over tokens; LayerNorm and FFN are per token, so it is exact."""
    cfg = ModelConfig.tiny()
    torch.manual_seed(0)
    model = WanModel(cfg).eval()
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.2)
    x, t, ctx = torch.randn(2, 16, 3, 4, 6), torch.tensor([900, 300]), torch.randn(2, 5, cfg.text_dim)
    with torch.no_grad():
        whole = model(x, t, ctx)
        for block in model.blocks:
            block.ffn_chunk = 5  # 18 tokens: chunks of 5, 5, 5, 3
        chunked = model(x, t, ctx)
    assert ((chunked - whole).norm() / whole.norm()).item() < 1e-6


def test_compile_blocks_keeps_its_kernels_in_the_wan_lite_cache(monkeypatch):
    """Inductor's cache goes under ~/.cache/wan-lite (not /tmp, which a reboot empties), unless set."""
    from wan_lite import model as model_mod

    m = WanModel(ModelConfig.tiny(num_layers=1))
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    model_mod.compile_blocks(m)  # lazy: nothing is compiled before the first call
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(model_mod.COMPILE_CACHE)
    assert model_mod.COMPILE_CACHE.parts[-2:] == ("wan-lite", "inductor")
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", "/elsewhere")
    model_mod.compile_blocks(m)
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == "/elsewhere"
