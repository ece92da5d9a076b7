"""The block-wise path and every kernel choice against plain attention (CPU, fp32)."""

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from wan_lite import attention as A


def plain(q, k, v):
    with sdpa_kernel([SDPBackend.MATH]):
        return F.scaled_dot_product_attention(q.double(), k.double(), v.double()).float()


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("block_bytes", [1, 4096, 64 * 2**10, 2**30])  # one row per block ... one block
def test_blockwise_matches_plain(block_bytes):
    g = torch.Generator().manual_seed(block_bytes)
    q, k, v = (torch.randn(2, 3, n, 16, generator=g) for n in (37, 53, 53))  # (B, H, L, D), Lq != Lk
    out = A.blockwise_attention(q, k, v, max_block_bytes=block_bytes)
    assert out.shape == q.shape
    assert rel(out, plain(q, k, v)) < 1e-5


def test_blockwise_bounds_the_block():
    """With a budget of one row of scores per block, each SDPA call sees one head and one query."""
    q, k, v = (torch.randn(1, 2, 5, 8) for _ in range(3))
    seen = []
    real = F.scaled_dot_product_attention
    try:
        F.scaled_dot_product_attention = lambda a, b, c: seen.append(a.shape) or real(a, b, c)
        A.blockwise_attention(q, k, v, max_block_bytes=5 * 4)
    finally:
        F.scaled_dot_product_attention = real
    assert seen == [torch.Size([1, 1, 1, 8])] * 10


@pytest.mark.parametrize("name", ["sdpa-flash", "sdpa-math", "blockwise", None])
def test_cpu_backends_match_plain(name):
    q, k, v = (torch.randn(1, 2, 40, 8) for _ in range(3))
    assert rel(A.attention(q, k, v, backend=name), plain(q, k, v)) < 1e-5


def test_choice_order(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.delenv(A.ENV, raising=False)
    assert A.resolve(cpu) == ("sdpa-flash", False)
    A.set_backend("sdpa-math")
    try:
        assert A.resolve(cpu) == ("sdpa-math", False)  # the planner's choice may fall back
        monkeypatch.setenv(A.ENV, "blockwise")
        A.set_backend("sdpa-math")  # the environment is read when a plan is applied, not on every call
        assert A.resolve(cpu) == ("blockwise", True)
        assert A.resolve(cpu, "sdpa-efficient") == ("sdpa-efficient", True)
    finally:
        A.set_backend(None)


def test_unknown_backend_names_the_choices():
    with pytest.raises(ValueError, match="sdpa-cudnn"):
        A.attention(*(torch.randn(1, 1, 2, 4) for _ in range(3)), backend="flash3")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", [b for b in A.BACKENDS if b != A.FP8])  # exact backends; fp8: test_attention8
def test_gpu_backends_match_plain(name):
    major, _ = torch.cuda.get_device_capability()
    if name == "sdpa-cudnn" and major < 9:
        pytest.skip("cuDNN SDPA is used on Hopper")
    q, k, v = (torch.randn(1, 4, 1000, 128, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    ref = plain(q.cpu().float(), k.cpu().float(), v.cpu().float())
    assert rel(A.attention(q, k, v, backend=name).float().cpu(), ref) < 1e-2
