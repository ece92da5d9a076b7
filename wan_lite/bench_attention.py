"""python -m wan_lite.bench_attention: the fp8 attention kernel against cuDNN and flash SDPA (bf16).

At Wan2.2 A14B self-attention shapes, B=1, H=40, D=128, L = 32,760 (480p x 81 frames) and 75,600
(720p x 81): per-call milliseconds (median of triton.testing.do_bench, CUDA events, uniform random
inputs), TFLOP/s = 4 B H L^2 D / t, the ratio to cuDNN, and the relative error ||out - ref|| / ||ref||
against exact attention (fp32, over a fixed sample of query rows) on three inputs:

- `conc`: softmax rows concentrated on a few hundred keys (clusters of ~256 keys, as trained video DiTs
  attend to local tokens), keys of one cluster carrying similar values, plus a large shared K offset
  (8 per channel, against a spread of ~1.5): the case the kernel is for;
- `conc-iid`: the same scores, V independent noise per token: each e4m3 rounding of P and V then
  shows in full (nothing averages it out);
- `uniform`: q, k, v standard normal: nearly uniform attention whose output is tiny, which inflates
  every relative error.

fp8 rows (and `fp8-gluon`, the Gluon loop of attention8_gluon, sm90 only) include the quantization
pre-pass; `fp8 loop` is the attention kernel alone, `fp8 pre-pass` the pre-pass alone. Needs a CUDA
GPU with FP8 tensor cores (sm89+). Prints a table, writes every number with --json (rewritten after
each row, so a crash keeps what was measured).
"""

from __future__ import annotations

import argparse
import json
import math

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from .bench_linear import environment  # one record of the machine for both kernel benchmarks

LENGTHS = (32760, 75600)
HEADS, HEAD_DIM = 40, 128
SDPA = {"sdpa-cudnn": SDPBackend.CUDNN_ATTENTION, "sdpa-flash": SDPBackend.FLASH_ATTENTION}
INPUTS = ("conc", "conc-iid", "uniform")
REF_ROWS = 1024  # query rows the exact reference is computed for
GLUON = "fp8-gluon"  # attention8_gluon's default config (issue 18), with the pre-pass


def concentrated_inputs(B, H, L, D=HEAD_DIM, *, cluster=256, gap=14.0, spread=0.7, offset=8.0, iid_v=False, seed=0,
                        device="cuda", dtype=torch.bfloat16):
    """(q, k, v) (B, H, L, D) whose softmax rows put ~all their mass on one cluster of ~`cluster` keys.

    Keys and queries are a * u_c + noise for random unit directions u_c (c the cluster of the token):
    same-cluster scores sit `gap` (natural log units) above the others (std ~1.2), the noise spreads
    the scores inside a cluster by `spread` (std; ~140 keys of weight at 0.7). k gets a shared offset
    vector (`offset` per channel); v is the cluster's value w_c plus 0.3 noise, or independent normal
    noise with `iid_v`.
    """
    g = torch.Generator(device=device).manual_seed(seed)
    C = max(1, L // cluster)
    a = math.sqrt(gap * math.sqrt(D))  # a^2 / sqrt(D) = gap
    sigma = spread * math.sqrt(D) / a  # scores of std `spread` inside a cluster
    u = F.normalize(torch.randn(B, H, C, D, device=device, generator=g), dim=-1)  # (B, H, C, D)

    def tokens(scale):
        c = torch.randint(C, (B, H, L), device=device, generator=g)  # cluster of each token
        centre = torch.gather(u, 2, c[..., None].expand(B, H, L, D))  # (B, H, L, D)
        return c, scale * centre + sigma * torch.randn(B, H, L, D, device=device, generator=g)

    _, q = tokens(a)
    ck, k = tokens(a)
    k = k + offset * torch.randn(B, H, 1, D, device=device, generator=g).sign()
    if iid_v:
        v = torch.randn(B, H, L, D, device=device, generator=g)
    else:
        w = torch.randn(B, H, C, D, device=device, generator=g)
        v = torch.gather(w, 2, ck[..., None].expand(B, H, L, D)) + 0.3 * torch.randn(B, H, L, D, device=device,
                                                                                     generator=g)
    return q.to(dtype), k.to(dtype), v.to(dtype)


def make_inputs(kind, B, H, L, D=HEAD_DIM, seed=0, device="cuda"):
    if kind == "uniform":
        g = torch.Generator(device=device).manual_seed(seed)
        return tuple(torch.randn(B, H, L, D, device=device, generator=g, dtype=torch.bfloat16) for _ in range(3))
    return concentrated_inputs(B, H, L, D, iid_v=kind == "conc-iid", seed=seed, device=device)


def exact_rows(q, k, v, rows):
    """Exact attention (fp32 matmuls, no TF32) for query rows `rows` only: (B, H, len(rows), D) fp32."""
    B, H, _, D = q.shape
    out = torch.empty(B, H, len(rows), D, device=q.device)
    for b in range(B):
        for h in range(H):
            s = (q[b, h, rows].float() @ k[b, h].float().T) / math.sqrt(D)  # (rows, Lk)
            out[b, h] = torch.softmax(s, -1) @ v[b, h].float()
    return out


def rel_err(out, ref, rows):
    o = out[:, :, rows].float()
    return ((o - ref).norm() / ref.norm()).item()


def variants(configs):
    """name -> (q, k, v) -> out, for the SDPA baselines and each fp8 config."""
    from wan_lite import attention8 as A8

    out = {}
    for name, backend in SDPA.items():
        out[name] = lambda q, k, v, b=backend: _sdpa(q, k, v, b)
    for c in configs:
        out[f"fp8 {c.name}"] = lambda q, k, v, c=c: A8.attention_fp8(q, k, v, config=c)
    out[GLUON] = _gluon
    return out


def _gluon(q, k, v):
    """The Gluon loop (attention8_gluon, sm90 only), imported at its first call: a Triton without Gluon or a
    kernel that fails to compile is one failing row, not a failing bench."""
    from wan_lite import attention8_gluon as G

    return G.attention_fp8_gluon(q, k, v)


def _sdpa(q, k, v, backend):
    with sdpa_kernel([backend]):
        return F.scaled_dot_product_attention(q, k, v)


def kernel_info(q, k, v, config) -> dict:
    """Registers, spills, shared memory and PTX instruction counts of the compiled `_attn_fwd`."""
    from wan_lite import attention8 as A8

    x = A8.quantize(q, k, v, config.block_n)
    ck = A8.launch(x, torch.empty_like(q), config)
    ptx = ck.asm.get("ptx", "")
    return {"regs": ck.n_regs, "spills": ck.n_spills, "shared": ck.metadata.shared,
            "wgmma_e4m3": ptx.count("e4m3.e4m3"), "wgmma": ptx.count("wgmma.mma_async"),
            "ex2": ptx.count("ex2.approx"), "st_shared": ptx.count("st.shared"), "ld_shared": ptx.count("ld.shared"),
            "cp_async_bulk_tensor": ptx.count("cp.async.bulk.tensor"), "setmaxnreg": ptx.count("setmaxnreg")}


def bench(lengths=LENGTHS, configs=None, *, sdpa=True, accuracy=-1, rep_ms=1500, info=False, log=print,
          on_row=None):
    """Rows of measurements; `accuracy`: how many fp8 configs (in order) get the error checks (-1: all)."""
    import triton

    from wan_lite import attention8 as A8

    configs = list(A8.CONFIGS.values()) if configs is None else configs
    fns = variants(configs)
    names = [n for n in fns if sdpa or not n.startswith("sdpa")]
    rows = []
    for L in lengths:
        flops = 4 * HEADS * L * L * HEAD_DIM
        g = torch.Generator(device="cuda").manual_seed(L)
        sample = torch.randperm(L, device="cuda", generator=g)[:REF_ROWS].sort().values
        checked = {"sdpa-cudnn", GLUON} | {f"fp8 {c.name}" for c in (configs if accuracy < 0 else configs[:accuracy])}
        inputs = {kind: make_inputs(kind, 1, HEADS, L, seed=L) for kind in INPUTS}
        refs = {kind: exact_rows(*inputs[kind], sample) for kind in INPUTS}
        base = None
        for name in names:
            row = {"L": L, "variant": name}
            try:
                fn = fns[name]
                qkv = inputs["uniform"]
                fn(*qkv)  # compile outside the timing
                torch.cuda.synchronize()
                row["ms"] = triton.testing.do_bench(lambda fn=fn, qkv=qkv: fn(*qkv), warmup=1, rep=rep_ms,
                                                     return_mode="median")
                row["tflops"] = flops / row["ms"] / 1e9
                base = row["ms"] if name == "sdpa-cudnn" else base
                row["vs_cudnn"] = base / row["ms"] if base else None
                if name in checked:
                    for kind in INPUTS:
                        row[f"err_{kind}"] = rel_err(fn(*inputs[kind]), refs[kind], sample)
                if info and name.startswith("fp8 "):
                    row["kernel"] = kernel_info(*qkv, A8.CONFIGS[name[4:]])
            except Exception as e:  # noqa: BLE001 - a failing variant is reported, the rest still run
                row["error"] = f"{type(e).__name__}: {e}"[:400]
            rows.append(row)
            log(format_row(row))
            if on_row:
                on_row(rows)
        if configs:
            rows += _split_rows(L, inputs["uniform"], configs[0], base, rep_ms, log)
        del inputs, refs
        torch.cuda.empty_cache()
    return rows


def _split_rows(L, qkv, config, base, rep_ms, log):
    """The pre-pass and the attention loop of one config timed apart."""
    import triton

    from wan_lite import attention8 as A8

    out = torch.empty_like(qkv[0])
    x = A8.quantize(*qkv, config.block_n)
    rows = []
    for name, fn in ((f"fp8 pre-pass {config.block_n}", lambda: A8.quantize(*qkv, config.block_n)),
                     (f"fp8 loop {config.name}", lambda: A8.attention_quantized(x, out, config))):
        ms = triton.testing.do_bench(fn, warmup=1, rep=rep_ms, return_mode="median")
        row = {"L": L, "variant": name, "ms": ms}
        if "loop" in name:
            row["tflops"] = 4 * HEADS * L * L * HEAD_DIM / ms / 1e9
            row["vs_cudnn"] = base / ms if base else None
        rows.append(row)
        log(format_row(row))
    return rows


HEADER = (f"{'L':>6} {'variant':<24} {'ms':>8} {'TFLOP/s':>8} {'x cuDNN':>7} {'err conc':>9} {'conc-iid':>9}"
          f" {'uniform':>9}")


def format_row(r) -> str:
    if "error" in r:
        return f"{r['L']:>6} {r['variant']:<24} ERROR {r['error'][:200]}"
    f = lambda key, fmt: format(r[key], fmt) if r.get(key) is not None else ""  # noqa: E731
    line = (f"{r['L']:>6} {r['variant']:<24} {f('ms', '8.2f'):>8} {f('tflops', '8.0f'):>8} {f('vs_cudnn', '7.2f'):>7}"
            f" {f('err_conc', '9.2e'):>9} {f('err_conc-iid', '9.2e'):>9} {f('err_uniform', '9.2e'):>9}")
    if "kernel" in r:
        line += "  " + " ".join(f"{k}={v}" for k, v in r["kernel"].items())
    return line


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m wan_lite.bench_attention", description=__doc__.split("\n\n")[0])
    p.add_argument("--json", help="write environment + every row here")
    p.add_argument("--lengths", default=",".join(map(str, LENGTHS)), help="comma list of sequence lengths")
    p.add_argument("--configs", help="comma list of fp8 kernel configs (attention8.CONFIGS names; default all)")
    p.add_argument("--no-sdpa", action="store_true", help="skip the cuDNN and flash baselines")
    p.add_argument("--accuracy", type=int, default=-1, help="how many fp8 configs (in order) get the error checks "
                   "(-1: all)")
    p.add_argument("--rep-ms", type=int, default=1500, help="do_bench repetition time per measurement")
    p.add_argument("--info", action="store_true", help="registers, spills and PTX counts of each fp8 config")
    a = p.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bench_attention needs a CUDA GPU (sm89+ for the fp8 rows)")
    from wan_lite import attention8 as A8

    configs = [A8.CONFIGS[n] for n in a.configs.split(",")] if a.configs else None
    env = environment()
    print(f"{env['device']} (sm{''.join(map(str, env['capability']))}), torch {env['torch']}, "
          f"triton {env['triton']}, {env['date']}\n{HEADER}", flush=True)

    def save(rows):
        if a.json:
            with open(a.json, "w") as f:
                json.dump({"environment": env, "argv": argv, "rows": rows}, f, indent=1)

    rows = bench(tuple(int(t) for t in a.lengths.split(",")), configs, sdpa=not a.no_sdpa, accuracy=a.accuracy,
                 rep_ms=a.rep_ms, info=a.info, log=lambda s: print(s, flush=True), on_row=save)
    save(rows)
    print("\n" + HEADER)
    print("\n".join(format_row(r) for r in rows))


if __name__ == "__main__":
    main()
