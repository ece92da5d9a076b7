"""`wan_lite.load_expert` on what users have: a single-file expert (fp8 scaled) and LoRAs, through the
one generic loader (`checkpoint.load_source`), against the official modules on the same weights."""

from __future__ import annotations

import copy

import pytest
import torch
from builders import official_forward
from builders_files import official_state, write_fp8_legacy
from test_lora import BLOCK_LINEARS, random_factors, reference_merge, write_comfyui
from tolerance import assert_close_fp32

import wan_lite
from wan_lite.checkpoint import CheckpointError


def _inputs(cfg):
    g = torch.Generator().manual_seed(11)
    return (torch.randn(1, cfg.in_dim, 2, 4, 4, generator=g), torch.tensor([937.5]),
            torch.randn(1, 6, cfg.text_dim, generator=g))


def test_folder_with_two_loras_matches_the_reference_merge(tmp_path, official_root, reference_experts, tiny_cfg):
    """load_expert(folder, loras=...) = the official forward of W + sum(s * alpha/r * up @ down)."""
    a, b = random_factors(tiny_cfg, BLOCK_LINEARS, 4, 2.0, 1), random_factors(tiny_cfg, BLOCK_LINEARS[:4], 8, 16.0, 2)
    files = write_comfyui(tmp_path / "a.safetensors", a), write_comfyui(tmp_path / "b.safetensors", b)
    model = wan_lite.load_expert(official_root.high, dtype=torch.float32, loras=[(files[0], 1.0), (files[1], -0.5)])
    ref = reference_merge(reference_experts[0], [(a, 1.0), (b, -0.5)])
    with torch.no_grad():
        assert_close_fp32(model(*_inputs(tiny_cfg)), official_forward(ref, *_inputs(tiny_cfg)))


def test_single_fp8_scaled_file_loads_through_load_expert(tmp_path, reference_experts, tiny_cfg):
    """A ComfyUI fp8_scaled single file: our fp8 layout with the file's own weights; fp32 on the CPU
    computes the official forward of the dequantized weights."""
    path, intended = write_fp8_legacy(official_state(reference_experts[0]), tmp_path / "high_fp8.safetensors",
                                      prefix="model.diffusion_model.")
    model = wan_lite.load_expert(path, dtype=torch.float32)
    assert model.blocks[0].ffn[0].weight.dtype == torch.float8_e4m3fn
    ref = copy.deepcopy(reference_experts[0])
    ref.load_state_dict({k: v.float() for k, v in intended.items()})
    with torch.no_grad():
        assert_close_fp32(model(*_inputs(tiny_cfg)), official_forward(ref, *_inputs(tiny_cfg)))


def test_lora_on_a_library_scheme_is_refused_by_name(tmp_path, official_root):
    pytest.importorskip("optimum.quanto")
    from quant.convert import convert_checkpoint

    dst = convert_checkpoint(official_root.root, tmp_path / "q", "quanto-int8", progress=False, experts=("high",))
    with pytest.raises(CheckpointError, match="LoRAs merge into float, int8 or fp8 weights"):
        wan_lite.load_expert(dst / "high_noise_model", loras=[(tmp_path / "x.safetensors", 1.0)])
