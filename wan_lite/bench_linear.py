"""python -m wan_lite.bench_linear: the quantized Linear kernels at A14B shapes against bf16.

For each block Linear shape (K x N: 5120x5120 for self-attn q/k/v/o and cross-attn q/o, 5120x13824
for ffn.0, 13824x5120 for ffn.2) at M = 32,760 (832x480x81) and 75,600 (1280x720x81) tokens:

| variant            | what runs                                                                |
|--------------------|--------------------------------------------------------------------------|
| bf16               | F.linear(x, w, b), the baseline                                          |
| fp8 w8a8           | runtime path: fused act quant + torch._scaled_mm rowwise, fast accum, bias, bf16 out |
| fp8 _scaled_mm prec| the same without fast accumulation (WAN_LITE_FP8_FAST_ACCUM=0)           |
| fp8 Triton GEMM    | fused act quant + the Triton 8-bit GEMM in fp8 (fast accum), epilogue    |
| fp8 Triton precise | the same, fp32 promotion every K tile                                    |
| int8 w8a8          | runtime path: fused act quant + Triton int8 GEMM, dequantize epilogue    |
| int8 _int_mm       | fused act quant + torch._int_mm + a separate dequantize                  |
| w8a16              | dequantize the int8 weight to bf16, then F.linear (the fallback path)    |
| act-quant fp8/int8 | the fused activation quantization alone (GB/s: bytes read + written)     |

Activation quantization is included in every w8a8 row. Times are medians of
triton.testing.do_bench (CUDA events); TFLOP/s = 2 M N K / t. `rel err` is ||y - y_bf16|| / ||y_bf16||.
Needs a CUDA GPU (fp8 rows: sm89+). Writes the table to stdout and, with --json, every number.
"""

from __future__ import annotations

import argparse
import json
import platform
from datetime import datetime, timezone

import torch
import torch.nn.functional as F

from .config import VideoSize

SHAPES = [("attn q/k/v/o", 5120, 5120), ("ffn.0", 5120, 13824), ("ffn.2", 13824, 5120)]  # (name, K, N)
TOKENS = (VideoSize(832, 480, 81).tokens(), VideoSize(1280, 720, 81).tokens())  # 480p, 720p: 32,760 and 75,600


def variants(x, w, b):
    """name -> zero-argument callable, for one (x (M, K) bf16, w (N, K) bf16, b (N,) bf16)."""
    from .quantized import kernels as K
    from .quantized.linear import quantize_linear_weight

    m = x.shape[0]  # quantize_rows pads M to a multiple of 16: the raw matmul rows are sliced back
    w8, s8 = quantize_linear_weight(w, "int8")
    wf8, sf8 = quantize_linear_weight(w, "fp8")
    q = lambda scheme: K.quantize_rows(x, scheme)
    out = {
        "bf16": lambda: F.linear(x, w, b),
        "fp8 w8a8": lambda: K.quant_linear(x, wf8, sf8, b, None, "fp8", "w8a8", torch.bfloat16),
        "fp8 _scaled_mm prec": lambda: K.fp8_matmul(*q("fp8"), wf8, sf8, b, fast_accum=False)[:m],
        "fp8 Triton GEMM": lambda: K.w8a8_matmul(*q("fp8"), wf8, sf8, b, fast_accum=True)[:m],
        "fp8 Triton precise": lambda: K.w8a8_matmul(*q("fp8"), wf8, sf8, b, fast_accum=False)[:m],
        "int8 w8a8": lambda: K.quant_linear(x, w8, s8, b, None, "int8", "w8a8", torch.bfloat16),
        "int8 _int_mm": lambda: K.int8_matmul_torch(*q("int8"), w8, s8, b)[:m],
        "w8a16": lambda: K.quant_linear(x, w8, s8, b, None, "int8", "w8a16", torch.bfloat16),
        "act-quant fp8": lambda: q("fp8"),
        "act-quant int8": lambda: q("int8"),
    }
    return out


def bench(tokens=TOKENS, shapes=SHAPES, rep_ms: int = 200, only=None):
    import triton

    rows = []
    dev = torch.device("cuda")
    for m in tokens:
        for shape_name, k, n in shapes:
            g = torch.Generator(device=dev).manual_seed(m + k + n)
            x = torch.randn(m, k, device=dev, dtype=torch.bfloat16, generator=g)
            w = (torch.randn(n, k, device=dev, generator=g) / k**0.5).to(torch.bfloat16)
            b = torch.randn(n, device=dev, generator=g).to(torch.bfloat16) * 0.1
            y_ref = F.linear(x, w, b).float()
            base = None
            for name, fn in variants(x, w, b).items():
                if only and name not in only:
                    continue
                row = {"M": m, "K": k, "N": n, "shape": shape_name, "variant": name}
                try:
                    y = fn()  # compile / autotune outside the timing
                    torch.cuda.synchronize()
                    ms = triton.testing.do_bench(fn, warmup=25, rep=rep_ms, return_mode="median")
                except Exception as e:  # noqa: BLE001 - a failing variant is reported, the rest still run
                    row["error"] = f"{type(e).__name__}: {e}"[:300]
                    rows.append(row)
                    print(f"{m:>6} {shape_name:<13} {name:<20} ERROR {row['error']}")
                    continue
                row["ms"] = ms
                if name.startswith("act-quant"):
                    row["gbps"] = (m * k * (x.element_size() + 1) + 4 * m) / ms / 1e6
                else:
                    row["tflops"] = 2 * m * n * k / ms / 1e9
                    yf = y.float()
                    row["rel_err"] = ((yf - y_ref).norm() / y_ref.norm()).item()
                if name == "bf16":
                    base = ms
                row["vs_bf16"] = base / ms if base else None
                rows.append(row)
                del y
            del x, w, b, y_ref
            torch.cuda.empty_cache()
    return rows


def format_table(rows) -> str:
    head = f"{'M':>6} {'K x N':<12} {'shape':<13} {'variant':<20} {'ms':>8} {'TFLOP/s':>8} {'x bf16':>7}"
    lines = [head + f" {'rel err':>9}"]
    for r in rows:
        kn = f"{r['K']}x{r['N']}"
        if "error" in r:
            lines.append(f"{r['M']:>6} {kn:<12} {r['shape']:<13} {r['variant']:<20} ERROR {r['error'][:60]}")
            continue
        tf = f"{r['tflops']:8.0f}" if "tflops" in r else f"{r['gbps']:5.0f}GB/s"
        err = f"{r['rel_err']:9.2e}" if "rel_err" in r else f"{'':>9}"
        ratio = f"{r['vs_bf16']:7.2f}" if r.get("vs_bf16") else f"{'':>7}"
        lines.append(f"{r['M']:>6} {kn:<12} {r['shape']:<13} {r['variant']:<20} {r['ms']:8.3f} {tf} {ratio} {err}")
    return "\n".join(lines)


def environment() -> dict:
    import triton

    return {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "device": torch.cuda.get_device_name(),
        "capability": list(torch.cuda.get_device_capability()),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": triton.__version__,
        "python": platform.python_version(),
    }


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m wan_lite.bench linear", description=__doc__.split("\n\n")[0])
    p.add_argument("--json", help="write environment + every row here")
    p.add_argument("--tokens", default=",".join(map(str, TOKENS)), help="comma list of M values")
    p.add_argument("--rep-ms", type=int, default=200, help="do_bench repetition time per measurement")
    p.add_argument("--only", help="comma list of variants to run")
    a = p.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bench_linear needs a CUDA GPU (the quantized kernels it measures are GPU kernels)")
    env = environment()
    rows = bench(tuple(int(t) for t in a.tokens.split(",")), rep_ms=a.rep_ms,
                 only=set(a.only.split(",")) if a.only else None)
    print(f"\n{env['device']} (sm{''.join(map(str, env['capability']))}), torch {env['torch']}, "
          f"triton {env['triton']}, {env['date']}")
    print(format_table(rows))
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"environment": env, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
