"""GGUF (ggml) tensors dequantized in torch: raw block bytes (a uint8 tensor on any device) -> float32.

`dequantize(raw, qtype, shape)` decodes every block at once with vectorised tensor ops, on the device
`raw` lives on (the CPU uses all of torch's threads, a GPU its own kernels); `dequantize_rows_int8` adds
the per-output-channel int8 requantization of a Linear weight (`quantize_linear_weight`), a chunk of
rows at a time so the float32 intermediate stays small (32 MB on a GPU that also holds a model, 4 MB
on the CPU, where cache-sized pieces run about 3x faster than whole-tensor passes).

Types decoded here: F32, F16, BF16 (a view of the bytes), Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q2_K, Q3_K,
Q4_K, Q5_K, Q6_K: what Wan GGUF files (city96's Wan2.2 conversions, QuantStack's) are made of. Any other
type (Q8_1, Q8_K, the IQ*, TQ*, MXFP4 families, integer types) falls back to `gguf.quants.dequantize`
(numpy, one thread, on the CPU) and is then moved to `raw`'s device; `implemented(qtype)` says which.

Block layouts (facts from ggml's `ggml-common.h` block structs, as read by the `gguf` package's
`gguf/quants.py` dequantize_blocks, and ComfyUI-GGUF's `dequant.py`); each block is little-endian bytes:
- Q8_0 (32 values, 34 bytes): d fp16, qs[32] int8; x = d * q.
- Q4_0 (32, 18): d fp16, qs[16]; value j < 16 is the low nibble of qs[j], value 16 + j its high nibble;
  x = d * (q - 8). Q4_1 (32, 20): d fp16, m fp16, qs[16] as Q4_0; x = d * q + m.
- Q5_0 (32, 22): d fp16, qh[4] (bit j of the little-endian uint32 is the 5th bit of value j), qs[16] as
  Q4_0; x = d * (q - 16). Q5_1 (32, 24): d, m fp16, qh[4], qs[16]; x = d * q + m.
- K-quants, super-blocks of 256 values:
  Q2_K (84): scales[16] (low nibble scale, high nibble min of each 16 values), qs[64] (2 bits: value
  128h + 32s + b at bits 2s of qs[32h + b]), d, dmin fp16; x = d * sc * q - dmin * m.
  Q3_K (110): hmask[32] (value 32k + b has its high bit in bit k of hmask[b], set meaning "no -4"),
  qs[64] (low 2 bits, as Q2_K), scales[12] (16 6-bit scales: low nibbles in bytes 0-7, high 2 bits in
  bytes 8-11, minus 32), d fp16; x = d * (sc - 32) * (q_low - 4 * (1 - hbit)).
  Q4_K (144): d, dmin fp16, scales[12] (8 6-bit scales and 8 6-bit mins of 32 values), qs[128] (value
  64c + 32s + b is nibble s of qs[32c + b]); x = d * sc * q - dmin * m.
  Q5_K (176): as Q4_K plus qh[32] before qs (value 32k + b has its 5th bit in bit k of qh[b]).
  Q6_K (210): ql[128], qh[64], scales[16] int8, d fp16 (the layout `tests/builders_files.pack_q6_k`
  spells out); x = d * sc * (q - 32).

Every decode computes in float32 with the same operations in the same order as gguf's numpy code, one
IEEE operation at a time (no fused multiply-add in eager torch), so on the CPU the two agree exactly;
tests/test_ggml_dequant.py checks it with a stated bound.
"""

from __future__ import annotations

import math

import torch

from ..quantized.linear import quantize_linear_weight

QK_K = 256  # values per K-quant super-block
BLOCKS = {  # ggml type name -> (values per block, bytes per block), as gguf.GGML_QUANT_SIZES
    "Q8_0": (32, 34), "Q4_0": (32, 18), "Q4_1": (32, 20), "Q5_0": (32, 22), "Q5_1": (32, 24),
    "Q2_K": (256, 84), "Q3_K": (256, 110), "Q4_K": (256, 144), "Q5_K": (256, 176), "Q6_K": (256, 210),
}
FLOATS = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}  # stored as plain values
CPU_CHUNK_ELEMENTS = 1 << 20  # values decoded at a time on the CPU (4 MB of float32: stays in cache)
CHUNK_ELEMENTS = {"cpu": 1 << 20, "cuda": 1 << 23}  # values per int8 requantization chunk (whole rows)


# ---------------------------------------------------------------------------------------------
# byte helpers


def _f16(b: torch.Tensor) -> torch.Tensor:
    """(n, 2) uint8 little-endian fp16 -> (n, 1) float32."""
    return b.contiguous().view(torch.float16).float()


def _nibbles(qs: torch.Tensor, groups: int) -> torch.Tensor:
    """(n, groups * 32) uint8 -> (n, groups * 2, 32) uint8: each 32-byte group gives its low nibbles,
    then its high nibbles (value 64c + 32s + b is nibble s of byte 32c + b)."""
    return _bits(qs.reshape(qs.shape[0], groups, 32), 4, 2).reshape(qs.shape[0], groups * 2, 32)


def _bits(b: torch.Tensor, width: int, count: int) -> torch.Tensor:
    """(n, ..., m) uint8 -> (n, ..., count, m) uint8: field k of each byte is bits [width*k, width*k+width).
    Scalar shifts (vectorised on the CPU), stacked: a loop over the `count` fields, never over blocks."""
    mask = (1 << width) - 1
    return torch.stack([(b >> (width * k)) & mask for k in range(count)], dim=-2)


def _split(blocks: torch.Tensor, *sizes: int) -> list[torch.Tensor]:
    """(n, bytes) -> column slices of `sizes` bytes each (views)."""
    return list(torch.split(blocks, list(sizes), dim=1))


# ---------------------------------------------------------------------------------------------
# the 32-value types: (n, bytes) uint8 -> (n, 32) float32


def _q8_0(blocks: torch.Tensor) -> torch.Tensor:
    d, qs = _split(blocks, 2, 32)
    return qs.view(torch.int8).float() * _f16(d)


def _q4_0(blocks: torch.Tensor) -> torch.Tensor:
    d, qs = _split(blocks, 2, 16)
    q = (_bits(qs, 4, 2).reshape(-1, 32).to(torch.int8) - 8).float()  # (n, 32): low nibbles, then high
    return _f16(d) * q


def _q4_1(blocks: torch.Tensor) -> torch.Tensor:
    d, m, qs = _split(blocks, 2, 2, 16)
    return _f16(d) * _bits(qs, 4, 2).reshape(-1, 32).float() + _f16(m)


def _q5(qh: torch.Tensor, qs: torch.Tensor) -> torch.Tensor:
    """qh (n, 4), qs (n, 16) uint8 -> (n, 32) uint8 values 0..31 (bit j of the uint32 qh is value j's 5th)."""
    high = _bits(qh, 1, 8).transpose(1, 2).reshape(-1, 32)  # (n, 4 bytes, 8 bits) -> bit 8 * byte + k
    return _bits(qs, 4, 2).reshape(-1, 32) | (high << 4)


def _q5_0(blocks: torch.Tensor) -> torch.Tensor:
    d, qh, qs = _split(blocks, 2, 4, 16)
    return _f16(d) * (_q5(qh, qs).to(torch.int8) - 16).float()


def _q5_1(blocks: torch.Tensor) -> torch.Tensor:
    d, m, qh, qs = _split(blocks, 2, 2, 4, 16)
    return _f16(d) * _q5(qh, qs).float() + _f16(m)


# ---------------------------------------------------------------------------------------------
# the K-quants: (n, bytes) uint8 -> (n, 256) float32


def _scale_min_k4(scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K / Q5_K: (n, 12) uint8 -> 8 scales and 8 mins (n, 8), 6 bits each: bytes 0-3 hold scales
    0-3 (low 6 bits), 4-7 mins 0-3, 8-11 the low nibbles of scales 4-7 and mins 4-7 (high nibble), whose
    top 2 bits are the top bits of bytes 0-3 (scales) and 4-7 (mins)."""
    d, m, md = scales.reshape(-1, 3, 4).unbind(1)  # (n, 4) each
    sc = torch.cat([d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)], dim=1)
    mn = torch.cat([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], dim=1)
    return sc, mn


def _q2_k(blocks: torch.Tensor) -> torch.Tensor:
    scales, qs, d, dmin = _split(blocks, 16, 64, 2, 2)
    n = blocks.shape[0]
    dl = (_f16(d) * (scales & 0x0F).float()).reshape(n, 16, 1)
    ml = (_f16(dmin) * (scales >> 4).float()).reshape(n, 16, 1)
    q = _bits(qs.reshape(n, 2, 32), 2, 4).reshape(n, 16, 16).float()  # value 128h + 32s + b
    return (dl * q - ml).reshape(n, QK_K)


def _q3_k(blocks: torch.Tensor) -> torch.Tensor:
    hmask, qs, scales, d = _split(blocks, 32, 64, 12, 2)
    n = blocks.shape[0]
    low = _bits(scales[:, :8], 4, 2).reshape(n, 16)  # nibble s of byte b -> scale 8s + b
    high = _bits(scales[:, 8:], 2, 4).reshape(n, 16)  # bits 2k of byte b -> scale 4k + b
    sc = ((low | (high << 4)).to(torch.int8) - 32).float()
    dl = (_f16(d) * sc).reshape(n, 16, 1)
    ql = _bits(qs.reshape(n, 2, 32), 2, 4).reshape(n, 16, 16)
    qh = _bits(hmask.reshape(n, 1, 32), 1, 8).reshape(n, 16, 16) ^ 1  # a set bit: no offset
    q = (ql.to(torch.int8) - (qh << 2).to(torch.int8)).float()
    return (dl * q).reshape(n, QK_K)


def _q4_k(blocks: torch.Tensor) -> torch.Tensor:
    d, dmin, scales, qs = _split(blocks, 2, 2, 12, 128)
    n = blocks.shape[0]
    sc, mn = _scale_min_k4(scales)
    dl = (_f16(d) * sc.float()).reshape(n, 8, 1)
    ml = (_f16(dmin) * mn.float()).reshape(n, 8, 1)
    q = _nibbles(qs, 4).float()  # (n, 8, 32)
    return (dl * q - ml).reshape(n, QK_K)


def _q5_k(blocks: torch.Tensor) -> torch.Tensor:
    d, dmin, scales, qh, qs = _split(blocks, 2, 2, 12, 32, 128)
    n = blocks.shape[0]
    sc, mn = _scale_min_k4(scales)
    dl = (_f16(d) * sc.float()).reshape(n, 8, 1)
    ml = (_f16(dmin) * mn.float()).reshape(n, 8, 1)
    high = _bits(qh.reshape(n, 1, 32), 1, 8).reshape(n, 8, 32)  # bit k of byte b -> value 32k + b
    q = (_nibbles(qs, 4) | (high << 4)).float()
    return (dl * q - ml).reshape(n, QK_K)


def _q6_k(blocks: torch.Tensor) -> torch.Tensor:
    ql, qh, scales, d = _split(blocks, 128, 64, 16, 2)
    n = blocks.shape[0]
    dl = (_f16(d) * scales.contiguous().view(torch.int8).float()).reshape(n, 16, 1)
    low = _bits(ql.reshape(n, 2, 64), 4, 2).reshape(n, 8, 32)  # nibble s of byte 64h + b -> 128h + 64s + b
    high = _bits(qh.reshape(n, 2, 32), 2, 4).reshape(n, 8, 32)  # bits 2s of byte 32h + b -> 128h + 32s + b
    q = ((low | (high << 4)).to(torch.int8) - 32).reshape(n, 16, 16).float()
    return (dl * q).reshape(n, QK_K)


DECODERS = {"Q8_0": _q8_0, "Q4_0": _q4_0, "Q4_1": _q4_1, "Q5_0": _q5_0, "Q5_1": _q5_1,
            "Q2_K": _q2_k, "Q3_K": _q3_k, "Q4_K": _q4_k, "Q5_K": _q5_k, "Q6_K": _q6_k}


# ---------------------------------------------------------------------------------------------
# the entry points


def implemented(qtype: str) -> bool:
    """Whether `qtype` (a gguf.GGMLQuantizationType name) is decoded in torch here (else: gguf's numpy)."""
    return qtype in FLOATS or qtype in DECODERS


def dequantize(raw: torch.Tensor, qtype: str, shape) -> torch.Tensor:
    """Raw GGUF tensor bytes -> float32 of `shape` (the torch shape), on `raw`'s device.

    raw: uint8 (any shape, contiguous bytes of the whole tensor) or, for F32/F16/BF16, the values in
    their own dtype. qtype: the ggml type name ("Q8_0", "Q4_K", ...). A type not decoded here goes
    through `gguf.quants.dequantize` on the CPU. Raises ValueError when the byte count does not match
    `shape` (a damaged file or a wrong shape).
    """
    count = math.prod(shape)
    if qtype in FLOATS:
        values = raw.reshape(-1).view(torch.uint8).view(FLOATS[qtype])
        _check(values.numel() == count, qtype, raw, shape)
        return values.float().reshape(shape)
    if qtype not in DECODERS:
        return _numpy_fallback(raw, qtype).reshape(shape)
    per, size = BLOCKS[qtype]
    _check(count % per == 0 and raw.numel() == count // per * size, qtype, raw, shape)
    blocks = raw.reshape(-1, size)  # (n_blocks, bytes)
    step = blocks.shape[0] if raw.device.type != "cpu" else max(1, CPU_CHUNK_ELEMENTS // per)
    if step >= blocks.shape[0]:
        return DECODERS[qtype](blocks).reshape(shape)
    out = torch.empty(blocks.shape[0], per, dtype=torch.float32)  # (n_blocks, values)
    for start in range(0, blocks.shape[0], step):  # cache-sized pieces: 3x faster than one pass on the CPU
        out[start: start + step] = DECODERS[qtype](blocks[start: start + step])
    return out.reshape(shape)


def dequantize_rows_int8(raw: torch.Tensor, qtype: str, shape, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """A GGUF Linear weight (torch shape (N, K)) -> (q (N, K) int8, scale (N,) float32) on the CPU.

    The bytes are sent to `device` (None: where they are), dequantized there and requantized per output
    channel by `quantize_linear_weight` (absmax / 127), CHUNK_ELEMENTS[device] values of whole rows at a time
    (rows are independent, so the result is that of the whole tensor at once). A row length that is not
    a whole number of blocks (no Wan Linear) is done in one piece.
    """
    rows, k = shape
    device = torch.device(device) if device is not None else raw.device
    q = torch.empty(rows, k, dtype=torch.int8)
    scale = torch.empty(rows, dtype=torch.float32)
    flat = raw.reshape(-1).view(torch.uint8)
    per, size = BLOCKS[qtype] if qtype in BLOCKS else (1, FLOATS[qtype].itemsize) if qtype in FLOATS else (0, 0)
    chunk = CHUNK_ELEMENTS["cpu" if device.type == "cpu" else "cuda"]
    step = max(1, chunk // k) if per and k % per == 0 else rows  # whole rows of whole blocks
    row_bytes = k // per * size if step < rows else 0
    for start in range(0, rows, step):
        n = min(step, rows - start)
        chunk = flat[start * row_bytes: (start + n) * row_bytes] if row_bytes else flat
        w = dequantize(chunk.to(device, non_blocking=False), qtype, (n, k))  # (n, K) float32
        qc, sc = quantize_linear_weight(w, "int8")
        q[start: start + n].copy_(qc)
        scale[start: start + n].copy_(sc)
    return q, scale


def _check(ok: bool, qtype: str, raw: torch.Tensor, shape) -> None:
    if not ok:
        raise ValueError(f"{raw.numel()} {raw.dtype} values of GGUF type {qtype} do not hold a tensor of shape "
                         f"{list(shape)}: the file is damaged or the shape is wrong")


def _numpy_fallback(raw: torch.Tensor, qtype: str) -> torch.Tensor:
    """gguf's own numpy dequantize (one thread, on the CPU), the result moved back to `raw`'s device."""
    import gguf

    data = raw.reshape(-1).view(torch.uint8).cpu().numpy()
    out = gguf.quants.dequantize(data.reshape(1, -1), gguf.GGMLQuantizationType[qtype])
    return torch.from_numpy(out.reshape(-1)).to(raw.device)
