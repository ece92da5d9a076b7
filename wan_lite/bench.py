"""python -m wan_lite.bench: time the denoising loop at full A14B size with random weights.

    python -m wan_lite.bench --res 720p --frames 81 --scheme int8 --vram-gb 24 [--mode resident|streaming]
                             [--steps N] [--baselines] [--json out.json]
    python -m wan_lite.bench --high FILE --low FILE [--label NAME] | --pairs LABEL=HIGH,LOW ...  (experts from files)

Both experts get random weights of the real size and format, generated on the GPU and kept in pinned
host RAM as the residency holds them (no checkpoint on disk). The process is capped with
`torch.cuda.set_per_process_memory_fraction(vram_gb / card)`, so PyTorch's allocator behaves as on a
card of that size. One warm-up pass (compilation, kernel autotuning, the first load), then
`pipeline.sample` over a short grid (`bench_sampling`): `--steps` guided steps with the high-noise
expert (the last of which swaps the low-noise expert in) and as many with the low-noise one, each
timed through the sampler's callback; per-step times are extrapolated to the official 26 + 14 steps.

Reported: seconds per step for each expert, the visible swap stall (time the compute stream waited
for weight copies during the first low-noise step, plus any host-side staging wait), peak VRAM
(allocated and reserved), host RAM (private and file-backed: `host_memory` per run, `host_peak` over
the process, sampled by wan_lite.hostmem), the 40-step total (and with the fixed 50% step cache: 13 + 7
computed steps), and the time a plain `.to("cuda")` of one expert from pageable memory takes. With
several `--attention` kernels, each one after the first also reports `final_latent_drift`: the relative
L2 difference of its final latent from the first kernel's (same experts, inputs and grid: a short
full-size denoise across the expert switch, so `--attention sdpa-cudnn,fp8` gives FP8 attention's drift).
`--baselines` adds, in the same process: our bf16 resident path without a cap, and diffusers'
`WanTransformer3DModel` with block-level group offloading (use_stream=True) under the same cap.
`--what text,vae` times the umt5 encoder and the VAE decode (random weights, real size).
`--high`/`--low` or `--pairs` time experts read from files instead (wan_lite.bench_files: opened and
placed on the host as the runtime does, each pair's speed against a baseline pair of ours).
Runs with PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True unless the variable is set.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import resource
import sys
import time
from collections.abc import Iterator
from dataclasses import replace
from datetime import datetime, timezone

import psutil
import torch

from . import attention
from .config import ModelConfig, SamplingConfig, StepCache, VideoSize
from .hostmem import PeakSampler, host_memory
from .model import WanModel
from .pipeline import computed_steps, high_steps, sample, timesteps
from .planner import RESOLUTIONS, PlanError, make_plan
from .quantized.format import quantized_linears
from .residency import HostExpert, Layout, Residency, layouts_of, template
from .scheduler import SIGMA_MAX

GB = 1e9


# ---------------------------------------------------------------------------------------------
# random experts of the real size


def runtime_template(cfg: ModelConfig, scheme: str) -> torch.nn.Module:
    """The meta-device model the residency copies onto the GPU: bf16 ("none"), or 8-bit block Linears."""
    return template(cfg, torch.bfloat16, quantized_linears(cfg, scheme))


def fill_random(name: str, t: torch.Tensor, g: torch.Generator) -> None:
    """A random value of the right scale for one tensor (weights keep activations O(1))."""
    if t.dtype in (torch.int8,):
        t.copy_(torch.randint(-127, 128, t.shape, generator=g, device=t.device, dtype=torch.int8))
    elif t.dtype == torch.float8_e4m3fn:
        t.copy_(torch.randn(t.shape, generator=g, device=t.device).mul_(100).clamp_(-448, 448))
    elif name.endswith("weight_scale"):
        t.fill_(1.0 / 127)
    elif name.endswith("modulation") or (t.ndim == 1 and "norm" not in name):
        t.normal_(0.0, 0.02, generator=g)
    elif t.ndim == 1:
        t.fill_(1.0)
    else:
        t.normal_(0.0, 1.0 / math.sqrt(t[0].numel()), generator=g)


def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def random_units(model: torch.nn.Module, seed: int, device="cuda") -> Iterator[tuple[str, Layout, torch.Tensor]]:
    """The one random-expert builder: each unit of `model`'s layout (a meta-device template will do) as
    (unit, layout, flat uint8 buffer on `device`) with random weights (`fill_random`), drawn unit by unit
    from one generator seeded with `seed` (so the same on every device of one kind; one unit in memory
    at a time unless the caller keeps them)."""
    g = torch.Generator(device).manual_seed(seed)
    for unit, lay in layouts_of(model).items():
        buf = torch.empty(lay.nbytes, dtype=torch.uint8, device=device)
        for name, view in lay.views(buf).items():
            fill_random(name, view, g)
        yield unit, lay, buf


def random_host_expert(model: torch.nn.Module, seed: int, pin: bool = True, device: str = "cuda") -> HostExpert:
    """One expert of `model`'s layout with random weights, generated on `device` (the GPU; "cpu" for the
    CPU tests of bench_profile), held in (pinned) host RAM."""
    layouts = layouts_of(model)
    _log(f"building a random expert: {sum(lay.nbytes for lay in layouts.values()) / GB:.1f} GB, pinned={pin}")
    host = HostExpert.empty(layouts, pin=pin)
    for unit, _, buf in random_units(model, seed, device):
        host.flats[unit].copy_(buf)
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
    return host


def random_expert(cfg: ModelConfig, device: torch.device, dtype: torch.dtype, seed: int) -> WanModel:
    """A WanModel on `device` with random weights (`random_units`), dtypes as `load_expert` holds them;
    each unit's tensors are views into its flat buffer, as the residency holds them on the GPU."""
    model = template(cfg, dtype)
    state = {}
    for _, lay, buf in random_units(model, seed, device):
        state.update(lay.views(buf))
    model.load_state_dict(state, assign=True)
    return model


# ---------------------------------------------------------------------------------------------
# measurements


def _cap(vram_gb: float | None) -> None:
    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction(1.0 if vram_gb is None else min(1.0, vram_gb * GB / total))
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()


def _inputs(cfg: ModelConfig, video: VideoSize, seed: int = 0, device: str = "cuda"):
    g = torch.Generator(device).manual_seed(seed)
    x = torch.randn(1, *video.latent_shape(cfg.in_dim), generator=g, device=device)  # (1, C, F', H/8, W/8)
    ctx = torch.randn(1, 120, cfg.text_dim, generator=g, device=device)  # a prompt of 120 tokens
    ctx_null = torch.randn(1, 60, cfg.text_dim, generator=g, device=device)
    return x, ctx, ctx_null


def _host_rss_gb() -> float:
    return psutil.Process().memory_info().rss / GB


def _host_memory() -> dict:
    """Host memory now, private and file-backed (wan_lite.hostmem), in GB."""
    return host_memory().to_dict()


def relative_l2(x: torch.Tensor, ref: torch.Tensor) -> float:
    """||x - ref|| / ||ref|| in float64 (the final-latent drift of one attention kernel against another)."""
    return ((x.double() - ref.double()).norm() / ref.double().norm()).item()


def extrapolate(high_s: float, low_s: float, stall_s: float, sampling: SamplingConfig | None = None) -> dict:
    """The official schedule: steps with t >= boundary on the high expert (26 of 40), the rest low; and
    the same with the fixed 50% step cache (`StepCache.half()`: 13 + 7 computed steps), whose skipped steps
    count nothing (they run no expert: a few element-wise ops on the latent, not timed here)."""
    sampling = sampling or SamplingConfig()
    n_high = high_steps(sampling)
    n_low = sampling.steps - n_high
    computed = computed_steps(replace(sampling, cache=StepCache.half()))
    c_high, c_low = sum(computed[:n_high]), sum(computed[n_high:])
    return {"steps_high": n_high, "steps_low": n_low, "denoise_total_s": n_high * high_s + n_low * low_s + stall_s,
            "cache50_steps_high": c_high, "cache50_steps_low": c_low,
            "cache50_denoise_total_s": c_high * high_s + c_low * low_s + stall_s}


def bench_sampling(steps: int) -> SamplingConfig:
    """The official sampler on a grid of 2 x `steps` steps whose first `steps` are the high-noise expert's.

    Before the shift the grid's sigmas are u_i = SIGMA_MAX (1 - i / (2n)); the shift maps u to
    s u / (1 + (s - 1) u). s is chosen so the point halfway between u_(n-1) and u_n, u = SIGMA_MAX (2n + 1) / 4n,
    lands on the boundary b: s = b (1 - u) / (u (1 - b)) (2.34 for n = 1, 5.74 for n = 5, 6.35 for n = 10).
    Raises ValueError if the truncated timesteps do not split n / n (checked with `pipeline.high_steps`).
    """
    b = SamplingConfig().boundary
    u = SIGMA_MAX * (2 * steps + 1) / (4 * steps)
    sampling = SamplingConfig(steps=2 * steps, shift=b * (1 - u) / (u * (1 - b)))
    if high_steps(sampling) != steps:
        raise ValueError(f"no {2 * steps}-step grid splits {steps} / {steps} between the experts: use fewer --steps")
    return sampling


def bench_ours(tmpl, hosts, *, height, width, frames, mode, cfg_batched, vram_gb, steps=1, label="",
               compile_blocks=False, ffn_chunk=None) -> dict:
    """Warm-up pass, then `pipeline.sample` over `bench_sampling(steps)`: `steps` guided high steps (the
    last swaps) and `steps` low steps, each timed by the sampler's callback (CUDA synchronized)."""
    cfg = tmpl.cfg
    video = VideoSize(width, height, frames)
    sampling = bench_sampling(steps)
    _cap(vram_gb)
    res = Residency(tmpl, *hosts, device="cuda", mode=mode, cfg_batched=cfg_batched, compile=compile_blocks,
                    ffn_chunk=ffn_chunk, measure=True)
    x, ctx, ctx_null = _inputs(cfg, video)
    L = video.tokens(cfg.patch_size)
    out = {"label": label, "width": width, "height": height, "frames": frames, "tokens": L, "mode": mode,
           "cfg_batched": cfg_batched, "vram_cap_gb": vram_gb, "compile": compile_blocks, "ffn_chunk": ffn_chunk,
           "weights_vram_gb": res.device_bytes / GB}
    _log(f"{label}: warm-up pass")
    try:
        t0 = time.perf_counter()
        res.high.guided(x, torch.tensor([999], device="cuda"), ctx, ctx_null, 4.0)  # warm-up and first load
        torch.cuda.synchronize()
        out["warmup_s"] = time.perf_counter() - t0
        res.prepare(sampling)  # plans the swap from the grid and the boundary
        _log(f"{label}: warm-up {out['warmup_s']:.1f} s, timing {sampling.steps} steps")
        stamps, experts = [], []

        def stamp(step: int, total: int, t: int, expert: str) -> None:  # after each step: its end time
            torch.cuda.synchronize()
            stamps.append(time.perf_counter())
            experts.append(expert)

        torch.cuda.synchronize()
        stamps.append(time.perf_counter())
        x = sample(res.high, res.low, x, ctx, ctx_null, sampling, callback=stamp)
        times = {"high": [], "low": []}
        for expert, start, end in zip(experts, stamps, stamps[1:]):
            times[expert].append(end - start)
        first_low = res._call - steps + 1
        out.update({
            "high_step_s": sum(times["high"]) / steps, "low_step_s": sum(times["low"]) / steps,
            "timesteps": [int(t) for t in timesteps(sampling)], "shift": sampling.shift,
            "swap_stall_ms": res.swap_stall_ms(),  # GPU idle between units around the switch (measure=True)
            "stall_per_low_step_ms": [res.stats.stall_ms(first_low + i) for i in range(steps)],
            "copied_gb": res.stats.bytes / GB,
            "peak_allocated_gb": torch.cuda.max_memory_allocated() / GB,
            "peak_reserved_gb": torch.cuda.max_memory_reserved() / GB,
            "finite": bool(torch.isfinite(x).all()),
        })
        out["_final_latent"] = x.float().cpu()  # main() compares it across attention kernels, then drops it
        batch = 2 if cfg_batched else 1
        out["act_bytes_per_token_dim"] = ((out["peak_allocated_gb"] - out["weights_vram_gb"]) * GB
                                          / (batch * L * cfg.dim))
        out.update(extrapolate(out["high_step_s"], out["low_step_s"], out["swap_stall_ms"] / 1e3))
    except torch.OutOfMemoryError as e:
        out["error"] = f"OOM: {str(e).splitlines()[0]}"
        out["peak_reserved_gb"] = torch.cuda.max_memory_reserved() / GB
    except Exception as e:  # a compile or kernel failure: report it, keep the other runs going
        out["error"] = f"{type(e).__name__}: {str(e)[:500]}"
    out["misses"], out["copies"] = res.stats.misses, res.stats.copies
    out["host_rss_gb"] = _host_rss_gb()
    out["host_memory"] = _host_memory()
    if out.get("swap_stall_ms", 0) > 50:
        _log(f"{label}: swap stall {out['swap_stall_ms']:.0f} ms, over 50 ms")
    res.release()
    del res
    return out


def bench_diffusers(cfg: ModelConfig, *, height, width, frames, vram_gb, label="diffusers group offload") -> dict:
    """diffusers' WanTransformer3DModel, bf16, block-level group offloading with a side stream."""
    from diffusers import WanTransformer3DModel

    _cap(None)
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device("meta"):
            model = WanTransformer3DModel(num_layers=cfg.num_layers, ffn_dim=cfg.ffn_dim,
                                          num_attention_heads=cfg.num_heads, attention_head_dim=cfg.head_dim)
    finally:
        torch.set_default_dtype(torch.float32)
    model = model.to_empty(device="cpu").eval().requires_grad_(False)
    g = torch.Generator("cuda").manual_seed(3)
    for name, p in model.named_parameters():  # random on the GPU, parameter by parameter
        buf = torch.empty_like(p, device="cuda")
        fill_random(name, buf, g)
        p.data.copy_(buf)
    model.enable_group_offload(onload_device=torch.device("cuda"), offload_device=torch.device("cpu"),
                               offload_type="block_level", num_blocks_per_group=1, use_stream=True)
    pad = lambda c: torch.nn.functional.pad(c, (0, 0, 0, cfg.text_len - c.shape[1]))  # as WanPipeline does
    x, ctx, ctx_null = _inputs(cfg, VideoSize(width, height, frames))
    x, ctx, ctx_null = x.bfloat16(), pad(ctx).bfloat16(), pad(ctx_null).bfloat16()
    out = {"label": label, "width": width, "height": height, "frames": frames, "vram_cap_gb": vram_gb}
    _cap(vram_gb)
    try:
        with torch.no_grad():
            t = torch.tensor([999], device="cuda")
            t0 = time.perf_counter()
            model(x, t, ctx_null, return_dict=False)  # warm-up (pins, first kernels)
            torch.cuda.synchronize()
            out["warmup_s"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            cond = model(x, t, ctx, return_dict=False)[0].float()
            uncond = model(x, t, ctx_null, return_dict=False)[0].float()
            v = uncond + 4.0 * (cond - uncond)
            torch.cuda.synchronize()
            out["step_s"] = time.perf_counter() - t0
        out.update({"peak_allocated_gb": torch.cuda.max_memory_allocated() / GB,
                    "peak_reserved_gb": torch.cuda.max_memory_reserved() / GB, "finite": bool(torch.isfinite(v).all())})
        out.update(extrapolate(out["step_s"], out["step_s"], 0.0))
    except torch.OutOfMemoryError as e:
        out["error"] = f"OOM: {str(e).splitlines()[0]}"
        out["peak_reserved_gb"] = torch.cuda.max_memory_reserved() / GB
    out["host_rss_gb"] = _host_rss_gb()
    out["host_memory"] = _host_memory()
    del model
    return out


def bench_copy(host: HostExpert) -> dict:
    """H2D bandwidth: one block from pinned RAM, and a plain .to('cuda') of pageable memory."""
    _cap(None)
    src = host.flats["blocks.0"]
    dst = torch.empty_like(src, device="cuda")
    dst.copy_(src, non_blocking=True)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(5):
        dst.copy_(src, non_blocking=True)
    torch.cuda.synchronize()
    pinned = 5 * src.numel() / (time.perf_counter() - t0) / GB
    pageable = torch.empty(2 * 2**30, dtype=torch.uint8)
    pageable.fill_(1)
    t0 = time.perf_counter()
    pageable.to("cuda")
    torch.cuda.synchronize()
    pageable_gbs = pageable.numel() / (time.perf_counter() - t0) / GB
    return {"pinned_h2d_gb_s": pinned, "pageable_h2d_gb_s": pageable_gbs,
            "plain_swap_s": host.nbytes / GB / pageable_gbs, "expert_gb": host.nbytes / GB}


def bench_text() -> dict:
    """umt5-xxl encoder, bf16, random weights of the real size: one 120-token prompt."""
    from transformers import UMT5Config, UMT5EncoderModel

    _cap(None)
    config = UMT5Config(vocab_size=256384, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
                        feed_forward_proj="gated-gelu", relative_attention_num_buckets=32)
    with torch.device("meta"):
        model = UMT5EncoderModel(config)
    model = model.to_empty(device="cuda").to(torch.bfloat16).eval()
    g = torch.Generator("cuda").manual_seed(4)
    with torch.no_grad():
        for name, p in model.named_parameters():
            fill_random(name, p, g)
        ids = torch.randint(0, 256384, (1, 120), device="cuda")
        model(input_ids=ids)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        model(input_ids=ids)
        torch.cuda.synchronize()
    out = {"label": "text encoder (umt5-xxl bf16, GPU)", "encode_s": time.perf_counter() - t0,
           "weights_gb": sum(p.numel() * 2 for p in model.parameters()) / GB,
           "peak_allocated_gb": torch.cuda.max_memory_allocated() / GB}
    del model
    return out


def bench_vae(width: int, height: int, frames: int, vram_gb: float | None, dtype=torch.float32) -> dict:
    """Wan2.1 VAE decode (diffusers AutoencoderKLWan, random weights), tiled as the planner says, in the
    pipeline's float32 (the official dtype)."""
    from diffusers import AutoencoderKLWan

    from .planner import make_plan
    from .vae import VAE

    _cap(vram_gb)
    with torch.device("meta"):
        model = AutoencoderKLWan()
    model = model.to_empty(device="cuda").to(dtype)
    g = torch.Generator("cuda").manual_seed(5)
    with torch.no_grad():
        for name, p in model.named_parameters():
            fill_random(name, p, g)
    vae = VAE(model, [0.0] * 16, [1.0] * 16, device=torch.device("cuda"), dtype=dtype)
    tile = make_plan(vram_gb or 80, height=height, width=width, frames=frames).vae_tile
    lat = torch.randn(1, *VideoSize(width, height, frames).latent_shape(), device="cuda")  # (1, 16, F', H/8, W/8)
    out = {"label": f"VAE decode ({str(dtype).split('.')[-1]})", "width": width, "height": height,
           "frames": frames, "tile": tile, "vram_cap_gb": vram_gb}
    try:
        t0 = time.perf_counter()
        video = vae.decode(lat, tile=tile)
        torch.cuda.synchronize()
        out.update({"decode_s": time.perf_counter() - t0, "peak_allocated_gb": torch.cuda.max_memory_allocated() / GB,
                    "shape": list(video.shape)})
    except torch.OutOfMemoryError as e:
        out["error"] = f"OOM: {str(e).splitlines()[0]}"
    del vae, model
    return out


# ---------------------------------------------------------------------------------------------
# the command line


def _empty_host_cache() -> None:
    """Return freed pinned blocks to the OS (the caller has dropped its host experts first), else the
    next build doubles host RAM."""
    gc.collect()
    torch._C._host_emptyCache()


WHAT = ("ours", "bf16", "diffusers", "text", "vae")


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["linear"]:  # python -m wan_lite.bench linear ...: the 8-bit Linear kernels alone
        from .bench_linear import main as bench_linear

        return bench_linear(argv[1:])
    p = argparse.ArgumentParser(prog="python -m wan_lite.bench", description=__doc__.split("\n")[0],
                                epilog="python -m wan_lite.bench linear --help: the 8-bit Linear kernels alone")
    p.add_argument("--res", choices=sorted(RESOLUTIONS), default="480p")
    p.add_argument("--frames", type=int, default=81)
    p.add_argument("--scheme", "--quant", dest="scheme", choices=("int8", "fp8", "none"), default="int8",
                   help="the experts' weight format (none: bf16)")
    p.add_argument("--vram-gb", type=float, default=24.0, help="cap PyTorch's allocator to this many GB (1e9); 0: none")
    p.add_argument("--mode", choices=("resident", "streaming"), help="default: what the planner picks")
    p.add_argument("--cfg-batched", choices=("yes", "no"), help="default: what the planner picks")
    p.add_argument("--ffn-chunk", type=int, help="tokens per FFN chunk (default: the planner's; 0: none)")
    p.add_argument("--steps", type=int, default=1, help="measured steps per expert (after one warm-up pass)")
    p.add_argument("--compile", choices=("yes", "no"), default="yes", help="torch.compile each block")
    p.add_argument("--what", default="ours", help=f"comma list of {', '.join(WHAT)}: ours = --scheme/--mode "
                   "under the cap; bf16 = our bf16 resident path without a cap; diffusers = WanTransformer3DModel "
                   "with group offloading under the cap; text / vae = the umt5 encoder / the VAE decode")
    p.add_argument("--baselines", action="store_true", help="shorthand: add bf16 and diffusers to --what")
    p.add_argument("--attention", help=f"attention kernel for ours, or a comma list of them, each timed on the same "
                   f"experts ({', '.join(attention.BACKENDS)}; default: the plan's, fp8 with 8-bit experts on sm89+)")
    p.add_argument("--json", help="write the results here")
    p.add_argument("--high", help="time the experts read from files instead of random ones (any expert source: our "
                   "folder, a safetensors / fp8-scaled / GGUF file), as the runtime opens and places them; with --low")
    p.add_argument("--low", help="the low-noise expert's file (the same file as --high is fine)")
    p.add_argument("--label", default="files", help="the name of the --high/--low pair in the table")
    p.add_argument("--pairs", nargs="+", action="extend", metavar="LABEL=HIGH,LOW",
                   help="several pairs in one run, each against the first pair of our own folders with the same "
                   "scheme (wan_lite.bench_files)")
    p.add_argument("--load-threads", type=int, default=1, help="with files: threads filling the pinned RAM (1: as "
                   "the runtime does; more: the one-thread time is estimated)")
    args = p.parse_args(argv)
    # as measured (before CUDA starts): less fragmentation, reserved within 1.05x of allocated
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    if not torch.cuda.is_available():
        print("the benchmark needs a CUDA GPU", file=sys.stderr)
        return 2
    if args.high or args.low or args.pairs:  # experts from files (wan_lite.bench_files)
        from .bench_files import run_pairs

        return run_pairs(args)
    what = set(args.what.split(",")) | ({"bf16", "diffusers"} if args.baselines else set())
    if what - set(WHAT):
        p.error(f"--what: unknown {', '.join(sorted(what - set(WHAT)))}; choose from {', '.join(WHAT)}")
    vram_gb = args.vram_gb or None

    cfg = ModelConfig.a14b()
    height, width = RESOLUTIONS[args.res]
    try:
        plan = make_plan(vram_gb or 1000.0, height=height, width=width, frames=args.frames, scheme=args.scheme,
                         mode=args.mode)
        print(plan.describe())
        mode, batched, chunk = plan.mode, plan.cfg_batched, plan.ffn_chunk
    except PlanError as e:  # measure anyway: the planner's estimate is what is being checked
        print(f"planner: {e}")
        plan, mode, batched, chunk = None, args.mode or "streaming", False, None
    attns = args.attention.split(",") if args.attention else [plan.attention if plan else None]
    for name in attns:
        if name is not None and name not in attention.BACKENDS:
            p.error(f"--attention: unknown {name!r}; choose from {', '.join(attention.BACKENDS)}")
    batched = batched if args.cfg_batched is None else args.cfg_batched == "yes"
    chunk = chunk if args.ffn_chunk is None else (args.ffn_chunk or None)
    results = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
               "device": torch.cuda.get_device_name(0), "torch": torch.__version__, "argv": sys.argv,
               "plan": plan.to_dict() if plan else None, "runs": []}

    def record(r):
        results["runs"].append(r)
        print(json.dumps(r), flush=True)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(results, f, indent=1)

    compile_blocks = args.compile == "yes"
    memory = PeakSampler().start()  # peak host RAM, private and file-backed, over all runs
    common = dict(height=height, width=width, frames=args.frames, steps=args.steps, ffn_chunk=chunk)
    reference = None  # the first attention kernel's final latent and label: the others' drift is against it
    if "ours" in what:
        tmpl = runtime_template(cfg, args.scheme)
        hosts = (random_host_expert(tmpl, 1), random_host_expert(tmpl, 2))
        record(bench_copy(hosts[0]))
        for attn in attns:
            attention.set_backend(attn)  # what T2VPipeline._apply does with a plan
            torch._dynamo.reset()  # compiled blocks traced with the last backend must not serve this one
            print(f"attention: {attn or 'device default'}", flush=True)
            run = bench_ours(tmpl, hosts, mode=mode, cfg_batched=batched, vram_gb=vram_gb,
                             label=f"wan-lite {args.scheme} {mode} attention={attn}", compile_blocks=compile_blocks,
                             **common)
            final = run.pop("_final_latent", None)
            if final is not None and reference is None:
                reference = (final, run["label"])
            elif final is not None:  # the same experts, inputs and grid: only the attention kernel differs
                run["final_latent_drift"] = {"against": reference[1], "rel_l2": relative_l2(final, reference[0])}
            record(run)
            if compile_blocks and "error" in run and not run["error"].startswith("OOM"):  # measure eager instead
                record(bench_ours(tmpl, hosts, mode=mode, cfg_batched=batched, vram_gb=vram_gb,
                                  label=f"wan-lite {args.scheme} {mode} attention={attn} (eager: compile failed)",
                                  **common))
        del hosts
        _empty_host_cache()
    attention.set_backend(attns[0])  # the other runs (bf16, diffusers) with the first backend, as before the list
    if "bf16" in what:
        tmpl16 = runtime_template(cfg, "none")
        hosts = (random_host_expert(tmpl16, 1), random_host_expert(tmpl16, 2))
        record(bench_ours(tmpl16, hosts, mode="resident", cfg_batched=False, vram_gb=None,
                          label="wan-lite bf16 resident, no cap", compile_blocks=compile_blocks, **common))
        del hosts
        _empty_host_cache()
    if "diffusers" in what:
        record(bench_diffusers(cfg, height=height, width=width, frames=args.frames, vram_gb=vram_gb))
    if "text" in what:
        record(bench_text())
    if "vae" in what:
        record(bench_vae(width, height, args.frames, vram_gb))
    results["host_peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GB
    results["host_peak"] = memory.stop().to_dict()  # private_gb, file_gb, shmem_gb, hwm_gb, pinned_gb
    print(f"peak host RAM {memory.peak.describe()}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
