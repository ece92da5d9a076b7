"""The quantized matmuls, and the one place that picks between them.

`select_kernel(device, scheme, override)` returns "w8a8" or "w8a16":

- w8a8 (int8: Ampere+; fp8 e4m3: Ada sm89, Hopper sm90): per-token activation scales by a fused
  Triton kernel (one read of each row of x, one write of the 8-bit row and its scale; ~3 TB/s on
  H100, the copy bandwidth), then an 8-bit GEMM whose epilogue applies scale_a (x) scale_b and the
  bias and writes bf16:
  - fp8: torch._scaled_mm with rowwise scales (scale_a (M, 1), scale_b (1, N), fp32) and fast
    accumulation (FP8_FAST_ACCUM; WAN_LITE_FP8_FAST_ACCUM=0 turns it off). The weight is stored
    row-major (N, K); `w.t()` is the column-major operand it wants. Shapes it refuses (K or N not a
    multiple of 16) go to the Triton GEMM below.
  - int8: a Triton GEMM (`w8a8_matmul`, wgmma on Hopper, int32 accumulation) with the same fused
    epilogue; it also runs fp8 and is kept as the fp8 fallback. `torch._int_mm` followed by a separate
    dequantize (`int8_matmul_torch`) reads and writes an M x N int32 tensor: half of bf16's speed at
    Wan shapes, kept for bench_linear only.
- w8a16 (everything else, the CPU included): dequantize the weight to the compute dtype and run
  a plain matmul. With `linear_w8a8_reference` (the w8a8 arithmetic in plain torch), the reference
  the fast paths are tested against.

Unfused, the activation quantization alone (abs, amax, div, round, cast: five passes over x) makes
fp8 slower than bf16 at Wan shapes (DESIGN.md section 2): fusing it is the point of the Triton kernel.

The 8-bit Triton GEMM has variants, for measuring on Hopper (`python -m wan_lite.bench_linear --variants`):
"grouped" (the default: one program per output tile, tiles in an L2-friendly grouped order, autotuned over
the configs of the 2026-11-26 sweep), "wide" (the same kernel over more configs: deeper pipelines of
64-wide K steps, BLOCK_M 256 on two consumer warpgroups), "persistent" (grid = number of SMs, each
program walks tiles SMs apart in the same grouped order), "tma" and "tma-persistent" (the same two
schedules with loads through host tensor descriptors: TMA on sm90). `w8a8_matmul(variant=...)`, then
the environment variable WAN_LITE_W8A8_GEMM, then GEMM_DEFAULT pick one. Measured on the H200
(BENCHMARKS.md, session 3; the GEMMs of one guided 720p step, outputs identical): grouped 3,122 ms,
wide 0.95x, persistent 0.93x, tma 1.02x, tma-persistent 1.02x, cuBLASLt fp8 (`torch._scaled_mm`, the
ceiling) 1.10x: "grouped" runs at 91% of cuBLAS's fp8 speed and stays the default (0.4% of the step was
on offer). The others stay selectable for cards not measured here (Ada: no TMA, smaller shared memory).

Override order: the `override` argument, then the environment variable WAN_LITE_QUANT_KERNEL
(w8a8 | w8a16), then the device's capability. Asking for w8a8 where it cannot run raises.

Deliberately unsupported: static (calibrated) activation scales, per-group weight scales, fp8 e5m2.
"""

from __future__ import annotations

import functools
import os

import torch
import torch.nn.functional as F

KERNELS = ("w8a8", "w8a16")
ENV_VAR = "WAN_LITE_QUANT_KERNEL"
QMAX = {"int8": 127.0, "fp8": 448.0}  # absmax maps to this value
INV_QMAX = {k: float(torch.tensor(1.0 / v, dtype=torch.float32)) for k, v in QMAX.items()}  # fp32-exact
QDTYPE = {"int8": torch.int8, "fp8": torch.float8_e4m3fn}
MIN_CAPABILITY = {"int8": (8, 0), "fp8": (8, 9)}  # _int_mm needs Ampere; e4m3 tensor cores Ada/Hopper
PAD_M = 16  # rows of the quantized activations: _scaled_mm wants M % 16 == 0, _int_mm M > 16 and M % 8 == 0
# fp8 tensor-core accumulation without periodic fp32 promotion: faster, and on Wan shapes its error is
# lost in the e4m3 rounding (bench_linear shows both). WAN_LITE_FP8_FAST_ACCUM=0 turns it off.
FP8_FAST_ACCUM = os.environ.get("WAN_LITE_FP8_FAST_ACCUM", "1") != "0"
GEMMS = ("grouped", "wide", "persistent", "tma", "tma-persistent")  # the Triton 8-bit GEMM's variants
GEMM_ENV_VAR = "WAN_LITE_W8A8_GEMM"
# "grouped": 1,280 int8 TOPS on the H200 in the 720p profile (BENCHMARKS.md, Run 3), ~65% of the dense peak,
# 91% of cuBLASLt fp8 on the same shapes; no variant was more than 2.3% faster (module docstring).
GEMM_DEFAULT = "grouped"
TMA_CAPABILITY = (9, 0)  # tensor descriptors are TMA loads on Hopper; older cards get the pointer loads

try:  # Triton ships with CUDA builds of torch; CPU builds have none (and need none: w8a16 runs there)
    import triton
    import triton.language as tl
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # pragma: no cover - depends on the torch build
    triton = None


# ---------------------------------------------------------------------------------------------
# the switch


@functools.cache
def _capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


def w8a8_unsupported(device: torch.device, scheme: str) -> str | None:
    """Why the w8a8 kernels cannot run for `scheme` on `device`, or None when they can."""
    if scheme not in QMAX:
        return f"scheme {scheme!r} has no w8a8 kernel (int8 and fp8 do)"
    if device.type != "cuda":
        return f"w8a8 needs a CUDA GPU, the tensors are on {device.type}"
    if triton is None:
        return "w8a8 needs Triton for the fused activation quantization, and this torch has none"
    cap = _capability(device.index if device.index is not None else torch.cuda.current_device())
    if cap < MIN_CAPABILITY[scheme]:
        need = ".".join(map(str, MIN_CAPABILITY[scheme]))
        return f"{scheme} w8a8 needs compute capability {need}+, this GPU is {cap[0]}.{cap[1]}"
    return None


@functools.cache
def _w8a8_unsupported_cached(device: torch.device, scheme: str) -> str | None:
    return w8a8_unsupported(device, scheme)  # per (device, scheme): select_kernel runs on every call


def select_kernel(device, scheme: str, override: str | None = None) -> str:
    """'w8a8' or 'w8a16' for a quantized Linear of `scheme` on `device` (see the module docstring)."""
    choice = override or os.environ.get(ENV_VAR) or None
    if choice is not None and choice not in KERNELS:
        raise ValueError(f"unknown quantized-Linear kernel {choice!r} (from {'argument' if override else ENV_VAR}): "
                         f"choose one of {', '.join(KERNELS)}")
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:  # the cache is per card
        device = torch.device("cuda", torch.cuda.current_device())
    why_not = _w8a8_unsupported_cached(device, scheme)
    if choice == "w8a8" and why_not:
        raise RuntimeError(f"kernel w8a8 was asked for but {why_not}: use {ENV_VAR}=w8a16 (or leave it unset)")
    return choice or ("w8a16" if why_not else "w8a8")


# ---------------------------------------------------------------------------------------------
# reference (plain torch) quantization and the w8a16 path


def quantize_rows_reference(x: torch.Tensor, scheme: str, smooth: torch.Tensor | None = None):
    """Symmetric per-row quantization of a 2-D x (optionally x / smooth first) in plain torch.

    Returns (q (M, K) in the scheme's 8-bit dtype, scale (M, 1) float32) with x ~= q * scale. Used for
    weights offline (rows = output channels) and as the reference of the fused activation kernel.
    Divisions are one reciprocal per row (per channel for smooth) and multiplies, as in the kernel:
    the two agree bit for bit.
    """
    xf = x.float()
    if smooth is not None:
        xf = xf * (1.0 / smooth.float())
    scale = xf.abs().amax(dim=1, keepdim=True).clamp(min=1e-12) * INV_QMAX[scheme]  # (M, 1)
    y = (xf * (1.0 / scale)).clamp(-QMAX[scheme], QMAX[scheme])
    q = y.round().to(torch.int8) if scheme == "int8" else y.to(torch.float8_e4m3fn)
    return q, scale


def dequantize_weight(w: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(N, K) 8-bit weight and (N,) float32 scales -> (N, K) in `dtype` (int8 and e4m3 values are exact
    in bf16, so only the product rounds)."""
    return w.to(dtype) * scale.to(dtype)[:, None]


def linear_w8a16(x2, w, w_scale, bias, smooth, dtype):
    """Dequantize the weight to `dtype`, plain matmul: x2 (M, K) -> (M, N) in `dtype`."""
    x2 = x2.to(dtype)
    if smooth is not None:
        x2 = x2 * (1.0 / smooth).to(dtype)
    return F.linear(x2, dequantize_weight(w, w_scale, dtype), None if bias is None else bias.to(dtype))


def linear_w8a8_reference(x2, w, w_scale, bias, smooth, scheme, dtype):
    """What w8a8 computes, in plain torch on any device: quantize x per token, float64 matmul of the
    8-bit values, scale. The reference the fused GPU kernels are tested against."""
    xq, x_scale = quantize_rows_reference(x2, scheme, smooth)
    acc = xq.double() @ w.double().t()  # exact for int8 (and for e4m3 products) in float64
    out = acc * x_scale.double() * w_scale.double()[None, :]
    if bias is not None:
        out = out + bias.double()
    return out.to(dtype)


# ---------------------------------------------------------------------------------------------
# Triton: fused per-token activation quantization, int8 GEMM with a dequantizing epilogue

if triton is not None:

    def _quantize_configs():
        return [triton.Config({}, num_warps=w) for w in (4, 8, 16, 32)]

    def _prune_quantize_configs(configs, named_args, **kwargs):
        """Short rows: 4 warps; Wan rows (5,120 / 13,824 channels): time 8, 16 and 32 warps."""
        wide = kwargs.get("BLOCK_K", named_args.get("BLOCK_K", 0)) >= 4096
        return [c for c in configs if (c.num_warps >= 8) == wide]

    @triton.autotune(configs=_quantize_configs(), key=["K"],
                     prune_configs_by={"early_config_prune": _prune_quantize_configs})
    @triton.jit
    def _quantize_rows_kernel(x_ptr, inv_smooth_ptr, q_ptr, scale_ptr, K, stride_x, stride_q,
                              QMAX_: tl.constexpr, INV_QMAX_: tl.constexpr, IS_INT8: tl.constexpr,
                              HAS_SMOOTH: tl.constexpr, BLOCK_K: tl.constexpr):
        # one row of x per program: read once, write the 8-bit row and its scale. No per-element
        # division (an IEEE divide is ~10 instructions and made this kernel compute-bound): one
        # reciprocal per row, multiplies, exactly as quantize_rows_reference.
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK_K)
        mask = cols < K
        x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
        if HAS_SMOOTH:
            x = x * tl.load(inv_smooth_ptr + cols, mask=mask, other=1.0)
        scale = tl.maximum(tl.max(tl.abs(x), axis=0), 1e-12) * INV_QMAX_
        inv = tl.div_rn(tl.full([], 1.0, tl.float32), scale)  # IEEE, as torch's reciprocal
        y = tl.minimum(tl.maximum(x * inv, -QMAX_), QMAX_)
        if IS_INT8:
            q = ((y + 12582912.0) - 12582912.0).to(tl.int8)  # + 1.5 * 2^23: round half to even, as torch.round
        else:
            q = y.to(tl.float8e4nv)  # cvt.rn.satfinite, as torch's cast
        tl.store(q_ptr + row * stride_q + cols, q, mask=mask)
        tl.store(scale_ptr + row, scale)

    def _gemm_configs():
        # the six fastest of 52 configs swept on H100 at the A14B shapes (M = 512 ... 75,600; 2026-11-26):
        # 128x256 / 256x128 tiles with 128-deep K steps win at the video token counts, 64x128 at 512 rows.
        # Those need 72-192 KB of shared memory; the two 64-deep ones (64-80 KB) are for consumer cards
        # (~100 KB on sm86/sm89). Configs a card cannot run are skipped by the autotuner (OutOfResources).
        tiles = [(128, 256, 128, 4, 8), (256, 128, 128, 4, 8), (128, 256, 128, 3, 8), (256, 128, 128, 3, 8),
                 (128, 128, 128, 3, 4), (64, 128, 128, 3, 4), (128, 128, 64, 5, 4), (64, 128, 64, 4, 4)]
        return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}, num_stages=s, num_warps=w)
                for bm, bn, bk, s, w in tiles]

    @triton.jit
    def _grouped_tile(tile, num_m, num_n, GROUP_M: tl.constexpr):
        """Output tile number -> (pid_m, pid_n): GROUP_M rows of tiles walked column by column, so
        programs running at once share their rows of a and columns of b in L2."""
        group = tile // (GROUP_M * num_n)
        first_m = group * GROUP_M
        size_m = min(num_m - first_m, GROUP_M)
        return first_m + (tile % (GROUP_M * num_n)) % size_m, (tile % (GROUP_M * num_n)) // size_m

    @triton.jit
    def _dequantize_store(acc, c_ptr, sa_ptr, sb_ptr, bias_ptr, pid_m, pid_n, M, N, stride_cm,
                          HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        """c[tile] = acc (BLOCK_M, BLOCK_N) * sa sb^T + bias, in c's dtype: every 8-bit GEMM's epilogue."""
        cm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        cn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        out = acc.to(tl.float32) * tl.load(sa_ptr + cm, mask=cm < M, other=0.0)[:, None]
        out = out * tl.load(sb_ptr + cn, mask=cn < N, other=0.0)[None, :]
        if HAS_BIAS:
            out += tl.load(bias_ptr + cn, mask=cn < N, other=0.0).to(tl.float32)[None, :]
        mask = (cm[:, None] < M) & (cn[None, :] < N)
        tl.store(c_ptr + cm[:, None].to(tl.int64) * stride_cm + cn[None, :], out.to(c_ptr.dtype.element_ty), mask=mask)

    # M_BUCKET (M rounded up to a power of two, at most 65,536) in the key: the best tile depends on M, and
    # one (N, K) serves 512 text tokens and 75,600 video tokens alike (a key of N, K kept whichever came first)
    @triton.autotune(configs=_gemm_configs(), key=["M_BUCKET", "N", "K"])
    @triton.jit
    def _w8a8_matmul_kernel(a_ptr, b_ptr, c_ptr, sa_ptr, sb_ptr, bias_ptr, M, N, K, M_BUCKET,
                            stride_am, stride_bn, stride_cm,
                            IS_FP8: tl.constexpr, FAST_ACCUM: tl.constexpr, HAS_BIAS: tl.constexpr,
                            EVEN_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                            BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
        # a (M, K) row-major 8-bit activations, b (N, K) row-major 8-bit weight (K-major, as wgmma wants
        # 8-bit operands); c (M, N) = (a b^T) * sa sb^T + bias, written in c's dtype.
        pid_m, pid_n = _grouped_tile(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP_M)
        rm = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)) % M
        rn = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)) % N
        rk = tl.arange(0, BLOCK_K)
        a_ptrs = a_ptr + rm[:, None].to(tl.int64) * stride_am + rk[None, :]
        b_ptrs = b_ptr + rn[None, :].to(tl.int64) * stride_bn + rk[:, None]  # (BLOCK_K, BLOCK_N) view of b^T
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32 if IS_FP8 else tl.int32)
        for i in range(0, tl.cdiv(K, BLOCK_K)):
            if EVEN_K:
                a, b = tl.load(a_ptrs), tl.load(b_ptrs)
            else:
                a = tl.load(a_ptrs, mask=rk[None, :] < K - i * BLOCK_K, other=0.0)
                b = tl.load(b_ptrs, mask=rk[:, None] < K - i * BLOCK_K, other=0.0)
            if IS_FP8:  # fast: accumulate in the tensor core's reduced precision; else promote every tile
                acc = tl.dot(a, b, acc, max_num_imprecise_acc=None if FAST_ACCUM else BLOCK_K)
            else:
                acc = tl.dot(a, b, acc, out_dtype=tl.int32)
            a_ptrs += BLOCK_K
            b_ptrs += BLOCK_K
        _dequantize_store(acc, c_ptr, sa_ptr, sb_ptr, bias_ptr, pid_m, pid_n, M, N, stride_cm, HAS_BIAS, BLOCK_M,
                          BLOCK_N)


    # --- the GEMM's variants (GEMMS), measured against the kernel above by bench_linear --variants

    def _wide_configs():
        # (c): the four Hopper tiles above, plus deeper pipelines of 64-wide K steps (6 and 8 stages of
        # 24 KB) on 128 x 256 and 256 x 128 (BLOCK_M 256: two consumer warpgroups of 128 rows), and 5 stages
        # of 128 x 128 x 128 on 8 warps. Not here: 256 x 256 tiles; on 16 warps (128 registers a thread for
        # a 256-register accumulator share) they spill ~800 bytes of stack per thread (sm90 SASS, Triton 3.6)
        tiles = [(128, 256, 128, 4, 8), (256, 128, 128, 4, 8), (128, 256, 128, 3, 8), (256, 128, 128, 3, 8),
                 (128, 256, 64, 6, 8), (256, 128, 64, 6, 8), (128, 256, 64, 8, 8), (256, 128, 64, 8, 8),
                 (128, 128, 128, 5, 8), (64, 128, 128, 3, 4)]
        return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}, num_stages=s, num_warps=w)
                for bm, bn, bk, s, w in tiles]

    def _set_tma_blocks(nargs):
        """Config pre-hook: the descriptors' block shapes are the config's tiles (a no-op for pointers)."""
        if isinstance(nargs["a"], TensorDescriptor):
            nargs["a"].block_shape = [nargs["BLOCK_M"], nargs["BLOCK_K"]]
            nargs["b"].block_shape = [nargs["BLOCK_N"], nargs["BLOCK_K"]]

    def _tile_configs(tiles):
        """(BLOCK_M, BLOCK_N, BLOCK_K, stages, warps, FLATTEN) -> configs of _w8a8_matmul_tiles_kernel."""
        return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8, "FLATTEN": flat},
                              num_stages=s, num_warps=w, pre_hook=_set_tma_blocks)
                for bm, bn, bk, s, w, flat in tiles]

    # Hopper tiles of _gemm_configs and _wide_configs (72-224 KB of shared memory), 128 x 128 for the FFN's
    # last chunk (1,872 rows at 720p), 64 x 128 for the 512 text tokens. FLATTEN (persistent only) lets the
    # pipeliner load the next tile's first K steps during this tile's last ones and its epilogue; it costs
    # registers: the pointer-load 256 x 128 tiles spill with it (72-88 bytes of stack, sm90 SASS), so
    # those run without it.
    _TMA_TILES = [(128, 256, 128, 4, 8, False), (256, 128, 128, 4, 8, False), (128, 256, 128, 3, 8, False),
                  (256, 128, 128, 3, 8, False), (128, 256, 64, 6, 8, False), (128, 128, 128, 4, 4, False),
                  (64, 128, 128, 4, 4, False)]
    _PERSISTENT_TILES = [(128, 256, 128, 4, 8, True), (128, 256, 128, 4, 8, False), (256, 128, 128, 4, 8, False),
                         (128, 256, 128, 3, 8, True), (128, 256, 64, 6, 8, True), (128, 128, 128, 4, 4, False),
                         (64, 128, 128, 4, 4, False)]
    _TMA_PERSISTENT_TILES = [(128, 256, 128, 4, 8, True), (256, 128, 128, 4, 8, True), (128, 256, 128, 4, 8, False),
                             (128, 256, 64, 6, 8, True), (256, 128, 64, 6, 8, True), (128, 128, 128, 4, 4, True),
                             (64, 128, 128, 4, 4, True)]

    @triton.jit
    def _w8a8_matmul_tiles_kernel(a, b, c_ptr, sa_ptr, sb_ptr, bias_ptr, M, N, K, M_BUCKET,
                                  stride_am, stride_bn, stride_cm,
                                  IS_FP8: tl.constexpr, FAST_ACCUM: tl.constexpr, HAS_BIAS: tl.constexpr,
                                  EVEN_K: tl.constexpr, TMA: tl.constexpr, FLATTEN: tl.constexpr,
                                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                                  GROUP_M: tl.constexpr):
        # _w8a8_matmul_kernel's GEMM over a grid-stride loop of output tiles: with one program per tile the
        # loop runs once; with a persistent grid (one program per SM) each program walks tiles SMs apart in
        # the grouped order, and FLATTEN lets the pipeliner prefetch the next tile's K steps during this
        # tile's last ones and its epilogue. a (M, K), b (N, K): 8-bit, row-major; pointers, or (TMA) host
        # tensor descriptors of blocks (BLOCK_M, BLOCK_K) and (BLOCK_N, BLOCK_K) whose reads past the
        # edges are zeros. Host descriptors rather than tl.make_tensor_descriptor in the kernel: those need a
        # global scratch allocator (triton.set_allocator, a ContextVar the app's worker threads would not
        # inherit) and build two tensormaps in every program.
        num_m, num_n = tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N)
        rk = tl.arange(0, BLOCK_K)
        for tile in tl.range(tl.program_id(0), num_m * num_n, tl.num_programs(0), flatten=FLATTEN):
            pid_m, pid_n = _grouped_tile(tile, num_m, num_n, GROUP_M)
            rm = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)) % M
            rn = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)) % N
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32 if IS_FP8 else tl.int32)
            for i in range(0, tl.cdiv(K, BLOCK_K)):
                if TMA:
                    x = a.load([pid_m * BLOCK_M, i * BLOCK_K])  # (BLOCK_M, BLOCK_K)
                    y = b.load([pid_n * BLOCK_N, i * BLOCK_K]).T  # (BLOCK_K, BLOCK_N), K-major in shared memory
                elif EVEN_K:
                    x = tl.load(a + rm[:, None].to(tl.int64) * stride_am + (i * BLOCK_K + rk)[None, :])
                    y = tl.load(b + rn[None, :].to(tl.int64) * stride_bn + (i * BLOCK_K + rk)[:, None])
                else:
                    x = tl.load(a + rm[:, None].to(tl.int64) * stride_am + (i * BLOCK_K + rk)[None, :],
                                mask=rk[None, :] < K - i * BLOCK_K, other=0.0)
                    y = tl.load(b + rn[None, :].to(tl.int64) * stride_bn + (i * BLOCK_K + rk)[:, None],
                                mask=rk[:, None] < K - i * BLOCK_K, other=0.0)
                if IS_FP8:
                    acc = tl.dot(x, y, acc, max_num_imprecise_acc=None if FAST_ACCUM else BLOCK_K)
                else:
                    acc = tl.dot(x, y, acc, out_dtype=tl.int32)
            _dequantize_store(acc, c_ptr, sa_ptr, sb_ptr, bias_ptr, pid_m, pid_n, M, N, stride_cm,
                              HAS_BIAS, BLOCK_M, BLOCK_N)

    _GEMM_KEY = ["M_BUCKET", "N", "K"]
    _tuned = lambda configs, fn: triton.autotune(configs=configs, key=_GEMM_KEY)(fn)
    # name -> (autotuned kernel, persistent grid, TMA loads); "grouped" is _w8a8_matmul_kernel itself
    _GEMM_VARIANTS = {
        "wide": (_tuned(_wide_configs(), _w8a8_matmul_kernel.fn), False, False),
        "persistent": (_tuned(_tile_configs(_PERSISTENT_TILES), _w8a8_matmul_tiles_kernel), True, False),
        "tma": (_tuned(_tile_configs(_TMA_TILES), _w8a8_matmul_tiles_kernel), False, True),
        "tma-persistent": (_tuned(_tile_configs(_TMA_PERSISTENT_TILES), _w8a8_matmul_tiles_kernel), True, True),
    }


def quantize_rows(x: torch.Tensor, scheme: str, smooth: torch.Tensor | None = None, pad_to: int = PAD_M):
    """Fused per-token quantization of a 2-D CUDA x: one Triton program per row.

    Returns (q (Mp, K), scale (Mp, 1) float32) with Mp = M rounded up to `pad_to` (and > 16); padded
    rows are zeros with scale 1. Bit-identical to `quantize_rows_reference`.
    """
    m, k = x.shape
    mp = max(-(-m // pad_to) * pad_to, 32)
    x = x if x.stride(1) == 1 else x.contiguous()
    q = torch.empty(mp, k, dtype=QDTYPE[scheme], device=x.device)
    scale = torch.empty(mp, 1, dtype=torch.float32, device=x.device)
    if mp > m:
        q[m:].view(torch.int8).zero_()
        scale[m:].fill_(1.0)
    inv_smooth = 1.0 / smooth.float() if smooth is not None else scale  # (K,): one reciprocal per channel
    _quantize_rows_kernel[(m,)](x, inv_smooth, q, scale, k, x.stride(0), q.stride(0),
                                QMAX_=QMAX[scheme], INV_QMAX_=INV_QMAX[scheme], IS_INT8=scheme == "int8",
                                HAS_SMOOTH=smooth is not None, BLOCK_K=triton.next_power_of_2(k))
    return q, scale


def gemm_choice(variant: str | None = None) -> str:
    """The Triton GEMM variant to run: `variant`, then WAN_LITE_W8A8_GEMM, then GEMM_DEFAULT (see GEMMS)."""
    choice = variant or os.environ.get(GEMM_ENV_VAR) or GEMM_DEFAULT
    if choice not in GEMMS:
        raise ValueError(f"unknown 8-bit GEMM variant {choice!r} (from {'argument' if variant else GEMM_ENV_VAR}): "
                         f"choose one of {', '.join(GEMMS)}")
    return choice


@functools.cache
def _num_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _tma_ok(xq: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether TMA can read xq and w: 16-byte aligned bases and row strides, rows contiguous."""
    return all(t.data_ptr() % 16 == 0 and t.stride(0) * t.element_size() % 16 == 0 and t.stride(1) == 1
               for t in (xq, w))


def w8a8_matmul(xq, x_scale, w, w_scale, bias, out_dtype=torch.bfloat16, fast_accum: bool | None = None,
                variant: str | None = None):
    """Triton 8-bit GEMM with the dequantizing epilogue: xq (M, K), x_scale (M, 1), w (N, K) int8 or
    e4m3, w_scale (N,), bias (N,) -> (M, N) out_dtype. int8 accumulates exactly in int32; fp8 in fp32,
    with the tensor core's fast accumulation unless `fast_accum` (default: FP8_FAST_ACCUM) is False.

    `variant` (default: gemm_choice()) names the kernel, all computing the same thing (GEMMS, module
    docstring): "grouped" stays the default until bench_linear --variants on the H200 shows another one
    faster at the Wan shapes. The TMA variants need sm90+ (RuntimeError before any launch otherwise) and
    16-byte aligned rows; operands TMA cannot read run the same schedule with pointer loads.
    """
    variant = gemm_choice(variant)
    m, k = xq.shape
    n = w.shape[0]
    c = torch.empty(m, n, dtype=out_dtype, device=xq.device)
    args = dict(IS_FP8=xq.dtype == torch.float8_e4m3fn, FAST_ACCUM=FP8_FAST_ACCUM if fast_accum is None else fast_accum,
                HAS_BIAS=bias is not None, EVEN_K=k % 128 == 0)
    bias = bias if bias is not None else w_scale
    m_bucket = min(triton.next_power_of_2(m), 1 << 16)
    tiles = lambda meta: triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"])
    if variant == "grouped":
        _w8a8_matmul_kernel[lambda meta: (tiles(meta),)](xq, w, c, x_scale, w_scale, bias, m, n, k, m_bucket,
                                                           xq.stride(0), w.stride(0), c.stride(0), **args)
        return c
    kernel, persistent, tma = _GEMM_VARIANTS[variant]
    if variant == "wide":
        kernel[lambda meta: (tiles(meta),)](xq, w, c, x_scale, w_scale, bias, m, n, k, m_bucket,
                                            xq.stride(0), w.stride(0), c.stride(0), **args)
        return c
    index = xq.device.index if xq.device.index is not None else torch.cuda.current_device()
    if tma and _capability(index) < TMA_CAPABILITY:
        need, cap = ".".join(map(str, TMA_CAPABILITY)), ".".join(map(str, _capability(index)))
        raise RuntimeError(f"8-bit GEMM variant {variant!r} loads through TMA, which needs compute capability "
                           f"{need}+ (this GPU is {cap}): choose 'grouped' or 'persistent' ({GEMM_ENV_VAR})")
    a, b = xq, w
    if tma and _tma_ok(xq, w):  # block shapes are set per config by _set_tma_blocks
        a, b = TensorDescriptor.from_tensor(xq, [1, 1]), TensorDescriptor.from_tensor(w, [1, 1])
    sms = _num_sms(index)
    grid = lambda meta: (min(sms, tiles(meta)) if persistent else tiles(meta),)
    kernel[grid](a, b, c, x_scale, w_scale, bias, m, n, k, m_bucket, xq.stride(0), w.stride(0), c.stride(0),
                 TMA=a is not xq, **args)
    return c


def int8_matmul_torch(xq, x_scale, w, w_scale, bias, out_dtype=torch.bfloat16):
    """`torch._int_mm` (int32 out) then a separate dequantize: the unfused variant, for the benchmark."""
    acc = torch._int_mm(xq, w.t())  # (M, N) int32; w.t() is the column-major operand cuBLASLt wants
    out = acc.float() * x_scale * w_scale[None, :]
    if bias is not None:
        out = out + bias.float()
    return out.to(out_dtype)


def fp8_matmul(xq, x_scale, w, w_scale, bias, out_dtype=torch.bfloat16, fast_accum: bool | None = None):
    """`torch._scaled_mm` with rowwise scales (xq (M, K) e4m3, w (N, K) e4m3 -> (M, N) bf16): the
    library fp8 GEMM, measured against the Triton one by bench_linear."""
    return torch._scaled_mm(xq, w.t(), scale_a=x_scale, scale_b=w_scale[None, :],
                            bias=None if bias is None else bias.to(out_dtype), out_dtype=out_dtype,
                            use_fast_accum=FP8_FAST_ACCUM if fast_accum is None else fast_accum)


def linear_w8a8(x2, w, w_scale, bias, smooth, scheme, out_dtype=torch.bfloat16):
    """Fused activation quantization + 8-bit GEMM with the dequantizing epilogue: x2 (M, K) -> (M, N).

    fp8 runs torch._scaled_mm where its shape rules hold (K, N multiples of 16): on H100 it beat the
    Triton fp8 GEMM on 5 of the 6 Wan shapes (bench_linear, 2026-11-26); int8 runs the Triton GEMM.
    """
    m, n = x2.shape[0], w.shape[0]
    xq, x_scale = quantize_rows(x2, scheme, smooth)
    if scheme == "fp8" and x2.shape[1] % 16 == 0 and n % 16 == 0:
        return fp8_matmul(xq, x_scale, w, w_scale, bias).to(out_dtype)[:m]  # rowwise _scaled_mm: bf16 out
    return w8a8_matmul(xq, x_scale, w, w_scale, bias, out_dtype)[:m]


@torch.library.custom_op("wan_lite::linear_w8a8", mutates_args=())
def linear_w8a8_op(x2: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None,
                   smooth: torch.Tensor | None, scheme: str, out_dtype: torch.dtype) -> torch.Tensor:
    """`linear_w8a8` as one opaque op, so torch.compile of a block keeps it whole (dynamo cannot trace
    the Triton autotuner) and still fuses the elementwise work around it."""
    return linear_w8a8(x2, w, w_scale, bias, smooth, scheme, out_dtype)


@linear_w8a8_op.register_fake
def _(x2, w, w_scale, bias, smooth, scheme, out_dtype):
    return x2.new_empty(x2.shape[0], w.shape[0], dtype=out_dtype)


def quant_linear(x: torch.Tensor, w, w_scale, bias, smooth, scheme: str, kernel: str, dtype: torch.dtype):
    """y = (x / smooth) @ (w * w_scale)^T + bias for x (..., K) -> (..., N) in `dtype`."""
    x2 = x.reshape(-1, x.shape[-1])  # (M, K)
    if kernel == "w8a8":
        y = linear_w8a8_op(x2, w, w_scale, bias, smooth, scheme, dtype)
    else:
        y = linear_w8a16(x2, w, w_scale, bias, smooth, dtype)
    return y.view(*x.shape[:-1], w.shape[0])  # (..., N)
