"""python -m wan_lite.generate: one prompt -> one mp4, with a progress bar and a closing summary.

    python -m wan_lite.generate --ckpt Wan2.2-T2V-A14B --prompt "a red fox in snow" --out fox.mp4

User errors (bad size or frame count, empty prompt, a setting out of range, missing or wrong
checkpoint files, an output that cannot be created) end with one line on stderr and exit code 2,
before any model loads: the arguments and the output path are checked before torch is even imported
(an answer in well under a second), the model's configs and headers before any weight is read. A
failed run leaves no partial mp4; an existing mp4 is not replaced (a new name is printed) unless
--overwrite. The denoised latents are written beside the output before the VAE decode (removed once
the mp4 is written, unless --keep-latents): when the decode fails, `--decode FILE` finishes the job
later (a smaller --vae-tile, or --device cpu). Ctrl-C ends with one line and exit code 130.
"""

from __future__ import annotations

import time

_STARTED = time.perf_counter()  # the summary's time includes start-up (imports, model loading)

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
import re  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

from .checks import PRESETS, looks_like_hub_id, resolve_seed, validate, validate_sampling  # noqa: E402  (torch-free)
from .config import VIDEO_DEFAULT, ModelConfig, SamplingConfig, StepCache, size_arg  # noqa: E402

DTYPES = ("bf16", "fp32")  # torch.bfloat16, torch.float32
SWAP_STALL_MS = 50  # a visible stall at the boundary above this is reported as such


def cache_arg(text: str) -> StepCache:
    """off | N% | easycache | a threshold number -> StepCache (argparse type). Anything else is refused in one
    sentence naming the accepted forms (argparse puts "argument --step-cache: " before it)."""
    try:
        if text == "off":
            return StepCache()
        if text == "easycache":
            return StepCache.easycache()
        if text.endswith("%"):
            return StepCache(mode="pattern", pattern=text)
        return StepCache(mode="threshold", threshold=float(text))
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"{text!r} is not a step cache setting: use off, N% (0% to 100%, e.g. 50%), "
                                         "easycache, or a threshold number of 0 or more (e.g. 0.06)") from e


def lora_arg(text: str) -> tuple[str, float]:
    """FILE or FILE:STRENGTH (strength 1.0 by default; negative allowed) -> (file, strength)."""
    file, sep, tail = text.rpartition(":")
    if sep:
        try:
            return file, float(tail)
        except ValueError:
            if Path(file).is_file() and not Path(text).exists():
                raise argparse.ArgumentTypeError(f"{text}: the strength {tail!r} is not a number (FILE:0.8)") from None
    return text, 1.0  # a colon in the path, no strength


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line instead of usage + message
        self.exit(2, f"error: {message} (see --help)\n")


class _Defaults(argparse.ArgumentDefaultsHelpFormatter):
    """Shows '(default: X)' where a flag has a default of its own (not None / off / a list)."""

    def _get_help_string(self, action):
        text = action.help or ""
        if action.default in (None, False, []) or "(default" in text or "default:" in text:
            return action.help
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m wan_lite.generate", description="Wan2.2-T2V-A14B text to video.",
                formatter_class=_Defaults)
    p.add_argument("--ckpt", help="model root (official, diffusers or quantized by wan_lite.quantize), a Hugging "
                   "Face id, or a ComfyUI models/ folder (with --high/--low naming the expert files there)")
    p.add_argument("--high", help="the high-noise expert: one .safetensors (fp16/bf16/fp32, fp8 scaled) or .gguf file")
    p.add_argument("--low", help="the low-noise expert (same kinds as --high)")
    p.add_argument("--text-encoder", help="with --high/--low: the umt5-xxl encoder file (umt5_xxl_fp16.safetensors, "
                   "fp8 scaled too) or folder (default with a ComfyUI --ckpt: found in text_encoders/)")
    p.add_argument("--vae", help="with --high/--low: the Wan2.1 VAE file (wan_2.1_vae.safetensors) or a diffusers "
                   "vae/ folder (default with a ComfyUI --ckpt: found in vae/)")
    p.add_argument("--tokenizer", help="the google/umt5-xxl tokenizer folder for a single-file text encoder "
                   "(default: the hub id, cached or downloaded)")
    p.add_argument("--prompt", help="what the video shows (required, except with --decode); at most 512 tokens are "
                   "read (a longer prompt is cut, with a warning)")
    p.add_argument("--negative-prompt", default=None, help="default: the official Chinese negative prompt")
    p.add_argument("--size", type=size_arg, help="WIDTHxHEIGHT, multiples of 16 (default: 1280x720; 64x64 for a "
                   "test-size model such as the app's demo)")
    p.add_argument("--frames", type=int, help="4n+1 frames at 16 fps (default: 81; 9 for a test-size model)")
    p.add_argument("--preset", choices=PRESETS, default="official",
                   help="sampling defaults: official (40 UniPC steps, shift 12, guidance 4/3) or lightning (4 Euler "
                   "steps on the float grid, shift 5, guidance 1/1: one pass per step; use the Lightning LoRAs)")
    p.add_argument("--steps", type=int, default=None, help="1 to 200 (default: the preset's, 40 official, 4 lightning)")
    p.add_argument("--seed", type=int, default=None, help="0 to 2**64-1; negative or left out: random (default: "
                   "random; the seed used is printed and stored in the mp4)")
    p.add_argument("--shift", type=float, default=None, help="above 0, at most 100 (default: the preset's, 12 "
                   "official, 5 lightning)")
    p.add_argument("--guidance-high", type=float, default=None, help="CFG scale with the high-noise expert, 0 to 20 "
                   "(default: the preset's, 4.0 official, 1.0 lightning)")
    p.add_argument("--guidance-low", type=float, default=None, help="CFG scale with the low-noise expert, 0 to 20 "
                   "(default: the preset's, 3.0 official, 1.0 lightning)")
    p.add_argument("--solver", default=None,
                   help="unipc or euler (default: the preset's: unipc official, euler lightning)")
    p.add_argument("--step-cache", type=cache_arg, default=StepCache(), metavar="off|N%|easycache|T",
                   help="step caching (default off): N%% computes a fixed N%% of each expert's steps (benchmarks); "
                   "easycache = threshold 0.06 (EasyCache's Wan2.2 setting); a number T = that threshold. "
                   "Quality is not measured here: compare with off on your prompts")
    p.add_argument("--lora", type=lora_arg, action="append", default=[], metavar="FILE[:S]",
                   help="a LoRA merged into both experts at strength S (default 1.0); repeatable")
    p.add_argument("--lora-high", type=lora_arg, action="append", default=[], metavar="FILE[:S]",
                   help="a LoRA for the high-noise expert only (e.g. Lightning's HIGH file); repeatable")
    p.add_argument("--lora-low", type=lora_arg, action="append", default=[], metavar="FILE[:S]",
                   help="a LoRA for the low-noise expert only (e.g. Lightning's LOW file); repeatable")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--text-device", default=None, help="where the umt5 encoder runs (default: --device)")
    p.add_argument("--dtype", default="bf16", choices=DTYPES, help="for the experts and the text encoder")
    p.add_argument("--vae-tile", type=int, default=None,
                   help="VAE tile side in pixels, a multiple of 32; 0 decodes untiled (default: from free memory)")
    p.add_argument("--vram-gb", type=float, default=None,
                   help="one GPU: plan for this much VRAM (e.g. 24, 16, 12, 8; default: the free memory now)")
    p.add_argument("--ram-gb", type=float, default=None,
                   help="one GPU: plan for this much private host RAM (e.g. 64, 32, 16; default: what is available "
                   "now). With the expert resident in VRAM this command reads both experts from their memory-mapped "
                   "files whatever the budget (one run: pinning pays only across runs, in the app); in streaming "
                   "mode both pinned, the low-noise one pinned, or neither, as the budget allows")
    p.add_argument("--exact-attention", action="store_true",
                   help="one GPU: keep exact (cuDNN / flash) attention even with 8-bit experts on an sm89+ card, "
                   "where the planner otherwise picks the FP8 attention kernel (1.17x the 720p step on an H200; "
                   "0.4%% error on concentrated attention, 5-8%% on random inputs)")
    p.add_argument("--no-read-ahead", action="store_true",
                   help="don't read the text encoder's weights into the page cache from the start, nor (one GPU) the "
                   "high-noise expert's once they are read (both on by default; this measures without them)")
    p.add_argument("--parallel", default="auto", choices=("auto", "ulysses", "cfg"),
                   help="under torchrun: CFG parallel on even GPU counts (auto; Ulysses when no step runs an uncond "
                   "pass, as with --preset lightning), or Ulysses sequence parallel")
    p.add_argument("--no-fsdp", action="store_true", help="under torchrun: replicate the experts, don't shard them")
    p.add_argument("--cache-dir", default=None, help="prompt-embedding cache (default ~/.cache/wan-lite/text)")
    p.add_argument("--stats", metavar="FILE", help="also write the run's timings and memory peaks as JSON here "
                   "(phases, time of each step's end since start-up, peak VRAM, peak host RAM, swap stall, plan)")
    p.add_argument("--out", required=True, help="output .mp4 (a <name>.json sidecar is written beside it); an "
                   "existing file is kept and a free name (<name>-1.mp4) used instead, unless --overwrite")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out (and its .json)")
    p.add_argument("--keep-latents", action="store_true", help="keep <name>.latents.safetensors (the denoised "
                   "latents, written before the VAE decode) after the mp4 is written")
    p.add_argument("--decode", metavar="LATENTS", help="decode the latents a run left (<name>.latents.safetensors, "
                   "e.g. after a failed VAE decode) into --out and stop; the VAE is the run's (recorded in the "
                   "file), --vae FILE or --ckpt ROOT's; with --vae-tile and --device")
    return p


def sampling_from_args(args: argparse.Namespace) -> SamplingConfig:
    """The preset with every explicitly given flag on top; a value out of range raises validate_sampling's
    ValueError (naming the range and the default), before SamplingConfig's own terser checks."""
    preset = PRESETS[args.preset]
    given = {"steps": args.steps, "shift": args.shift, "guidance_high": args.guidance_high,
             "guidance_low": args.guidance_low, "solver": args.solver}
    values = {k: getattr(preset, k) if v is None else v for k, v in given.items()}
    validate_sampling(**values)
    return dataclasses.replace(preset, **values)


def model_from_args(args: argparse.Namespace):
    """--ckpt ROOT (a path or hub id, opened by the pipeline), or the pieces: --high/--low with --text-encoder
    and --vae, or a ComfyUI models/ folder as --ckpt with --high/--low naming files in it."""
    from .checkpoint import open_comfyui, open_components, swapped_names

    if args.high is None and args.low is None:
        if args.ckpt is None:
            raise ValueError("no model: give --ckpt ROOT (official / diffusers / quantized root or a hub id), or "
                             "--high FILE --low FILE --text-encoder FILE --vae FILE")
        return args.ckpt
    if args.high is None or args.low is None:
        raise ValueError("give both --high and --low (the two expert files)")
    if args.text_encoder is None or args.vae is None:
        if args.ckpt is None:
            raise ValueError("with --high/--low also give --text-encoder FILE and --vae FILE, or --ckpt "
                             "COMFYUI/models to find them in text_encoders/ and vae/")
        found = open_comfyui(args.ckpt, high=args.high, low=args.low, tokenizer=args.tokenizer)
        model = open_components(found.high, found.low, text_encoder=args.text_encoder or found.text_encoder,
                                vae=args.vae or found.vae, tokenizer=args.tokenizer, name=found.name)
    else:
        model = open_components(args.high, args.low, text_encoder=args.text_encoder, vae=args.vae,
                                tokenizer=args.tokenizer)
    if (swapped := swapped_names(model.high, model.low)) is not None:
        print(f"warning: {swapped}", file=sys.stderr)
    return model


def check_args(args: argparse.Namespace) -> SamplingConfig:
    """Everything the arguments alone decide, before torch is imported: the output (a free name unless
    --overwrite, and creatable), prompt, size, frames, the sampling ranges, the seed, the VAE tile.
    Sets args.out (maybe renamed: args.renamed_from holds the name asked for, said once the model has opened)
    and args.seed (drawn when random). Raises ValueError / OSError."""
    from .video import check_writable, free_name

    out = Path(args.out).expanduser()
    renamed = not args.overwrite and free_name(out) != out
    if renamed:
        out = free_name(out)
    check_writable(out)
    args.renamed_from = str(Path(args.out).expanduser()) if renamed else None
    if args.stats and Path(args.stats).expanduser().resolve() in (out.resolve(), out.with_suffix(".json").resolve()):
        raise ValueError(f"--stats {args.stats} would overwrite the video or its .json sidecar: give another name, "
                         f"e.g. {out.with_suffix('.stats.json')}")
    if args.stats:
        check_stats_path(Path(args.stats).expanduser())
    check_files(args)
    for flag, device in (("--device", args.device), ("--text-device", args.text_device)):
        if device is not None and not re.fullmatch(r"cpu|cuda(:\d+)?", device):
            raise ValueError(f"{flag} {device}: wan-lite runs on cpu or cuda (cuda:N for the N-th GPU)")
    for flag, gb in (("--vram-gb", args.vram_gb), ("--ram-gb", args.ram_gb)):
        if gb is not None and not (math.isfinite(gb) and gb > 0):
            raise ValueError(f"{flag} {gb}: give a number of GB above 0 (or leave it out: what is free now)")
    if args.vae_tile is not None and (args.vae_tile < 0 or args.vae_tile % 32):
        raise ValueError(f"--vae-tile {args.vae_tile} is not a multiple of 32: use {max(32, args.vae_tile // 32 * 32)}"
                         " (or 0 for an untiled decode)")
    if args.decode:
        args.out = str(out)
        return PRESETS[args.preset]
    if args.prompt is None:
        raise ValueError("give --prompt (what the video shows), or --decode LATENTS to decode a run's latents")
    validate(args.prompt, args.size or VIDEO_DEFAULT[0], VIDEO_DEFAULT[1] if args.frames is None else args.frames)
    sampling = sampling_from_args(args)  # raises naming the range for a value out of it
    args.random_seed = args.seed is None or args.seed < 0
    args.seed = resolve_seed(args.seed)  # drawn here when random: printed when the run starts
    args.out = str(out)
    return sampling


def say_renamed(args: argparse.Namespace) -> None:
    """Once the model has opened (a refused model writes nothing, so there is nothing to say)."""
    if args.renamed_from:
        print(f"{args.renamed_from} exists: writing {args.out} instead (--overwrite replaces it)", file=sys.stderr)


def video_defaults(args: argparse.Namespace, config: ModelConfig, say: bool = True) -> None:
    """Fill --size / --frames left out with the model's `ModelConfig.default_video` (64x64 x 9 for a test-size
    model such as the app's demo, said on stderr; else the official 1280x720 x 81)."""
    size, frames = config.default_video
    if config.is_test_size and (args.size is None or args.frames is None) and say:
        print(f"a test-size model (dim {config.dim}): {size[0]}x{size[1]}, {frames} frames unless --size / --frames "
              "say otherwise", file=sys.stderr)
    args.size = args.size or size
    args.frames = frames if args.frames is None else args.frames


def check_stats_path(path: Path) -> None:
    """--stats FILE can be written once the run ends: not a folder, in a folder that exists and is writable."""
    if path.is_dir():
        raise IsADirectoryError(f"--stats {path} is a folder: give a file name, e.g. {path / 'run.stats.json'}")
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise FileNotFoundError(f"--stats {path}: the folder {folder} does not exist: create it first")
    if not os.access(folder, os.W_OK):
        raise PermissionError(f"--stats {path}: the folder {folder} is not writable: choose another path")


def check_files(args: argparse.Namespace) -> None:
    """The files named on the command line exist (torch-free, so a typo answers at once); what they hold is
    checked when the model is opened. Raises FileNotFoundError."""
    named = [("LoRA", f) for f, _ in args.lora + args.lora_high + args.lora_low]
    named += [(what, getattr(args, key)) for what, key in (("text encoder", "text_encoder"), ("VAE", "vae"),
                                                          ("tokenizer folder", "tokenizer"))]
    if args.ckpt is None:  # else --high / --low may name files in a ComfyUI folder
        named += [("high-noise expert", args.high), ("low-noise expert", args.low)]
    elif not looks_like_hub_id(args.ckpt):  # a local folder
        named.append(("model folder (--ckpt)", args.ckpt))
    for what, path in named:
        if path is not None and not Path(path).expanduser().exists():
            raise FileNotFoundError(f"the {what} {path} does not exist: check the path")


def decode(args: argparse.Namespace) -> int:
    """--decode LATENTS: the VAE decode of a run's saved latents into --out, and nothing else."""
    from .t2v import decode_latents

    say_renamed(args)
    vae = args.vae
    if vae is None and args.ckpt is not None:
        from .checkpoint import open_root

        vae = open_root(args.ckpt).vae
    out = decode_latents(args.decode, args.out, vae=vae, device=args.device,
                         vae_tile="auto" if args.vae_tile is None else (args.vae_tile or None))
    print(f"wrote {out} (decoded from {args.decode}); time {time.perf_counter() - _STARTED:.1f}s")
    return 0


def run(args: argparse.Namespace, progress: dict | None = None) -> int:
    progress = {} if progress is None else progress  # step / total / latents / out: what a cancel reports
    sampling = check_args(args)  # before torch is imported: an argument error answers at once
    if args.preset == "lightning" and not (args.lora or args.lora_high or args.lora_low):
        print("note: --preset lightning (4 steps, guidance 1) needs step-distilled experts: the Lightning LoRA pair "
              "(--lora-high FILE --lora-low FILE) or experts with it merged; the base experts give a blurred video "
              "in 4 steps", file=sys.stderr)
    if args.decode:
        return decode(args)

    parts = {"checks": time.perf_counter() - _STARTED}  # seconds of the start-up's parts (--stats)
    clock = time.perf_counter()
    import torch
    from tqdm import tqdm

    from .hostmem import PeakSampler
    from .parallel import setup_from_env
    from .pipeline import needs_negative_prompt
    from .t2v import T2VPipeline
    from .text import DEFAULT_NEGATIVE_PROMPT
    from .video import latents_path

    parts["imports"] = time.perf_counter() - clock
    memory = PeakSampler().start()  # peak private and file-backed host RAM of the whole run (wan_lite.hostmem)
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    mode = args.parallel
    if mode == "auto" and not needs_negative_prompt(sampling):  # no uncond pass (Lightning): CFG halves would idle
        mode = "ulysses"
    ctx = setup_from_env(mode, fsdp=not args.no_fsdp)  # None unless torchrun started several ranks
    main = ctx is None or ctx.is_main

    prompts = [args.prompt] + ([args.negative_prompt or DEFAULT_NEGATIVE_PROMPT] if needs_negative_prompt(sampling)
                               else [])
    clock = time.perf_counter()
    pipe = T2VPipeline.from_pretrained(model_from_args(args), device=args.device, dtype=dtype,
                                       text_device=args.text_device, text_dtype=dtype, cache_dir=args.cache_dir,
                                       parallel=ctx, prompts=prompts if main and not args.no_read_ahead else ())
    parts["pipeline"] = time.perf_counter() - clock  # every config and header checked, no weight read
    clock = time.perf_counter()
    pipe.set_loras(high=args.lora + args.lora_high, low=args.lora + args.lora_low)  # checked before weights load
    parts["loras"] = time.perf_counter() - clock
    pipe.read_ahead_high = not args.no_read_ahead
    tokens = pipe.text.tokens_if_cut(args.prompt)
    if tokens and main:
        print(f"warning: {pipe.prompt_warning(tokens)}", file=sys.stderr)
    if pipe.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(pipe.device)
    video_defaults(args, pipe.expert_config(), say=main)
    if main:
        say_renamed(args)
    if main and args.random_seed:
        print(f"seed {args.seed} (random)", file=sys.stderr)
    if main:
        what = f"expert files {pipe.model_name}" if pipe.layout == "files" else f"{pipe.layout} checkpoint {pipe.root}"
        print(f"{what} on {pipe.device}; encoding the prompt and loading the experts", file=sys.stderr)
    plan = None
    one_gpu = {"--vram-gb": args.vram_gb is not None, "--ram-gb": args.ram_gb is not None,
               "--exact-attention": args.exact_attention}
    if pipe.device.type != "cuda" and main and any(one_gpu.values()):
        given = [k for k, v in one_gpu.items() if v]
        print(f"note: {', '.join(given)} {'applies' if len(given) == 1 else 'apply'} only to a run on one GPU: "
              f"ignored on {pipe.device.type}", file=sys.stderr)
    if pipe.device.type == "cuda" and ctx is None:  # one GPU: how the run fits, decided and shown up front
        clock = time.perf_counter()
        plan = pipe.make_plan(args.size, args.frames, args.vram_gb, ram_gb=args.ram_gb,
                              attention_8bit=False if args.exact_attention else None, one_run=True)
        parts["plan"] = time.perf_counter() - clock
        print(plan.describe(), file=sys.stderr)
    bar = tqdm(total=sampling.steps, desc="denoise", unit="step", file=sys.stderr, disable=not main)
    progress.update(step=0, total=sampling.steps, latents=latents_path(args.out), out=args.out)

    step_ends = []  # seconds since start-up at the end of each step (the first includes loading the high expert)

    def on_step(step: int, total: int, t: int, expert: str) -> None:
        if args.stats and pipe.device.type == "cuda":  # the GPU's end of the step, not the host's run-ahead
            torch.cuda.synchronize(pipe.device)
        step_ends.append(round(time.perf_counter() - _STARTED, 3))
        progress["step"] = step + 1
        bar.set_description(f"denoise [{expert}-noise expert]")
        bar.set_postfix(t=int(t))
        bar.update(1)
        if step + 1 == total:  # its rate is the steps', not the decode's that follows
            bar.close()

    try:
        result = pipe(args.prompt, negative_prompt=args.negative_prompt, size=args.size, frames=args.frames,
                      steps=sampling.steps, seed=args.seed, shift=sampling.shift,
                      guidance_high=sampling.guidance_high, guidance_low=sampling.guidance_low,
                      solver=sampling.solver, grid=sampling.grid, cache=args.step_cache, callback=on_step,
                      out=args.out, keep_latents=args.keep_latents,
                      vae_tile="auto" if args.vae_tile is None else (args.vae_tile or None), plan=plan)
    finally:
        bar.close()
        peak = memory.stop()
    if not main:
        return 0

    total = time.perf_counter() - _STARTED
    phases = ", ".join(f"{k} {v:.1f}s" for k, v in result.timings.items())
    startup = total - sum(result.timings.values())
    vram = (f"peak VRAM {max(result.vram_peaks.values()):.2f} GiB ("
            + ", ".join(f"{k} {v:.1f}" for k, v in result.vram_peaks.items()) + "), "
            if pipe.device.type == "cuda" else "")
    print(f"wrote {args.out} ({args.frames} frame{'s' * (args.frames != 1)}, {args.size[0]}x{args.size[1]}, "
          f"seed {result.seed})")
    print(f"time {total:.1f}s: start-up and loading {startup:.1f}s, {phases}; {vram}peak RAM {peak.describe()}"
          f"{_swap_summary(pipe)}")
    if args.stats:
        write_stats(args.stats, pipe, plan, result, peak, total=total, startup=startup, step_ends=step_ends,
                    parts=parts)
    return 0


def write_stats(path, pipe, plan, result, peak, *, total: float, startup: float, step_ends: list[float],
                parts: dict | None = None) -> None:
    """--stats FILE: one run's numbers as JSON (seconds; GiB of VRAM as torch counts them; host RAM in GB),
    written to a temporary name and renamed. `parts_s`: the start-up's parts (`parts`: the argument checks,
    the imports, the pipeline (`open_root`, `check_text`, `tokenizer`, `check_vae` inside it), the LoRA
    checks, the plan) and the phases' (`apply`, `text_load`, `text_encode` of the text phase; the first step's
    `first_step_staging_wait` and `first_step_compile`); `parts_began_s`: when the pipeline's parts began and
    `read_ahead_s`: when each read-ahead read and how much (seconds since start-up), to line them up."""
    import json

    import torch

    cuda = pipe.device.type == "cuda"
    stats = {
        "total_s": round(total, 3), "startup_and_loading_s": round(startup, 3),
        "phases_s": {k: round(v, 3) for k, v in result.timings.items()},
        "step_ends_s": step_ends, "first_step_done_s": step_ends[0] if step_ends else None,
        "peak_vram_allocated_gib": max(result.vram_peaks.values()) if cuda else None,
        "vram_peaks_gib": result.vram_peaks,  # per phase
        "vram_held_before_decode_gib": result.vram_held,  # allocated once the experts were released
        "peak_vram_reserved_gib": torch.cuda.max_memory_reserved(pipe.device) / 2**30 if cuda else None,
        "host_peak": peak.to_dict(),
        "swap_stall_ms": pipe.residency.swap_stall_ms() if pipe.residency is not None else None,
        "plan": plan.to_dict() if plan is not None else None, "params": result.params,
        "read_ahead": pipe.read_ahead_thread is not None,  # the high expert's files read ahead (--no-read-ahead)
        "parts_s": {**{k: round(v, 3) for k, v in (parts or {}).items()}, **result.parts},
        "parts_began_s": {k: round(t - _STARTED, 3) for k, t in pipe.part_began.items()},  # the pipeline's
        "read_ahead_s": {name: _read_ahead_stats(thread) for name, thread in
                         (("text", pipe.read_ahead_text), ("high", pipe.read_ahead_thread)) if thread is not None},
    }  # fmt: skip
    tmp = Path(f"{path}.partial")
    tmp.write_text(json.dumps(stats, indent=2, default=str) + "\n")
    os.replace(tmp, path)


def _read_ahead_stats(thread) -> dict:
    """A read-ahead's (checkpoint.ReadAhead) window in seconds since start-up, and the GB it read."""
    since = lambda t: None if t is None else round(t - _STARTED, 3)
    return {"began": since(thread.began), "ended": since(thread.ended), "gb": round(thread.bytes / 1e9, 6),
            "waited_for": len(thread.after)}


def _swap_summary(pipe) -> str:
    """'; swap stall 12 ms' from the residency's stats (one GPU), flagged when over SWAP_STALL_MS."""
    stall = pipe.residency.swap_stall_ms() if pipe.residency is not None else None
    if stall is None:
        return ""
    late = stall > SWAP_STALL_MS
    flag = f" (over {SWAP_STALL_MS} ms: the low-noise expert's copies did not keep ahead)" if late else ""
    return f"; swap stall {stall:.0f} ms{flag}"


def _cancelled(progress: dict) -> str:
    """The one line a Ctrl-C ends with: how far the run got and what is on disk."""
    latents = progress.get("latents")
    if latents is not None and Path(latents).exists():
        return (f"cancelled during the decode; the denoised latents are kept in {latents}: decode them with "
                f"python -m wan_lite.generate --decode {latents} --out {progress.get('out') or 'OUT.mp4'}")
    if progress.get("total"):
        return f"cancelled at step {progress['step']}/{progress['total']}; nothing written"
    return "cancelled before the denoise; nothing written"


def _user_error(e: BaseException) -> bool:
    """An error to report in one line (bad input, a full disk, out of memory, a failed decode), not a bug."""
    torch = sys.modules.get("torch")
    t2v = sys.modules.get("wan_lite.t2v")
    return isinstance(e, (ValueError, OSError, MemoryError)) or (
        torch is not None and isinstance(e, torch.cuda.OutOfMemoryError)) or (
        t2v is not None and isinstance(e, t2v.DecodeError))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    progress = {}
    try:
        return run(args, progress)
    except KeyboardInterrupt:
        print(_cancelled(progress), file=sys.stderr)
        return 130
    except Exception as e:
        if not _user_error(e):
            raise
        message = " ".join(str(e).split())  # one line
        print(f"error: {message}", file=sys.stderr)
        return 1 if type(e).__name__ == "DecodeError" else 2
    finally:
        torch = sys.modules.get("torch")
        if torch is not None and torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
