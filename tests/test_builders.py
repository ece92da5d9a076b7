"""The test builders themselves: the random official model, the on-disk layouts and the diffusers key
map, checked against the official and diffusers code so the other tests stand on solid ground."""

from __future__ import annotations

import json

import pytest
import torch
from builders import (
    OFFICIAL_INDEX,
    diffusers_forward,
    make_diffusers_model,
    make_official_model,
    official_forward,
    official_shard_files,
    official_to_diffusers,
)
from reference import official
from safetensors.torch import load_file


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def test_reference_modules_load_with_sdpa_attention():
    ref = official()
    assert ref.model.flash_attention.__name__ == "sdpa_flash_attention"
    assert ref.attention.flash_attention.__name__ == "sdpa_flash_attention"
    for name in ("t5", "tokenizers", "vae2_1", "fm_solvers_unipc"):
        assert getattr(ref, name).__name__.startswith("wan.")


def test_sdpa_stand_in_masks_keys_past_k_lens():
    attn = official().attention.flash_attention
    q, k, v = torch.randn(2, 5, 2, 8), torch.randn(2, 7, 2, 8), torch.randn(2, 7, 2, 8)
    out = attn(q, k, v, k_lens=torch.tensor([3, 7]))
    assert out.shape == (2, 5, 2, 8) and out.dtype == torch.float32
    short = attn(q[:1], k[:1, :3], v[:1, :3])
    torch.testing.assert_close(out[:1], short)
    assert attn(q.bfloat16(), k.bfloat16(), v.bfloat16()).dtype == torch.bfloat16


def test_every_parameter_is_random(reference_experts):
    high, low = reference_experts
    for (name, p), q in zip(high.named_parameters(), low.parameters(), strict=True):
        assert p.dtype == torch.float32
        assert p.std() > 0 if p.numel() > 1 else p.abs() > 0, name
        assert not torch.equal(p, q), f"{name} is the same in both experts"
        if name.endswith("weight") and p.ndim == 1:
            assert not torch.equal(p, torch.ones_like(p)), f"{name} kept its init"
    assert high.head.head.weight.abs().min() > 0  # the official init zeroes it
    assert not high.training


def test_random_model_is_deterministic(tiny_cfg, reference_experts):
    again = make_official_model(tiny_cfg, 1)
    for a, b in zip(again.state_dict().values(), reference_experts[0].state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_official_layout_on_disk(official_root, reference_experts, tiny_cfg):
    for folder, model in zip((official_root.high, official_root.low), reference_experts, strict=True):
        assert folder.name in ("high_noise_model", "low_noise_model")
        config = json.loads((folder / "config.json").read_text())
        assert config["_class_name"] == "WanModel"
        for dropped in ("text_dim", "patch_size", "qk_norm", "cross_attn_norm", "window_size"):
            assert dropped not in config  # the loader must read these from tensor shapes
        assert (config["dim"], config["num_heads"], config["num_layers"]) == (32, 2, 2)
        shards = official_shard_files(folder)
        assert len(shards) >= 3
        assert {p.name for p in folder.glob("*.safetensors")} == {p.name for p in shards}
        assert all(p.name.endswith(f"-of-{len(shards):05d}.safetensors") for p in shards)
        index = json.loads((folder / OFFICIAL_INDEX).read_text())
        state = {}
        for shard in shards:
            state.update(load_file(shard))
        assert set(index["weight_map"]) == set(state) == set(model.state_dict())
        assert index["metadata"]["total_size"] == sum(t.numel() * 4 for t in state.values())
        for key, tensor in model.state_dict().items():
            assert state[key].dtype == torch.float32 and torch.equal(state[key], tensor), key


def test_official_single_file_layout(official_single_file, reference_experts):
    files = sorted(p.name for p in official_single_file.iterdir())
    assert files == ["config.json", "diffusion_pytorch_model.safetensors"]
    state = load_file(official_single_file / "diffusion_pytorch_model.safetensors")
    for key, tensor in reference_experts[0].state_dict().items():
        assert torch.equal(state[key], tensor), key


def test_diffusers_key_map_is_a_bijection(reference_experts, tiny_cfg):
    from builders import diffusers_config
    from diffusers import WanTransformer3DModel

    official_keys = list(reference_experts[0].state_dict())
    mapped = [official_to_diffusers(k) for k in official_keys]
    assert len(set(mapped)) == len(mapped)
    target = set(WanTransformer3DModel(**diffusers_config(tiny_cfg)).state_dict())
    assert set(mapped) == target
    assert official_to_diffusers("blocks.1.norm3.weight") == "blocks.1.norm2.weight"
    assert not any(k.startswith("blocks.0.norm2") for k in official_keys)  # unaffine FFN norm


def test_diffusers_layout_on_disk(diffusers_root, reference_experts):
    from diffusers import WanTransformer3DModel

    index = json.loads((diffusers_root.root / "model_index.json").read_text())
    assert index["boundary_ratio"] == 0.875
    assert (diffusers_root.high.name, diffusers_root.low.name) == ("transformer", "transformer_2")
    for folder, model in zip((diffusers_root.high, diffusers_root.low), reference_experts, strict=True):
        loaded = WanTransformer3DModel.from_pretrained(folder)
        state = loaded.state_dict()
        for key, tensor in model.state_dict().items():
            assert torch.equal(state[official_to_diffusers(key)], tensor), key


@pytest.mark.parametrize(
    "frames, height, width, ctx_len, timesteps",
    [(1, 4, 6, 7, (999.0, 500.0)), (3, 6, 4, 1, (877.0, 3.0)), (2, 4, 4, 512, (235.0, 0.0))],
)
def test_diffusers_forward_matches_official(reference_experts, tiny_cfg, frames, height, width, ctx_len, timesteps):
    """The key map is right iff diffusers' forward on the mapped weights equals the official one."""
    model = reference_experts[0]
    dmodel = make_diffusers_model(model, tiny_cfg)
    x = torch.randn(2, 16, frames, height, width)
    ctx = torch.randn(2, ctx_len, tiny_cfg.text_dim)
    t = torch.tensor(timesteps)
    with torch.no_grad():
        want = official_forward(model, x, t, ctx)
        got = diffusers_forward(dmodel, x, t, ctx)
    assert want.shape == x.shape and 0.3 < want.std() < 5  # activations stay O(1)
    assert rel_err(got, want) < 1e-5
