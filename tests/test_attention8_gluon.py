"""The Gluon fp8 attention loop (issue 18): compiled for sm90 without a GPU, and on an H200 against the Triton
kernel, the emulated arithmetic and exact attention.

Needs Triton with Gluon (3.6+; CPU builds of torch lack Triton: the module's tests skip there). GPU tests need
an sm90 card: `python -m pytest -q -m gpu tests/test_attention8_gluon.py`.
"""

import dataclasses
import re
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton.experimental.gluon", reason="needs Triton >= 3.6 with Gluon (CUDA builds of torch)")

from test_attention8 import emulate, errors_vs_exact  # noqa: E402 - the kernel's arithmetic in torch, shared with attention8

from wan_lite import attention8 as A8  # noqa: E402
from wan_lite import attention8_gluon as G  # noqa: E402

HAS_SM90 = torch.cuda.is_available() and torch.cuda.get_device_capability() == G.CAPABILITY
needs_sm90 = pytest.mark.skipif(not HAS_SM90, reason="needs an sm90 GPU (Hopper wgmma)")


# ---------------------------------------------------------------------------------------------
# CPU: the compiled schedule


def _scores_per_thread(cfg):
    """exp2 per thread per key block: the (block_m, block_n) scores spread over 32 * num_warps threads."""
    return cfg.block_m * cfg.block_n // (32 * cfg.num_warps)


PIPELINED = [n for n, c in G.CONFIGS.items() if not c.warp_specialize]
SPECIALIZED = [n for n, c in G.CONFIGS.items() if c.warp_specialize]


def _sass(cfg):
    """The SASS ptxas made for cfg (Triton's bundled nvdisasm); skips where the wheel lacks it."""
    import triton.backends.nvidia as nv

    nvdisasm = Path(nv.__file__).parent / "bin" / "nvdisasm"
    if not nvdisasm.exists():
        pytest.skip(f"no nvdisasm at {nvdisasm}")
    return G.sass(cfg)


@pytest.mark.parametrize("name", PIPELINED)
def test_compiles_for_sm90_with_the_softmax_between_issue_and_wait(name):
    """Every config compiles for sm90 on this machine; in the PTX the asynchronous Q.K^T of the next block is
    committed, then this block's exp2 run, and only then comes a wgmma wait (Triton's own loop waits right
    after each issue: notes/attention8.md)."""
    cfg = G.CONFIGS[name]
    ptx = G.compile_sm90(cfg).asm["ptx"]
    n_k = 128 // 32  # k32 fp8 instructions per 128-deep product (D = 128 for Q.K^T)
    n_pv = cfg.block_n // 32
    # S_0, S_{j+1}, P.V in the loop, P.V of the last block
    assert ptx.count("wgmma.mma_async") == 2 * n_k + 2 * n_pv
    assert ptx.count("wgmma.mma_async") == ptx.count("e4m3.e4m3")  # every product in fp8
    # split the instruction stream at the waits: some segment must commit a wgmma group and then run
    # a block's worth of exp2 before the next wait
    segments = re.split(r"wgmma\.wait_group", ptx)
    overlapped = [seg for seg in segments if "wgmma.commit_group" in seg
                  and seg.split("wgmma.commit_group", 1)[1].count("ex2.approx") >= _scores_per_thread(cfg)]
    assert len(overlapped) >= 1, "no exp2 between a wgmma commit and its wait: the softmax does not overlap"
    assert "cp.async.bulk.tensor" in ptx  # K and V arrive by TMA
    assert ".local" not in ptx  # no local memory (spills) at the PTX level


@pytest.mark.parametrize("name", PIPELINED)
def test_sass_runs_the_exp2_between_the_tensor_core_issue_and_its_wait(name):
    """The same in the SASS: some QGMMA issue is followed by most of a block's MUFU.EX2 (3/4 of a thread's
    exp2: ptxas hoists a few) before the next WARPGROUP.DEPBAR, and nothing spills to local memory."""
    cfg = G.CONFIGS[name]
    sass = _sass(cfg)
    exp2_after_issue = [seg.split("QGMMA", 1)[1].count("MUFU.EX2") for seg in sass.split("WARPGROUP.DEPBAR")
                        if "QGMMA" in seg]
    print(name, "MUFU.EX2 between a QGMMA issue and the next wait, per wait:", exp2_after_issue)
    assert max(exp2_after_issue) >= 3 * _scores_per_thread(cfg) // 4
    assert "STL" not in sass and "LDL" not in sass


@pytest.mark.parametrize("name", SPECIALIZED)
def test_warp_specialized_configs_compile_with_their_register_split(name):
    """The ping-pong kernel compiles for sm90: the consumer code (twice: the default partition and a worker)
    issues S_0, then PV_j with S_{j+1} in the loop, then the last PV, all e4m3; setmaxnreg gives the
    consumers and the producer their budgets; K/V/Q arrive by TMA; no local memory."""
    cfg = G.CONFIGS[name]
    ptx = G.compile_sm90(cfg).asm["ptx"]
    n_k, n_pv = 128 // 32, cfg.block_n // 32
    assert ptx.count("wgmma.mma_async") == 2 * (2 * n_k + 2 * n_pv)
    assert ptx.count("wgmma.mma_async") == ptx.count("e4m3.e4m3")
    regs = {int(r) for r in re.findall(r"setmaxnreg\.\w+\.sync\.aligned\.u32\s+(\d+);", ptx)}
    assert {cfg.consumer_regs, cfg.producer_regs} <= regs
    assert "cp.async.bulk.tensor" in ptx
    assert ".local" not in ptx
    # consumer 0 takes its first turn at once (parity 1 of a fresh barrier), so the turn waits exist
    # only with pingpong: count the mbarrier waits against the variant without it
    if cfg.pingpong:
        plain = G.compile_sm90(dataclasses.replace(cfg, pingpong=False)).asm["ptx"]
        assert ptx.count("mbarrier.try_wait") > plain.count("mbarrier.try_wait")


@pytest.mark.parametrize("name", SPECIALIZED)
def test_warp_specialized_sass_fits_the_consumer_budget_without_spills(name):
    """ptxas kept every consumer loop within consumer_regs registers, without local memory; printed: the
    SASS instruction mix of the hottest loop (notes/attention8.md compares it with DEFAULT's)."""
    cfg = G.CONFIGS[name]
    sass = _sass(cfg)
    assert "STL" not in sass and "LDL" not in sass
    used = max(int(r) for r in re.findall(r"\bR(\d+)\b", sass))
    assert used < cfg.consumer_regs, f"R{used} used, the consumers have {cfg.consumer_regs}"
    print(name, "highest register", used, "loop mix", G.loop_mix(sass))
    assert G.loop_mix(sass)["QGMMA"] == cfg.block_n // 32 + 128 // 32  # PV_j and S_{j+1} once per block
    if cfg.permute_v:
        assert G.loop_mix(sass)["SEL"] == 0  # P stays in its lanes: no byte exchange within a quad
    exp2_after_issue = [seg.split("QGMMA", 1)[1].count("MUFU.EX2") for seg in sass.split("WARPGROUP.DEPBAR")
                        if "QGMMA" in seg]
    if cfg.overlap:  # a consumer's softmax runs while its own next S is on the tensor cores
        assert max(exp2_after_issue) >= 3 * (cfg.tile_m * cfg.block_n // 128) // 4
    else:  # it waits for its S; the other consumer's wgmma fill the gap
        assert max(exp2_after_issue) < 8


def test_every_variant_has_its_own_name_and_bad_combinations_raise():
    assert len(G.CONFIGS) == len(G.VARIANTS)
    assert G.CONFIGS[G.DEFAULT.name] == G.GluonConfig()  # the default is the lead's to switch
    with pytest.raises(ValueError, match="two consumer warpgroups"):
        G.GluonConfig(num_warps=8, warp_specialize=True)
    with pytest.raises(ValueError, match="overlap"):
        G.GluonConfig(overlap=True)
    with pytest.raises(ValueError, match="<= 512"):
        G.GluonConfig(warp_specialize=True, consumer_regs=248)


def test_wgmma_key_columns_match_the_kernels_relabelling():
    """The pre-pass puts key c of each block at V^T column wgmma_key_columns[c]; the kernel (_a_operand) moves
    score column c to column a by the reshape-permute-reshape below: the two must be the same map, a
    permutation within each 32 keys (so block_n 64 and 128 blocks keep their own keys)."""
    for n in (64, 128):
        relabelled = torch.arange(n).reshape(n // 32, 2, 2, 4, 2).permute(0, 1, 3, 2, 4).reshape(n)  # [a] = c
        cols = A8.wgmma_key_columns(n)
        assert torch.equal(cols[relabelled], torch.arange(n))
        assert torch.equal(cols // 32, torch.arange(n) // 32)
    assert torch.equal(A8.wgmma_key_columns(256)[128:] - 128, A8.wgmma_key_columns(128))


def test_refuses_cpu_tensors_naming_the_way_out():
    q, k, v = (torch.randn(1, 2, 16, 128, dtype=torch.bfloat16) for _ in range(3))
    with pytest.raises(ValueError, match=r"needs a CUDA GPU.*attention8.attention_fp8"):
        G.attention_fp8_gluon(q, k, v)
    with pytest.raises(ValueError, match="head_dim must be 128"):
        G.attention_fp8_gluon(q[..., :64], k[..., :64], v[..., :64])


# ---------------------------------------------------------------------------------------------
# GPU: the kernel


def _rand_inputs(B, H, Lq, Lk, layout, seed):
    g = torch.Generator(device="cuda").manual_seed(seed)

    def rand(L):  # (B, H, L, D), stored (B, L, H, D) for "blhd" like the DiT's projections
        t = torch.randn(B, L, H, 128, device="cuda", generator=g).transpose(1, 2)
        return (t if layout == "blhd" else t.contiguous()).to(torch.bfloat16)

    return rand(Lq) * 0.5, rand(Lk) + 3.0, rand(Lk)


@pytest.mark.parametrize("name", list(G.CONFIGS))
@pytest.mark.parametrize("B,H,Lq,Lk,layout", [(1, 2, 1000, 1000, "bhld"), (2, 3, 777, 300, "blhd"),
                                              (1, 1, 130, 77, "bhld"), (1, 2, 512, 1024, "bhld"),
                                              (1, 2, 200, 129, "bhld"), (1, 1, 64, 1700, "bhld")])
@pytest.mark.gpu
@needs_sm90
def test_kernel_matches_the_triton_kernel_and_the_emulation(name, B, H, Lq, Lk, layout):
    """Same 8-bit tensors through the Gluon loop, attention8's Triton loop and `emulate`: the same arithmetic,
    so only tensor-core accumulation order (and with it a few e4m3 roundings of P) may differ."""
    cfg = G.CONFIGS[name]
    q, k, v = _rand_inputs(B, H, Lq, Lk, layout, Lq + Lk)
    x = A8.quantize(q, k, v, cfg.block_n, cfg.permute_v)
    out = torch.full(q.shape, float("nan"), device="cuda")  # fp32 out, poisoned: every element must be written
    G.attention_quantized(x, out, cfg)
    triton_cfg = A8.KernelConfig(64, cfg.block_n, 4, 2)
    ref_triton = A8.attention_quantized(A8.quantize(q, k, v, cfg.block_n), torch.empty_like(out), triton_cfg)
    ref = emulate(x, B, H, Lq, Lk, cfg.block_m, cfg.block_n)
    err_t = ((out - ref_triton).norm() / ref_triton.norm()).item()
    err_e = ((out - ref).norm() / ref.norm()).item()
    print(f"{name} {B}x{H}x{Lq}x{Lk} {layout}: vs triton {err_t:.2e}, vs emulation {err_e:.2e}")
    assert out.isfinite().all()
    assert err_t < 1e-2 and err_e < 1e-2  # tests/test_attention8.py's kernel-vs-emulation bound


@pytest.mark.parametrize("name", list(G.CONFIGS))
@pytest.mark.gpu
@needs_sm90
def test_concentrated_attention_within_one_percent(name):
    """attention8's accuracy contract against exact attention (L not a multiple of 128: the tail runs)."""
    cfg = G.CONFIGS[name]
    errs = errors_vs_exact(lambda q, k, v: G.attention_fp8_gluon(q, k, v, config=cfg))
    print(f"fp8 gluon attention ({name}) relative error vs exact:", {k: f"{e:.2e}" for k, e in errs.items()})
    assert errs["conc"] <= 0.01
    assert errs["uniform"] < 0.1 and errs["conc-iid"] < 0.15


@pytest.mark.gpu
@needs_sm90
def test_prepass_permute_v_only_moves_v_columns():
    """quantize(permute_v=True): the same 8-bit tensors but V^T's keys at wgmma_key_columns; the Triton loop
    refuses it (its P.V runs over keys in order)."""
    q, k, v = _rand_inputs(2, 3, 300, 1000, "blhd", 5)
    x, xp = A8.quantize(q, k, v, 128), A8.quantize(q, k, v, 128, permute_v=True)
    for name in ("q8", "k8", "qs", "ks", "vs"):
        assert torch.equal(getattr(x, name).float(), getattr(xp, name).float()), name
    cols = A8.wgmma_key_columns(x.lkp, "cuda")
    assert torch.equal(xp.vt8.float()[:, cols], x.vt8.float())
    with pytest.raises(ValueError, match="permute_v"):
        A8.attention_quantized(xp, torch.empty_like(q))


@pytest.mark.gpu
@needs_sm90
def test_output_keeps_q_dtype_and_strides():
    q, k, v = _rand_inputs(1, 3, 300, 300, "blhd", 7)
    q16, k16, v16 = q.half(), k.half(), v.half()
    out = G.attention_fp8_gluon(q16, k16, v16)
    assert out.dtype == torch.float16 and out.stride() == q16.stride()
    ref = A8.attention_fp8(q16, k16, v16)
    assert ((out.float() - ref.float()).norm() / ref.float().norm()).item() < 1e-2


@pytest.mark.gpu
@needs_sm90
def test_attention_fp8_runs_the_gluon_loop_from_gluon_min_keys(monkeypatch):
    """attention8.attention_fp8 without a config (what the model's `fp8` backend calls) runs the Gluon loop
    from GLUON_MIN_KEYS keys on (lowered here), the Triton one below it and for an explicit config."""
    q, k, v = (torch.randn(1, 2, 1000, 128, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    gluon = G.attention_fp8_gluon(q, k, v)
    triton_loop = A8.attention_fp8(q, k, v, config=A8.DEFAULT)
    monkeypatch.setattr(A8, "GLUON_MIN_KEYS", 1001)
    assert torch.equal(A8.attention_fp8(q, k, v), triton_loop)  # same kernel, same inputs
    monkeypatch.setattr(A8, "GLUON_MIN_KEYS", 1000)
    assert torch.equal(A8.attention_fp8(q, k, v), gluon)
    assert torch.equal(A8.attention_fp8(q, k, v, config=A8.DEFAULT), triton_loop)
    pingpong = G.CONFIGS["gluon-wspp-m128n128s3-pv"]  # RUNTIME picks the Gluon config, with its own pre-pass
    monkeypatch.setattr(G, "RUNTIME", pingpong)
    assert torch.equal(A8.attention_fp8(q, k, v), G.attention_fp8_gluon(q, k, v, config=pingpong))
