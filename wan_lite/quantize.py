"""python -m wan_lite.quantize: make quantized experts, or report how far they are from the source.

Convert (streaming, resumable, writes DST.partial/ and renames it to DST when verified):

    python -m wan_lite.quantize --ckpt SRC --out DST --scheme int8|fp8|quanto-int8|quanto-fp8|nf4
        [--calib calib/prompts.txt | --calib stats.safetensors] [--experts high,low] [--force]

Report (per-layer relative error and final-latent drift of a short denoise, same seed):

    python -m wan_lite.quantize --report --ckpt SRC --quantized DST [--steps N] [--size 832x480] [--json out.json]

(--steps 2 or fewer runs only the high-noise expert: the report's summary marks the low one not covered.)

SRC is a model root of either layout (official high_noise_model/ + low_noise_model/, or diffusers
transformer/ + transformer_2/). The work is done by quant.convert and quant.report.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from .config import size_arg

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def parse_args(argv=None) -> argparse.Namespace:
    from .quantized.format import SCHEMES

    p = argparse.ArgumentParser(prog="python -m wan_lite.quantize", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n\n".join(__doc__.split("\n\n")[1:5]))
    p.add_argument("--ckpt", required=True, help="source model root (official or diffusers layout)")
    p.add_argument("--out", help="output model root (convert)")
    p.add_argument("--scheme", choices=SCHEMES, help="quantization scheme (convert)")
    p.add_argument("--calib", help="SmoothQuant calibration: a prompts .txt (collected now, both experts are "
                                   "loaded) or a statistics .safetensors from python -m calib.collect")
    p.add_argument("--alpha", type=float, default=0.5, help="SmoothQuant migration strength (default 0.5)")
    p.add_argument("--experts", default="high,low", help="experts to quantize; the others are linked unquantized")
    p.add_argument("--force", action="store_true", help="replace an existing --out; discard mismatched partial work")
    p.add_argument("--shard-mb", type=int, default=512, help="shard size limit in MiB (default 512)")
    p.add_argument("--report", action="store_true", help="compare --quantized with --ckpt instead of converting")
    p.add_argument("--quantized", help="quantized model root (report)")
    p.add_argument("--steps", type=int, default=6, help="denoising steps (report; calibration)")
    p.add_argument("--size", type=size_arg, default=(832, 480),
                   help="WIDTHxHEIGHT of the report/calibration video, multiples of 16 (832x480)")
    p.add_argument("--frames", type=int, default=17, help="frames of the report/calibration video (4n+1)")
    p.add_argument("--json", help="write the report as JSON here")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="device for the report and for calibration")
    p.add_argument("--dtype", choices=DTYPES, default="bf16", help="compute dtype for the report and calibration")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    a = p.parse_args(argv)
    if a.report:
        if not a.quantized:
            p.error("--report needs --quantized DST")
    elif not (a.out and a.scheme):
        p.error("converting needs --out DST and --scheme (or pass --report --quantized DST)")
    elif a.calib and a.scheme not in ("int8", "fp8"):  # before any calibration work
        p.error(f"--calib (SmoothQuant) applies to --scheme int8 or fp8, not {a.scheme}: drop --calib")
    return a


def load_calibration(a: argparse.Namespace):
    """The --calib argument as statistics: read a .safetensors file, or collect from a prompts file now."""
    from calib.collect import load_stats, run

    path = Path(a.calib)
    if not path.is_file():
        raise SystemExit(f"--calib {path}: no such file (give calib/prompts.txt or a statistics .safetensors)")
    if path.suffix == ".safetensors":
        return load_stats(path)
    stats, _ = run(a.ckpt, prompts_file=path, size=a.size, frames=a.frames, steps=a.steps, device=a.device,
                   dtype=DTYPES[a.dtype], seed=a.seed, progress=not a.quiet)
    return stats


def main(argv=None) -> int:
    a = parse_args(argv)
    if a.report:
        from quant.report import format_report, quality_report, write_json

        r = quality_report(a.ckpt, a.quantized, steps=a.steps, size=a.size, frames=a.frames, seed=a.seed,
                           device=a.device, dtype=DTYPES[a.dtype])
        print(format_report(r))
        if a.json:
            write_json(r, a.json)
        return 0

    from quant.convert import ConversionError, convert_checkpoint

    calib = load_calibration(a) if a.calib else None
    try:
        dst = convert_checkpoint(a.ckpt, a.out, a.scheme, experts=tuple(a.experts.split(",")), calib=calib,
                                 alpha=a.alpha, force=a.force, max_shard_bytes=a.shard_mb * 2**20,
                                 progress=not a.quiet)
    except ConversionError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {dst} ({a.scheme})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
