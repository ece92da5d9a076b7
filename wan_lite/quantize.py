"""python -m wan_lite.quantize: make quantized experts, or report how far they are from the source.

Convert (streaming, resumable, writes DST.partial/ and renames it to DST when verified):

    python -m wan_lite.quantize --ckpt SRC --out DST --scheme int8|fp8|quanto-int8|quanto-fp8|nf4
        [--calib calib/prompts.txt | --calib stats.safetensors] [--experts high,low] [--force]

Report (per-layer relative error and final-latent drift of a short denoise, same seed):

    python -m wan_lite.quantize --report --ckpt SRC --quantized DST [--steps N] [--size 832x480] [--json out.json]

(--steps 2 or fewer runs only the high-noise expert: the report's summary marks the low one not covered.)

Convert the expert files you already have (fp32/fp16/bf16, fp8 scaled, GGUF; one alone is allowed):

    python -m wan_lite.quantize --high HIGH_FILE --low LOW_FILE --out DST --scheme int8|fp8
    python -m wan_lite.quantize --ckpt COMFYUI/models --high HIGH_NAME --low LOW_NAME --out DST --scheme fp8

DST then holds high_noise_model/ + low_noise_model/; run it with python -m wan_lite.generate --high
DST/high_noise_model --low DST/low_noise_model --text-encoder FILE --vae FILE (the command is printed).

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
                                epilog="\n\n".join(__doc__.split("\n\n")[1:9]))
    p.add_argument("--ckpt", help="source model root (official or diffusers layout); with --high/--low a ComfyUI "
                   "models/ folder where they are named")
    p.add_argument("--high", help="the high-noise expert as one file (.safetensors fp32/fp16/bf16 or fp8 scaled, "
                   ".gguf) or folder; with --ckpt COMFYUI/models its name in diffusion_models/")
    p.add_argument("--low", help="the low-noise expert (same kinds as --high)")
    p.add_argument("--out", help="output folder (convert): a complete model root from --ckpt ROOT; the quantized "
                   "experts, one folder each, from --high/--low")
    p.add_argument("--scheme", choices=SCHEMES, help="quantization scheme (convert)")
    p.add_argument("--calib", help="SmoothQuant calibration: a prompts .txt (collected now, both experts are "
                                   "loaded) or a statistics .safetensors from python -m calib.collect")
    p.add_argument("--alpha", type=float, default=0.5, help="SmoothQuant migration strength (default 0.5)")
    p.add_argument("--experts", default=None, help="experts to quantize, a comma list of high, low (default: both, "
                   "or those given as --high/--low); from a root the others are linked unquantized")
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
    files = a.high is not None or a.low is not None
    if a.experts is not None and not set(a.experts.split(",")) <= {"high", "low"}:
        p.error(f"--experts takes a comma list of high, low; got {a.experts}")
    if a.ckpt is None and not files:
        p.error("give the source: --ckpt ROOT (a model root), or --high FILE --low FILE (expert files)")
    if a.report:
        if not a.quantized or files or a.ckpt is None:
            p.error("--report needs --ckpt ROOT and --quantized DST (the report compares model roots)")
    elif not (a.out and a.scheme):
        p.error("converting needs --out DST and --scheme (or pass --report --quantized DST)")
    elif a.calib and a.scheme not in ("int8", "fp8"):  # before any calibration work
        p.error(f"--calib (SmoothQuant) applies to --scheme int8 or fp8, not {a.scheme}: drop --calib")
    elif a.calib and files:
        p.error("--calib works from a model root (--ckpt ROOT): convert expert files without --calib")
    elif files and a.ckpt is not None and (a.high is None or a.low is None):
        p.error("with --ckpt COMFYUI/models name both experts (--high NAME --low NAME); --experts picks which to "
                "convert")
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

    from .keys import CheckpointError

    try:
        if a.high is not None or a.low is not None:
            return convert_expert_files(a)
        calib = load_calibration(a) if a.calib else None
        dst = convert_checkpoint(a.ckpt, a.out, a.scheme, experts=tuple((a.experts or "high,low").split(",")),
                                 calib=calib, alpha=a.alpha, force=a.force, max_shard_bytes=a.shard_mb * 2**20,
                                 progress=not a.quiet)
    except (ConversionError, CheckpointError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {dst} ({a.scheme})")
    return 0


def expert_files(a: argparse.Namespace):
    """(experts to convert {"high": path, ...}, the ComfyUI model or None, every expert given {"high": path, ...}):
    --high/--low as files or folders, or names in a ComfyUI models/ folder (--ckpt: checkpoint.open_comfyui,
    which also finds the text encoder and VAE). ValueError when --experts names one not given."""
    from .checkpoint import open_comfyui

    model = open_comfyui(a.ckpt, high=a.high, low=a.low) if a.ckpt is not None else None
    given = {"high": model.high, "low": model.low} if model else {
        k: Path(v) for k, v in (("high", a.high), ("low", a.low)) if v is not None}
    wanted = a.experts.split(",") if a.experts else list(given)
    absent = [k for k in wanted if k not in given]
    if absent or not wanted:
        raise ValueError(f"--experts {a.experts}: {', '.join(absent) or 'nothing'} not given: pass "
                         + " and ".join(f"--{k} FILE" for k in absent or ("high",)))
    return {k: given[k] for k in wanted}, model, given


def convert_expert_files(a: argparse.Namespace) -> int:
    """Convert --high/--low files into DST/high_noise_model, DST/low_noise_model; print how each file's weights
    are rounded and the generate command that runs the result."""
    from quant.convert import EXPERT_DIRS, ConversionError, check_out, convert_files, open_files, source_notes

    try:
        chosen, model, given = expert_files(a)
        check_out(Path(a.out), list(chosen.values()), a.force)  # said before the notes about the sources
    except (ValueError, ConversionError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for source in open_files(chosen, a.scheme).values():  # every file checked (headers) before any weight is read
        for note in source_notes(source, a.scheme):
            print(f"note: {note}", file=sys.stderr)
    dst = convert_files(chosen, a.out, a.scheme, force=a.force, max_shard_bytes=a.shard_mb * 2**20,
                        progress=not a.quiet)
    experts = {k: dst / EXPERT_DIRS[k] if k in chosen else given.get(k, f"{k.upper()}_NOISE_EXPERT")
               for k in ("high", "low")}
    text = model.text_encoder if model else "PATH/TO/umt5_xxl_fp16.safetensors"
    vae = model.vae if model else "PATH/TO/wan_2.1_vae.safetensors"
    print(f"wrote {dst} ({a.scheme}); run it with (--tokenizer: a folder of google/umt5-xxl's tokenizer files, "
          f"or leave it out when online):\n  python -m wan_lite.generate --high {experts['high']} --low "
          f"{experts['low']} --text-encoder {text} --vae {vae} --tokenizer PATH/TO/umt5-tokenizer "
          f"--prompt \"...\" --out video.mp4")
    return 0


if __name__ == "__main__":
    sys.exit(main())
