"""The 8-bit GEMM's variants (kernels.GEMMS): the switch and the step's shapes (CPU), each variant compiled
for sm90 and its SASS read (CPU, needs Triton), each variant against `linear_w8a8_reference` (GPU).

GPU tests run on the device machine: `python -m pytest -q -m gpu tests/test_gemm_variants.py`.
The sm90 compile tests need Triton (CUDA builds of torch ship it; CI's CPU torch has none: they skip).
"""

from __future__ import annotations

import collections
import re
import shutil

import pytest
import torch

from wan_lite import bench_linear
from wan_lite.quantized import kernels
from wan_lite.quantized.linear import quantize_linear_weight

HAS_CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
CUDA = torch.device("cuda")


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


# ---------------------------------------------------------------------------------------------
# CPU: the switch, the shapes of the step


def test_default_is_the_current_kernel_and_the_environment_overrides_it(monkeypatch):
    monkeypatch.delenv(kernels.GEMM_ENV_VAR, raising=False)
    assert kernels.GEMM_DEFAULT == "grouped" and kernels.gemm_choice() == "grouped"
    monkeypatch.setenv(kernels.GEMM_ENV_VAR, "tma-persistent")
    assert kernels.gemm_choice() == "tma-persistent"
    assert kernels.gemm_choice("wide") == "wide"  # the argument wins over the environment


@pytest.mark.parametrize("how", ["argument", "environment"])
def test_unknown_variant_raises_naming_the_choices(monkeypatch, how):
    monkeypatch.delenv(kernels.GEMM_ENV_VAR, raising=False)
    if how == "environment":
        monkeypatch.setenv(kernels.GEMM_ENV_VAR, "fastest")
    with pytest.raises(ValueError, match=rf"unknown 8-bit GEMM variant 'fastest' \(from "
                                         rf"{'argument' if how == 'argument' else kernels.GEMM_ENV_VAR}\).*"
                                         r"grouped, wide, persistent, tma, tma-persistent"):
        kernels.gemm_choice("fastest" if how == "argument" else None)


def test_step_gemms_are_the_profiles_2240_calls():
    """BENCHMARKS.md Run 3 counted 2,240 `_w8a8_matmul_kernel` calls in a guided 720p step."""
    gemms = bench_linear.step_gemms()
    assert sum(calls for *_, calls in gemms) * 40 * 2 == 2240
    ffn0 = [(m, calls) for name, m, k, n, calls in gemms if name.startswith("ffn.0")]
    assert sum(m * calls for m, calls in ffn0) == 75600  # the chunks cover every token once
    assert {(k, n) for _, _, k, n, _ in gemms} == {(5120, 5120), (5120, 13824), (13824, 5120)}
    assert bench_linear.step_gemms(tokens=16384) == [g for g in bench_linear.step_gemms(tokens=16384)
                                                     if "last" not in g[0]]  # no remainder, no last chunk


def test_bench_refuses_unknown_variants_before_looking_for_a_gpu(capsys):
    with pytest.raises(SystemExit):
        bench_linear.main(["--variants", "grouped,warp-specialized"])
    assert "unknown --variants warp-specialized" in capsys.readouterr().err


def test_gemm_table_gives_each_variant_against_grouped_and_the_step_total():
    shape = dict(M=75600, K=5120, N=5120, shape="q/k/v/o, cross q/o", calls=6)
    rows = [dict(shape, variant="grouped", ms=3.0, tops=1320.0, x_grouped=1.0, rel_err=0.0),
            dict(shape, variant="persistent", ms=2.5, tops=1584.0, x_grouped=1.2, rel_err=1e-7),
            dict(shape, variant="tma", error="RuntimeError: out of resources")]
    table = bench_linear.format_gemm_table(rows, {"grouped": 1440.0, "persistent": 1200.0, "tma": None})
    assert "persistent         2.500    1584  1.200  1.00e-07" in table
    assert "tma             ERROR RuntimeError: out of resources" in table
    assert table.endswith("persistent         1200.0  x grouped 1.200\n  tma             failed")


# ---------------------------------------------------------------------------------------------
# CPU with Triton: every config of every variant compiles for sm90, runs on the tensor cores, no spills


def _tuned():
    """variant -> (autotuned kernel, TMA loads); empty without Triton."""
    if kernels.triton is None:
        return {}
    return {"grouped": (kernels._w8a8_matmul_kernel, False)} | {
        v: (kern, tma) for v, (kern, _, tma) in kernels._GEMM_VARIANTS.items()}


def _all_configs():
    return [pytest.param(v, tma, c, id=f"{v}-{i}") for v, (kern, tma) in _tuned().items()
            for i, c in enumerate(kern.configs)]


def compile_sm90(kern, tma: bool, config, fp8: bool = False):
    """One autotune config of a GEMM kernel, compiled for an sm90 target (no GPU needed): the compiled
    kernel. Integer arguments are marked divisible by 16, as Triton specializes them at Wan shapes."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = kern.fn
    e = "fp8e4nv" if fp8 else "i8"
    kw = config.kwargs
    sig = {name: "i32" for name in fn.arg_names}
    a, b = ("a", "b") if "a" in fn.arg_names else ("a_ptr", "b_ptr")
    sig[a] = f"tensordesc<{e}[{kw['BLOCK_M']}, {kw['BLOCK_K']}]>" if tma else f"*{e}"
    sig[b] = f"tensordesc<{e}[{kw['BLOCK_N']}, {kw['BLOCK_K']}]>" if tma else f"*{e}"
    sig.update(c_ptr="*bf16", sa_ptr="*fp32", sb_ptr="*fp32", bias_ptr="*bf16")
    const = dict(IS_FP8=fp8, FAST_ACCUM=True, HAS_BIAS=True, EVEN_K=True, **kw)
    if "TMA" in fn.arg_names:
        const["TMA"] = tma
    sig.update(dict.fromkeys(const, "constexpr"))
    attrs = {(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n in fn.arg_names
             if n not in const and not sig[n].startswith("tensordesc")}
    return kernels.triton.compile(ASTSource(fn, sig, constexprs=const, attrs=attrs),
                                  target=GPUTarget("cuda", 90, 32),
                                  options={"num_warps": config.num_warps, "num_stages": config.num_stages})


def sass_counts(compiled) -> collections.Counter:
    from triton.tools.disasm import get_sass

    return collections.Counter(re.findall(r"\b(IGMMA|QGMMA|UTMALDG|LDGSTS|STL|LDL)\b", get_sass(compiled.asm["cubin"])))


needs_triton = pytest.mark.skipif(kernels.triton is None, reason="needs Triton (a CUDA build of torch)")


@needs_triton
@pytest.mark.parametrize("variant, tma, config", _all_configs())
def test_every_config_compiles_for_sm90_to_wgmma_without_spills(variant, tma, config):
    pytest.importorskip("triton.tools.disasm")
    if shutil.which("cuobjdump") is None and not _bundled_cuobjdump():
        pytest.skip("needs cuobjdump (Triton bundles one) to read the SASS")
    compiled = compile_sm90(_tuned()[variant][0], tma, config)
    ops = sass_counts(compiled)
    assert ops["IGMMA"] > 0  # int8 wgmma (Hopper's tensor-core instruction)
    assert ops["STL"] == 0 and ops["LDL"] == 0  # no register spills to local memory
    assert (ops["UTMALDG"] > 0) == tma and (ops["LDGSTS"] > 0) != tma  # TMA loads, or cp.async ones
    assert compiled.metadata.shared <= 232448  # H100/H200: 227 KB of shared memory per block


@needs_triton
@pytest.mark.parametrize("variant", list(kernels.GEMMS))
def test_fp8_operands_compile_to_qgmma(variant):
    pytest.importorskip("triton.tools.disasm")
    if shutil.which("cuobjdump") is None and not _bundled_cuobjdump():
        pytest.skip("needs cuobjdump (Triton bundles one) to read the SASS")
    kern, tma = _tuned()[variant]
    ops = sass_counts(compile_sm90(kern, tma, kern.configs[0], fp8=True))
    assert ops["QGMMA"] > 0 and ops["IGMMA"] == 0 and ops["STL"] == 0


def _bundled_cuobjdump() -> bool:
    from pathlib import Path

    return (Path(kernels.triton.__file__).parent / "backends/nvidia/bin/cuobjdump").exists()


_INTERPRETED = """
import torch
from triton.tools.tensor_descriptor import TensorDescriptor
from wan_lite.quantized import kernels as K

m, k, n, bm, bn, bk = 300, 96, 200, 64, 64, 64  # 5 x 4 tiles, partial in M, N and K
g = torch.Generator().manual_seed(0)
a = torch.randint(-127, 128, (m, k), dtype=torch.int8, generator=g)
w = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=g)
sa, sw, bias = torch.rand(m, 1, generator=g), torch.rand(n, generator=g), torch.randn(n, generator=g).bfloat16()
blocks = dict(IS_FP8=False, FAST_ACCUM=True, HAS_BIAS=True, EVEN_K=False, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk,
              GROUP_M=2)
grouped = torch.empty(m, n, dtype=torch.bfloat16)
K._w8a8_matmul_kernel.fn[(20,)](a, w, grouped, sa, sw, bias, m, n, k, 512, k, k, n, **blocks)
ref = (a.double() @ w.double().t()) * sa.double() * sw.double() + bias.double()
print("grouped", ((grouped.double() - ref).norm() / ref.norm()).item())
for tma in (False, True):
    for programs in (20, 3):  # one program per tile; 3 persistent programs walking 6-7 tiles each
        c = torch.empty(m, n, dtype=torch.bfloat16)
        x, y = (TensorDescriptor.from_tensor(a, [bm, bk]), TensorDescriptor.from_tensor(w, [bn, bk])) if tma else (a, w)
        K._w8a8_matmul_tiles_kernel[(programs,)](x, y, c, sa, sw, bias, m, n, k, 512, k, k, n, TMA=tma,
                                                 FLATTEN=programs < 20, **blocks)
        rel = ((c.float() - grouped.float()).abs() / grouped.float().abs().clamp_min(1e-30)).max().item()
        print(f"tma={tma} programs={programs}", rel)
"""


@needs_triton
def test_tile_walks_equal_the_current_kernel_in_the_interpreter(tmp_path):
    """Triton's CPU interpreter runs _w8a8_matmul_tiles_kernel's four schedules (pointer / TMA loads, one
    program per tile / persistent) and _w8a8_matmul_kernel on the same int8 operands: the same int32 sums
    and epilogue, so the same bf16 values up to one rounding step (stated as 2^-8 relative, not bit for bit)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    env = dict(os.environ, TRITON_INTERPRET="1")
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parents[1]), env.get("PYTHONPATH", "")])
    out = subprocess.run([sys.executable, "-c", _INTERPRETED], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.split("\n")
    assert float(lines[0].split()[1]) < 5e-3  # interpreted bf16 output: ~2x round-to-nearest's error
    # the same int32 sums and epilogue: at most one bf16 rounding step (2^-8 relative) apart on any CPU
    assert all(float(line.split()[-1]) <= 2**-8 for line in lines[1:5]), out.stdout


# ---------------------------------------------------------------------------------------------
# GPU: every variant against the reference


def need_variant(variant, scheme):
    if why := kernels.w8a8_unsupported(CUDA, scheme):
        pytest.skip(why)
    if variant.startswith("tma") and torch.cuda.get_device_capability() < kernels.TMA_CAPABILITY:
        pytest.skip("TMA needs sm90+")


@pytest.fixture
def one_config(monkeypatch):
    """Pin a variant's autotuner to one config (no timing; each config compiled and checked on its own)."""

    def pin(variant, config):
        kern = _tuned()[variant][0]
        monkeypatch.setattr(kern, "configs", [config])
        monkeypatch.setattr(kern, "cache", {})

    return pin


def _case(m, k, n, scheme, with_bias, variant):
    """One w8a8 GEMM through `w8a8_matmul(variant=...)` against `linear_w8a8_reference`: rel error."""
    g = torch.Generator(device=CUDA).manual_seed(m + k + n)
    x = torch.randn(m, k, device=CUDA, generator=g).to(torch.bfloat16)
    w, w_scale = quantize_linear_weight(torch.randn(n, k, device=CUDA, generator=g) / k**0.5, scheme)
    bias = (torch.randn(n, device=CUDA, generator=g) * 0.1).to(torch.bfloat16) if with_bias else None
    xq, x_scale = kernels.quantize_rows(x, scheme)
    out = kernels.w8a8_matmul(xq, x_scale, w, w_scale, bias, variant=variant)[:m]
    ref = kernels.linear_w8a8_reference(x, w, w_scale, bias, None, scheme, torch.float64)
    assert out.dtype == torch.bfloat16 and out.shape == (m, n)
    return rel(out, ref)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("variant, tma, config", _all_configs())
def test_every_config_matches_linear_w8a8_reference(variant, tma, config, one_config):
    """4000 x 2000 output: 256 tiles of 128 x 256 or 256 x 128 (an H200 has 132 SMs: persistent programs
    walk two), partial tiles in M and N."""
    need_variant(variant, "int8")
    one_config(variant, config)
    assert _case(4000, 1024, 2000, "int8", True, variant) < 5e-3  # bf16 output rounding


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("variant", list(kernels.GEMMS))
@pytest.mark.parametrize("scheme", ["int8", "fp8"])
@pytest.mark.parametrize("m, k, n, with_bias", [(256, 512, 384, True), (75, 96, 40, True), (4096, 1024, 2048, False),
                                                (1872, 5120, 1024, True)])
def test_variant_matches_linear_w8a8_reference(variant, scheme, m, k, n, with_bias, one_config):
    """Each variant's first (largest) config over both schemes, with and without bias; K = 96 and N = 40:
    partial K and N tiles, zero-filled by TMA, masked by the pointer loads."""
    need_variant(variant, scheme)
    one_config(variant, _tuned()[variant][0].configs[0])
    assert _case(m, k, n, scheme, with_bias, variant) < 5e-3  # bf16 rounding (and fp8 fast accumulation)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("variant", ["tma", "tma-persistent"])
def test_tma_variant_on_a_misaligned_weight_falls_back_to_pointer_loads(variant):
    need_variant(variant, "int8")
    m, k, n = 300, 512, 256
    a = torch.randint(-127, 128, (m, k), dtype=torch.int8, device=CUDA)
    buf = torch.empty(n * k + 8, dtype=torch.int8, device=CUDA)
    w = buf[8:].view(n, k)  # 8 bytes past a 16-byte boundary: TMA cannot read it
    w.copy_(torch.randint(-127, 128, (n, k), dtype=torch.int8, device=CUDA))
    assert not kernels._tma_ok(a, w)
    sa, sw = torch.rand(m, 1, device=CUDA), torch.rand(n, device=CUDA)
    out = kernels.w8a8_matmul(a, sa, w, sw, None, variant=variant)
    ref = (a.double() @ w.double().t()) * sa.double() * sw.double()
    assert rel(out, ref) < 4e-3


@pytest.mark.gpu
@needs_cuda
def test_tma_variant_before_hopper_raises_naming_the_way_out():
    if not HAS_CUDA or torch.cuda.get_device_capability() >= kernels.TMA_CAPABILITY:
        pytest.skip("needs a CUDA GPU older than sm90")
    a = torch.zeros(32, 64, dtype=torch.int8, device=CUDA)
    with pytest.raises(RuntimeError, match=r"loads through TMA.*choose 'grouped' or 'persistent'"):
        kernels.w8a8_matmul(a, torch.ones(32, 1, device=CUDA), a, torch.ones(32, device=CUDA), None, variant="tma")


@pytest.mark.gpu
@needs_cuda
def test_bench_gemms_times_every_variant_against_grouped():
    need_variant("persistent", "int8")
    names = ["persistent", "cublas-int8"] + (["tma"] if torch.cuda.get_device_capability() >= (9, 0) else [])
    rows, step = bench_linear.bench_gemms(names, gemms=[("t", 512, 1024, 768, 3)], rep_ms=10, blocks=1, passes=1)
    by = {r["variant"]: r for r in rows}
    assert list(by) == ["grouped", *names] and all("error" not in r for r in rows)
    assert by["grouped"]["x_grouped"] == 1.0 and by["persistent"]["rel_err"] < 1e-2
    assert "rel_err" not in by["cublas-int8"]  # int32 out without scales: not comparable
    assert step["persistent"] == pytest.approx(3 * by["persistent"]["ms"])
