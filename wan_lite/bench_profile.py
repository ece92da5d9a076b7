"""python -m wan_lite.bench_profile: where the time of one denoising step goes, kernel by kernel.

    python -m wan_lite.bench_profile --res 720p --scheme int8 --vram-gb 24 [--attention fp8|cudnn]
                                     [--low] [--json out.json] [--trace-dir traces/]

The same random experts, memory cap, inputs and residency as `python -m wan_lite.bench` (bench.py's
`runtime_template`, `random_host_expert`, `_cap`, `_inputs`, `Residency` as `bench_ours` builds it), the
same plan (mode, CFG batching, FFN chunking, attention kernel; each can be overridden). One warm-up pass
(compilation, autotuning, the first load), then on the grid `bench_sampling(3)`: the first high-noise step
timed without the profiler, the second profiled with torch.profiler (CUDA activity, no shapes): a steady
high-noise step. `--low` also profiles the third high step (it sends the low-noise expert's weights
into the slots as each unit finishes) and the first low-noise step.

Every GPU activity of a profiled step is put in one category by `classify(name)`, a pure function of
the kernel name (CATEGORIES says what each holds); names it cannot place go to "other", listed. For
each step: a table (category, ms, % of GPU time, % of the step, launches, top kernels), the step's wall
time (CUDA synchronized before and after), the kernel time summed and the time any kernel ran, the GPU
time summed over all activities and its union over time (busy); wall - busy is the time the GPU sat
idle (launch and sync overhead). Host->device copies are reported by themselves with the share of
their time that ran under compute kernels (they run on the residency's side stream). Last, the largest
category besides attention and the 8-bit GEMMs and whether it is over 10% of the step (issue 18: the
next cost to attack). The scheduler's update between steps (a few element-wise ops) is not in the step.

On the CPU (`--device cpu --tiny`, the tests) the same path profiles CPU operators: their self times are
classified by the same function (aten names), and no copy overlap exists.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

from . import attention
from .bench import _cap, _inputs, _log, bench_sampling, random_host_expert, runtime_template
from .config import ModelConfig, VideoSize
from .pipeline import grid
from .planner import RESOLUTIONS, PlanError, make_plan
from .residency import Residency

# ---------------------------------------------------------------------------------------------
# kernel names -> categories (pure)

CATEGORIES = {
    "linear 8-bit": "8-bit Linear GEMMs: Triton _w8a8_matmul_kernel (int8, fp8 fallback), fp8 torch._scaled_mm "
                    "(cuBLASLt / CUTLASS kernels with e4m3 in the name)",
    "act quant": "per-token activation quantization before the 8-bit GEMMs (Triton _quantize_rows_kernel)",
    "attention": "self- and cross-attention: cuDNN / flash / memory-efficient SDPA, the FP8 Triton kernel "
                 "(_attn_fwd) and its pre-pass (_kv_stats, _quant_q, _quant_kv)",
    "elementwise": "norms, modulation, RoPE, gating, GELU, residual adds: Inductor's fused triton_poi / "
                   "triton_red / triton_per kernels and aten's element-wise, reduction and norm kernels (on the "
                   "CPU: also the self time of Inductor's compiled graphs, i.e. their fused C++ kernels)",
    "linear float": "float GEMMs and convolutions: the bf16 / fp32 Linears outside the blocks (text and time "
                    "embeddings, head), the patch-embedding Conv3d, the blocks' Linears with --scheme none",
    "copy HtoD": "host -> device copies: the residency's weight copies on its side stream (and the 8-byte "
                 "timestep)",
    "copy other": "device -> device and device -> host copies, memsets, aten copy kernels (casts, contiguous, cat)",
    "other": "kernels no rule above names (listed by name)",
}

_GEMM = r"gemm|gemv|nvjet|xmma|cutlass|Kernel2|splitKreduce|s16816|s1688"
_EIGHT_BIT = r"e4m3|e5m2|f8f8|fp8|float8|s8s8|i8i8|int8|imma"
_NVJET_FP8 = r"^nvjet_(sm\d+_)?qq"  # cuBLASLt's nvjet names give the A/B types first: q = e4m3 (t = bf16, h = fp16)
_RULES = (  # (category, pattern): the first that matches wins, so the order matters
    ("copy HtoD", r"^Memcpy HtoD"),
    # Inductor's fused kernels: their names list the aten ops they fuse (_to_copy, clone, mul, ...)
    ("elementwise", r"^triton_(poi|red|per)_|^cpp_fused_|CompiledFxGraph"),
    ("copy other", r"^Memcpy|^Memset|direct_copy_kernel|CatArrayBatchedCopy|FillFunctor"
                   r"|^aten::(copy_|_to_copy|to|clone|contiguous|cat|stack|constant_pad_nd|pad|fill_|zero_)$"),
    # before the GEMMs: flash and memory-efficient SDPA kernels carry cutlass in their template names
    ("attention", r"_attn_fwd|_kv_stats|_quant_q|_quant_kv|attention_fp8|sdpa|flash_fwd|flash_fprop|fmha"
                  r"|scaled_dot_product|attention"),
    ("act quant", r"quantize_rows"),
    ("linear 8-bit", rf"_w8a8_matmul|linear_w8a8|^aten::(_int_mm|_scaled_mm)$|{_NVJET_FP8}"
                     rf"|(?i:({_GEMM}).*({_EIGHT_BIT}))"),
    ("linear float", rf"(?i:{_GEMM})|implicit_convolve|fprop|conv|^triton_tem_"
                     r"|^aten::(addmm|mm|bmm|baddbmm|matmul|linear|convolution|_convolution|conv3d)$"),
    ("elementwise", r"elementwise|reduce_kernel|(?i:norm)|softmax|SoftMax|gelu|silu|rope|Moments"
                    r"|^aten::(mul|mul_|add|add_|addcmul_|sub|div|div_|rsqrt|pow|mean|sum|exp|cos|sin|neg|flip|gelu"
                    r"|silu|sigmoid|tanh|where|clamp|clamp_min|abs|amax|max|outer|arange|repeat_interleave"
                    r"|index_select|lerp)$"),
)
_COMPILED = tuple((cat, re.compile(pattern)) for cat, pattern in _RULES)


def classify(name: str) -> str:
    """The category (a key of CATEGORIES) of one GPU kernel, memcpy or memset, or CPU operator, by name."""
    return next((cat for cat, pattern in _COMPILED if pattern.search(name)), "other")


# ---------------------------------------------------------------------------------------------
# activities and their summary (pure)


@dataclass(frozen=True)
class Activity:
    """One GPU kernel / memcpy / memset (start and stream known), or one CPU operator's self time summed
    over its `count` calls (no start)."""

    name: str
    dur_us: float
    start_us: float | None = None
    stream: int | None = None
    count: int = 1


DEVICE_CATS = ("kernel", "gpu_memcpy", "gpu_memset")  # the chrome trace's categories of GPU activity


def device_activities(trace: dict | list) -> list[Activity]:
    """The GPU activities of a chrome trace (torch.profiler's `export_chrome_trace`: complete events "X"
    of cat kernel / gpu_memcpy / gpu_memset, ts and dur in microseconds, tid the stream)."""
    events = trace.get("traceEvents", []) if isinstance(trace, dict) else trace
    out = []
    for e in events:
        if e.get("ph") == "X" and e.get("cat") in DEVICE_CATS:
            stream = (e.get("args") or {}).get("stream", e.get("tid"))
            out.append(Activity(e["name"], float(e["dur"]), float(e["ts"]), stream))
    return out


def event_activities(events) -> list[Activity]:
    """The GPU activities among torch.profiler's FunctionEvents (`prof.events()`): the second source, in
    case a torch's chrome trace holds none (time_range in microseconds, device_resource_id the stream)."""
    return [Activity(e.name, float(e.time_range.elapsed_us()), float(e.time_range.start), e.device_resource_id)
            for e in events if e.device_type == DeviceType.CUDA]


def _union(intervals: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Merge (start, end) intervals into disjoint sorted ones."""
    merged: list[list[float]] = []
    for s, e in sorted(intervals):
        if merged and s <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], e)
        else:
            merged.append([s, e])
    return [(s, e) for s, e in merged]


def _length(intervals: list[tuple[float, float]]) -> float:
    return sum(e - s for s, e in intervals)


def _overlap(a: list[tuple[float, float]], b: list[tuple[float, float]]) -> float:
    """Length of the intersection of two disjoint sorted interval lists."""
    i = j = 0
    total = 0.0
    while i < len(a) and j < len(b):
        total += max(0.0, min(a[i][1], b[j][1]) - max(a[i][0], b[j][0]))
        if a[i][1] < b[j][1]:
            i += 1
        else:
            j += 1
    return total


def _copy_overlap(acts: list[Activity]) -> dict:
    """Host -> device copies against compute kernels: their time, how much of it ran while a kernel ran."""
    timed = [a for a in acts if a.start_us is not None]
    htod = _union([(a.start_us, a.start_us + a.dur_us) for a in timed if classify(a.name) == "copy HtoD"])
    compute = [a for a in timed if not _is_copy(a.name)]
    kernels = _union([(a.start_us, a.start_us + a.dur_us) for a in compute])
    copy_ms, under_ms = _length(htod) / 1e3, _overlap(htod, kernels) / 1e3
    return {"htod_ms": copy_ms, "htod_under_kernels_ms": under_ms, "htod_exposed_ms": copy_ms - under_ms,
            "overlap_fraction": under_ms / copy_ms if copy_ms else None}


def summarize(acts: list[Activity], wall_ms: float, top: int = 3) -> dict:
    """Per category: ms, % of the summed GPU (or CPU operator) time, % of the step's wall time, launches and
    the `top` names by time; "other" lists up to 20 names. Totals: summed time of all activities (the
    categories add up to it) and of the kernels alone (no memcpy / memset), the time they ran (union over
    time and streams: busy; = the sums when starts are unknown), idle = wall - busy (launch and sync
    overhead), per-stream busy time, host -> device copy overlap."""
    by_cat: dict[str, dict[str, list[float]]] = {c: {} for c in CATEGORIES}
    for a in acts:
        ms_count = by_cat[classify(a.name)].setdefault(a.name, [0.0, 0])
        ms_count[0] += a.dur_us / 1e3
        ms_count[1] += a.count
    total_ms = sum(a.dur_us for a in acts) / 1e3
    rows = []
    for cat, names in by_cat.items():
        ms = sum(v[0] for v in names.values())
        ranked = sorted(names.items(), key=lambda kv: -kv[1][0])
        rows.append({"category": cat, "ms": ms, "pct_gpu": 100 * ms / total_ms if total_ms else 0.0,
                     "pct_step": 100 * ms / wall_ms if wall_ms else 0.0, "count": sum(v[1] for v in names.values()),
                     "top": [[n, v[0], v[1]] for n, v in ranked[: 20 if cat == "other" else top]]})
    kernels = [a for a in acts if not _is_copy(a.name)]
    timed = all(a.start_us is not None for a in acts) and bool(acts)
    streams: dict = {}
    for a in acts if timed else []:
        streams.setdefault(str(a.stream), []).append(a)
    kernel_ms = sum(a.dur_us for a in kernels) / 1e3
    busy_ms = _busy_ms(acts) if timed else total_ms
    return {"wall_ms": wall_ms, "gpu_sum_ms": total_ms, "kernel_ms": kernel_ms,
            "kernel_busy_ms": _busy_ms(kernels) if timed else kernel_ms, "gpu_busy_ms": busy_ms,
            "idle_ms": max(0.0, wall_ms - busy_ms),
            "stream_busy_ms": {s: _busy_ms(v) for s, v in sorted(streams.items())},
            "copies": _copy_overlap(acts) if timed else None, "categories": rows}


def _is_copy(name: str) -> bool:
    return name.startswith(("Memcpy", "Memset"))


def _busy_ms(acts: list[Activity]) -> float:
    """The time at least one of `acts` (with starts) ran, in ms."""
    return _length(_union([(a.start_us, a.start_us + a.dur_us) for a in acts])) / 1e3


def largest_remaining(summary: dict, exclude: tuple[str, ...] = ("attention", "linear 8-bit")) -> dict:
    """The largest category besides `exclude` (the costs issue 18 already attacked), and whether it is
    over 10% of the step's wall time (the line for attacking it next)."""
    rows = [r for r in summary["categories"] if r["category"] not in exclude]
    best = max(rows, key=lambda r: r["ms"])
    return {"category": best["category"], "ms": best["ms"], "pct_step": best["pct_step"],
            "over_10pct": best["pct_step"] > 10.0}


def _short(name: str, width: int = 56) -> str:
    return name if len(name) <= width else name[: width - 3] + "..."


def table(summary: dict, label: str = "") -> str:
    """The summary as text: one row per category, then the totals."""
    lines = [f"== {label}", f"{'category':<13} {'ms':>10} {'% gpu':>6} {'% step':>6} {'count':>6}  top kernels (ms)"]
    for r in summary["categories"]:
        shown = r["top"][:3] if r["category"] == "other" else r["top"]  # other: all listed below
        tops = "; ".join(f"{_short(n)} ({ms:.1f})" for n, ms, _ in shown)
        lines.append(f"{r['category']:<13} {r['ms']:>10.2f} {r['pct_gpu']:>6.1f} {r['pct_step']:>6.1f} "
                     f"{r['count']:>6}  {tops}")
    lines.append(f"{'total':<13} {summary['gpu_sum_ms']:>10.2f} {100.0 if summary['gpu_sum_ms'] else 0.0:>6.1f}")
    streams = ", ".join(f"{s}: {ms:.1f}" for s, ms in summary["stream_busy_ms"].items())
    lines.append(f"step wall {summary['wall_ms']:.1f} ms; kernels {summary['kernel_ms']:.1f} ms summed, running "
                 f"{summary['kernel_busy_ms']:.1f} ms; GPU busy {summary['gpu_busy_ms']:.1f} ms, idle (launch / sync "
                 f"gaps) {summary['idle_ms']:.1f} ms" + (f"; busy ms per stream: {streams}" if streams else ""))
    if (c := summary["copies"]) and c["htod_ms"]:
        lines.append(f"host->device copies {c['htod_ms']:.1f} ms, {c['htod_under_kernels_ms']:.1f} ms of it under "
                     f"compute kernels ({100 * c['overlap_fraction']:.0f}%), {c['htod_exposed_ms']:.1f} ms exposed")
    elif c:
        lines.append("no host->device copies in this step")
    other = next(r for r in summary["categories"] if r["category"] == "other")
    if other["top"]:
        lines.append("other: " + "; ".join(f"{_short(n, 100)} ({ms:.2f} ms x{k})" for n, ms, k in other["top"]))
    nxt = largest_remaining(summary)
    lines.append(f"largest besides attention and the 8-bit GEMMs: {nxt['category']} {nxt['ms']:.1f} ms, "
                 f"{nxt['pct_step']:.1f}% of the step ({'over' if nxt['over_10pct'] else 'under'} 10%)")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# profiling one step


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device) -> float:
    """Wall time of fn() in ms, the device synchronized before and after."""
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    return (time.perf_counter() - t0) * 1e3


def profile_step(fn: Callable[[], object], device: torch.device, trace: str | Path | None = None
                 ) -> tuple[float, list[Activity]]:
    """(wall ms, activities) of one fn() under torch.profiler: on CUDA the GPU's kernels, memcpys and
    memsets from the chrome trace (kept at `trace` if given); on the CPU each operator's self time."""
    cuda = device.type == "cuda"
    with profile(activities=[ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU], record_shapes=False) as prof:
        wall_ms = timed(fn, device)
    if not cuda:
        acts = [Activity(e.key, e.self_cpu_time_total, count=e.count) for e in prof.key_averages()
                if e.self_cpu_time_total > 0 and not e.key.startswith(("ProfilerStep", "[memory]"))]
        return wall_ms, acts
    return wall_ms, gpu_activities(prof, trace)


def gpu_activities(prof, trace: str | Path | None = None) -> list[Activity]:
    """The GPU activities a finished torch.profiler run recorded: from its chrome trace (kept at `trace` if
    given), else from its FunctionEvents. Raises RuntimeError when neither holds any (CUPTI missing)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "trace.json"
        prof.export_chrome_trace(str(path))
        if trace is not None:
            _replace(path, Path(trace))
        try:
            acts = device_activities(json.loads(path.read_text()))
        except ValueError as e:  # a trace this parser cannot read: the profiler's own events below
            _log(f"the chrome trace did not parse ({e}); reading the profiler's events instead")
            acts = []
    acts = acts or event_activities(prof.events())
    if not acts:
        raise RuntimeError("torch.profiler recorded no GPU activity (is CUPTI missing? torch.profiler."
                           "supported_activities() must list CUDA): nothing to classify")
    return acts


def _replace(src: Path, dst: Path) -> None:
    """Move a finished file to `dst` through a temporary name beside it."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    part = dst.with_name(dst.name + ".part")
    part.write_bytes(src.read_bytes())
    os.replace(part, dst)


def profile_steps(tmpl, hosts, *, height: int, width: int, frames: int, mode: str, cfg_batched: bool,
                  vram_gb: float | None, compile_blocks: bool = True, ffn_chunk: int | None = None,
                  low: bool = False, device: str = "cuda", top: int = 3, trace_dir: str | Path | None = None,
                  report: Callable[[dict], None] | None = None) -> dict:
    """Warm-up pass, then the steps of `bench_sampling(3)`: high step 0 timed without the profiler, high
    step 1 profiled; with `low`, high step 2 (the swap) and low step 3 profiled as well. Guided calls as
    `pipeline.sample` makes them. Returns {"settings", "warmup_s", "unprofiled_high_ms", "steps": [...]};
    each step holds `summarize`'s result plus its label, expert, timestep and the residency's copy waits,
    and is handed to `report(step)` as soon as it is done. A failure (out of memory, a kernel) ends the run
    with "error" set and the steps so far kept, as bench does."""
    cfg, dev = tmpl.cfg, torch.device(device)
    video = VideoSize(width, height, frames)
    sampling = bench_sampling(3)
    if dev.type == "cuda":
        _cap(vram_gb)
    res = Residency(tmpl, *hosts, device=dev, mode=mode, cfg_batched=cfg_batched, compile=compile_blocks,
                    ffn_chunk=ffn_chunk, measure=dev.type == "cuda")
    x, ctx, ctx_null = _inputs(cfg, video, device=device)
    out = {"settings": {"width": width, "height": height, "frames": frames, "tokens": video.tokens(cfg.patch_size),
                        "mode": mode, "cfg_batched": cfg_batched, "vram_cap_gb": vram_gb, "compile": compile_blocks,
                        "ffn_chunk": ffn_chunk, "device": str(dev)}, "steps": []}
    ts = grid(sampling)[1]  # int64 timesteps on the CPU, as `sample` passes them

    def step(i: int, expert: str):
        scale = sampling.guidance_high if expert == "high" else sampling.guidance_low
        return lambda: getattr(res, expert).guided(x, ts[i : i + 1], ctx, ctx_null, scale)

    try:
        _log("warm-up pass")
        warm = lambda: res.high.guided(x, torch.tensor([999], device=dev), ctx, ctx_null, 4.0)
        out["warmup_s"] = timed(warm, dev) / 1e3  # compilation, autotuning, the first load
        res.prepare(sampling)  # plans the copies: high steps 0-1 keep the high expert, step 2 sends the low one
        out["unprofiled_high_ms"] = timed(step(0, "high"), dev)
        runs = [(1, "high", "high-noise step")]
        if low:
            runs += [(2, "high", "last high-noise step (sends the low-noise expert)"),
                     (3, "low", "first low-noise step")]
        for i, expert, label in runs:
            _log(f"profiling: {label}")
            trace = Path(trace_dir) / f"step{i}_{expert}.json" if trace_dir else None
            wall_ms, acts = profile_step(step(i, expert), dev, trace)
            summary = summarize(acts, wall_ms, top)
            summary.update({"label": label, "expert": expert, "t": int(ts[i]), "call": res._call,
                            "copy_wait_ms": res.stats.stall_ms(res._call) if dev.type == "cuda" else 0.0})
            out["steps"].append(summary)
            if report is not None:
                report(summary)
    except Exception as e:  # an OOM or a kernel failure: keep what was measured, as bench does
        traceback.print_exc()
        out["error"] = f"{type(e).__name__}: {str(e)[:500]}"
    finally:
        if dev.type == "cuda":
            out["peak_allocated_gb"] = torch.cuda.max_memory_allocated() / 1e9
        res.release()
    return out


# ---------------------------------------------------------------------------------------------
# the command line


ATTENTION_ALIASES = {"cudnn": "sdpa-cudnn", "flash": "sdpa-flash"}


def _size(text: str) -> tuple[int, int]:
    w, _, h = text.partition("x")
    if not (w.isdigit() and h.isdigit()):
        raise argparse.ArgumentTypeError(f"size must be WIDTHxHEIGHT, e.g. 1280x720, got {text!r}")
    return int(w), int(h)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m wan_lite.bench_profile", description=__doc__.split("\n")[0])
    p.add_argument("--res", choices=sorted(RESOLUTIONS), default="720p")
    p.add_argument("--size", type=_size, help="WIDTHxHEIGHT instead of --res")
    p.add_argument("--frames", type=int, default=81)
    p.add_argument("--scheme", choices=("int8", "fp8", "none"), default="int8", help="the experts' weight format")
    p.add_argument("--vram-gb", type=float, default=24.0, help="cap PyTorch's allocator to this many GB (1e9); 0: none")
    p.add_argument("--mode", choices=("resident", "streaming"), help="default: what the planner picks")
    p.add_argument("--cfg-batched", choices=("yes", "no"), help="default: what the planner picks")
    p.add_argument("--ffn-chunk", type=int, help="tokens per FFN chunk (default: the planner's; 0: none)")
    p.add_argument("--compile", choices=("yes", "no"), help="torch.compile each block (default: the planner's)")
    p.add_argument("--attention", choices=(*attention.BACKENDS, *ATTENTION_ALIASES),
                   help="attention kernel (default: the plan's; cudnn / flash: sdpa-cudnn / sdpa-flash)")
    p.add_argument("--low", action="store_true", help="also profile the last high step (the swap) and a low step")
    p.add_argument("--top", type=int, default=3, help="kernel names listed per category")
    p.add_argument("--json", help="write the results here")
    p.add_argument("--trace-dir", help="keep each profiled step's chrome trace here (open in Perfetto)")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda", help="cpu: CPU operators (with --tiny)")
    p.add_argument("--tiny", action="store_true", help="a 2-layer 2-head model (ModelConfig.tiny), for smoke runs")
    return p


def _write_json(path: str, data: dict) -> None:
    part = f"{path}.part"
    with open(part, "w") as f:
        json.dump(data, f, indent=1)
    os.replace(part, path)


def main(argv=None) -> int:
    args = _parser().parse_args(sys.argv[1:] if argv is None else argv)
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")  # as bench: before CUDA starts
    if args.device == "cuda" and not torch.cuda.is_available():
        print("the profile needs a CUDA GPU (a CPU smoke run: --device cpu --tiny --size 64x64 --frames 5)",
              file=sys.stderr)
        return 2
    cfg = ModelConfig.tiny() if args.tiny else ModelConfig.a14b()
    width, height = args.size or RESOLUTIONS[args.res][::-1]
    vram_gb = args.vram_gb or None
    try:
        plan = make_plan(vram_gb or 1000.0, height=height, width=width, frames=args.frames, scheme=args.scheme,
                         mode=args.mode, cfg=cfg, device=args.device)
        print(plan.describe())
    except PlanError as e:  # profile anyway, as bench does
        print(f"planner: {e}")
        plan = None
    mode = args.mode or (plan.mode if plan else "streaming")
    batched = plan.cfg_batched if plan and args.cfg_batched is None else args.cfg_batched == "yes"
    chunk = (plan.ffn_chunk if plan else None) if args.ffn_chunk is None else (args.ffn_chunk or None)
    compile_blocks = args.compile == "yes" if args.compile else (plan.compile if plan else args.device == "cuda")
    attn = ATTENTION_ALIASES.get(args.attention, args.attention) or (plan.attention if plan else None)
    attention.set_backend(attn)  # what T2VPipeline._apply does with a plan
    print(f"attention: {attn or 'device default'}", flush=True)

    tmpl = runtime_template(cfg, args.scheme)
    pin = args.device == "cuda"
    hosts = (random_host_expert(tmpl, 1, pin, args.device), random_host_expert(tmpl, 2, pin, args.device))
    results = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
               "device": torch.cuda.get_device_name(0) if args.device == "cuda" else "cpu", "torch": torch.__version__,
               "argv": sys.argv if argv is None else argv, "scheme": args.scheme, "attention": attn,
               "plan": plan.to_dict() if plan else None, "category_descriptions": CATEGORIES, "steps": []}

    def report(step: dict) -> None:  # each table as soon as its step is done; the JSON so far
        print(table(step, f"{step['label']} (t={step['t']}), {args.scheme} {mode}, attention={attn or 'default'}"),
              flush=True)
        results["steps"].append(step)
        if args.json:
            _write_json(args.json, results)

    run = profile_steps(tmpl, hosts, height=height, width=width, frames=args.frames, mode=mode, cfg_batched=batched,
                        vram_gb=vram_gb, compile_blocks=compile_blocks, ffn_chunk=chunk, low=args.low,
                        device=args.device, top=args.top, trace_dir=args.trace_dir, report=report)
    results.update(run)
    if "unprofiled_high_ms" in run and run["steps"]:
        print(f"unprofiled high-noise step: {run['unprofiled_high_ms']:.1f} ms (profiled: "
              f"{run['steps'][0]['wall_ms']:.1f} ms); warm-up {run['warmup_s']:.1f} s")
    if args.json:
        _write_json(args.json, results)
    if "error" in run:
        print(f"stopped: {run['error']}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
