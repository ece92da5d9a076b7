"""The planner: plans chosen for given budgets, the memory arithmetic, and the error for too little."""

import json

import pytest
import torch

from wan_lite import planner
from wan_lite.config import ModelConfig
from wan_lite.planner import Plan, PlanError, activation_bytes, make_plan, tokens, unit_bytes

A14B = ModelConfig.a14b()
HOPPER = dict(device="cuda", capability=(9, 0))


def test_tokens_match_design():
    assert tokens(480, 832, 81, A14B) == 32_760
    assert tokens(720, 1280, 81, A14B) == 75_600


def test_expert_bytes():
    """One 8-bit expert ~14-15 GB (DESIGN section 3), bf16 about twice the block part."""
    embed, block, head = unit_bytes(A14B, "int8")
    total = embed + head + 40 * block
    assert 14.0e9 < total < 15.5e9
    _, block16, _ = unit_bytes(A14B, "none")
    assert 1.95 < block16 / block < 2.0


@pytest.fixture(params=[True, False], ids=["ffn-chunked", "ffn-whole"])
def chunked(request, monkeypatch):
    """Plan for a model.py with and without FFN chunking (Block.ffn_chunk)."""
    monkeypatch.setattr(planner, "ffn_chunking", lambda: request.param)
    return request.param


# (budget GB, (height, width)) -> (mode, cfg_batched) with FFN chunking / without; None: too small.
# From the arithmetic fitted on 2026-11-26 (H100): 720p resident measured 20.48 GB allocated with
# chunking; without it the estimate (22.9 GB) leaves no room in 24 GB; 480p streaming, sequential
# CFG, measured 4.70 GB.
BUDGETS = {
    (80, (720, 1280)): (("resident", False), ("resident", False)),
    (24, (720, 1280)): (("resident", False), ("streaming", True)),
    (24, (480, 832)): (("resident", False), ("resident", False)),
    (16, (480, 832)): (("streaming", True), ("streaming", True)),
    (8, (480, 832)): (("streaming", True), ("streaming", False)),
    (6, (480, 832)): (("streaming", False), None),
    (5, (480, 832)): (None, None),
}


@pytest.mark.parametrize(("vram", "res"), list(BUDGETS))
def test_plan_for_budget(vram, res, chunked):
    expected = BUDGETS[(vram, res)][0 if chunked else 1]
    if expected is None:
        with pytest.raises(PlanError, match="smallest budget that works"):
            make_plan(vram, height=res[0], width=res[1], frames=81, scheme="int8", **HOPPER)
        return
    plan = make_plan(vram, height=res[0], width=res[1], frames=81, scheme="int8", attention_8bit=False, **HOPPER)
    assert (plan.mode, plan.cfg_batched) == expected
    assert plan.estimated_peak_gb < vram
    assert plan.attention == "sdpa-cudnn"
    assert plan.ffn_chunk == (8192 if chunked else None)


def test_plan_is_frozen_and_serializable(monkeypatch):
    monkeypatch.setattr(planner, "ffn_chunking", lambda: True)
    plan = make_plan(24, height=720, width=1280, frames=81, **HOPPER)
    assert isinstance(plan, Plan)
    with pytest.raises(AttributeError):
        plan.mode = "streaming"
    assert json.loads(json.dumps(plan.to_dict()))["mode"] == "resident"
    text = plan.describe()
    assert "resident" in text and "75,600 tokens" in text and "GB peak" in text


def test_text_encoder_and_vae_follow_the_budget(monkeypatch):
    monkeypatch.setattr(planner, "ffn_chunking", lambda: True)
    big = make_plan(24, height=720, width=1280, frames=81, **HOPPER)
    small = make_plan(8, height=480, width=832, frames=81, **HOPPER)
    assert big.text_device == "cuda" and small.text_device == "cpu"
    assert small.vae_tile is not None and (big.vae_tile is None or big.vae_tile > small.vae_tile)


def test_too_small_names_the_smallest_budget():
    with pytest.raises(PlanError, match=r"smallest budget that works is (\d+\.\d) GB") as err:
        make_plan(4, height=720, width=1280, frames=81, **HOPPER)
    smallest = float(err.value.args[0].split("works is ")[1].split(" GB")[0])
    make_plan(smallest, height=720, width=1280, frames=81, **HOPPER)  # and that budget does work


def test_forced_mode_and_cpu_attention():
    plan = make_plan(80, height=480, width=832, frames=81, mode="streaming", device="cpu")
    assert plan.mode == "streaming" and plan.attention == "sdpa-flash" and plan.text_device == "cpu"


def test_activation_model_orders_the_options():
    L = 32_760
    seq = activation_bytes(L, A14B, "resident", False)
    block_major = activation_bytes(L, A14B, "streaming", False)
    batched = activation_bytes(L, A14B, "streaming", True)
    assert seq < block_major < batched == 2 * seq
    assert activation_bytes(L, A14B, "resident", False, ffn_chunk=None) > seq


def test_bad_size_is_an_error():
    with pytest.raises(PlanError, match="multiples of 16"):
        make_plan(24, height=481, width=832, frames=81, device="cpu")
    with pytest.raises(PlanError, match="--vram-gb"):
        if torch.cuda.is_available():
            pytest.skip("a CUDA device is here")
        make_plan(height=480, width=832, frames=81, device="cpu")


def test_fp8_attention_with_8bit_weights_where_the_card_has_fp8():
    """8-bit experts get the FP8 attention kernel on sm89 / sm90 (a flag turns it off); float experts,
    Ampere cards and the CPU keep exact attention."""
    kw = dict(height=480, width=832, frames=81, device="cuda", compile=True)
    assert make_plan(24, scheme="int8", capability=(9, 0), **kw).attention == "fp8"
    assert make_plan(24, scheme="fp8", capability=(8, 9), **kw).attention == "fp8"
    assert make_plan(24, scheme="int8", capability=(9, 0), attention_8bit=False, **kw).attention == "sdpa-cudnn"
    assert make_plan(40, scheme="none", capability=(9, 0), **kw).attention == "sdpa-cudnn"
    assert make_plan(24, scheme="int8", capability=(8, 6), **kw).attention == "sdpa-flash"
