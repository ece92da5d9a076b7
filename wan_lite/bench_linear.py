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

`--variants grouped,wide,...` instead times the 8-bit GEMM alone (operands already quantized, the
dequantizing epilogue included) at the GEMMs of one 720p guided step (STEP_GEMMS: 28 per block and CFG
pass, as the profile counted), for the Triton variants of `kernels.GEMMS` and two cuBLASLt ceilings:
"cublas-fp8" (torch._scaled_mm on e4m3 operands, rowwise scales, bias, bf16 out: the same epilogue) and
"cublas-int8" (torch._int_mm, int32 out, no epilogue). Per shape: ms, TOPS, x grouped (the current
kernel, always run first), rel err against grouped's output; then each variant's GEMM time for the
whole step (sum of calls x ms x blocks x 2 passes). All Triton variants are autotuned on first use:
compiling their 35 distinct configs (~1-2 s each) and timing each at 6 shapes is most of the run.
"""

from __future__ import annotations

import argparse
import json
import platform
from datetime import datetime, timezone

import torch
import torch.nn.functional as F

from .config import ModelConfig, VideoSize
from .planner import FFN_CHUNK
from .quantized.kernels import GEMMS

SHAPES = [("attn q/k/v/o", 5120, 5120), ("ffn.0", 5120, 13824), ("ffn.2", 13824, 5120)]  # (name, K, N)
TOKENS = (VideoSize(832, 480, 81).tokens(), VideoSize(1280, 720, 81).tokens())  # 480p, 720p: 32,760 and 75,600


def step_gemms(tokens: int = TOKENS[1], chunk: int = FFN_CHUNK, cfg: ModelConfig | None = None):
    """The 8-bit GEMMs of one block pass at `tokens` video tokens: [(name, M, K, N, calls)].

    Per block and pass: self-attn q/k/v/o and cross-attn q/o over the video tokens, cross-attn k/v over
    the text tokens, ffn.0 and ffn.2 per FFN chunk (Block.ffn_chunk; the last chunk is the remainder).
    At 720p: 6 + 2 + 2 x 10 = 28 calls, 2,240 in a guided step of 40 blocks (the profile's count).
    """
    cfg = cfg or ModelConfig.a14b()
    d, f = cfg.dim, cfg.ffn_dim
    full, last = divmod(tokens, chunk)
    rows = [("q/k/v/o, cross q/o", tokens, d, d, 6), ("cross k/v (text)", cfg.text_len, d, d, 2),
            ("ffn.0 chunk", chunk, d, f, full), ("ffn.2 chunk", chunk, f, d, full)]
    if last:
        rows += [("ffn.0 last chunk", last, d, f, 1), ("ffn.2 last chunk", last, f, d, 1)]
    return rows


STEP_GEMMS = step_gemms()
CEILINGS = ("cublas-fp8", "cublas-int8")  # library GEMMs, measured beside the Triton variants
GEMM_VARIANT_NAMES = GEMMS + CEILINGS


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


def _timed(fn, rep_ms: int):
    """(fn's output, median milliseconds of do_bench): the first call compiles / autotunes outside the timing."""
    import triton

    y = fn()
    torch.cuda.synchronize()
    return y, triton.testing.do_bench(fn, warmup=25, rep=rep_ms, return_mode="median")


def bench(tokens=TOKENS, shapes=SHAPES, rep_ms: int = 200, only=None):

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
                    y, ms = _timed(fn, rep_ms)
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


def gemm_operands(m: int, k: int, n: int, dev):
    """Random quantized operands of one GEMM: int8 (a (M, K), w (N, K)), their e4m3 twins, float32
    scales a_scale (M, 1) and w_scale (N,), bias (N,) bf16. Scales ~ 1 / (127^2 sqrt K): outputs O(1)."""
    g = torch.Generator(device=dev).manual_seed(m + k + n)
    a = torch.randint(-127, 128, (m, k), device=dev, dtype=torch.int8, generator=g)
    w = torch.randint(-127, 128, (n, k), device=dev, dtype=torch.int8, generator=g)
    sa = (torch.rand(m, 1, device=dev, generator=g) + 0.5) / (127 * k**0.5)
    sw = (torch.rand(n, device=dev, generator=g) + 0.5) / 127
    bias = (torch.randn(n, device=dev, generator=g) * 0.1).to(torch.bfloat16)
    a8 = (torch.randn(m, k, device=dev, generator=g) * 64).to(torch.float8_e4m3fn)
    w8 = (torch.randn(n, k, device=dev, generator=g) * 64).to(torch.float8_e4m3fn)
    return a, w, a8, w8, sa, sw, bias


def gemm_call(name: str, ops):
    """Variant name -> zero-argument callable on `gemm_operands`' result."""
    from .quantized import kernels as K

    a, w, a8, w8, sa, sw, bias = ops
    if name == "cublas-fp8":
        return lambda: K.fp8_matmul(a8, sa, w8, sw, bias)
    if name == "cublas-int8":
        return lambda: torch._int_mm(a, w.t())  # (M, N) int32: the library GEMM without an epilogue
    K.gemm_choice(name)  # an unknown name raises here, naming the choices
    return lambda: K.w8a8_matmul(a, sa, w, sw, bias, variant=name)


def bench_gemms(names, gemms=STEP_GEMMS, rep_ms: int = 100, blocks: int = 40, passes: int = 2):
    """Time each GEMM variant at each shape of `gemms` ((name, M, K, N, calls)); "grouped" runs first
    as the baseline. Returns (rows, step): rows per shape and variant; step: variant -> ms of 8-bit GEMM
    in one step (calls x ms x blocks x passes, None if a shape failed)."""

    from .quantized import kernels as K

    names = ["grouped"] + [v for v in names if v != "grouped"]
    for v in names:
        if v not in CEILINGS:
            K.gemm_choice(v)  # raises before any GPU work on an unknown name
    dev = torch.device("cuda")
    rows, step = [], dict.fromkeys(names, 0.0)
    for shape_name, m, k, n, calls in gemms:
        ops = gemm_operands(m, k, n, dev)
        base = base_out = None
        for v in names:
            row = {"M": m, "K": k, "N": n, "shape": shape_name, "calls": calls, "variant": v}
            fn = gemm_call(v, ops)
            try:
                y, ms = _timed(fn, rep_ms)
            except Exception as e:  # noqa: BLE001 - a failing variant is reported, the rest still run
                row["error"] = f"{type(e).__name__}: {e}"[:300]
                rows.append(row)
                step[v] = None
                print(f"{m:>6} {shape_name:<20} {v:<15} ERROR {row['error']}", flush=True)
                continue
            base = ms if v == "grouped" else base
            base_out = y.float() if v == "grouped" else base_out
            row.update(ms=ms, tops=2 * m * n * k / ms / 1e9, x_grouped=base / ms if base else None)
            if v not in CEILINGS and base_out is not None:
                row["rel_err"] = ((y.float() - base_out).norm() / base_out.norm()).item()
            if step[v] is not None:
                step[v] += calls * ms * blocks * passes
            rows.append(row)
            print(format_gemm_row(row), flush=True)
            del y
        del ops, base_out
        torch.cuda.empty_cache()
    return rows, step


def format_gemm_row(r) -> str:
    kn = f"{r['M']}x{r['K']}x{r['N']}"
    if "error" in r:
        return f"{kn:<18} {r['shape']:<20} {r['variant']:<15} ERROR {r['error'][:60]}"
    ratio = f"{r['x_grouped']:6.3f}" if r.get("x_grouped") else f"{'':>6}"
    err = f"{r['rel_err']:9.2e}" if "rel_err" in r else f"{'':>9}"
    return f"{kn:<18} {r['shape']:<20} {r['variant']:<15} {r['ms']:8.3f} {r['tops']:7.0f} {ratio} {err}"


def format_gemm_table(rows, step) -> str:
    head = f"{'M x K x N':<18} {'shape':<20} {'variant':<15} {'ms':>8} {'TOPS':>7} {'x grp':>6} {'err/grp':>9}"
    lines = [head] + [format_gemm_row(r) for r in rows]
    base = step.get("grouped")
    lines.append("\n8-bit GEMM ms in one guided step (calls x ms x 40 blocks x 2 passes):")
    for v, ms in step.items():
        ratio = f"  x grouped {base / ms:.3f}" if ms and base else ""
        lines.append(f"  {v:<15} {'failed' if ms is None else f'{ms:9.1f}'}{ratio}")
    return "\n".join(lines)


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
    p.add_argument("--variants", help="comma list of 8-bit GEMM variants to time alone at the 720p step's GEMMs "
                   f"instead (any of {','.join(GEMM_VARIANT_NAMES)}; grouped always runs, as the baseline)")
    a = p.parse_args(argv)
    if a.variants:
        unknown = set(a.variants.split(",")) - set(GEMM_VARIANT_NAMES)
        if unknown:
            p.error(f"unknown --variants {', '.join(sorted(unknown))}: choose from {','.join(GEMM_VARIANT_NAMES)}")
    if not torch.cuda.is_available():
        raise SystemExit("bench_linear needs a CUDA GPU (the quantized kernels it measures are GPU kernels)")
    env = environment()
    if a.variants:
        rows, step = bench_gemms(a.variants.split(","), rep_ms=a.rep_ms)
        print(f"\n{env['device']} (sm{''.join(map(str, env['capability']))}), torch {env['torch']}, "
              f"triton {env['triton']}, {env['date']}")
        print(format_gemm_table(rows, step))
        if a.json:
            with open(a.json, "w") as f:
                json.dump({"environment": env, "rows": rows, "step_ms": step}, f, indent=1)
        return
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
