"""Time a full-size expert's forward over several GPUs against one GPU, in one torchrun launch.

    torchrun --nproc_per_node 2 -m wan_lite.bench_parallel --res 720p --json out.json

Random weights (the same seed on every rank, bf16 where the runtime holds bf16), batch 1, one timestep.
Modes, each timed after one warm-up call, median of `--repeats`:
- `single`: rank 0 alone runs the plain WanModel (the others wait): the baseline. Its repeats alternate
  the cond and the uncond prompt, so the CFG reference costs no extra pass.
- `ulysses`: Ulysses sequence parallel over all ranks, weights replicated.
- `cfg`: one CFG-parallel guided step (cond and uncond on the two halves of the ranks).
- `ulysses-fsdp`, `cfg-fsdp`: the same with FSDP2-sharded weights (1/N of them per GPU).
A denoising step is two passes: `step s` is 2 x forward for single and ulysses, the guided call for cfg
(whose `forward s` is then one pass on each half, run at once).
Printed on rank 0: forward and step time, speed-up over single, model TFLOP/s per GPU, peak VRAM per GPU
(the largest over ranks) and the relative error against single (bf16: a few 1e-3 is rounding).
`--tiny` runs the tiny config in float32 on the CPU (gloo): the smoke test's path.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import statistics
import time

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh

from . import parallel
from .attention import resolve
from .bench import random_expert
from .config import ModelConfig, VideoSize

RES = {"480p": (832, 480), "720p": (1280, 720)}  # (width, height) in pixels: the official T2V sizes
MODES = ("single", "ulysses", "cfg", "ulysses-fsdp", "cfg-fsdp")


def forward_flops(cfg: ModelConfig, tokens: int) -> float:
    """Matmul FLOPs of one forward (DESIGN section 1): per block self-attn projections 8Ld^2, cross-attn
    q/o 4Ld^2 and k/v 4*512*d^2, FFN 4*L*d*ffn, self-attention 4L^2d, cross-attention 4*L*512*d."""
    d, n = cfg.dim, cfg.text_len
    per_block = 12 * tokens * d * d + 4 * n * d * d + 4 * tokens * d * cfg.ffn_dim + 4 * tokens * tokens * d
    return cfg.num_layers * (per_block + 4 * tokens * n * d)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _peak_gib(device: torch.device) -> float:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")


def _allocated_gib(device: torch.device) -> float:
    return torch.cuda.memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")


def _max_over_ranks(value: float, device: torch.device) -> float:
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.item()


def time_calls(fn, repeats: int, device: torch.device, *, collective: bool = True) -> tuple[float, list]:
    """Median seconds of `repeats` calls fn(i) after one warm-up fn(0) (slowest rank), and their outputs."""
    fn(0)
    times, outs = [], []
    for i in range(repeats):
        _sync(device)
        if collective:
            dist.barrier()
        start = time.perf_counter()
        outs.append(fn(i))
        _sync(device)
        times.append(time.perf_counter() - start)
    median = statistics.median(times)
    return (_max_over_ranks(median, device) if collective else median), outs


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--res", choices=sorted(RES), default="720p")
    ap.add_argument("--frames", type=int, default=81, help="video frames, 4n+1")
    ap.add_argument("--layers", type=int, default=None, help="blocks (default: all 40; fewer for a quick look)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--modes", default=",".join(MODES), help=f"comma-separated subset of {', '.join(MODES)}")
    ap.add_argument("--tiny", action="store_true", help="the tiny config in float32 (CPU smoke test)")
    ap.add_argument("--note", default="", help="free text for the JSON, e.g. the commit")
    ap.add_argument("--json", default=None, help="write the rows here (rank 0), rewritten after each mode")
    args = ap.parse_args(argv)
    asked = {m for m in args.modes.split(",") if m}
    if unknown := asked - set(MODES):
        ap.error(f"unknown mode(s) {', '.join(sorted(unknown))}: choose from {', '.join(MODES)}")
    modes = [m for m in MODES if m in asked]  # this order: single needs the unsharded model, FSDP shards it

    cfg = ModelConfig.tiny() if args.tiny else ModelConfig.a14b()
    if args.layers:
        cfg = dataclasses.replace(cfg, num_layers=args.layers)
    dtype = torch.float32 if args.tiny else torch.bfloat16
    grid = parallel.setup_from_env("ulysses", fsdp=False, num_heads=cfg.num_heads)
    if grid is None:
        ap.error("run it under torchrun with --nproc_per_node 2 or more: it compares N ranks against one")
    device, world = grid.device, grid.world_size
    grids = {"ulysses": grid}
    if any(m.startswith("cfg") for m in modes):
        grids["cfg"] = parallel.init_parallel("cfg", device=device, fsdp=False, num_heads=cfg.num_heads)
    fsdp_mesh = init_device_mesh(device.type, (world,), mesh_dim_names=("fsdp",))

    video = VideoSize(48, 16, 9) if args.tiny else VideoSize(*RES[args.res], args.frames)
    shape, frames = (1, *video.latent_shape(cfg.in_dim)), video.frames  # (B, C, F', H/8, W/8) latents
    tokens = video.tokens(cfg.patch_size)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g).to(device)
    contexts = tuple(torch.randn(1, n, cfg.text_dim, generator=g).to(device, dtype) for n in (97, 126))
    t, scale, flops = torch.tensor([950], device=device), 4.0, forward_flops(cfg, tokens)
    meta = dict(date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu", world_size=world,
                torch=torch.__version__, res="tiny" if args.tiny else args.res, frames=frames, latent=list(shape),
                tokens=tokens, layers=cfg.num_layers, dtype=str(dtype), note=args.note,
                attention=resolve(device)[0])
    if grid.is_main:
        print(_table([], meta), flush=True)

    model = random_expert(cfg, device, dtype, seed=1)
    rows, ref, sharded = [], {}, None
    for mode in modes:
        outs = []
        if mode == "single":  # rank 0 alone; its repeats alternate cond and uncond
            seconds = 0.0
            _reset_peak(device)
            resident = _max_over_ranks(_allocated_gib(device), device)
            if grid.is_main:
                seconds, outs = time_calls(lambda i: model(x, t, contexts[i % 2]), max(2, args.repeats), device,
                                           collective=False)
                ref = dict(cond=outs[0], guided=outs[1] + scale * (outs[0] - outs[1]))
            dist.barrier()
            seconds = _max_over_ranks(seconds, device)
            ranks, layout, weights = 1, "-", "full"
        else:
            base = grids[mode.removesuffix("-fsdp")]
            if mode.endswith("-fsdp"):  # shard the model in place once; later FSDP modes reuse the shards
                base = dataclasses.replace(base, fsdp_mesh=fsdp_mesh)
                sharded = sharded or parallel.parallelize(model, base)
                expert, expert.ctx = sharded, base
            else:
                expert = parallel.parallelize(model, base)
            if mode.startswith("cfg"):
                call = lambda i: expert.guided(x, t, *contexts, scale)  # noqa: B023
            else:
                call = lambda i: expert(x, t, contexts[0])  # noqa: B023
            _reset_peak(device)  # after sharding: the peak of the calls alone
            resident = _max_over_ranks(_allocated_gib(device), device)
            seconds, outs = time_calls(call, args.repeats, device)
            ranks, layout = world, f"{base.cfg_size} x {base.sp_size}"
            weights = "sharded" if mode.endswith("-fsdp") else "replicated"
        err = float("nan")
        if grid.is_main and mode != "single" and ref:
            err = rel_err(outs[-1], ref["guided"] if mode.startswith("cfg") else ref["cond"])
        step = seconds if mode.startswith("cfg") else 2 * seconds  # a denoising step is two passes
        baseline = rows[0]["step_s"] if rows and rows[0]["mode"] == "single" else step if mode == "single" else None
        rows.append(dict(mode=mode, ranks=ranks, grid=layout, weights=weights, forward_s=seconds, step_s=step,
                         speedup=baseline / step if baseline else float("nan"),
                         tflops_per_gpu=2 * flops / step / ranks / 1e12,
                         peak_gib=_max_over_ranks(_peak_gib(device), device),
                         resident_gib=resident, rel_err=err))
        del outs
        if grid.is_main:
            print(_table(rows[-1:], meta, header=False), flush=True)
            if args.json:
                with open(args.json, "w") as f:
                    json.dump(dict(meta=meta, rows=rows), f, indent=2)
    if grid.is_main:
        print("\n" + _table(rows, meta), flush=True)
    dist.barrier()
    dist.destroy_process_group()
    return rows


def _table(rows: list[dict], meta: dict, header: bool = True) -> str:
    head = (f"wan-lite parallel bench {meta['date']}: {meta['world_size']} x {meta['device']}, torch {meta['torch']}, "
            f"{meta['res']} {meta['frames']} frames, L={meta['tokens']:,}, {meta['layers']} layers, "
            f"{meta['dtype']}, attention {meta['attention']}")
    cols = ("mode", "ranks", "cfg x sp", "weights", "forward s", "step s", "speed-up", "TFLOP/s/GPU",
            "resident GiB/GPU", "peak GiB/GPU", "rel err")
    lines = [head, " | ".join(cols)] if header else []
    for r in rows:
        lines.append(" | ".join((r["mode"], str(r["ranks"]), r["grid"], r["weights"], f"{r['forward_s']:.3f}",
                                 f"{r['step_s']:.3f}", f"{r['speedup']:.2f}x", f"{r['tflops_per_gpu']:.0f}",
                                 f"{r['resident_gib']:.1f}", f"{r['peak_gib']:.1f}", f"{r['rel_err']:.1e}")))
    return "\n".join(lines)


if __name__ == "__main__":
    main()
