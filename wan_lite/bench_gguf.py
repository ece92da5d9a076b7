"""python -m wan_lite.bench_gguf: GGUF dequantization of one A14B ffn.0 weight, numpy against torch.

One (13824, 5120) weight (70.8M values, the largest block Linear of Wan2.2-T2V-A14B) in Q8_0 and in
Q4_K, as random blocks with valid fp16 scales (the time does not depend on the values):

| path                 | what runs                                                                  |
|----------------------|----------------------------------------------------------------------------|
| numpy                | `gguf.quants.dequantize` (one thread): what GGUF experts were read with     |
| numpy + int8         | the same, then `quantize_linear_weight` per output channel (the old int8)   |
| torch cpu            | `formats.ggml.dequantize` on the CPU (torch.get_num_threads() threads)      |
| torch cpu + int8     | `formats.ggml.dequantize_rows_int8` on the CPU (what ExpertFile now does)   |
| torch cuda           | `ggml.dequantize` with the bytes already on the GPU                         |
| torch cuda + int8    | `dequantize_rows_int8(device="cuda")`: CPU bytes in, CPU int8 out, as a load |

Times are the best of --repeat runs (numpy rows: one run), in seconds; the CUDA rows synchronize. The
table goes to stdout and, with --json, every number with the thread count and device to that file.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from datetime import datetime, timezone

import torch

from .formats import ggml
from .quantized.linear import quantize_linear_weight

SHAPE = (13824, 5120)  # A14B ffn.0: (out, in)
QTYPES = ("Q8_0", "Q4_K")
SCALE_OFFSETS = {"Q8_0": (0,), "Q4_K": (0, 2)}  # byte offsets of the fp16 scale fields in a block (d, dmin)


def random_blocks(qtype: str, shape: tuple[int, int], seed: int = 0) -> torch.Tensor:
    """(rows, bytes per row) uint8: random quants, fp16 scales drawn in 1e-3 .. 1e-2 (valid, finite)."""
    per, size = ggml.BLOCKS[qtype]
    g = torch.Generator().manual_seed(seed)
    n = shape[0] * shape[1] // per
    blocks = torch.randint(0, 256, (n, size), dtype=torch.uint8, generator=g)
    for off in SCALE_OFFSETS[qtype]:
        scale = (torch.rand(n, generator=g) * 9e-3 + 1e-3).half()  # (n,)
        blocks[:, off: off + 2] = scale.view(torch.uint8).reshape(n, 2)
    return blocks.reshape(shape[0], -1)


def timed(fn, repeat: int, cuda: bool = False) -> float:
    """Best wall time of `repeat` calls of fn (seconds), the GPU synchronized around each."""
    best = float("inf")
    for _ in range(repeat):
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return best


PATHS = ("numpy", "numpy + int8", "torch cpu", "torch cpu + int8", "torch cuda", "torch cuda + int8")  # `paths`


def paths(raw: torch.Tensor, qtype: str) -> dict[str, tuple]:
    """name -> (zero-argument callable, runs on CUDA, repeats factor) for one weight's bytes."""
    import gguf

    kind = gguf.GGMLQuantizationType[qtype]
    data = raw.numpy()

    def numpy_int8():
        return quantize_linear_weight(torch.from_numpy(gguf.quants.dequantize(data, kind)), "int8")

    out = {
        "numpy": (lambda: gguf.quants.dequantize(data, kind), False, 0),
        "numpy + int8": (numpy_int8, False, 0),
        "torch cpu": (lambda: ggml.dequantize(raw, qtype, SHAPE), False, 1),
        "torch cpu + int8": (lambda: ggml.dequantize_rows_int8(raw, qtype, SHAPE), False, 1),
    }
    if torch.cuda.is_available():
        on_gpu = raw.cuda()
        out["torch cuda"] = (lambda: ggml.dequantize(on_gpu, qtype, SHAPE), True, 1)
        out["torch cuda + int8"] = (lambda: ggml.dequantize_rows_int8(raw, qtype, SHAPE, device="cuda"), True, 1)
    return out


def bench(repeat: int, only: set[str] | None = None) -> list[dict]:
    """One row per (type, path): seconds and values per second."""
    rows = []
    for qtype in QTYPES:
        raw = random_blocks(qtype, SHAPE)
        for name, (fn, cuda, rep) in paths(raw, qtype).items():
            if only and name not in only:
                continue
            fn()  # warm-up (CUDA context, kernels, page cache)
            sec = timed(fn, max(1, repeat * rep), cuda)
            rows.append({"qtype": qtype, "path": name, "seconds": sec, "mvalues_per_s": SHAPE[0] * SHAPE[1] / sec / 1e6,
                         "bytes": raw.numel()})
    base = {(r["qtype"], r["path"].removeprefix("numpy").strip()): r["seconds"] for r in rows
            if r["path"].startswith("numpy")}
    for r in rows:  # speed-up over the numpy path doing the same work (dequantize, or + int8)
        ref = base.get((r["qtype"], "+ int8" if r["path"].endswith("+ int8") else ""))
        r["speedup"] = ref / r["seconds"] if ref else None
    return rows


def environment() -> dict:
    cuda = torch.cuda.is_available()
    return {"torch": torch.__version__, "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
            "cpu": platform.processor() or platform.machine(), "device": torch.cuda.get_device_name() if cuda else None,
            "shape": list(SHAPE), "date": datetime.now(timezone.utc).isoformat(timespec="seconds")}


def format_table(rows: list[dict]) -> str:
    lines = [f"{'type':6} {'path':18} {'seconds':>9} {'Mvalues/s':>10} {'vs numpy':>9}"]
    for r in rows:
        speed = f"{r['speedup']:.1f}x" if r["speedup"] else "-"
        lines.append(f"{r['qtype']:6} {r['path']:18} {r['seconds']:9.3f} {r['mvalues_per_s']:10.0f} {speed:>9}")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m wan_lite.bench_gguf", description=__doc__.split("\n\n")[0])
    p.add_argument("--json", help="write the environment and every row here")
    p.add_argument("--repeat", type=int, default=3, help="runs per torch path (the best is kept)")
    p.add_argument("--threads", type=int, help="torch.set_num_threads first (default: torch's own choice)")
    p.add_argument("--only", help=f"comma list of paths to run, of: {', '.join(PATHS)} (cuda ones need a GPU)")
    a = p.parse_args(argv)
    only = set(a.only.split(",")) if a.only else None
    if only and (unknown := only - set(PATHS)):
        p.error(f"--only: unknown {', '.join(sorted(unknown))}; choose from {', '.join(PATHS)}")
    if a.threads:
        torch.set_num_threads(a.threads)
    env = environment()
    rows = bench(a.repeat, only)
    print(f"\nA14B ffn.0 {SHAPE[0]}x{SHAPE[1]}: torch {env['torch']}, {env['threads']} threads "
          f"({env['cpu_count']} CPUs), GPU {env['device'] or 'none'}, {env['date']}")
    print(format_table(rows))
    if a.json:
        tmp = a.json + ".tmp"
        with open(tmp, "w") as f:
            json.dump({"environment": env, "rows": rows}, f, indent=1)
        os.replace(tmp, a.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
