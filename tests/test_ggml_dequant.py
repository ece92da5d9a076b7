"""formats.ggml: GGUF blocks dequantized in torch against the `gguf` package's own numpy code, on the same bytes.

Bytes come from `gguf.quants.quantize` where the package can quantize the type (F32, F16, BF16, Q8_0,
Q4_0/1, Q5_0/1), else random block bytes whose fp16 scale fields hold valid values (the K-quants).
Tolerance: dequantization is elementwise per block, at most three float32 roundings (fp16 scale times
a 6-bit scale, times the quant, minus the min product) done in the same order as gguf's numpy, so on
the CPU the two agree exactly; the tests state a bound instead of bitwise equality (ELEMENT_RTOL per
element plus tests/tolerance.py's FP32_RTOL on the whole tensor). The int8 requantization is compared
as 8-bit values: at most 1 step apart, on at most INT8_FLIP_FRACTION of the values (a value exactly on
.5 may round either way on another device or kernel). The GPU test (`-m gpu`) compares CUDA with the CPU.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from builders_files import write_gguf
from tolerance import assert_close_fp32

from wan_lite.formats import ggml
from wan_lite.formats.expert import open_expert_file
from wan_lite.quantized.linear import quantize_linear_weight

gguf = pytest.importorskip("gguf")
Q = gguf.GGMLQuantizationType

QUANTIZABLE = ["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1"]  # gguf.quants.quantize makes them
K_QUANTS = ["Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"]  # gguf only dequantizes these: random valid blocks
SCALE_OFFSETS = {"Q2_K": (80, 82), "Q3_K": (108,), "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,)}  # fp16 d / dmin
ELEMENT_RTOL = 1e-6  # per element, relative to max(|ref|, 1e-30): one float32 ulp is 6e-8
INT8_FLIP_FRACTION = 1e-3  # int8 values allowed 1 step apart between two devices (ties on .5)


def gguf_bytes(qtype: str, shape: tuple[int, int], seed: int = 0) -> np.ndarray:
    """Raw bytes of a (rows, K) tensor of `qtype`, (rows, bytes per row) as a GGUF file holds them."""
    rng = np.random.default_rng(seed)
    rows, k = shape
    if qtype in QUANTIZABLE:
        return gguf.quants.quantize(rng.standard_normal(shape).astype(np.float32), Q[qtype])
    per, size = ggml.BLOCKS[qtype]
    blocks = rng.integers(0, 256, (rows * k // per, size), dtype=np.uint8)
    for off in SCALE_OFFSETS[qtype]:  # valid positive and negative fp16 scales, 1e-3 .. 1e-1
        scale = (rng.uniform(1e-3, 1e-1, len(blocks)) * rng.choice([-1, 1], len(blocks))).astype(np.float16)
        blocks[:, off: off + 2] = scale.view(np.uint8).reshape(-1, 2)
    return blocks.reshape(rows, -1)


def assert_same_values(got: torch.Tensor, ref: np.ndarray) -> None:
    """got (float32) equals gguf's `ref` within ELEMENT_RTOL per element and FP32_RTOL overall."""
    ref_t = torch.from_numpy(np.ascontiguousarray(ref))
    assert got.dtype == torch.float32 and got.shape == ref_t.shape
    bound = ELEMENT_RTOL * ref_t.abs().clamp_min(1e-30)
    assert ((got - ref_t).abs() <= bound).all(), f"max difference {(got - ref_t).abs().max().item():.3g}"
    assert_close_fp32(got, ref_t)


def assert_int8_close(q: torch.Tensor, ref: torch.Tensor) -> None:
    """Two int8 tensors at most 1 step apart, on at most INT8_FLIP_FRACTION of the values."""
    diff = (q.int() - ref.int()).abs()
    assert diff.max().item() <= 1
    assert (diff > 0).float().mean().item() <= INT8_FLIP_FRACTION


def test_block_table_is_ggml_s():
    for name, (per, size) in ggml.BLOCKS.items():
        assert gguf.GGML_QUANT_SIZES[Q[name]] == (per, size)
        assert ggml.implemented(name)
    assert not ggml.implemented("TQ2_0") and not ggml.implemented("IQ4_NL")


@pytest.mark.parametrize("qtype", QUANTIZABLE + K_QUANTS)
@pytest.mark.parametrize("shape", [(1, 256), (7, 512)])
def test_dequantize_matches_gguf(qtype, shape, monkeypatch):
    """Every implemented type, one row (one pass) and several rows (in CPU chunks of 512 values), raw
    bytes as the GGUF reader hands them."""
    monkeypatch.setattr(ggml, "CPU_CHUNK_ELEMENTS", 512)
    data = gguf_bytes(qtype, shape)
    ref = gguf.quants.dequantize(data, Q[qtype]).reshape(shape)
    got = ggml.dequantize(torch.from_numpy(data), qtype, shape)
    assert_same_values(got, ref)


def test_dequantize_into_another_shape():
    """A tensor stored reshaped (comfy.gguf.orig_shape: the 5-D patch embedding, builders' Q6_K) decodes
    in its torch shape: dequantization only depends on the flat byte order."""
    data = gguf_bytes("Q4_K", (4, 256))
    ref = gguf.quants.dequantize(data, Q.Q4_K).reshape(8, 2, 1, 4, 16)
    assert_same_values(ggml.dequantize(torch.from_numpy(data), "Q4_K", (8, 2, 1, 4, 16)), ref)


def test_unimplemented_type_falls_back_to_gguf():
    data = gguf.quants.quantize(np.random.default_rng(1).standard_normal((3, 256)).astype(np.float32), Q.TQ2_0)
    ref = gguf.quants.dequantize(data, Q.TQ2_0)
    assert_same_values(ggml.dequantize(torch.from_numpy(data), "TQ2_0", (3, 256)), ref)


def test_wrong_byte_count_is_refused():
    data = torch.from_numpy(gguf_bytes("Q8_0", (2, 64)))
    with pytest.raises(ValueError, match=r"do not hold a tensor of shape \[2, 96\].*damaged"):
        ggml.dequantize(data, "Q8_0", (2, 96))


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_K", "Q6_K", "F16"])
def test_int8_rows_match_whole_tensor_requantization(qtype, monkeypatch):
    """dequantize_rows_int8 in chunks of rows = quantize_linear_weight on gguf's dequantized tensor."""
    monkeypatch.setattr(ggml, "CHUNK_ELEMENTS", {"cpu": 3 * 512, "cuda": 3 * 512})  # 13 rows: 3 a chunk, 1 last
    shape = (13, 512)
    data = gguf_bytes(qtype, shape)
    ref_q, ref_s = quantize_linear_weight(torch.from_numpy(gguf.quants.dequantize(data, Q[qtype]).reshape(shape)),
                                          "int8")
    q, scale = ggml.dequantize_rows_int8(torch.from_numpy(data), qtype, shape)
    assert q.dtype == torch.int8 and q.shape == shape and q.device.type == "cpu"
    assert_int8_close(q, ref_q)
    assert_close_fp32(scale, ref_s)


@pytest.fixture(scope="module")
def state(reference_experts):
    return {k: v.detach().clone() for k, v in reference_experts[0].state_dict().items()}


def test_expert_int8(tmp_path, state):
    """A GGUF expert's int8 block Linears (what a run of a GGUF expert copies to the GPU) equal
    quantize_linear_weight of the float tensor the file holds."""
    path, intended = write_gguf(state, tmp_path / "e.gguf", "Q4_0")
    source = open_expert_file(path, scheme="int8")
    for layer in list(source.linears)[:4]:
        q, scale = source.tensor(layer + ".weight"), source.tensor(layer + ".weight_scale")
        ref_q, ref_s = quantize_linear_weight(intended[layer + ".weight"], "int8")
        assert_int8_close(q, ref_q)
        assert_close_fp32(scale, ref_s)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("qtype", QUANTIZABLE + K_QUANTS)
def test_cuda_matches_cpu(qtype):
    """The same bytes dequantized on the GPU and on the CPU; int8 requantized on both (A14B row length)."""
    shape = (96, 5120)
    raw = torch.from_numpy(gguf_bytes(qtype, shape))
    cpu = ggml.dequantize(raw, qtype, shape)
    cuda = ggml.dequantize(raw.cuda(), qtype, shape)
    assert cuda.device.type == "cuda"
    assert_same_values(cuda.cpu(), cpu.numpy())
    q_cpu, s_cpu = ggml.dequantize_rows_int8(raw, qtype, shape)
    q_gpu, s_gpu = ggml.dequantize_rows_int8(raw, qtype, shape, device="cuda")
    assert q_gpu.device.type == "cpu"
    assert_int8_close(q_gpu, q_cpu)
    assert_close_fp32(s_gpu, s_cpu)
