"""8-bit attention in Gluon on Hopper (sm90): `attention_fp8_gluon(q, k, v)`, issue 18.

The same arithmetic as `attention8._attn_fwd` (it consumes `attention8.quantize`'s `Quantized`: q8 pre-scaled
by log2(e)/sqrt(D) with per-128-query scales qs, per-block K scales ks, V transposed (D, L) with per-channel
scales vs, all padded to 256 tokens; exp2, P scaled by 2^8 into e4m3, a fresh fp32 accumulator per key
block, only the last block masked), so its accuracy is attention8's by construction. What differs is the
schedule, written out by hand because Triton 3.6 waits on every wgmma right after issuing it
(attention8's docstring, notes/attention8.md):

    S_0 = Q.K_0^T
    for j in 0 .. n-2:
        issue S_{j+1} = Q.K_{j+1}^T        (asynchronous wgmma: the tensor cores run it ...)
        softmax(S_j) -> P_j, alpha_j        (... while this warpgroup does block j's exp2 on the MUFU pipe)
        issue PV_j = P_j . V_j              (asynchronous, P_j from registers)
        wait for both; acc = acc * alpha_j + PV_j
        refill the shared-memory stage of block j with block j + STAGES (TMA, mbarrier per stage)
    the last block (masked when L is not a multiple of BLOCK_N) without a next S

This is FlashAttention-3's intra-warpgroup pipelining (its part 1). One warpgroup (4 warps) owns 64 query
rows; `num_warps=8` puts two warpgroups on 128 rows sharing the K/V tiles. K and V tiles arrive by TMA into
a STAGES-deep ring, issued by the same warps STAGES blocks ahead.

`warp_specialize` configs run `_attn_fwd_pingpong` instead, FlashAttention-3's parts 2 and 3: one producer
warp (24 registers) issues every TMA load; two consumer warpgroups (240 registers each, one program per SM)
own 64 query rows each of a 128-row program and share one K/V ring (a stage is refilled once both have
released it). With `pingpong` they take turns at the tensor cores, so one's softmax runs while the other's
matrix products do:

    consumer c:  S_0 = Q_c.K_0^T                                  (turn 0)
                 for j in 0 .. n-2:
                     softmax(S_j) -> P_j, alpha_j
                     issue PV_j = P_j . V_j, S_{j+1} = Q_c.K_{j+1}^T  (turn j + 1, then hand over)
                     wait PV_j; acc = acc * alpha_j + PV_j; wait S_{j+1}
                 softmax(S_{n-1}) (masked), PV_{n-1}              (turn n)

A consumer's softmax waits for its own S here (a second 64x128 fp32 S tile in flight does not fit 240
registers beside acc and PV); FA3's order (S_j and PV_{j-1} issued together, P_{j-1} carried over the loop)
compiled to 744 SASS instructions per block against 505: Triton carries an fp8 tensor across a loop as
bytes and repacks it (192 PRMT). `overlap` configs keep part 1 inside each consumer in the plain loop's
order instead (S_{j+1} issued before block j's softmax, PV_j after it; turns for the S issues only): 64
more instructions per block copying the carried S (unrolled by 2 to avoid them, it spilled at 240).
`_attn_fwd_pingpong`'s docstring gives the barrier protocol.

`permute_v` configs take the e4m3 P straight from the registers the Q.K^T accumulator left it in: the
pre-pass stores V^T's keys in that order (attention8.wgmma_key_columns), which removes the 48 SHFL/SEL/PRMT
per block that move bytes between the lanes of a quad. SASS per warp per 64x128 block (`loop_mix`, sm90,
ptxas of Triton 3.6): DEFAULT 591 instructions, ping-pong 505, ping-pong + permute_v 472 (FFMA 130, FADD 70,
FMNMX 68, MUFU 66, F2FP 32, PRMT 16, SHFL 8, the rest barriers and addresses); overlap + permute_v 536.

Not built: FlashAttention-4's lazy rescaling. With the fresh P.V accumulator per block (the accuracy
choice above) acc = acc * alpha + PV is one FFMA per element whether or not alpha is 1, so skipping the
rescale saves no instruction on the accumulator (only alpha's 2 exp2 per row pair) and needs P_SHIFT + a
threshold <= log2(448).

Needs Triton >= 3.6 (triton.experimental.gluon) and an sm90 GPU (wgmma): `unsupported_device` says why
not elsewhere. Without a GPU, `compile_sm90` compiles the kernel for sm90 (`sass` and `loop_mix` read ptxas's
output).
Imported only where Triton is installed (CUDA builds).
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import mbarrier, tma, warpgroup_mma, warpgroup_mma_wait
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

from . import attention8 as A8

CAPABILITY = (9, 0)  # wgmma: Hopper only (Ada has no wgmma, Blackwell uses tcgen05)


@dataclass(frozen=True)
class GluonConfig:
    """One launch shape: `_attn_fwd_gluon` (16 * num_warps query rows per program, 64 per warpgroup) or, with
    warp_specialize, `_attn_fwd_pingpong` (128 rows: two consumer warpgroups and a producer warp)."""

    block_n: int = 128  # keys per step, also the K scale block of the pre-pass
    num_warps: int = 4  # 4: one warpgroup on 64 rows; 8: two on 128 rows (warp_specialize: 4, per consumer)
    stages: int = 2  # K/V tiles in the TMA ring
    warp_specialize: bool = False  # a producer warp issues the TMA loads, two consumer warpgroups compute
    pingpong: bool = True  # warp_specialize: the consumers take turns issuing their wgmma (FA3's ping-pong)
    overlap: bool = False  # warp_specialize: S_{j+1} issued before block j's softmax (FA3 part 1 in each consumer)
    permute_v: bool = False  # the pre-pass stores V^T's keys in the wgmma order: P needs no shuffles (_a_operand)
    consumer_regs: int = 240  # warp_specialize: registers per consumer thread (setmaxnreg)
    producer_regs: int = 24  # warp_specialize: registers per producer thread

    def __post_init__(self):
        if self.overlap and not self.warp_specialize:
            raise ValueError("overlap is the warp-specialized consumers' option (the plain loop always overlaps)")
        if self.warp_specialize and self.num_warps != 4:
            raise ValueError(f"warp_specialize runs two consumer warpgroups of 4 warps, got num_warps {self.num_warps}")
        if 2 * self.consumer_regs + self.producer_regs > 512:  # 3 warpgroups x 128 threads share 64 K registers
            raise ValueError(f"2 x consumer_regs + producer_regs must be <= 512, got {self.consumer_regs}, "
                             f"{self.producer_regs}")

    @property
    def block_m(self) -> int:
        return 128 if self.warp_specialize else 16 * self.num_warps

    @property
    def tile_m(self) -> int:
        """Rows of the Q tile one TMA load brings (one consumer's with warp_specialize)."""
        return 64 if self.warp_specialize else self.block_m

    @property
    def maxnreg(self) -> int | None:
        """The kernel's register limit with warp_specialize: three warpgroups (the producer's warp rounds up to
        one) share the 64 K registers, the default partition (consumer 0) gets what the workers leave."""
        if not self.warp_specialize:
            return None
        return (2 * self.consumer_regs + self.producer_regs) // 3 // 8 * 8

    @property
    def name(self) -> str:
        perm = "-pv" if self.permute_v else ""
        if not self.warp_specialize:
            return f"gluon-m{self.block_m}n{self.block_n}w{self.num_warps}s{self.stages}{perm}"
        regs = "" if (self.consumer_regs, self.producer_regs) == (240, 24) else \
            f"r{self.consumer_regs}p{self.producer_regs}"
        ov = "ov" if self.overlap else ""
        return f"gluon-ws{'pp' if self.pingpong else ''}{ov}-m{self.block_m}n{self.block_n}s{self.stages}{regs}{perm}"


DEFAULT = GluonConfig()
PINGPONG = GluonConfig(stages=3, warp_specialize=True)  # FA3's schedule: producer warp, two consumers taking turns
VARIANTS = (
    DEFAULT, GluonConfig(stages=3), GluonConfig(num_warps=8), GluonConfig(block_n=64, stages=3),
    GluonConfig(permute_v=True),
    PINGPONG, GluonConfig(stages=2, warp_specialize=True), GluonConfig(stages=4, warp_specialize=True),
    GluonConfig(stages=3, warp_specialize=True, pingpong=False),  # the consumers unordered
    GluonConfig(stages=3, warp_specialize=True, permute_v=True),
    GluonConfig(stages=2, warp_specialize=True, permute_v=True),
    GluonConfig(stages=3, warp_specialize=True, permute_v=True, overlap=True),
    GluonConfig(stages=3, warp_specialize=True, permute_v=True, overlap=True, pingpong=False),
)
CONFIGS = {c.name: c for c in VARIANTS}
# the config attention8.attention_fp8 runs (from GLUON_MIN_KEYS keys on Hopper): the fastest of the sweep on an
# H100 (2026-12-06; BENCHMARKS.md, session 4) at both lengths, its output bit-identical to the Triton loop's
RUNTIME = CONFIGS["gluon-wspp-m128n128s2-pv"]


# ---------------------------------------------------------------------------------------------
# the kernel


@gluon.jit
def _issue_kv(k_desc, v_desc, k_smem, v_smem, k_bars, v_bars, row0, vrow0, j, n,
              BLOCK_N: gl.constexpr, STAGES: gl.constexpr):
    """TMA loads of key block j (K (BLOCK_N, D) and V^T (D, BLOCK_N), fp8) into ring stage j % STAGES,
    each signalling its own mbarrier; nothing is issued when j >= n."""
    s = j % STAGES
    ok = j < n
    kb = k_bars.index(s)
    vb = v_bars.index(s)
    mbarrier.expect(kb, k_desc.block_type.nbytes, pred=ok)
    tma.async_copy_global_to_shared(k_desc, [row0 + j * BLOCK_N, 0], kb, k_smem.index(s), pred=ok)
    mbarrier.expect(vb, v_desc.block_type.nbytes, pred=ok)
    tma.async_copy_global_to_shared(v_desc, [vrow0, j * BLOCK_N], vb, v_smem.index(s), pred=ok)


@gluon.jit
def _issue_scores(q_smem, k_smem, k_bars, j, s_zero, STAGES: gl.constexpr):
    """Wait for K block j, then issue S = q8 . k8^T (BLOCK_M, BLOCK_N) asynchronously: returns the token."""
    s = j % STAGES
    mbarrier.wait(k_bars.index(s), (j // STAGES) & 1)
    return warpgroup_mma(q_smem, k_smem.index(s).permute((1, 0)), s_zero, use_acc=False, is_async=True)


@gluon.jit
def _softmax(s, m_i, l_i, c, start_n, Lk, s_layout: gl.constexpr, BLOCK_N: gl.constexpr, MASK: gl.constexpr,
             P_SHIFT: gl.constexpr):
    """One key block of the online softmax in base 2 on raw scores s (BLOCK_M, BLOCK_N) fp32, c = sq * sk.

    Returns p (fp32, in [0, 2^P_SHIFT]), alpha = exp2(m_old - m_new) (BLOCK_M,), l and m updated: the
    arithmetic of attention8._softmax_pv, operation for operation.
    """
    if MASK:  # the last, partial block
        s = s * c
        cols = start_n + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s_layout))
        s = gl.where(gl.expand_dims(cols < Lk, 0), s, float("-inf"))
        m_new = gl.maximum(m_i, gl.max(s, 1))
        x = s - gl.expand_dims(m_new - P_SHIFT, 1)
    else:
        m_new = gl.maximum(m_i, gl.max(s, 1) * c)
        x = s * c - gl.expand_dims(m_new - P_SHIFT, 1)  # one FMA per score
    alpha = gl.exp2(m_i - m_new)
    p = gl.exp2(x)
    l_i = l_i * alpha + gl.sum(p, 1)
    return p, alpha, l_i, m_new


@gluon.jit
def _a_operand(p, p_layout: gl.constexpr, BLOCK_N: gl.constexpr, PERMUTE_V: gl.constexpr):
    """P (BLOCK_M, BLOCK_N) fp32 in the Q.K^T accumulator's layout as the e4m3 A operand of P.V.

    PERMUTE_V: each lane keeps its own scores; the columns are relabelled within each 32 (column
    32b + 16h + 8q + 2t + e becomes 32b + 16h + 4t + 2q + e, attention8.wgmma_key_columns) so that the
    conversion is trivial (asserted at compile time), and the pre-pass stored V^T's keys in that order.
    Otherwise lanes of a quad exchange bytes (SHFL, SEL, PRMT in the SASS)."""
    p8 = p.to(gl.float8e4nv)
    if PERMUTE_V:
        BLOCK_M: gl.constexpr = p.shape[0]
        p8 = gl.reshape(p8, [BLOCK_M, BLOCK_N // 32, 2, 2, 4, 2])  # (m, b, h, q, t, e)
        p8 = gl.reshape(gl.permute(p8, [0, 1, 2, 4, 3, 5]), [BLOCK_M, BLOCK_N])  # (m, b, h, t, q, e)
        return gl.convert_layout(p8, p_layout, assert_trivial=True)
    return gl.convert_layout(p8, p_layout)


@gluon.jit
def _pv_acc(p, alpha, v_smem, v_bars, j, o_zero, p_layout: gl.constexpr, o_layout: gl.constexpr,
            STAGES: gl.constexpr, BLOCK_N: gl.constexpr, PERMUTE_V: gl.constexpr):
    """Wait for V block j and issue P8 . V8 (BLOCK_M, D) asynchronously from registers; returns the token and
    acc * alpha-to-be (alpha moved to the accumulator's row layout)."""
    s = j % STAGES
    p8 = _a_operand(p, p_layout, BLOCK_N, PERMUTE_V)
    mbarrier.wait(v_bars.index(s), (j // STAGES) & 1)
    tok = warpgroup_mma(p8, v_smem.index(s).permute((1, 0)), o_zero, use_acc=False, is_async=True)
    alpha_o = gl.convert_layout(alpha, gl.SliceLayout(1, o_layout))
    return tok, gl.expand_dims(alpha_o, 1)


@gluon.jit
def _loop_state(BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, D: gl.constexpr, s_layout: gl.constexpr,
                o_layout: gl.constexpr):
    """The online softmax's starting state: zero tiles for wgmma's unused accumulators (use_acc=False: never
    read) of S and of P.V, the row max m = -inf, the row sum l = 0 and the output accumulator 0."""
    s_zero = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, s_layout)
    o_zero = gl.zeros([BLOCK_M, D], gl.float32, o_layout)
    m_i = gl.full([BLOCK_M], float("-inf"), gl.float32, gl.SliceLayout(1, s_layout))
    l_i = gl.zeros([BLOCK_M], gl.float32, gl.SliceLayout(1, s_layout))
    acc = gl.zeros([BLOCK_M, D], gl.float32, o_layout)
    return s_zero, o_zero, m_i, l_i, acc


@gluon.jit
def _attn_fwd_gluon(q_desc, k_desc, v_desc, qs, ks, vs, Out, H, Lq, Lqp, Lk, Lkp, sob, soh, sol,
                    D: gl.constexpr, BLOCK_N: gl.constexpr, Q_BLOCK: gl.constexpr, STAGES: gl.constexpr,
                    P_SHIFT: gl.constexpr, PERMUTE_V: gl.constexpr, num_warps: gl.constexpr):
    """One program: BLOCK_M = 16 * num_warps queries of one (batch, head) over all keys (module docstring)."""
    BLOCK_M: gl.constexpr = q_desc.block_type.shape[0]
    # wgmma accumulator layouts: m16 x n x k32 (fp8) instructions, warps stacked along the rows
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                       instr_shape=[16, BLOCK_N, 32])
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                       instr_shape=[16, D, 32])
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=4)  # fp8 A in registers

    start_m = gl.program_id(0)
    bh = gl.program_id(1)
    row0 = bh * Lkp  # first row of this head in the (B*H*Lkp, D) 8-bit K
    vrow0 = bh * D  # first row of this head in the (B*H*D, Lkp) 8-bit V^T
    n = gl.cdiv(Lk, BLOCK_N)  # key blocks; the last one is masked when Lk % BLOCK_N

    q_smem = gl.allocate_shared_memory(q_desc.dtype, q_desc.block_type.shape, q_desc.layout)
    k_smem = gl.allocate_shared_memory(k_desc.dtype, [STAGES] + k_desc.block_type.shape, k_desc.layout)
    v_smem = gl.allocate_shared_memory(v_desc.dtype, [STAGES] + v_desc.block_type.shape, v_desc.layout)
    q_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    k_bars = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    v_bars = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    mbarrier.init(q_bar, count=1)
    for i in gl.static_range(STAGES):
        mbarrier.init(k_bars.index(i), count=1)
        mbarrier.init(v_bars.index(i), count=1)

    mbarrier.expect(q_bar, q_desc.block_type.nbytes)
    tma.async_copy_global_to_shared(q_desc, [bh * Lqp + start_m * BLOCK_M, 0], q_bar, q_smem)
    for i in gl.static_range(STAGES):  # fill the ring
        _issue_kv(k_desc, v_desc, k_smem, v_smem, k_bars, v_bars, row0, vrow0, i, n, BLOCK_N, STAGES)

    c_q = gl.load(qs + bh * (Lqp // Q_BLOCK) + (start_m * BLOCK_M) // Q_BLOCK)
    ks_h = ks + bh * (Lkp // BLOCK_N)
    s_zero, o_zero, m_i, l_i, acc = _loop_state(BLOCK_M, BLOCK_N, D, s_layout, o_layout)

    mbarrier.wait(q_bar, 0)
    tok = _issue_scores(q_smem, k_smem, k_bars, 0, s_zero, STAGES)
    s = warpgroup_mma_wait(0, deps=[tok])
    for j in range(0, n - 1):  # every block but the last: unmasked, with the next S in flight
        s_tok = _issue_scores(q_smem, k_smem, k_bars, j + 1, s_zero, STAGES)
        p, alpha, l_i, m_i = _softmax(s, m_i, l_i, c_q * gl.load(ks_h + j), j * BLOCK_N, Lk, s_layout, BLOCK_N,
                                      False, P_SHIFT)
        pv_tok, alpha_o = _pv_acc(p, alpha, v_smem, v_bars, j, o_zero, p_layout, o_layout, STAGES, BLOCK_N,
                                  PERMUTE_V)
        s, pv = warpgroup_mma_wait(0, deps=[s_tok, pv_tok])
        acc = acc * alpha_o + pv
        _issue_kv(k_desc, v_desc, k_smem, v_smem, k_bars, v_bars, row0, vrow0, j + STAGES, n, BLOCK_N, STAGES)
    last = n - 1
    c = c_q * gl.load(ks_h + last)
    if last * BLOCK_N + BLOCK_N > Lk:  # the partial last block
        p, alpha, l_i, m_i = _softmax(s, m_i, l_i, c, last * BLOCK_N, Lk, s_layout, BLOCK_N, True, P_SHIFT)
    else:
        p, alpha, l_i, m_i = _softmax(s, m_i, l_i, c, last * BLOCK_N, Lk, s_layout, BLOCK_N, False, P_SHIFT)
    pv_tok, alpha_o = _pv_acc(p, alpha, v_smem, v_bars, last, o_zero, p_layout, o_layout, STAGES, BLOCK_N,
                              PERMUTE_V)
    pv = warpgroup_mma_wait(0, deps=[pv_tok])
    acc = acc * alpha_o + pv

    mbarrier.invalidate(q_bar)
    for i in gl.static_range(STAGES):
        mbarrier.invalidate(k_bars.index(i))
        mbarrier.invalidate(v_bars.index(i))
    _store_out(acc, l_i, vs, Out, bh, H, start_m, Lq, sob, soh, sol, o_layout, BLOCK_M, D)


@gluon.jit
def _store_out(acc, l_i, vs, Out, bh, H, start_m, Lq, sob, soh, sol, o_layout: gl.constexpr,
               BLOCK_M: gl.constexpr, D: gl.constexpr):
    """out = acc / l * sv (sv the V scale per channel), stored in Out's dtype for the rows < Lq."""
    d = gl.arange(0, D, layout=gl.SliceLayout(0, o_layout))
    sv = gl.load(vs + bh * D + d)  # (D,)
    inv_l = gl.convert_layout(1.0 / l_i, gl.SliceLayout(1, o_layout))
    out = acc * gl.expand_dims(inv_l, 1) * gl.expand_dims(sv, 0)  # (BLOCK_M, D)
    rows = start_m * BLOCK_M + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, o_layout))
    b = bh // H
    h = bh % H
    base = Out + b.to(gl.int64) * sob + h.to(gl.int64) * soh
    ptr = base + gl.expand_dims(rows.to(gl.int64) * sol, 1) + gl.expand_dims(d, 0)
    mask = gl.expand_dims(rows < Lq, 1) & gl.expand_dims(d < D, 0)
    gl.store(ptr, out.to(Out.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------------------------------------
# the ping-pong kernel: a producer warp and two consumer warpgroups (FlashAttention-3 parts 1-3)


@gluon.jit
def _pp_load(q_desc, k_desc, v_desc, q_smem, k_smem, v_smem, q_bars, k_full, v_full, k_empty, v_empty,
             qrow0, row0, vrow0, n, BLOCK_N: gl.constexpr, STAGES: gl.constexpr):
    """The producer (one warp): both consumers' Q tiles, then key block j's K and V^T into ring stage
    j % STAGES as soon as both consumers have released what the stage held (block j - STAGES)."""
    for c in gl.static_range(2):
        mbarrier.expect(q_bars.index(c), q_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(q_desc, [qrow0 + c * q_desc.block_type.shape[0], 0], q_bars.index(c),
                                        q_smem.index(c))
    for j in range(n):
        s = j % STAGES
        free = ((j // STAGES) & 1) ^ 1  # a fresh barrier passes parity 1: the first STAGES blocks go at once
        mbarrier.wait(k_empty.index(s), free)
        mbarrier.expect(k_full.index(s), k_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(k_desc, [row0 + j * BLOCK_N, 0], k_full.index(s), k_smem.index(s))
        mbarrier.wait(v_empty.index(s), free)
        mbarrier.expect(v_full.index(s), v_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(v_desc, [vrow0, j * BLOCK_N], v_full.index(s), v_smem.index(s))


@gluon.jit
def _pp_turn(turn, c, k, PINGPONG: gl.constexpr):
    """Wait until consumer c may issue its k-th group of wgmma: consumer 0 goes first, then they alternate
    (the other consumer arrives on `turn[c]` after issuing its group k - 1 + c)."""
    if PINGPONG:
        mbarrier.wait(turn.index(c), (k & 1) ^ (1 - c))


@gluon.jit
def _pp_pass(turn, c, PINGPONG: gl.constexpr):
    """Hand the tensor cores to the other consumer (one arrival on its turn barrier)."""
    if PINGPONG:
        mbarrier.arrive(turn.index(1 - c), count=1)


@gluon.jit
def _pp_overlapped_block(s, q, k_smem, v_smem, k_full, v_full, k_empty, v_empty, turn, c, j, acc, l_i, m_i, c_q,
                         ks_h, Lk, s_zero, o_zero, s_layout: gl.constexpr, p_layout: gl.constexpr,
                         o_layout: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr,
                         P_SHIFT: gl.constexpr, PINGPONG: gl.constexpr, PERMUTE_V: gl.constexpr):
    """Block j < n - 1 with the intra-warpgroup overlap (`overlap` configs): S_{j+1} is issued (turn j + 1)
    before block j's softmax, PV_j after it; returns S_{j+1}, acc, l, m."""
    s_k = (j + 1) % STAGES
    s_v = j % STAGES
    mbarrier.wait(k_full.index(s_k), ((j + 1) // STAGES) & 1)
    _pp_turn(turn, c, j + 1, PINGPONG)
    s_tok = warpgroup_mma(q, k_smem.index(s_k).permute((1, 0)), s_zero, use_acc=False, is_async=True)
    _pp_pass(turn, c, PINGPONG)
    p, alpha, l_i, m_i = _softmax(s, m_i, l_i, c_q * gl.load(ks_h + j), j * BLOCK_N, Lk, s_layout, BLOCK_N, False,
                                  P_SHIFT)
    p8 = _a_operand(p, p_layout, BLOCK_N, PERMUTE_V)
    mbarrier.wait(v_full.index(s_v), (j // STAGES) & 1)
    pv_tok = warpgroup_mma(p8, v_smem.index(s_v).permute((1, 0)), o_zero, use_acc=False, is_async=True)
    s, pv = warpgroup_mma_wait(0, deps=[s_tok, pv_tok])
    mbarrier.arrive(k_empty.index(s_k), count=1)
    mbarrier.arrive(v_empty.index(s_v), count=1)
    acc = acc * gl.expand_dims(gl.convert_layout(alpha, gl.SliceLayout(1, o_layout)), 1) + pv
    return s, acc, l_i, m_i


@gluon.jit
def _pp_consume(q_smem, k_smem, v_smem, q_bars, k_full, v_full, k_empty, v_empty, turn, c, qs, ks, vs, Out, H,
                Lq, Lqp, Lk, Lkp, sob, soh, sol, D: gl.constexpr, BLOCK_N: gl.constexpr, Q_BLOCK: gl.constexpr,
                STAGES: gl.constexpr, P_SHIFT: gl.constexpr, PINGPONG: gl.constexpr, PERMUTE_V: gl.constexpr,
                OVERLAP: gl.constexpr):
    """Consumer c (one warpgroup): query rows 64 c .. 64 c + 63 of the program's 128 over all key blocks.

    Turn 0 issues S_0; turn j + 1 (j < n - 1) issues PV_j and S_{j+1} back to back, after block j's softmax;
    turn n issues PV_{n-1}: n + 1 turns for either consumer. While one consumer runs its softmax the other's
    pair runs on the tensor cores (within a consumer the softmax waits for its own S: registers for a
    second S tile in flight are not there at 240 per thread). Only the last block is masked.
    OVERLAP: the blocks run `_pp_overlapped_block` instead (S_{j+1} in flight during block j's softmax)."""
    BLOCK_M: gl.constexpr = q_smem.type.shape[1]
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, BLOCK_N, 32])
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, D, 32])
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=4)
    start_m = gl.program_id(0)
    bh = gl.program_id(1)
    n = gl.cdiv(Lk, BLOCK_N)
    c_q = gl.load(qs + bh * (Lqp // Q_BLOCK) + (start_m * 2 * BLOCK_M) // Q_BLOCK)  # both halves: one Q block
    ks_h = ks + bh * (Lkp // BLOCK_N)
    s_zero, o_zero, m_i, l_i, acc = _loop_state(BLOCK_M, BLOCK_N, D, s_layout, o_layout)
    q = q_smem.index(c)

    mbarrier.wait(q_bars.index(c), 0)
    mbarrier.wait(k_full.index(0), 0)
    _pp_turn(turn, c, 0, PINGPONG)
    s_tok = warpgroup_mma(q, k_smem.index(0).permute((1, 0)), s_zero, use_acc=False, is_async=True)
    _pp_pass(turn, c, PINGPONG)
    s = warpgroup_mma_wait(0, deps=[s_tok])
    mbarrier.arrive(k_empty.index(0), count=1)
    if OVERLAP:  # the carried S costs 64 register copies per block (unrolled by 2 it spilled at 240)
        for j in range(0, n - 1):
            s, acc, l_i, m_i = _pp_overlapped_block(s, q, k_smem, v_smem, k_full, v_full, k_empty, v_empty, turn, c,
                                                    j, acc, l_i, m_i, c_q, ks_h, Lk, s_zero, o_zero, s_layout,
                                                    p_layout, o_layout, BLOCK_N, STAGES, P_SHIFT, PINGPONG,
                                                    PERMUTE_V)
    else:
        for j in range(0, n - 1):  # every block but the last: unmasked, S_{j+1} issued with PV_j
            p, alpha, l_i, m_i = _softmax(s, m_i, l_i, c_q * gl.load(ks_h + j), j * BLOCK_N, Lk, s_layout, BLOCK_N,
                                          False, P_SHIFT)
            p8 = _a_operand(p, p_layout, BLOCK_N, PERMUTE_V)
            s_v = j % STAGES
            s_k = (j + 1) % STAGES
            mbarrier.wait(v_full.index(s_v), (j // STAGES) & 1)
            mbarrier.wait(k_full.index(s_k), ((j + 1) // STAGES) & 1)
            _pp_turn(turn, c, j + 1, PINGPONG)
            pv_tok = warpgroup_mma(p8, v_smem.index(s_v).permute((1, 0)), o_zero, use_acc=False, is_async=True)
            s_tok = warpgroup_mma(q, k_smem.index(s_k).permute((1, 0)), s_zero, use_acc=False, is_async=True)
            _pp_pass(turn, c, PINGPONG)
            pv = warpgroup_mma_wait(1, deps=[pv_tok])  # groups retire in order: PV_j is done, S_{j+1} may run on
            mbarrier.arrive(v_empty.index(s_v), count=1)
            acc = acc * gl.expand_dims(gl.convert_layout(alpha, gl.SliceLayout(1, o_layout)), 1) + pv
            s = warpgroup_mma_wait(0, deps=[s_tok])
            mbarrier.arrive(k_empty.index(s_k), count=1)
    last = n - 1
    p, alpha, l_i, m_i = _softmax(s, m_i, l_i, c_q * gl.load(ks_h + last), last * BLOCK_N, Lk, s_layout, BLOCK_N,
                                  True, P_SHIFT)
    p8 = _a_operand(p, p_layout, BLOCK_N, PERMUTE_V)
    s_v = last % STAGES
    mbarrier.wait(v_full.index(s_v), (last // STAGES) & 1)
    _pp_turn(turn, c, n, PINGPONG and not OVERLAP)  # overlap configs take turns for the S issues only
    pv_tok = warpgroup_mma(p8, v_smem.index(s_v).permute((1, 0)), o_zero, use_acc=False, is_async=True)
    _pp_pass(turn, c, PINGPONG and not OVERLAP)
    pv = warpgroup_mma_wait(0, deps=[pv_tok])
    mbarrier.arrive(v_empty.index(s_v), count=1)
    acc = acc * gl.expand_dims(gl.convert_layout(alpha, gl.SliceLayout(1, o_layout)), 1) + pv
    _store_out(acc, l_i, vs, Out, bh, H, start_m * 2 + c, Lq, sob, soh, sol, o_layout, BLOCK_M, D)


@gluon.jit
def _attn_fwd_pingpong(q_desc, k_desc, v_desc, qs, ks, vs, Out, H, Lq, Lqp, Lk, Lkp, sob, soh, sol,
                       D: gl.constexpr, BLOCK_N: gl.constexpr, Q_BLOCK: gl.constexpr, STAGES: gl.constexpr,
                       P_SHIFT: gl.constexpr, PINGPONG: gl.constexpr, PERMUTE_V: gl.constexpr,
                       OVERLAP: gl.constexpr, CONSUMER_REGS: gl.constexpr,
                       PRODUCER_REGS: gl.constexpr, num_warps: gl.constexpr):
    """One program: 128 queries of one (batch, head), two consumer warpgroups of 64 rows and a producer warp.

    Synchronization (every mbarrier counts phases; a fresh one has its parity-1 phase complete):
      q_bars[c]  (count 1): Q tile c landed (TMA transaction bytes), waited with parity 0 once.
      k_full[s], v_full[s] (count 1): block j's K / V^T landed in stage s = j % STAGES; consumers wait
                 parity (j // STAGES) & 1.
      k_empty[s], v_empty[s] (count 2): each consumer arrives once per block when its wgmma reading the
                 stage has retired (S_j for K, PV_j for V); the producer waits parity ((j // STAGES) & 1) ^ 1
                 before refilling s with block j, so the first STAGES fills do not wait.
      turn[c]    (count 1, PINGPONG only): consumer c waits parity (k & 1) ^ (1 - c) before its k-th group
                 of wgmma issues and then arrives on turn[1 - c]: 0 issues group 0, then 1 its group 0,
                 then 0 its group 1, ...; neither can run two phases ahead of the other's wait, since each
                 arrival follows its own wait. Groups: S_0, then PV_j with S_{j+1}, then PV_{n-1} (n + 1
                 turns each); with OVERLAP the S issues alone, S_0 .. S_{n-1} (n turns each).
    No wait depends on a later arrival of the waiter's own partition, and the producer runs ahead of the
    consumers by at most STAGES blocks, so the three partitions cannot deadlock for any n >= 1.
    """
    BLOCK_M: gl.constexpr = q_desc.block_type.shape[0]  # 64 rows per consumer
    start_m = gl.program_id(0)
    bh = gl.program_id(1)
    n = gl.cdiv(Lk, BLOCK_N)

    q_smem = gl.allocate_shared_memory(q_desc.dtype, [2] + q_desc.block_type.shape, q_desc.layout)
    k_smem = gl.allocate_shared_memory(k_desc.dtype, [STAGES] + k_desc.block_type.shape, k_desc.layout)
    v_smem = gl.allocate_shared_memory(v_desc.dtype, [STAGES] + v_desc.block_type.shape, v_desc.layout)
    q_bars = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    turn = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    k_full = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    v_full = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    k_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    v_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(2):
        mbarrier.init(q_bars.index(i), count=1)
        mbarrier.init(turn.index(i), count=1)
    for i in gl.static_range(STAGES):
        mbarrier.init(k_full.index(i), count=1)
        mbarrier.init(v_full.index(i), count=1)
        mbarrier.init(k_empty.index(i), count=2)
        mbarrier.init(v_empty.index(i), count=2)

    gl.warp_specialize([
        (_pp_consume, (q_smem, k_smem, v_smem, q_bars, k_full, v_full, k_empty, v_empty, turn, 0, qs, ks, vs, Out,
                       H, Lq, Lqp, Lk, Lkp, sob, soh, sol, D, BLOCK_N, Q_BLOCK, STAGES, P_SHIFT, PINGPONG,
                       PERMUTE_V, OVERLAP)),
        (_pp_consume, (q_smem, k_smem, v_smem, q_bars, k_full, v_full, k_empty, v_empty, turn, 1, qs, ks, vs, Out,
                       H, Lq, Lqp, Lk, Lkp, sob, soh, sol, D, BLOCK_N, Q_BLOCK, STAGES, P_SHIFT, PINGPONG,
                       PERMUTE_V, OVERLAP)),
        (_pp_load, (q_desc, k_desc, v_desc, q_smem, k_smem, v_smem, q_bars, k_full, v_full, k_empty, v_empty,
                    bh * Lqp + start_m * 2 * BLOCK_M, bh * Lkp, bh * D, n, BLOCK_N, STAGES)),
    ], [4, 1], [CONSUMER_REGS, PRODUCER_REGS])

    for i in gl.static_range(2):
        mbarrier.invalidate(q_bars.index(i))
        mbarrier.invalidate(turn.index(i))
    for i in gl.static_range(STAGES):
        mbarrier.invalidate(k_full.index(i))
        mbarrier.invalidate(v_full.index(i))
        mbarrier.invalidate(k_empty.index(i))
        mbarrier.invalidate(v_empty.index(i))


# ---------------------------------------------------------------------------------------------
# torch entry points


def _layouts(cfg: GluonConfig, D: int):
    """NVMMA shared layouts of the Q, K and V^T tiles (fp8, 128-byte swizzle for 128-byte rows)."""
    f8 = gl.float8e4nv
    return (gl.NVMMASharedLayout.get_default_for([cfg.tile_m, D], f8),
            gl.NVMMASharedLayout.get_default_for([cfg.block_n, D], f8),
            gl.NVMMASharedLayout.get_default_for([D, cfg.block_n], f8))


def _pingpong_constexprs(cfg: GluonConfig, D: int) -> dict:
    return dict(D=D, BLOCK_N=cfg.block_n, Q_BLOCK=A8.Q_BLOCK, STAGES=cfg.stages, P_SHIFT=A8.P_SHIFT,
                PINGPONG=cfg.pingpong, PERMUTE_V=cfg.permute_v, OVERLAP=cfg.overlap, CONSUMER_REGS=cfg.consumer_regs,
                PRODUCER_REGS=cfg.producer_regs)


def launch(x: A8.Quantized, out: torch.Tensor, config: GluonConfig = DEFAULT):
    """One launch of `_attn_fwd_gluon` into `out` (B, H, Lq, D); returns the compiled kernel."""
    B, H, Lq, D = out.shape
    cfg = config
    if (cfg.block_n, cfg.permute_v) != (x.block_n, x.permute_v):
        raise ValueError(f"the pre-pass ran with block_n {x.block_n}, permute_v {x.permute_v}; the config has "
                         f"{cfg.block_n}, {cfg.permute_v}")
    ql, kl, vl = _layouts(cfg, D)
    q_desc = TensorDescriptor.from_tensor(x.q8, [cfg.tile_m, D], ql)
    k_desc = TensorDescriptor.from_tensor(x.k8, [cfg.block_n, D], kl)
    v_desc = TensorDescriptor.from_tensor(x.vt8, [D, cfg.block_n], vl)
    grid = (triton.cdiv(Lq, cfg.block_m), B * H)  # queries fastest: neighbouring programs share K and V in L2
    if cfg.warp_specialize:
        return _attn_fwd_pingpong[grid](q_desc, k_desc, v_desc, x.qs, x.ks, x.vs, out, H, Lq, x.lqp, x.lk, x.lkp,
                                        *out.stride()[:3], **_pingpong_constexprs(cfg, D), num_warps=4,
                                        maxnreg=cfg.maxnreg)
    return _attn_fwd_gluon[grid](q_desc, k_desc, v_desc, x.qs, x.ks, x.vs, out, H, Lq, x.lqp, x.lk, x.lkp,
                                 *out.stride()[:3], D=D, BLOCK_N=cfg.block_n, Q_BLOCK=A8.Q_BLOCK, STAGES=cfg.stages,
                                 P_SHIFT=A8.P_SHIFT, PERMUTE_V=cfg.permute_v, num_warps=cfg.num_warps)


def attention_quantized(x: A8.Quantized, out: torch.Tensor, config: GluonConfig = DEFAULT) -> torch.Tensor:
    """The Gluon attention loop over a pre-pass result; writes and returns `out` (B, H, Lq, D)."""
    launch(x, out, config)
    return out


def unsupported_device(device: torch.device) -> str | None:
    """Why this kernel cannot run on `device` (None: it can): it needs Hopper's wgmma (sm90 exactly)."""
    if device.type != "cuda":
        return f"it needs a CUDA GPU, got {device.type}"
    cap = torch.cuda.get_device_capability(device)
    if cap != CAPABILITY:
        return f"it needs an sm90 GPU (Hopper wgmma), got sm{cap[0]}{cap[1]}"
    return None


def attention_fp8_gluon(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
                        config: GluonConfig | None = None) -> torch.Tensor:
    """softmax(q k^T / sqrt(D)) v in FP8 on Hopper: (B, H, Lq, D) x (B, H, Lk, D) x2 -> (B, H, Lq, D).

    attention8.attention_fp8's contract: bf16 or fp16 in, q's dtype (and strides) out, D = 128, no mask.
    `config`: None runs RUNTIME. Raises ValueError for inputs or a device it does not run (the message names
    what does).
    """
    config = config or RUNTIME
    problem = A8.unsupported(q, k, v) or unsupported_device(q.device)
    if problem:
        raise ValueError(f"fp8 gluon attention cannot run these inputs: {problem}; use attention8.attention_fp8 "
                         "(sm89+) or an sdpa-* backend for them")
    if A8.Q_BLOCK % config.block_m or A8.PAD % config.block_n:
        raise ValueError(f"block_m must divide {A8.Q_BLOCK} and block_n divide {A8.PAD}, got {config}")
    out = torch.empty_like(q)  # keeps q's strides: (B, L, H, D) storage stays that way
    return attention_quantized(A8.quantize(q, k, v, config.block_n, config.permute_v), out, config)


# ---------------------------------------------------------------------------------------------
# compile without a GPU


def compile_sm90(config: GluonConfig = DEFAULT, D: int = A8.HEAD_DIM, out_dtype: str = "bf16"):
    """Compile `_attn_fwd_gluon` for sm90 on any machine (no GPU needed): returns Triton's CompiledKernel
    (asm["ptx"], asm["cubin"], n_regs and n_spills are filled in by ptxas)."""
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource

    descs = [f"tensordesc<fp8e4nv[{s[0]}, {s[1]}],{lay!r}>"
             for s, lay in zip(([config.tile_m, D], [config.block_n, D], [D, config.block_n]), _layouts(config, D))]
    signature = dict(zip(["q_desc", "k_desc", "v_desc"], descs))
    signature.update(qs="*fp32", ks="*fp32", vs="*fp32", Out=f"*{out_dtype}", H="i32", Lq="i32", Lqp="i32",
                     Lk="i32", Lkp="i32", sob="i64", soh="i64", sol="i64")
    if config.warp_specialize:
        kernel, constexprs = _attn_fwd_pingpong, _pingpong_constexprs(config, D)
    else:
        kernel = _attn_fwd_gluon
        constexprs = dict(D=D, BLOCK_N=config.block_n, Q_BLOCK=A8.Q_BLOCK, STAGES=config.stages, P_SHIFT=A8.P_SHIFT,
                          PERMUTE_V=config.permute_v)
    constexprs["num_warps"] = config.num_warps
    for name in constexprs:
        signature[name] = "constexpr"
    src = GluonASTSource(kernel, signature, constexprs={(list(signature).index(k),): v for k, v in constexprs.items()})
    options = {"num_warps": config.num_warps}
    if config.maxnreg:
        options["maxnreg"] = config.maxnreg
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options)


def sass(config: GluonConfig = DEFAULT) -> str:
    """The SASS of `compile_sm90(config)`, disassembled by the nvdisasm bundled with Triton's CUDA backend."""
    import subprocess
    import tempfile
    from pathlib import Path

    import triton.backends.nvidia as nv

    with tempfile.TemporaryDirectory() as d:
        cubin = Path(d) / "k.cubin"
        cubin.write_bytes(compile_sm90(config).asm["cubin"])
        return subprocess.run([str(Path(nv.__file__).parent / "bin" / "nvdisasm"), "-c", str(cubin)],
                              capture_output=True, text=True, check=True).stdout


def loop_mix(sass_text: str) -> Counter:
    """Opcode counts (first mnemonic part: FFMA, MUFU, ...) of the key-block loop in `sass_text`: the shortest
    span from a label to a branch back to it holding a block's wgmma (>= 4 QGMMA) and softmax (>= 32 MUFU);
    per warp per key block. Empty when there is none."""
    lines = sass_text.splitlines()
    labels = {m.group(1): i for i, ln in enumerate(lines) if (m := re.match(r"\s*(\.L_x_\d+):", ln))}
    best = Counter()
    for i, ln in enumerate(lines):
        m = re.search(r"\bBRA\b.*\((\.L_x_\d+)\)", ln)
        if not m or labels.get(m.group(1), i) >= i:
            continue
        ops = Counter(m2.group(1).split(".")[0] for body in lines[labels[m.group(1)]:i + 1]
                      if (m2 := re.match(r"\s*/\*[0-9a-f]+\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]+)", body)))
        if ops["QGMMA"] >= 4 and ops["MUFU"] >= 32 and (not best or ops.total() < best.total()):
            best = ops
    return best


# ---------------------------------------------------------------------------------------------
# python -m wan_lite.attention8_gluon: the loop alone, every Gluon config beside attention8's


def sweep(lengths=(32760, 75600), heads: int = 40, rep_ms: int = 400, log=print, watchdog_s: float = 0,
          configs: tuple[GluonConfig, ...] = VARIANTS) -> list[dict]:
    """Time the attention loops alone (pre-pass excluded) on one pre-pass result per block_n at B=1, D=128,
    beside cuDNN's bf16 SDPA on the same q, k, v: per row ms, TFLOP/s (4 B H L^2 D / t), speed-up over
    attention8's DEFAULT Triton loop and over cuDNN, relative difference to the Triton loop's output,
    registers (per consumer thread for warp-specialized configs) and spills. A config that fails to compile
    or run is reported and the rest still run; one that runs longer than watchdog_s (> 0) ends the process
    (a hung kernel cannot be interrupted), after the rows so far were logged."""
    rows = []
    for L in lengths:
        rows += _sweep_length(L, heads, rep_ms, log, watchdog_s, configs)
        torch.cuda.empty_cache()
    return rows


def _cudnn_ms(q, k, v, rep_ms: int) -> float:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def run():
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            return torch.nn.functional.scaled_dot_product_attention(q, k, v)

    return triton.testing.do_bench(run, warmup=1, rep=rep_ms, return_mode="median")


def _watchdog(seconds: float, what: str):
    """A started timer that ends the process if not cancelled within `seconds` (0: none)."""
    import os
    import threading

    def fire():
        print(f"{what} ran over {seconds} s (a hung kernel?): exiting", flush=True)
        os._exit(3)

    timer = threading.Timer(seconds, fire)
    timer.daemon = True
    if seconds > 0:
        timer.start()
    return timer


def _sweep_length(L: int, heads: int, rep_ms: int, log, watchdog_s: float, configs) -> list[dict]:
    g = torch.Generator(device="cuda").manual_seed(L)
    q, k, v = (torch.randn(1, heads, L, A8.HEAD_DIM, device="cuda", generator=g, dtype=torch.bfloat16)
               for _ in range(3))
    flops = 4 * heads * L * L * A8.HEAD_DIM
    rows = []
    try:
        cudnn = _cudnn_ms(q, k, v, rep_ms)
        rows.append({"L": L, "variant": "cudnn sdpa bf16", "ms": cudnn, "tflops": flops / cudnn / 1e9})
    except Exception as e:  # noqa: BLE001 - reported; the fp8 rows still run
        cudnn = None
        rows.append({"L": L, "variant": "cudnn sdpa bf16", "error": f"{type(e).__name__}: {e}"[:400]})
    log(rows[-1])
    xs = {(n, pv): A8.quantize(q, k, v, n, pv)
          for n, pv in {(c.block_n, c.permute_v) for c in configs} | {(A8.DEFAULT.block_n, False)}}
    x0, out = xs[A8.DEFAULT.block_n, False], torch.empty_like(q)
    ref = A8.attention_quantized(x0, torch.empty_like(q)).float()
    base = triton.testing.do_bench(lambda: A8.launch(x0, out, A8.DEFAULT), warmup=1, rep=rep_ms, return_mode="median")
    rows.append({"L": L, "variant": f"triton {A8.DEFAULT.name}", "ms": base, "tflops": flops / base / 1e9})
    if cudnn:
        rows[-1]["vs_cudnn"] = cudnn / base
    log(rows[-1])
    for cfg in configs:
        row = {"L": L, "variant": cfg.name}
        timer = _watchdog(watchdog_s, f"{cfg.name} at L={L}")
        try:
            x = xs[cfg.block_n, cfg.permute_v]
            ck = launch(x, out, cfg)
            row["diff_vs_triton"] = ((out.float() - ref).norm() / ref.norm()).item()
            row["ms"] = triton.testing.do_bench(lambda cfg=cfg, x=x: launch(x, out, cfg), warmup=1, rep=rep_ms,
                                                return_mode="median")
            row.update(tflops=flops / row["ms"] / 1e9, vs_triton=base / row["ms"],
                       regs=cfg.consumer_regs if cfg.warp_specialize else ck.n_regs, spills=ck.n_spills)
            if cudnn:
                row["vs_cudnn"] = cudnn / row["ms"]
        except Exception as e:  # noqa: BLE001 - a failing config is reported, the rest still run
            row["error"] = f"{type(e).__name__}: {e}"[:400]
        timer.cancel()
        rows.append(row)
        log(row)
    return rows


if __name__ == "__main__":
    import argparse
    import json

    p = argparse.ArgumentParser(prog="python -m wan_lite.attention8_gluon", description=sweep.__doc__.split(":")[0])
    p.add_argument("--lengths", default="32760,75600", help="comma list of sequence lengths")
    p.add_argument("--rep-ms", type=int, default=400, help="do_bench repetition time per measurement")
    p.add_argument("--json", help="write the rows here")
    p.add_argument("--configs", default=",".join(CONFIGS), help="comma list of config names (default: all)")
    p.add_argument("--watchdog-s", type=float, default=90, help="end the sweep if one config runs longer (0: never)")
    a = p.parse_args()
    unknown = set(a.configs.split(",")) - set(CONFIGS)
    if unknown:
        raise SystemExit(f"unknown configs {sorted(unknown)}; known: {', '.join(CONFIGS)}")
    problem = unsupported_device(torch.device("cuda")) if torch.cuda.is_available() else "no CUDA GPU"
    if problem:
        raise SystemExit(f"the Gluon sweep needs an sm90 GPU: {problem}")
    logged = []

    def log(row):  # printed and written as it comes: a watchdog exit keeps the rows so far
        print(row, flush=True)
        logged.append(row)
        if a.json:
            with open(a.json, "w") as f:
                json.dump(logged, f, indent=1)

    sweep(tuple(int(t) for t in a.lengths.split(",")), rep_ms=a.rep_ms, log=log, watchdog_s=a.watchdog_s,
          configs=tuple(CONFIGS[n] for n in a.configs.split(",")))
