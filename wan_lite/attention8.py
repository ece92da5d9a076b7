"""8-bit attention on FP8 tensor cores (Ada sm89, Hopper sm90): `attention_fp8(q, k, v)`.

softmax(q k^T / sqrt(D)) v for (B, H, L, D=128) bf16/fp16 inputs, non-causal, no mask: Q.K^T and P.V
run in FP8 e4m3 with FP32 accumulation (SageAttention2's recipe on FlashAttention-2's loop):

1. K smoothing: k - mean_t(k) per (batch, head). Every score of a query row moves by the same q . mean,
   so the softmax is unchanged; a large shared K offset (trained DiTs have one) then costs no e4m3 range.
2. Quantization pre-pass, three Triton kernels (one read of Q, two of K and V, one write of each in
   8 bits, about 1% of the attention's time at Wan shapes):
   - `_kv_stats`: per (head, CHUNK tokens) partial sums of K and per-channel absmax of V;
   - `_quant_q`: q8 = q * log2(e)/sqrt(D) / sq, sq = absmax / 448 per 128-query block;
   - `_quant_kv`: k8 = (k - mean) / sk, sk per BLOCK_N-key block; v8 = v / sv, sv per channel of the
     head, stored transposed (D, L): Hopper's fp8 wgmma wants both operands K-major in shared memory.
   The 8-bit tensors are padded to a multiple of 256 tokens so every tile load is whole (TMA).
3. The loop (`_attn_fwd`), one program per (BLOCK_M queries, head), over BLOCK_N-key blocks loaded by
   TMA descriptors, online softmax in base 2:
       s   = (q8 . k8^T) * sq * sk                   fp32 (BLOCK_M, BLOCK_N)
       p   = exp2(s - m + 8)                          in [0, 256]: e4m3's 2^-9 floor is 2^-17 of the row max
       acc = acc * exp2(m_old - m) + p8 . v8          a fresh fp32 accumulator per block (Hopper's fp8
                                                      wgmma accumulates in ~22 bits; 128 terms at most)
       out = acc * sv / l,  l = sum of p (fp32)
   Only the last key block is masked (L need not be a multiple of BLOCK_N).

Accuracy: each e4m3 rounding is up to 2^-4 relative (RMS ~2.6%); they average out over the keys a row
attends to when those keys carry similar values (local video tokens), not when V is independent noise
per token: bench_attention reports both (and uniform random inputs).

Measured (H200, torch 2.11, Triton 3.6, 2026-11-29, `python -m wan_lite.bench_attention`, B=1, H=40):
DEFAULT (64 queries x 128 keys, 4 warps, 2 stages; 166 registers: 3 programs per SM) 28.1 ms at
L=32,760 (783 TFLOP/s, 1.36x cuDNN SDPA) and 167.5 ms at 75,600 (699 TFLOP/s, 1.22x), pre-pass
included (0.6 / 1.4 ms); relative error 0.43% (concentrated), 7.8% (concentrated, iid V), 5.4%
(uniform) against cuDNN's 0.17% / 0.22% / 0.23%. Short of the 1.5x goal: Triton 3.6 waits for each
wgmma right after issuing it and did not warp-specialize this loop on sm90 (same SASS with
warp_specialize=True), so a warpgroup never overlaps its softmax with its own matrix products; only
the 3 programs per SM overlap each other. The loop is ~550 instructions per warp per 64x128 tile
(64 exp2 on the 16/clock/SM MUFU pipe, max, sum, scale, convert), as long as the tile's wgmma time.

Deliberately unsupported: masks, causal attention, dropout, GQA, head_dim other than 128, the INT8
Q.K^T path for Ampere (no FP8 tensor cores: wan_lite.attention refuses this backend there), backward.
Imported only on CUDA (it imports Triton, which CPU builds of torch lack).
"""

from __future__ import annotations

import functools
import importlib.util
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

HEAD_DIM = 128
FP8_MAX = 448.0  # largest finite float8_e4m3fn
LOG2E = 1.4426950408889634
Q_BLOCK = 128  # queries per Q scale; BLOCK_M divides it
PAD = 256  # the 8-bit copies hold a multiple of this many tokens (block_n divides it)
STATS_CHUNK = 1024  # tokens per partial sum in _kv_stats
P_SHIFT = 8.0  # p is computed as 2^8 * softmax numerator: [0, 256] of e4m3's [2^-9, 448]
MIN_CAPABILITY = (8, 9)  # FP8 e4m3 tensor cores: Ada and Hopper
# From this many keys on, on Hopper, the default config runs attention8_gluon's loop (its RUNTIME config: FA3's
# ping-pong, same pre-pass and arithmetic, bit-identical output) instead of `_attn_fwd`: every length. H100,
# 2026-12-06, same run, `python -m wan_lite.attention8_gluon`: at 32,760 keys 24.4 ms vs 27.0 ms (1.51x vs
# 1.37x cuDNN), at 75,600 134.3 vs 163.4 ms (1.59x vs 1.31x); the 480p step ran all its attention on it,
# the 512-key cross-attention included (BENCHMARKS.md, session 4). Raise it to keep the Triton loop below.
GLUON_MIN_KEYS = 0


@dataclass(frozen=True)
class KernelConfig:
    """One launch shape of `_attn_fwd` (the sweep in bench_attention picks the default)."""

    block_m: int = 128  # queries per program: 64 per warpgroup of 4 warps
    block_n: int = 128  # keys per loop step, also the K scale block
    num_warps: int = 8
    num_stages: int = 2  # TMA buffers of K and V in flight
    acc: int = 0  # how P.V joins the accumulator: see _softmax_pv

    @property
    def name(self) -> str:
        return f"m{self.block_m}n{self.block_n}w{self.num_warps}s{self.num_stages}a{self.acc}"


CONFIGS = {
    c.name: c
    for c in (
        KernelConfig(128, 128, 8, 2),
        KernelConfig(64, 128, 4, 2),
        KernelConfig(128, 128, 8, 3),
        KernelConfig(128, 64, 8, 3),
        KernelConfig(128, 256, 8, 2),
        KernelConfig(64, 128, 4, 3),
        KernelConfig(64, 64, 4, 3),
        KernelConfig(128, 128, 8, 2, acc=1),
        KernelConfig(64, 128, 4, 2, acc=1),
        KernelConfig(128, 128, 8, 2, acc=2),
        KernelConfig(64, 128, 4, 2, acc=2),
    )
}
DEFAULT = KernelConfig(64, 128, 4, 2)  # fastest exact-accumulation config of the H200 sweep (notes/)


# ---------------------------------------------------------------------------------------------
# pre-pass: statistics, then quantization


@triton.jit
def _kv_stats(K, V, ksum, vmax, H, L, skb, skh, skl, svb, svh, svl,
              D: tl.constexpr, CHUNK: tl.constexpr, ROWS: tl.constexpr):
    """Partial sum of K over tokens and absmax of V per channel, for CHUNK tokens of one head."""
    c = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    d = tl.arange(0, D)
    k_base = K + b.to(tl.int64) * skb + h.to(tl.int64) * skh
    v_base = V + b.to(tl.int64) * svb + h.to(tl.int64) * svh
    s = tl.zeros([D], tl.float32)
    a = tl.zeros([D], tl.float32)
    for r0 in range(0, CHUNK, ROWS):
        rows = c * CHUNK + r0 + tl.arange(0, ROWS)
        ok = rows[:, None] < L
        k = tl.load(k_base + rows[:, None].to(tl.int64) * skl + d[None, :], mask=ok, other=0.0)
        v = tl.load(v_base + rows[:, None].to(tl.int64) * svl + d[None, :], mask=ok, other=0.0)
        s += tl.sum(k.to(tl.float32), 0)
        a = tl.maximum(a, tl.max(tl.abs(v.to(tl.float32)), 0))
    out = (bh * tl.num_programs(0) + c) * D + d
    tl.store(ksum + out, s)
    tl.store(vmax + out, a)


@triton.jit
def _store_fp8(x, out, scale):
    """x (ROWS, D) fp32 stored at the pointers `out` as e4m3 scaled to its absmax (448 = e4m3's largest
    finite value), and its dequantization scale absmax / 448 at `scale`."""
    amax = tl.maximum(tl.max(tl.abs(x)), 1e-30)
    tl.store(out, (x * (448.0 / amax)).to(tl.float8e4nv))
    tl.store(scale, amax / 448.0)


@triton.jit
def _quant_q(Q, q8, qs, H, L, Lp, sqb, sqh, sql, scale, D: tl.constexpr, ROWS: tl.constexpr):
    """q8 = q * scale / sq for ROWS queries of one head, sq = absmax / 448 (padding rows: zeros)."""
    blk = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    d = tl.arange(0, D)
    rows = blk * ROWS + tl.arange(0, ROWS)
    ptr = Q + b.to(tl.int64) * sqb + h.to(tl.int64) * sqh + rows[:, None].to(tl.int64) * sql + d[None, :]
    x = tl.load(ptr, mask=rows[:, None] < L, other=0.0).to(tl.float32) * scale  # (ROWS, D)
    _store_fp8(x, q8 + (bh * Lp + rows[:, None]).to(tl.int64) * D + d[None, :], qs + bh * (Lp // ROWS) + blk)


@triton.jit
def _wgmma_key_column(key):
    """Where V^T stores `key` in the wgmma order (`quantize(permute_v=True)`): within each 32 keys, key
    32b + 16h + 8q + 2t + e goes to column 32b + 16h + 4t + 2q + e (the two fields q and t swapped)."""
    return (key & ~15) | (((key >> 1) & 3) << 2) | (((key >> 3) & 1) << 1) | (key & 1)


@triton.jit
def _quant_kv(K, V, kmean, vscale, k8, vt8, ks, H, L, Lp, skb, skh, skl, svb, svh, svl,
              D: tl.constexpr, ROWS: tl.constexpr, PERMUTE_V: tl.constexpr):
    """k8 = (k - mean) / sk (sk per ROWS keys), vt8 = (v / sv)^T (sv per channel) for ROWS keys of one head
    (PERMUTE_V: each key's V^T column in the wgmma order, `_wgmma_key_column`)."""
    blk = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    d = tl.arange(0, D)
    rows = blk * ROWS + tl.arange(0, ROWS)
    ok = rows[:, None] < L
    roff = rows[:, None].to(tl.int64)
    k = tl.load(K + b.to(tl.int64) * skb + h.to(tl.int64) * skh + roff * skl + d[None, :], mask=ok, other=0.0)
    k = tl.where(ok, k.to(tl.float32) - tl.load(kmean + bh * D + d)[None, :], 0.0)  # (ROWS, D) centred
    _store_fp8(k, k8 + (bh * Lp + roff) * D + d[None, :], ks + bh * (Lp // ROWS) + blk)
    v = tl.load(V + b.to(tl.int64) * svb + h.to(tl.int64) * svh + roff * svl + d[None, :], mask=ok, other=0.0)
    v8 = (v.to(tl.float32) / tl.load(vscale + bh * D + d)[None, :]).to(tl.float8e4nv)  # (ROWS, D)
    col = _wgmma_key_column(roff) if PERMUTE_V else roff
    tl.store(vt8 + (bh * D + d[None, :]).to(tl.int64) * Lp + col, v8)  # stored (D, Lp): tokens contiguous


# ---------------------------------------------------------------------------------------------
# the attention loop


@triton.jit
def _scores(q, k_desc, row0, j, BLOCK_N: tl.constexpr):
    """q8 . k8^T for key block j: (BLOCK_M, BLOCK_N) fp32, not yet scaled."""
    k = k_desc.load([row0 + j * BLOCK_N, 0])  # (BLOCK_N, D) fp8
    return tl.dot(q, k.T)


@triton.jit
def _softmax_pv(s, acc, pv, l_i, m_i, c_q, v_desc, ks, vrow0, j, L,
                BLOCK_N: tl.constexpr, MASK: tl.constexpr, P_SHIFT: tl.constexpr, ACC: tl.constexpr):
    """Key block j of the online softmax (base 2) given its raw scores s, then P.V into the accumulator.

    ACC 0: acc = acc * alpha + p8 . v8 (a fresh fp32 accumulator per block, added at once);
    ACC 1: the same, the add deferred to the next block (`pv` carried), so the P.V wgmma can stay in
           flight through the next block's Q.K^T and softmax;
    ACC 2: p8 . v8 accumulated into acc * alpha by the tensor cores (their ~14-bit adder over the whole
           key sequence: one register tile less; fine on the bench inputs, but a sum of same-sign terms
           over ~600 blocks loses bits: a variant that also summed the row sums this way was off by
           60-130% on uniform inputs, H200 2026-11-29. Not the default).
    """
    start_n = j * BLOCK_N
    c = c_q * tl.load(ks + j)  # dequantization scale of this tile
    if MASK:  # the last, partial block
        s = s * c
        s = tl.where((start_n + tl.arange(0, BLOCK_N))[None, :] < L, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        x = s - (m_new - P_SHIFT)[:, None]
    else:
        m_new = tl.maximum(m_i, tl.max(s, 1) * c)
        x = s * c - (m_new - P_SHIFT)[:, None]  # one FMA per score
    alpha = tl.math.exp2(m_i - m_new)
    p = tl.math.exp2(x)
    l_i = l_i * alpha + tl.sum(p, 1)
    vt = v_desc.load([vrow0, start_n])  # (D, BLOCK_N) fp8, keys contiguous
    p8 = p.to(tl.float8e4nv)
    if ACC == 0:
        acc = acc * alpha[:, None] + tl.dot(p8, vt.T)  # (BLOCK_M, D)
    elif ACC == 1:
        acc = (acc + pv) * alpha[:, None]
        pv = tl.dot(p8, vt.T)
    else:
        acc = tl.dot(p8, vt.T, acc * alpha[:, None])
    return acc, pv, l_i, m_new


@triton.jit
def _attn_fwd(q_desc, k_desc, v_desc, qs, ks, vs, Out, H, Lq, Lqp, Lk, Lkp, sob, soh, sol,
              D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, Q_BLOCK: tl.constexpr,
              P_SHIFT: tl.constexpr, ACC: tl.constexpr):
    """One program: BLOCK_M queries of one (batch, head) over all keys."""
    start_m = tl.program_id(0)
    bh = tl.program_id(1)
    q = q_desc.load([bh * Lqp + start_m * BLOCK_M, 0])  # (BLOCK_M, D) fp8, stays in shared memory
    c_q = tl.load(qs + bh * (Lqp // Q_BLOCK) + (start_m * BLOCK_M) // Q_BLOCK)
    row0 = bh * Lkp  # first row of this head in the (B*H*Lkp, D) 8-bit K
    vrow0 = bh * D  # first row of this head in the (B*H*D, Lkp) 8-bit V^T
    ks_h = ks + bh * (Lkp // BLOCK_N)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D], tl.float32)
    pv = tl.zeros([BLOCK_M, D], tl.float32)  # ACC 1: the last block's P.V, not yet in acc
    n_full = Lk // BLOCK_N
    for j in range(0, n_full):
        s = _scores(q, k_desc, row0, j, BLOCK_N)
        acc, pv, l_i, m_i = _softmax_pv(s, acc, pv, l_i, m_i, c_q, v_desc, ks_h, vrow0, j, Lk,
                                              BLOCK_N, False, P_SHIFT, ACC)
    if n_full * BLOCK_N < Lk:  # the partial last block
        s = _scores(q, k_desc, row0, n_full, BLOCK_N)
        acc, pv, l_i, m_i = _softmax_pv(s, acc, pv, l_i, m_i, c_q, v_desc, ks_h, vrow0, n_full, Lk,
                                              BLOCK_N, True, P_SHIFT, ACC)
    if ACC == 1:
        acc += pv
    d = tl.arange(0, D)
    sv = tl.load(vs + bh * D + d)  # (D,) V scale per channel
    out = acc * (1.0 / l_i)[:, None] * sv[None, :]
    rows = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    b = bh // H
    h = bh % H
    ptr = Out + b.to(tl.int64) * sob + h.to(tl.int64) * soh + rows[:, None].to(tl.int64) * sol + d[None, :]
    tl.store(ptr, out.to(Out.dtype.element_ty), mask=rows[:, None] < Lq)


# ---------------------------------------------------------------------------------------------
# torch entry points


@dataclass(frozen=True)
class Quantized:
    """The pre-pass output for one (q, k, v): 8-bit copies padded to a multiple of PAD tokens, fp32 scales."""

    q8: torch.Tensor  # (B*H*Lqp, D) e4m3, q * log2(e)/sqrt(D) / qs
    k8: torch.Tensor  # (B*H*Lkp, D) e4m3, (k - mean) / ks
    vt8: torch.Tensor  # (B*H*D, Lkp) e4m3, v^T / vs
    qs: torch.Tensor  # (B*H, Lqp/128) per 128-query block
    ks: torch.Tensor  # (B*H, Lkp/block_n) per key block
    vs: torch.Tensor  # (B*H, D) per channel
    lq: int
    lk: int
    block_n: int
    permute_v: bool = False  # vt8's keys in the wgmma order within each 32 (wgmma_key_columns); Gluon loop only

    @property
    def lqp(self) -> int:
        return self.q8.shape[0] // self.qs.shape[0]

    @property
    def lkp(self) -> int:
        return self.vt8.shape[1]


def wgmma_key_columns(n: int, device=None) -> torch.Tensor:
    """Column of each of n keys (n a multiple of 32) in a `permute_v` V^T: Hopper's fp32 wgmma accumulator
    gives lane t of a quad the score columns 2t, 2t+1, 8+2t, 9+2t (+16) of each 32, the fp8 A operand wants
    4t .. 4t+3 (+16): storing V^T's keys in that order makes the P.V contraction run over the same keys
    while P stays in the registers it was computed in (attention8_gluon's `permute_v` configs)."""
    key = torch.arange(n, device=device)
    return (key & ~15) | (((key >> 1) & 3) << 2) | (((key >> 3) & 1) << 1) | (key & 1)


def quantize(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_n: int, permute_v: bool = False) -> Quantized:
    """The three pre-pass kernels (plus two tiny torch reductions over the per-chunk statistics).

    q (B, H, Lq, D), k and v (B, H, Lk, D), bf16/fp16 with the last axis contiguous (any other strides).
    permute_v: V^T's keys in the wgmma order (`wgmma_key_columns`), for the Gluon loop's `permute_v` configs.
    """
    B, H, Lq, D = q.shape
    Lk = k.shape[2]
    Lqp, Lkp = triton.cdiv(Lq, PAD) * PAD, triton.cdiv(Lk, PAD) * PAD
    BH, dev, f8 = B * H, q.device, torch.float8_e4m3fn
    chunks = triton.cdiv(Lk, STATS_CHUNK)
    ksum = torch.empty(BH, chunks, D, device=dev, dtype=torch.float32)
    vmax = torch.empty_like(ksum)
    _kv_stats[(chunks, BH)](k, v, ksum, vmax, H, Lk, *k.stride()[:3], *v.stride()[:3],
                            D=D, CHUNK=STATS_CHUNK, ROWS=64, num_warps=4)
    kmean = ksum.sum(1) / Lk  # (BH, D)
    vs = vmax.amax(1).clamp_min(1e-30) / FP8_MAX  # (BH, D)
    q8 = torch.empty(BH * Lqp, D, device=dev, dtype=f8)
    k8 = torch.empty(BH * Lkp, D, device=dev, dtype=f8)
    vt8 = torch.empty(BH * D, Lkp, device=dev, dtype=f8)
    qs = torch.empty(BH, Lqp // Q_BLOCK, device=dev, dtype=torch.float32)
    ks = torch.empty(BH, Lkp // block_n, device=dev, dtype=torch.float32)
    _quant_q[(Lqp // Q_BLOCK, BH)](q, q8, qs, H, Lq, Lqp, *q.stride()[:3], LOG2E / D**0.5,
                                   D=D, ROWS=Q_BLOCK, num_warps=8)
    _quant_kv[(Lkp // block_n, BH)](k, v, kmean, vs, k8, vt8, ks, H, Lk, Lkp, *k.stride()[:3], *v.stride()[:3],
                                    D=D, ROWS=block_n, PERMUTE_V=permute_v, num_warps=8)
    return Quantized(q8, k8, vt8, qs, ks, vs, Lq, Lk, block_n, permute_v)


def attention_quantized(x: Quantized, out: torch.Tensor, config: KernelConfig = DEFAULT) -> torch.Tensor:
    """The attention loop over a pre-pass result; writes and returns `out` (B, H, Lq, D)."""
    launch(x, out, config)
    return out


def launch(x: Quantized, out: torch.Tensor, config: KernelConfig):
    """One launch of `_attn_fwd` into `out`; returns Triton's compiled kernel (registers, spills, PTX)."""
    B, H, Lq, D = out.shape
    cfg = config
    if cfg.block_n != x.block_n:
        raise ValueError(f"the pre-pass ran with block_n {x.block_n}, the config has {cfg.block_n}")
    if x.permute_v:
        raise ValueError("the pre-pass ran with permute_v (attention8_gluon's order); quantize without it")
    q_desc = TensorDescriptor.from_tensor(x.q8, [cfg.block_m, D])
    k_desc = TensorDescriptor.from_tensor(x.k8, [cfg.block_n, D])
    v_desc = TensorDescriptor.from_tensor(x.vt8, [D, cfg.block_n])
    grid = (triton.cdiv(Lq, cfg.block_m), B * H)  # queries fastest: neighbouring programs share K and V in L2
    return _attn_fwd[grid](q_desc, k_desc, v_desc, x.qs, x.ks, x.vs, out, H, Lq, x.lqp, x.lk, x.lkp,
                           *out.stride()[:3], D=D, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, Q_BLOCK=Q_BLOCK,
                           P_SHIFT=P_SHIFT, ACC=cfg.acc, num_warps=cfg.num_warps,
                           num_stages=cfg.num_stages)


def attention_fp8(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
                  config: KernelConfig | None = None) -> torch.Tensor:
    """softmax(q k^T / sqrt(D)) v in FP8 on an sm89+ GPU: (B, H, Lq, D) x (B, H, Lk, D) x2 -> (B, H, Lq, D).

    bf16 or fp16 in, q's dtype out. `config`: this Triton launch shape; None: DEFAULT, or on Hopper from
    GLUON_MIN_KEYS keys the Gluon loop (attention8_gluon.RUNTIME, the same arithmetic). Raises ValueError for
    inputs it does not run (the message names what does).
    """
    problem = unsupported(q, k, v)
    if problem:
        raise ValueError(f"fp8 attention cannot run these inputs: {problem}; use an sdpa-* backend for them")
    cfg = config or DEFAULT
    if Q_BLOCK % cfg.block_m or PAD % cfg.block_n:
        raise ValueError(f"block_m must divide {Q_BLOCK} and block_n divide {PAD}, got {cfg}")
    if config is None and k.shape[2] >= GLUON_MIN_KEYS and _gluon_runs(q.device):
        from . import attention8_gluon  # noqa: PLC0415 - it imports this module

        return attention8_gluon.attention_fp8_gluon(q, k, v)  # its RUNTIME config, with that config's pre-pass
    out = torch.empty_like(q)  # keeps q's strides: (B, L, H, D) storage stays that way
    return attention_quantized(quantize(q, k, v, cfg.block_n), out, cfg)


@functools.cache
def _gluon_runs(device: torch.device) -> bool:
    """Hopper (sm90) with Triton's Gluon: the hand-scheduled loop of attention8_gluon can run here."""
    if torch.cuda.get_device_capability(device) != (9, 0):
        return False
    try:  # Triton before 3.5 has no triton.experimental (find_spec raises for a missing parent)
        return importlib.util.find_spec("triton.experimental.gluon") is not None
    except ModuleNotFoundError:
        return False


def unsupported(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> str | None:
    """Why these inputs cannot run here (None: they can); needs no GPU to answer for CPU tensors."""
    if q.dim() != 4 or k.shape != v.shape or q.shape[:2] != k.shape[:2] or q.shape[3] != k.shape[3]:
        shapes = ", ".join(str(tuple(t.shape)) for t in (q, k, v))
        return f"q, k, v must be (B, H, L, D) with one B, H and D, got {shapes}"
    if q.shape[-1] != HEAD_DIM:
        return f"head_dim must be {HEAD_DIM}, got {q.shape[-1]}"
    if q.dtype not in (torch.bfloat16, torch.float16) or not (q.dtype == k.dtype == v.dtype):
        return f"inputs must be bf16 or fp16, got {q.dtype}, {k.dtype}, {v.dtype}"
    if any(t.stride(-1) != 1 for t in (q, k, v)):
        return "the head_dim axis must be contiguous (stride 1)"
    return None


@torch.library.custom_op("wan_lite::attention_fp8", mutates_args=())
def attention_fp8_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """`attention_fp8` as an operator torch.compile treats as opaque (the blocks are compiled)."""
    return attention_fp8(q, k, v)


@attention_fp8_op.register_fake
def _(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(q)  # what attention_fp8 allocates: q's shape, dtype and strides
