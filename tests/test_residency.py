"""Residency on the CPU: the copy plan (pure), where each expert is at each step, and outputs that are
those of the plain models in resident and streaming modes (fp32, within a stated tolerance)."""

from __future__ import annotations

import pytest
import torch
from builders import random_expert
from tolerance import FP32_RTOL, assert_close_fp32, rel_error

from wan_lite.checkpoint import find_experts, load_expert
from wan_lite.config import ModelConfig, SamplingConfig
from wan_lite.model import WanModel
from wan_lite.pipeline import sample
from wan_lite.residency import (
    Call,
    HostExpert,
    Layout,
    Residency,
    host_experts,
    layouts_of,
    swap_schedule,
    template,
    unit_names,
)
from wan_lite.scheduler import sigma_grid

CFG = ModelConfig.tiny(num_layers=4)
BOUNDARY = SamplingConfig().boundary_timestep
BOUNDARY_RATIO = SamplingConfig().boundary


@pytest.fixture(scope="module")
def experts():
    return random_expert(CFG, 1), random_expert(CFG, 2)


def residency(experts, **kw) -> Residency:
    high, low = experts
    return Residency(template(CFG, torch.float32), HostExpert.from_module(high, pin=False),
                     HostExpert.from_module(low, pin=False), device="cpu", **kw)


def inputs(batch=1):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, CFG.in_dim, 2, 4, 6, generator=g)
    return x, torch.randn(batch, 7, CFG.text_dim, generator=g), torch.randn(batch, 3, CFG.text_dim, generator=g)


# ---------------------------------------------------------------------------------------------
# the plan, as data


def test_layout_round_trip(experts):
    high = experts[0]
    host = HostExpert.from_module(high, pin=False)
    state = high.state_dict()
    for unit, lay in host.layouts.items():
        for name, view in lay.views(host.flats[unit]).items():
            assert torch.equal(view, state[name]) and view.dtype == state[name].dtype
            assert (view.data_ptr() - host.flats[unit].data_ptr()) % 256 == 0
    transposed = torch.randn(3, 5).t()  # non-contiguous but dense: strides are kept
    lay = Layout.of({"w": transposed})
    flat = torch.empty(lay.nbytes, dtype=torch.uint8)
    lay.pack({"w": transposed}.__getitem__, flat)
    assert lay.views(flat)["w"].stride() == transposed.stride() and torch.equal(lay.views(flat)["w"], transposed)


def test_resident_swap_happens_in_the_last_high_pass():
    """3 high steps, 2 low steps, sequential CFG (2 sweeps a call): the low expert's units go into the
    slots right after each unit's uncond pass of the last high step, in unit order, and only then."""
    units = unit_names(3)
    calls = [Call("high", t, 2) for t in (999, 950, 900)] + [Call("low", t, 2) for t in (800, 500)]
    copies = [c for c in swap_schedule(calls, units, "resident") if c[2] == "after"]
    assert copies == [(2, 1, "after", u, u, "low", u) for u in units]
    loads = [c for c in swap_schedule(calls, units, "resident") if c[2] == "before"]
    assert [(c[0], c[5]) for c in loads] == [(0, "high")] * len(units)  # the first load, nothing else


def test_streaming_cycles_blocks_through_two_slots():
    units = unit_names(4)
    calls = [Call("high", 999, 1), Call("low", 800, 1)]
    sched = swap_schedule(calls, units, "streaming", slots=2)
    after = [(c, used, slot, expert, unit) for c, _, kind, used, slot, expert, unit in sched if kind == "after"]
    assert after[1:4] == [(0, "blocks.0", "slot0", "high", "blocks.2"), (0, "blocks.1", "slot1", "high", "blocks.3"),
                         (0, "blocks.2", "slot0", "low", "blocks.0")]
    # the high call sends the low expert's embed (right after its own ran), first two blocks and head
    assert after[0] == (0, "embed", "embed", "low", "embed")
    assert (0, "blocks.2", "slot0", "low", "blocks.0") in after
    assert (0, "blocks.3", "slot1", "low", "blocks.1") in after
    assert (0, "head", "head", "low", "head") in after
    blocks_per_call = [sum(1 for c in sched if c[0] == k and c[6].startswith("blocks.")) for k in (0, 1)]
    assert blocks_per_call == [2 + 2 + 2, 2]  # first load, blocks 2-3, low 0-1 sent ahead; then 2-3


# ---------------------------------------------------------------------------------------------
# running it


def plain_guided(model, x, t, ctx, ctx_null, scale):
    cond, uncond = model(x, t, ctx).float(), model(x, t, ctx_null).float()
    return uncond + scale * (cond - uncond)


@pytest.mark.parametrize("mode", ["resident", "streaming"])
def test_guided_matches_the_plain_model(experts, mode):
    x, ctx, ctx_null = inputs()
    t = torch.tensor([900])
    res = residency(experts, mode=mode, cfg_batched=False)
    for name, model in zip(("high", "low"), experts):
        got = getattr(res, name).guided(x, t, ctx, ctx_null, 4.0)
        assert_close_fp32(got, plain_guided(model, x, t, ctx, ctx_null, 4.0))  # flat-buffer views vs parameters


def test_batched_cfg_same_in_both_modes_and_close_to_sequential(experts):
    x, ctx, ctx_null = inputs(batch=2)
    t = torch.tensor([900, 900])
    outs = [residency(experts, mode=m, cfg_batched=True).high.guided(x, t, ctx, ctx_null, 4.0)
            for m in ("resident", "streaming")]
    assert_close_fp32(outs[0], outs[1])  # slots at different offsets of the flat buffers
    ref = plain_guided(experts[0], x, t, ctx, ctx_null, 4.0)
    assert ((outs[0] - ref).norm() / ref.norm()).item() < 1e-5


@pytest.mark.parametrize("mode", ["resident", "streaming"])
def test_sample_through_residency(experts, mode):
    """The real loop (one `.guided` call a step): same latents as with the plain models, the high
    expert on the device for high steps and the low one after, every later unit sent ahead of use."""
    sampling = SamplingConfig(steps=4, solver="euler", shift=3.0)
    _, timesteps = sigma_grid(sampling.steps, sampling.shift)
    x, ctx, ctx_null = inputs()
    ref = sample(*experts, x, ctx, ctx_null, sampling)

    res = residency(experts, mode=mode)
    res.prepare(sampling)
    seen = []
    got = sample(res.high, res.low, x, ctx, ctx_null, sampling,
                 callback=lambda i, n, t, expert: seen.append((expert, res.where())))
    assert_close_fp32(got, ref)  # flat-buffer views vs parameters
    n_units = CFG.num_layers + 2
    for _, where in seen:
        # at the end of a step, the slots hold (or receive) what the next step needs
        assert sum(len(v) for v in where.values()) == (n_units if mode == "resident" else 4)
    assert [e for e, _ in seen] == ["high"] * 2 + ["low"] * 2
    assert seen[1][1]["high"] == []  # after the last high step, everything is low's
    first_load = n_units if mode == "resident" else 4
    assert res.stats.misses == first_load


def test_wrong_plan_is_an_error(experts):
    res = residency(experts)
    res.plan_steps([999, 800], BOUNDARY_RATIO)
    x, ctx, ctx_null = inputs()
    with pytest.raises(RuntimeError, match="plan_steps"):
        res.low.guided(x, torch.tensor([800]), ctx, ctx_null, 3.0)


def test_no_plan_still_correct_with_load_on_demand(experts):
    x, ctx, ctx_null = inputs()
    res = residency(experts, mode="streaming")
    for name, t in (("high", 999), ("high", 950), ("low", 800)):
        got = getattr(res, name).guided(x, torch.tensor([t]), ctx, ctx_null, 3.0)
        model = experts[0] if name == "high" else experts[1]
        assert_close_fp32(got, plain_guided(model, x, torch.tensor([t]), ctx, ctx_null, 3.0))
    assert res.where()["low"] and not res.where()["high"]


def test_checkpoint_source_through_staging(experts, official_root):
    """Serving units from the memory-mapped checkpoint gives the loaded model's output."""
    from wan_lite.checkpoint import load_expert, open_expert

    model = load_expert(official_root.high, dtype=torch.float32)
    tmpl = template(model.cfg, torch.float32)
    layouts = layouts_of(tmpl)
    mapped = HostExpert.from_checkpoint(open_expert(official_root.high), layouts)
    in_ram = HostExpert.from_checkpoint(open_expert(official_root.high), layouts, in_ram=True)
    x = torch.randn(1, 16, 1, 4, 4)
    ctx, ctx_null = torch.randn(1, 5, model.cfg.text_dim), torch.randn(1, 2, model.cfg.text_dim)
    t = torch.tensor([999])
    ref = plain_guided(model, x, t, ctx, ctx_null, 4.0)
    for src in (mapped, in_ram):
        res = Residency(tmpl, src, src, device="cpu", mode="streaming")
        assert_close_fp32(res.high.guided(x, t, ctx, ctx_null, 4.0), ref)  # staged/mapped memory vs a copy


# ---------------------------------------------------------------------------------------------
# on the GPU: the side stream and events must give the same bits as the plain model


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize(("mode", "batched"), [("resident", False), ("streaming", False), ("streaming", True)])
def test_gpu_swap_and_streaming_match_plain(mode, batched):
    cfg = ModelConfig.tiny(dim=256, ffn_dim=512, num_heads=2, num_layers=8)
    g = torch.Generator().manual_seed(0)
    experts = []
    for _ in range(2):
        m = WanModel(cfg).eval().requires_grad_(False)
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
        experts.append(m)
    res = Residency(template(cfg, torch.float32), *(HostExpert.from_module(m, pin=True) for m in experts),
                    device="cuda", mode=mode, cfg_batched=batched, measure=True)
    plain = [m.cuda() for m in experts]
    x = torch.randn(1, cfg.in_dim, 3, 16, 16, device="cuda")
    ctx, ctx_null = torch.randn(1, 9, cfg.text_dim, device="cuda"), torch.randn(1, 4, cfg.text_dim, device="cuda")
    ts = [999, 950, 900, 800, 700]
    res.plan_steps(ts, BOUNDARY_RATIO)
    for t in ts:
        tt = torch.tensor([t], device="cuda")
        name, model = ("high", plain[0]) if t >= BOUNDARY else ("low", plain[1])
        got = getattr(res, name).guided(x, tt, ctx, ctx_null, 4.0)
        if batched:
            ref = getattr(Residency(template(cfg, torch.float32), *res.hosts.values(), device="cuda",
                                    mode="resident", cfg_batched=True), name).guided(x, tt, ctx, ctx_null, 4.0)
        else:
            ref = plain_guided(model, x, tt, ctx, ctx_null, 4.0)
        assert rel_error(got, ref) < FP32_RTOL, (mode, t)  # the same kernels may see other alignments
    first = len(cfg.num_layers * [0]) + 2 if mode == "resident" else 4
    assert res.stats.misses == first  # the first load only: every later copy was sent ahead
    # measure=True: one GPU gap per unit but the first, per sweep; the swap's stall is the gaps of the two calls
    # around the switch plus the first low-noise unit's copy wait, a time (ms, finite, >= 0)
    sweeps = 2 if mode == "resident" and not batched else 1  # resident: cond, then uncond
    assert len(res.stats.gaps) == len(ts) * sweeps * (len(res.units) - 1)
    switch = next(c for c in range(1, len(ts)) if ts[c] < BOUNDARY <= ts[c - 1])
    stall = res.swap_stall_ms()
    unit0 = sum(a.elapsed_time(b) for c, u, (a, b) in res.stats.waits if c == switch and u == res.units[0])
    assert stall == pytest.approx(res.stats.gap_ms(switch - 1) + res.stats.gap_ms(switch) + unit0)
    assert 0 <= stall < 60e3


# ---------------------------------------------------------------------------------------------
# from checkpoints on disk (what T2VPipeline runs on one GPU)


def denoise_inputs(cfg, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, cfg.in_dim, 2, 4, 6, generator=g)
    return x, torch.randn(1, 7, cfg.text_dim, generator=g), torch.randn(1, 3, cfg.text_dim, generator=g)


@pytest.mark.parametrize("in_ram", [True, False])
def test_host_experts_from_checkpoints_sample_like_the_loaded_experts(official_root, in_ram):
    """Unquantized experts read unit by unit from the files (into RAM, or served at copy time) give
    the latents of the experts loaded with load_expert."""
    sampling = SamplingConfig(steps=4, shift=3.0)
    tmpl, high, low = host_experts(official_root.high, official_root.low, dtype=torch.float32, in_ram=in_ram)
    res = Residency(tmpl, high, low, device="cpu")
    res.prepare(sampling)
    x, ctx, ctx_null = denoise_inputs(tmpl.cfg, seed=3)
    ref = sample(load_expert(official_root.high, dtype=torch.float32),
                 load_expert(official_root.low, dtype=torch.float32), x, ctx, ctx_null, sampling)
    assert_close_fp32(sample(res.high, res.low, x, ctx, ctx_null, sampling), ref)  # flat buffers vs parameters


def test_host_experts_from_a_quantized_root(official_root, tmp_path):
    """int8 experts (quant/ layout) packed for the residency sample like the loaded quantized experts."""
    from quant.convert import convert_checkpoint


    dst = convert_checkpoint(official_root.root, tmp_path / "int8", "int8", progress=False)
    high_path, low_path = find_experts(dst)
    sampling = SamplingConfig(steps=3, shift=3.0)
    tmpl, high, low = host_experts(high_path, low_path, dtype=torch.bfloat16)
    assert tmpl.blocks[0].ffn[0].weight.device.type == "meta"
    res = Residency(tmpl, high, low, device="cpu")
    res.prepare(sampling)
    x, ctx, ctx_null = denoise_inputs(tmpl.cfg, seed=4)
    ref = sample(load_expert(high_path), load_expert(low_path), x, ctx, ctx_null, sampling)
    # bf16 compute: another CPU kernel may round one bf16 ulp (3.9e-3) differently, hence 1e-2
    assert_close_fp32(sample(res.high, res.low, x, ctx, ctx_null, sampling), ref, rtol=1e-2)
