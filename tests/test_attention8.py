"""The fp8 attention backend: its place in the kernel switch (CPU) and the kernel against exact attention (GPU).

GPU tests need an sm89+ card (FP8 tensor cores) and run on the device machine:
`python -m pytest -q -m gpu tests/test_attention8.py`.
"""

import math

import pytest
import torch
import torch.nn.functional as F

from wan_lite import attention as A
from wan_lite.bench_attention import exact_rows, make_inputs, rel_err

HAS_FP8_GPU = torch.cuda.is_available() and torch.cuda.get_device_capability() >= A.FP8_MIN_CAPABILITY
needs_fp8_gpu = pytest.mark.skipif(not HAS_FP8_GPU, reason="needs a CUDA GPU with FP8 tensor cores (sm89+)")


# ---------------------------------------------------------------------------------------------
# CPU: the switch


def test_fp8_is_a_known_backend_but_never_a_default(monkeypatch):
    monkeypatch.delenv(A.ENV, raising=False)
    assert A.FP8 in A.BACKENDS
    for cap in [(8, 0), (8, 9), (9, 0), (10, 0)]:
        assert A.device_default(torch.device("cuda"), cap) != A.FP8
    assert A.resolve(torch.device("cpu"), "fp8") == ("fp8", True)


@pytest.mark.parametrize("how", ["argument", "environment"])
def test_fp8_named_on_the_cpu_raises_naming_the_way_out(monkeypatch, how):
    q, k, v = (torch.randn(1, 2, 16, 128, dtype=torch.bfloat16) for _ in range(3))
    monkeypatch.setenv(A.ENV, "fp8") if how == "environment" else monkeypatch.delenv(A.ENV, raising=False)
    with pytest.raises(RuntimeError, match=r"needs a CUDA GPU with FP8 tensor cores.*'sdpa-flash'.*unset "
                                           r"WAN_LITE_ATTENTION"):
        A.attention(q, k, v, backend="fp8" if how == "argument" else None)


def test_fp8_chosen_by_the_planner_falls_back_on_the_cpu(monkeypatch):
    monkeypatch.delenv(A.ENV, raising=False)
    q, k, v = (torch.randn(1, 2, 40, 128) for _ in range(3))
    A.set_backend("fp8")
    try:
        out = A.attention(q, k, v)
    finally:
        A.set_backend(None)
    ref = F.scaled_dot_product_attention(q.double(), k.double(), v.double())
    assert ((out.double() - ref).norm() / ref.norm()).item() < 1e-5  # the device default ran, in fp32


def test_concentrated_inputs_concentrate():
    """The accuracy inputs: each softmax row holds ~all its mass in a few hundred keys."""
    q, k, v = make_inputs("conc", 1, 2, 4096, device="cpu")
    p = torch.softmax(q.float() @ k.float().transpose(-1, -2) / math.sqrt(128), -1)  # (1, 2, L, L)
    top = p.sort(-1, descending=True).values
    assert top[..., :512].sum(-1).min() > 0.99
    assert 50 < (1 / (p**2).sum(-1)).mean() < 400  # effective number of keys per row
    assert k.float().mean(2).abs().mean() > 4 * (k.float() - k.float().mean(2, keepdim=True)).std()  # shared offset


# ---------------------------------------------------------------------------------------------
# GPU: the kernel


def emulate(x, B, H, Lq, Lk, block_m, block_n):
    """The kernel's arithmetic in torch from the pre-pass output (fp32; e4m3 rounding of P included)."""
    D = x.vs.shape[1]
    q8 = x.q8.float().view(B * H, x.lqp, D)[:, :Lq] * x.qs.repeat_interleave(128, 1)[:, :Lq, None]  # sq folded
    k8 = x.k8.float().view(B * H, x.lkp, D)
    vt8 = x.vt8.float().view(B * H, D, x.lkp)
    if x.permute_v:  # the Gluon loop's key order: back to key order
        from wan_lite.attention8 import wgmma_key_columns

        vt8 = vt8[:, :, wgmma_key_columns(x.lkp, vt8.device)]
    m = torch.full((B * H, Lq), float("-inf"), device=q8.device)
    denom = torch.zeros(B * H, Lq, device=q8.device)
    acc = torch.zeros(B * H, Lq, D, device=q8.device)
    for j in range(math.ceil(Lk / block_n)):
        n = slice(j * block_n, (j + 1) * block_n)
        s = (q8 @ k8[:, n].transpose(1, 2)) * x.ks[:, j, None, None]  # (BH, Lq, block_n), base 2
        s[..., max(0, Lk - j * block_n):] = float("-inf")
        m_new = torch.maximum(m, s.amax(-1))
        p = torch.exp2(s - (m_new - 8)[..., None])
        alpha = torch.exp2(m - m_new)
        denom = denom * alpha + p.sum(-1)
        acc = acc * alpha[..., None] + p.to(torch.float8_e4m3fn).float() @ vt8[:, :, n].transpose(1, 2)
        m = m_new
    return (acc / denom[..., None] * x.vs[:, None, :]).view(B, H, Lq, D)


@pytest.mark.parametrize("cfg", ["m128n128w8s2a0", "m64n128w4s2a0", "m128n64w8s3a0"])
@pytest.mark.parametrize("B,H,Lq,Lk,layout", [(1, 2, 1000, 1000, "bhld"), (2, 3, 777, 300, "blhd"),
                                              (1, 1, 130, 77, "bhld")])
@pytest.mark.gpu
@needs_fp8_gpu
def test_kernel_computes_the_quantized_arithmetic(cfg, B, H, Lq, Lk, layout):
    """Kernel vs `emulate` on the same 8-bit tensors: only tensor-core accumulation order differs."""
    from wan_lite import attention8 as A8

    config = A8.CONFIGS[cfg]
    g = torch.Generator(device="cuda").manual_seed(Lq + Lk)

    def rand(L):  # (B, H, L, D), stored (B, L, H, D) for "blhd" like the DiT's projections
        t = torch.randn(B, L, H, 128, device="cuda", generator=g).transpose(1, 2)
        return (t if layout == "blhd" else t.contiguous()).to(torch.bfloat16)

    q, k, v = rand(Lq) * 0.5, rand(Lk) + 3.0, rand(Lk)
    x = A8.quantize(q, k, v, config.block_n)
    out = torch.full(q.shape, float("nan"), device="cuda")  # fp32 out, poisoned: every element must be written
    A8.attention_quantized(x, out, config)
    ref = emulate(x, B, H, Lq, Lk, config.block_m, config.block_n)
    err = ((out - ref).norm() / ref.norm()).item()
    print(f"{cfg} {B}x{H}x{Lq}x{Lk} {layout}: kernel vs emulation {err:.2e}")
    assert out.isfinite().all()
    assert err < 1e-2  # the fp8 products accumulate in ~14-bit tensor-core adders: a few P roundings move


@pytest.mark.gpu
@needs_fp8_gpu
def test_prepass_quantizes_within_e4m3_rounding():
    from wan_lite import attention8 as A8

    B, H, L, D = 1, 2, 1000, 128
    q, k, v = make_inputs("conc", B, H, L, seed=3)
    x = A8.quantize(q, k, v, 128)
    qf = q.float() * (A8.LOG2E / math.sqrt(D))
    kc = k.float() - k.float().mean(2, keepdim=True)
    deq = {
        "q": (x.q8.float().view(B * H, x.lqp, D)[:, :L] * x.qs.repeat_interleave(128, 1)[:, :L, None], qf),
        "k": (x.k8.float().view(B * H, x.lkp, D)[:, :L] * x.ks.repeat_interleave(128, 1)[:, :L, None], kc),
        "v": (x.vt8.float().view(B * H, D, x.lkp)[:, :, :L].transpose(1, 2) * x.vs[:, None, :], v.float()),
    }
    for name, (got, want) in deq.items():
        want = want.reshape(B * H, L, D)
        tiny = want.abs().amax() * 2**-15  # e4m3 subnormal steps at the block's scale, with margin
        assert ((got - want).abs() <= want.abs() * (2**-4 * 1.001) + tiny).all(), name  # round to nearest
    assert (x.q8.float().view(B * H, x.lqp, D)[:, L:] == 0).all()  # padding
    assert (x.k8.float().view(B * H, x.lkp, D)[:, L:] == 0).all()
    assert (x.vt8.float().view(B * H, D, x.lkp)[..., L:] == 0).all()


def errors_vs_exact(attn, L: int = 8000) -> dict[str, float]:
    """attn(q, k, v)'s relative error against exact attention on each input kind of bench_attention, B=1,
    4 heads, over every 5th query row (L = 8000 is not a multiple of 128: the masked tail block runs)."""
    rows = torch.arange(0, L, 5, device="cuda")
    errs = {}
    for kind in ("conc", "conc-iid", "uniform"):
        q, k, v = make_inputs(kind, 1, 4, L, seed=11)
        errs[kind] = rel_err(attn(q, k, v), exact_rows(q, k, v, rows), rows)
    return errs


@pytest.mark.parametrize("cfg", ["default", "m128n128w8s2a0"])
@pytest.mark.gpu
@needs_fp8_gpu
def test_concentrated_attention_within_one_percent(cfg):
    """Rows concentrated on a few hundred keys, large shared K offset: <= 1% against exact attention."""
    from wan_lite import attention8 as A8

    config = A8.DEFAULT if cfg == "default" else A8.CONFIGS[cfg]
    errs = errors_vs_exact(lambda q, k, v: A8.attention_fp8(q, k, v, config=config))
    print(f"fp8 attention ({config.name}) relative error vs exact:", {k: f"{e:.2e}" for k, e in errs.items()})
    assert errs["conc"] <= 0.01
    assert errs["uniform"] < 0.1 and errs["conc-iid"] < 0.15  # e4m3 rounding not averaged out: reported, bounded


@pytest.mark.gpu
@needs_fp8_gpu
def test_backend_switch_on_the_gpu(monkeypatch):
    from wan_lite import attention8 as A8

    monkeypatch.delenv(A.ENV, raising=False)
    q, k, v = make_inputs("conc", 1, 2, 1000, seed=5)
    torch.testing.assert_close(A.attention(q, k, v, backend="fp8"), A8.attention_fp8(q, k, v), rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="bf16 or fp16"):  # fp32: named explicitly, it raises
        A.attention(q.float(), k.float(), v.float(), backend="fp8")
    A.set_backend("fp8")
    try:  # chosen by the planner, fp32 falls back to an exact kernel
        out = A.attention(q.float(), k.float(), v.float())
    finally:
        A.set_backend(None)
    ref = exact_rows(q.float(), k.float(), v.float(), torch.arange(1000, device="cuda"))
    assert rel_err(out, ref, torch.arange(1000, device="cuda")) < 1e-3
