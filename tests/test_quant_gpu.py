"""GPU tests of the quantized Linear: the fused w8a8 kernels against the plain reference paths.

Marked `gpu`; they skip without CUDA (CI), and run on the device machine:
    python -m pytest tests/test_quant_gpu.py -m gpu -q
Self-contained: the tiny checkpoint is written from wan_lite's own WanModel (the device machine has no
wan22 / diffusers), in the official single-file layout.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn as nn

from quant import QuantLinear, kernels
from wan_lite.quantized.linear import set_kernel

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
CUDA = torch.device("cuda")


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def need_w8a8(scheme):
    if torch.cuda.is_available() and (why := kernels.w8a8_unsupported(CUDA, scheme)):
        pytest.skip(why)


@pytest.mark.parametrize("scheme", ["int8", "fp8"])
@pytest.mark.parametrize("dtype, m, k, smooth", [
    (torch.bfloat16, 37, 96, False), (torch.float32, 37, 96, True), (torch.bfloat16, 300, 5120, True),
    (torch.float32, 300, 5120, False), (torch.bfloat16, 16, 13824, False), (torch.float32, 1000, 13824, True)])
def test_fused_activation_quantization_matches_reference(scheme, dtype, m, k, smooth):
    need_w8a8(scheme)
    x = (torch.randn(m, k, device=CUDA) * torch.rand(k, device=CUDA) * 4).to(dtype)
    x[1] = 0  # a zero row gets scale 1e-12/qmax and zeros, not NaN
    s = torch.rand(k, device=CUDA) + 0.5 if smooth else None
    q, scale = kernels.quantize_rows(x, scheme, s)
    q_ref, scale_ref = kernels.quantize_rows_reference(x, scheme, s)
    assert q.shape[0] % kernels.PAD_M == 0 and q.shape[0] >= max(m, 32)
    torch.testing.assert_close(scale[:m], scale_ref, rtol=1e-6, atol=0)  # the same arithmetic in another kernel
    assert (q[m:].view(torch.int8) == 0).all() and (scale[m:] == 1).all()
    same = q[:m].view(torch.int8) == q_ref.view(torch.int8)
    assert same.float().mean() > 0.999  # two kernels: a value on a rounding boundary may land one step away
    if scheme == "int8":
        assert ((q[:m].float() - q_ref.float()).abs() <= 1).all()
    else:
        assert torch.allclose(q[:m].float(), q_ref.float(), rtol=2**-3, atol=2**-9)


@pytest.mark.parametrize("scheme", ["int8", "fp8"])
@pytest.mark.parametrize("in_dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("shape", [(2, 300, 512), (1, 5, 512), (40, 512)])
def test_w8a8_matches_reference_and_w8a16(scheme, in_dtype, shape):
    need_w8a8(scheme)
    lin = nn.Linear(512, 384, device=CUDA)
    smooth = torch.rand(512, device=CUDA) + 0.5
    q = QuantLinear.from_linear(lin, scheme, smooth=smooth, dtype=torch.bfloat16)
    x = torch.randn(*shape, device=CUDA).to(in_dtype)
    assert kernels.select_kernel(CUDA, scheme) == "w8a8"
    y = q(x)
    assert y.shape == (*shape[:-1], 384) and y.dtype == torch.bfloat16
    x2 = x.reshape(-1, 512)
    ref = kernels.linear_w8a8_reference(x2, q.weight, q.weight_scale, q.bias, q.smooth, scheme, torch.float64)
    assert rel(y.reshape(-1, 384), ref) < 5e-3  # same arithmetic up to bf16 output rounding
    q.kernel = "w8a16"
    w16 = q(x)
    assert rel(y, w16) < (2e-2 if scheme == "int8" else 6e-2)  # the per-token activation quantization
    with torch.no_grad():
        assert rel(y.float(), lin(x.float())) < (2e-2 if scheme == "int8" else 6e-2)


def test_fp8_linear_outside_scaled_mm_shapes_uses_the_triton_gemm():
    need_w8a8("fp8")
    lin = nn.Linear(96, 40, device=CUDA)  # N = 40: not a multiple of 16, which _scaled_mm refuses
    q = QuantLinear.from_linear(lin, "fp8")
    x = torch.randn(3, 7, 96, device=CUDA)
    ref = kernels.linear_w8a8_reference(x.reshape(-1, 96), q.weight, q.weight_scale, q.bias, None, "fp8",
                                        torch.float64)
    assert rel(q(x).reshape(-1, 40), ref) < 5e-3


@pytest.mark.parametrize("m, k, n", [(256, 512, 384), (75, 96, 40), (4096, 1024, 2048)])
def test_int8_triton_gemm_matches_reference(m, k, n):
    need_w8a8("int8")
    a = torch.randint(-127, 128, (max(m, 32), k), dtype=torch.int8, device=CUDA)
    w = torch.randint(-127, 128, (n, k), dtype=torch.int8, device=CUDA)
    sa, sw = torch.rand(a.shape[0], 1, device=CUDA), torch.rand(n, device=CUDA)
    bias = torch.randn(n, device=CUDA).to(torch.bfloat16)
    out = kernels.w8a8_matmul(a, sa, w, sw, bias)
    ref = (a.double() @ w.double().t()) * sa.double() * sw.double() + bias.double()
    assert out.dtype == torch.bfloat16 and rel(out, ref) < 4e-3
    if m % 8 == 0 and k % 8 == 0 and n % 8 == 0:  # what torch._int_mm accepts
        assert rel(kernels.int8_matmul_torch(a, sa, w, sw, bias), ref) < 4e-3


@pytest.mark.parametrize("m, k, n", [(256, 512, 384), (4096, 5120, 1024)])
@pytest.mark.parametrize("fast_accum", [True, False])
def test_fp8_gemms_match_reference(m, k, n, fast_accum):
    need_w8a8("fp8")
    a = torch.randn(m, k, device=CUDA).to(torch.float8_e4m3fn)
    w = torch.randn(n, k, device=CUDA).to(torch.float8_e4m3fn)
    sa, sw = torch.rand(m, 1, device=CUDA), torch.rand(n, device=CUDA)
    bias = torch.randn(n, device=CUDA).to(torch.bfloat16)
    ref = (a.double() @ w.double().t()) * sa.double() * sw.double() + bias.double()
    triton_out = kernels.w8a8_matmul(a, sa, w, sw, bias, fast_accum=fast_accum)
    library_out = kernels.fp8_matmul(a, sa, w, sw, bias, fast_accum=fast_accum)
    print(f"fp8 K={k} fast_accum={fast_accum}: triton {rel(triton_out, ref):.2e}, "
          f"_scaled_mm {rel(library_out, ref):.2e}")
    assert rel(triton_out, ref) < 4e-3 and rel(library_out, ref) < 4e-3


def _tiny_root(tmp_path, cfg, seed):
    """Both experts of a random wan_lite WanModel in the official single-file layout."""
    from safetensors.torch import save_file

    from wan_lite.model import WanModel

    for i, name in enumerate(("high_noise_model", "low_noise_model")):
        g = torch.Generator().manual_seed(seed + i)
        model = WanModel(cfg)
        state = {}
        for k, v in model.state_dict().items():
            r = torch.randn(v.shape, generator=g)
            state[k] = (1 + 0.2 * r) if k.endswith("norm_q.weight") or k.endswith("norm_k.weight") else \
                r * (0.3 if "modulation" in k else 1 / max(v.shape[-1], 1) ** 0.5)
        folder = tmp_path / name
        folder.mkdir(parents=True)
        save_file({k: v.contiguous() for k, v in state.items()}, folder / "diffusion_pytorch_model.safetensors")
        (folder / "config.json").write_text(json.dumps({"_class_name": "WanModel", "num_heads": cfg.num_heads,
                                                        "dim": cfg.dim, "eps": cfg.eps}))
    return tmp_path


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory):
    from wan_lite.config import ModelConfig

    cfg = ModelConfig.tiny(dim=64, ffn_dim=128, num_heads=2, text_dim=32)
    return cfg, _tiny_root(tmp_path_factory.mktemp("src"), cfg, 5)


def _forward(model, cfg):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, cfg.in_dim, 3, 8, 8, generator=g).to(CUDA)
    ctx = torch.randn(1, 9, cfg.text_dim, generator=g).to(CUDA, torch.bfloat16)
    with torch.no_grad():
        return model(x, torch.tensor([930], device=CUDA), ctx)


@pytest.mark.parametrize("scheme", ["int8", "fp8"])
def test_quantized_model_w8a8_against_w8a16_and_source(tmp_path, tiny_root, scheme, monkeypatch):
    need_w8a8(scheme)
    from quant.convert import convert_checkpoint
    from wan_lite.checkpoint import load_expert

    cfg, root = tiny_root
    dst = convert_checkpoint(root, tmp_path / "q", scheme, progress=False)
    model = load_expert(dst / "high_noise_model", dtype=torch.bfloat16, device=CUDA)
    assert isinstance(model.blocks[0].ffn[0], QuantLinear) and model.blocks[0].ffn[0].weight.is_cuda
    y8 = _forward(set_kernel(model, "w8a8"), cfg)  # the kernel is chosen once per device, not per call
    y16 = _forward(set_kernel(model, "w8a16"), cfg)
    ref = _forward(load_expert(root / "high_noise_model", dtype=torch.bfloat16, device=CUDA), cfg)
    assert torch.isfinite(y8).all()
    print(f"{scheme}: w8a8 vs w8a16 {rel(y8, y16):.2e}, w8a8 vs bf16 source {rel(y8, ref):.2e}")
    assert rel(y8, y16) < (3e-2 if scheme == "int8" else 8e-2)
    assert rel(y8, ref) < (4e-2 if scheme == "int8" else 1e-1)


def test_nf4_runs_on_cuda(tmp_path, tiny_root):
    pytest.importorskip("bitsandbytes")
    from quant.convert import convert_checkpoint
    from wan_lite.checkpoint import load_expert

    cfg, root = tiny_root
    dst = convert_checkpoint(root, tmp_path / "q", "nf4", progress=False, experts=("high",))
    model = load_expert(dst / "high_noise_model", dtype=torch.bfloat16, device=CUDA)
    assert type(model.blocks[0].ffn[0]).__name__ == "Linear4bit"
    ref = _forward(load_expert(root / "high_noise_model", dtype=torch.bfloat16, device=CUDA), cfg)
    err = rel(_forward(model, cfg), ref)
    print(f"nf4 vs bf16 source {err:.2e}")
    assert err < 0.25


def test_quanto_runs_on_cuda(tmp_path, tiny_root):
    pytest.importorskip("optimum.quanto")
    from quant.convert import convert_checkpoint
    from wan_lite.checkpoint import load_expert

    cfg, root = tiny_root
    dst = convert_checkpoint(root, tmp_path / "q", "quanto-int8", progress=False, experts=("high",))
    model = load_expert(dst / "high_noise_model", dtype=torch.bfloat16, device=CUDA)
    ref = _forward(load_expert(root / "high_noise_model", dtype=torch.bfloat16, device=CUDA), cfg)
    err = rel(_forward(model, cfg), ref)
    print(f"quanto-int8 vs bf16 source {err:.2e}")
    assert err < 4e-2
