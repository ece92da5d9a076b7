"""wan_lite.bench_profile: the kernel-name classifier on real names, the summary arithmetic on a
synthetic GPU trace (overlap of side-stream copies), and the whole profiling path on the tiny model on
the CPU (CPU operators stand in for kernels there)."""

from __future__ import annotations

import json

import pytest
import torch

from wan_lite import bench_profile
from wan_lite.bench_profile import CATEGORIES, Activity, classify, device_activities, summarize, table

# Names as the profiler reports them. CPU: seen in this test's own CPU run (aten operators). CUDA: the
# Triton kernels by the function names wan_lite launches (quantized/kernels.py, attention8.py), Inductor's
# fused kernels by its naming scheme, and the library kernels as CUDA traces of torch show them.
NAMES = {
    "linear 8-bit": [
        "nvjet_sm90_qqtst_128x128_128x6_1x2_h_bz_ovscale_bias_TNT",  # torch._scaled_mm on H100, 2026-12-06
        "_w8a8_matmul_kernel",
        "wan_lite::linear_w8a8",
        "aten::_int_mm",
        "aten::_scaled_mm",
        "sm90_xmma_gemm_e4m3bf16_e4m3f32_f32_tn_n_tilesize128x128x128_warpgroupsize1x1x1_execute_segment_k_off"
        "_kernel__5x_cublas",
        "void cutlass::device_kernel<at::cuda::detail::enable_3x_kernel_for_sm9x<cutlass::gemm::kernel::GemmUniversal"
        "<cute::tuple<int, int, int, int>, cutlass::gemm::collective::CollectiveMma<cutlass::float_e4m3_t>>>>",
        "sm90_xmma_gemm_s8s8_s32_tn_n_tilesize128x128x128_kernel__5x_cublas",
    ],
    "act quant": ["_quantize_rows_kernel"],
    "attention": [
        "_attn_fwd",
        "_kv_stats",
        "_quant_q",
        "_quant_kv",
        "wan_lite::attention_fp8",
        "cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_7_64x128x128_4x1x1_kernel0_0",
        "void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<128, 128, 64, 4, false, false, "
        "cutlass::bfloat16_t, Flash_kernel_traits<128, 128, 64, 4, cutlass::bfloat16_t> >, false, false, false, "
        "false, true, true, false, false>(pytorch_flash::Flash_fwd_params)",
        "fmha_cutlassF_bf16_aligned_64x128_rf_sm80(PyTorchMemEffAttention::AttentionKernel<cutlass::bfloat16_t, "
        "cutlass::arch::Sm80, true, 64, 128, 128, true, true>::Params)",
        "aten::_scaled_dot_product_flash_attention_for_cpu",
        "aten::scaled_dot_product_attention",
    ],
    "elementwise": [
        "triton_poi_fused__to_copy_add_mul_0",
        "triton_red_fused__to_copy_add_mean_mul_pow_rsqrt_1",
        "triton_per_fused_native_layer_norm_2",
        "triton_poi_fused_clone_3",
        "## Call CompiledFxGraph fbchbamwktxp2sqrxo2su32ajupmxjztfk7ihatm37pac6a253f5 ##",  # CPU, compiled blocks
        "void at::native::vectorized_elementwise_kernel<4, at::native::CUDAFunctorOnSelf_add<float>, "
        "std::array<char*, 2ul> >(int, at::native::CUDAFunctorOnSelf_add<float>, std::array<char*, 2ul>)",
        "void at::native::(anonymous namespace)::vectorized_layer_norm_kernel<float, float>(int, float, float "
        "const*, float const*, float const*, float*, float*, float*)",
        "void at::native::reduce_kernel<512, 1, at::native::ReduceOp<float, at::native::MeanOps<float, float, "
        "float, float>, unsigned int, float, 4, 4> >(at::native::ReduceOp<float, at::native::MeanOps<float, "
        "float, float, float>, unsigned int, float, 4, 4>)",
        "void at::native::vectorized_elementwise_kernel<4, at::native::GeluCUDAKernelImpl(at::TensorIteratorBase&, "
        "at::native::GeluType)::{lambda()#2}::operator()() const, std::array<char*, 2ul> >",
        "aten::native_layer_norm",
        "aten::mul",
        "aten::add_",
        "aten::addcmul_",
        "aten::pow",
        "aten::rsqrt",
        "aten::gelu",
        "aten::flip",
    ],
    "linear float": [
        "sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x256x64_warpgroupsize2x1x1_execute_segment_k_off"
        "_kernel__5x_cublas",
        "nvjet_tst_128x256_64x4_1x2_h_bz_coopA_NNT",
        "ampere_bf16_s16816gemm_bf16_128x128_ldg8_f2f_stages_64x3_tn",
        "void gemv2T_kernel_val<int, int, float, float, float, float, 128, 16, 4, 4, false, false, "
        "cublasGemvParamsEx<int, cublasGemvTensorStridedBatched<float const>, "
        "cublasGemvTensorStridedBatched<float const>, cublasGemvTensorStridedBatched<float>, float> >",
        "sm90_xmma_fprop_implicit_gemm_bf16bf16_bf16f32_f32_nhwckrsc_nhwc_tilesize128x128x64_warpgroupsize1x1x1"
        "_g1_execute_kernel__5x_cudnn",
        "aten::addmm",
        "aten::mm",
        "aten::slow_conv3d_forward",
    ],
    "copy HtoD": ["Memcpy HtoD (Pinned -> Device)", "Memcpy HtoD (Pageable -> Device)"],
    "copy other": [
        "Memcpy DtoD (Device -> Device)",
        "Memcpy DtoH (Device -> Pageable)",
        "Memset (Device)",
        "void at::native::unrolled_elementwise_kernel<at::native::direct_copy_kernel_cuda(at::TensorIteratorBase&)"
        "::{lambda()#3}::operator()() const::{lambda()#7}::operator()() const::{lambda(float)#1}, "
        "std::array<char*, 2ul>, 4, TrivialOffsetCalculator<1, unsigned int>, TrivialOffsetCalculator<1, unsigned "
        "int>, at::native::memory::LoadWithCast<1>, at::native::memory::StoreWithCast<1> >",
        "void at::native::(anonymous namespace)::CatArrayBatchedCopy<at::native::(anonymous namespace)::OpaqueType"
        "<4u>, unsigned int, 3, 128, 1>",
        "aten::copy_",
        "aten::_to_copy",
    ],
    "other": ["aten::view", "aten::empty_strided", "TorchDynamo Cache Lookup", "Torch-Compiled Region: 0/2",
              "void some_unknown_kernel<float>(float*)"],
}


@pytest.mark.parametrize("category,name", [(c, n) for c, names in NAMES.items() for n in names])
def test_classify_real_names(category, name):
    assert classify(name) == category


def test_categories_cover_the_classifier():
    assert set(NAMES) == set(CATEGORIES)


# ---------------------------------------------------------------------------------------------
# a synthetic GPU trace in torch.profiler's chrome-trace form

TRACE = {"traceEvents": [
    {"ph": "M", "name": "thread_name", "pid": 0, "tid": 7, "args": {"name": "stream 7"}},
    {"ph": "X", "cat": "cpu_op", "name": "aten::mul", "pid": 1, "tid": 1, "ts": 0.0, "dur": 400.0},
    {"ph": "X", "cat": "cuda_runtime", "name": "cudaLaunchKernel", "pid": 1, "tid": 1, "ts": 1.0, "dur": 3.0},
    {"ph": "X", "cat": "kernel", "name": "_w8a8_matmul_kernel", "pid": 0, "tid": 7, "ts": 0.0, "dur": 100.0,
     "args": {"stream": 7, "correlation": 1}},
    {"ph": "X", "cat": "kernel", "name": "_attn_fwd", "pid": 0, "tid": 7, "ts": 150.0, "dur": 100.0,
     "args": {"stream": 7, "correlation": 2}},
    {"ph": "X", "cat": "gpu_memcpy", "name": "Memcpy HtoD (Pinned -> Device)", "pid": 0, "tid": 20, "ts": 50.0,
     "dur": 150.0, "args": {"stream": 20}},
    {"ph": "X", "cat": "gpu_memset", "name": "Memset (Device)", "pid": 0, "tid": 7, "ts": 260.0, "dur": 10.0},
    {"ph": "s", "cat": "ac2g", "name": "ac2g", "id": 1, "pid": 1, "tid": 1, "ts": 1.0},
]}


def test_device_activities_keep_gpu_events_only():
    acts = device_activities(TRACE)
    assert [a.name for a in acts] == ["_w8a8_matmul_kernel", "_attn_fwd", "Memcpy HtoD (Pinned -> Device)",
                                      "Memset (Device)"]
    assert [a.stream for a in acts] == [7, 7, 20, 7]  # args.stream, else the tid
    assert device_activities(TRACE["traceEvents"]) == acts  # a bare event list reads the same


def test_event_activities_read_the_profilers_gpu_events():
    """The second source (a torch whose chrome trace holds no GPU events): FunctionEvents of device CUDA."""
    from torch.autograd import DeviceType
    from torch.autograd.profiler_util import FunctionEvent

    events = [FunctionEvent(0, "aten::mm", 1, 0, 50, device_type=DeviceType.CPU),
              FunctionEvent(1, "_attn_fwd", 7, 10, 110, device_type=DeviceType.CUDA, device_resource_id=7),
              FunctionEvent(2, "Memcpy HtoD (Pinned -> Device)", 20, 20, 60, device_type=DeviceType.CUDA,
                            device_resource_id=20)]
    assert bench_profile.event_activities(events) == [Activity("_attn_fwd", 100.0, 10.0, 7),
                                                      Activity("Memcpy HtoD (Pinned -> Device)", 40.0, 20.0, 20)]


def test_summary_of_a_synthetic_step():
    s = summarize(device_activities(TRACE), wall_ms=0.3)
    rows = {r["category"]: r for r in s["categories"]}
    assert [r["category"] for r in s["categories"]] == list(CATEGORIES)
    assert s["gpu_sum_ms"] == pytest.approx(0.36)  # 100 + 100 + 150 + 10 us
    assert sum(r["ms"] for r in s["categories"]) == pytest.approx(s["gpu_sum_ms"])
    assert sum(r["pct_gpu"] for r in s["categories"]) == pytest.approx(100.0)
    assert rows["linear 8-bit"]["ms"] == pytest.approx(0.1) and rows["attention"]["ms"] == pytest.approx(0.1)
    assert rows["copy HtoD"]["ms"] == pytest.approx(0.15) and rows["copy other"]["ms"] == pytest.approx(0.01)
    assert rows["attention"]["pct_step"] == pytest.approx(100 * 0.1 / 0.3)
    assert s["kernel_ms"] == pytest.approx(0.2) and s["kernel_busy_ms"] == pytest.approx(0.2)
    assert s["gpu_busy_ms"] == pytest.approx(0.26)  # [0, 250] and [260, 270]
    assert s["idle_ms"] == pytest.approx(0.04)
    assert s["stream_busy_ms"] == {"7": pytest.approx(0.21), "20": pytest.approx(0.15)}
    c = s["copies"]  # the copy [50, 200] runs under the kernels [0, 100] and [150, 250] for 100 us
    assert c["htod_ms"] == pytest.approx(0.15) and c["htod_under_kernels_ms"] == pytest.approx(0.1)
    assert c["htod_exposed_ms"] == pytest.approx(0.05) and c["overlap_fraction"] == pytest.approx(2 / 3)
    text = table(s, "synthetic")
    assert "host->device copies 0.1 ms" in text and "(67%)" in text
    assert all(cat in text for cat in CATEGORIES)


def test_other_lists_unknown_names_and_largest_remaining():
    acts = [Activity("mystery_kernel", 500.0, 0.0, 7), Activity("triton_poi_fused_add_0", 200.0, 600.0, 7),
            Activity("_attn_fwd", 2000.0, 900.0, 7)]
    s = summarize(acts, wall_ms=3.0)
    other = next(r for r in s["categories"] if r["category"] == "other")
    assert other["top"] == [["mystery_kernel", pytest.approx(0.5), 1]]
    assert "mystery_kernel" in table(s)
    nxt = bench_profile.largest_remaining(s)
    assert nxt["category"] == "other" and nxt["over_10pct"]  # 0.5 of 3 ms; attention is excluded
    assert s["copies"]["overlap_fraction"] is None  # no copies


# ---------------------------------------------------------------------------------------------
# the whole path on the tiny model, on the CPU


@pytest.fixture(scope="module")
def cpu_run(tmp_path_factory):
    """`python -m wan_lite.bench_profile --device cpu --tiny ... --low --json`: its JSON."""
    out = tmp_path_factory.mktemp("profile") / "profile.json"
    argv = ["--device", "cpu", "--tiny", "--size", "64x64", "--frames", "5", "--vram-gb", "0", "--low",
            "--json", str(out)]
    assert bench_profile.main(argv) == 0
    return json.loads(out.read_text())


def test_cpu_run_profiles_three_steps(cpu_run):
    steps = cpu_run["steps"]
    assert [(s["expert"], s["t"]) for s in steps] == [("high", 961), ("high", 909), ("low", 833)]
    assert cpu_run["unprofiled_high_ms"] > 0 and cpu_run["warmup_s"] > 0
    assert cpu_run["settings"]["tokens"] == 32 and cpu_run["settings"]["device"] == "cpu"
    assert not cpu_run["settings"]["compile"]  # the plan's choice on the CPU


def test_cpu_run_tables_sum_to_the_total(cpu_run):
    for s in cpu_run["steps"]:
        rows = {r["category"]: r for r in s["categories"]}
        assert set(rows) == set(CATEGORIES)
        assert sum(r["ms"] for r in rows.values()) == pytest.approx(s["gpu_sum_ms"], rel=1e-9)
        assert sum(r["pct_gpu"] for r in rows.values()) == pytest.approx(100.0)
        assert 0 < s["gpu_sum_ms"] <= s["wall_ms"]  # operator self times, one thread: within the wall time
        for cat in ("attention", "linear float", "elementwise", "copy other"):  # w8a16 on the CPU
            assert rows[cat]["ms"] > 0 and rows[cat]["count"] > 0, cat
        for cat in ("linear 8-bit", "act quant", "copy HtoD"):  # no CUDA kernels, no host->device copies
            assert rows[cat]["ms"] == 0 and rows[cat]["top"] == [], cat
        attn = [n for n, _, _ in rows["attention"]["top"]]
        assert "aten::_scaled_dot_product_flash_attention_for_cpu" in attn  # the device default on the CPU
        assert s["copies"] is None  # no timestamps for CPU self times


def test_cpu_run_records_the_swap(cpu_run):
    """The last high step copies the low expert's units into the slots (plain copies on the CPU), so it
    copies more than the steady step before it."""
    steady, swap, _ = cpu_run["steps"]
    copies = {s["label"]: next(r for r in s["categories"] if r["category"] == "copy other")["count"]
              for s in (steady, swap)}
    assert copies[swap["label"]] > copies[steady["label"]]


def test_gpu_activities_of_a_cpu_profile(tmp_path):
    """The GPU reader on a real (CPU-only) profile: the chrome trace is written, kept and parsed, the
    FunctionEvents are read too, and finding no GPU activity in either is an error, not an empty table."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], record_shapes=False) as prof:
        torch.ones(4, 4) @ torch.ones(4, 4)
    kept = tmp_path / "traces" / "step.json"
    with pytest.raises(RuntimeError, match="no GPU activity"):
        bench_profile.gpu_activities(prof, kept)
    trace = json.loads(kept.read_text())
    assert any(e.get("cat") == "cpu_op" and e["name"] == "aten::mm" for e in trace["traceEvents"])
    assert device_activities(trace) == [] and bench_profile.event_activities(prof.events()) == []
    assert not list(kept.parent.glob("*.part"))


def test_needs_cuda_without_device_cpu(capsys):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    assert bench_profile.main(["--res", "720p"]) == 2
    assert "--device cpu --tiny" in capsys.readouterr().err


def test_a_failing_step_keeps_the_steps_before_it(monkeypatch, tiny_cfg):
    """An out-of-memory in the second profiled step: the first step's table is reported and kept, the
    error recorded, the residency released."""
    from wan_lite.bench import random_host_expert, runtime_template

    real = bench_profile.profile_step
    calls = []

    def flaky(fn, device, trace=None):
        calls.append(1)
        if len(calls) == 2:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(fn, device, trace)

    monkeypatch.setattr(bench_profile, "profile_step", flaky)
    tmpl = runtime_template(tiny_cfg, "int8")
    hosts = tuple(random_host_expert(tmpl, seed, pin=False, device="cpu") for seed in (1, 2))
    reported = []
    run = bench_profile.profile_steps(tmpl, hosts, height=32, width=32, frames=1, mode="resident",
                                      cfg_batched=False, vram_gb=None, compile_blocks=False, low=True,
                                      device="cpu", report=reported.append)
    assert run["error"].startswith("OutOfMemoryError: CUDA out of memory (simulated)")
    assert [s["label"] for s in run["steps"]] == ["high-noise step"] and reported == run["steps"]
    assert run["steps"][0]["gpu_sum_ms"] > 0
