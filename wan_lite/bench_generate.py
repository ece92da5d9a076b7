"""python -m wan_lite.bench_generate: the main job end to end at full size, from files on disk.

    python -m wan_lite.bench_generate --work /tmp/e2e [--source-dir /dev/shm/src] [--scheme int8]
        [--run 1280x720:vram=24 --run 832x480:vram=12:ram=16 ...] [--preset lightning] [--json out.json]

1. Writes a model root with random weights of the real size (`write_random_root`): both experts in the
   official layout (bf16 safetensors shards + index + config.json, 28.6 GB each; put them on a RAM disk with
   --source-dir, they are read once), the umt5-xxl encoder as the official `models_t5_umt5-xxl-enc-bf16.pth`
   (11.4 GB), a small tokenizer in `google/umt5-xxl/` (token ids only matter for timing) and the Wan2.1 VAE as
   the official `Wan2.1_VAE.pth` (diffusers' `AutoencoderKLWan()` random init, renamed; 0.5 GB in fp32).
2. Runs `python -m wan_lite.quantize --ckpt SRC --out Q --scheme SCHEME` (timed), then deletes the source
   experts.
3. Runs `python -m wan_lite.generate --ckpt Q ... --stats FILE` once per --run, each cold (the root's pages
   dropped from the page cache first: `drop_caches` where permitted, else `posix_fadvise(DONTNEED)`; the share
   of pages still resident afterwards is measured with mincore(2) and reported) and, with --warm, again warm.
   A fresh prompt-embedding cache each time, so the text encoder always runs.

Reported per run: time to the end of the first step (start-up, text encoder, loading the high expert, one
step), each phase (text, load: filling the experts held in RAM, denoise, decode, write), the steps'
durations, peak VRAM, the VRAM still allocated before the decode, peak host RAM private and file-backed,
the swap stall. The numbers come from generate's --stats JSON; nothing is timed here but the
quantize subprocess.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import mmap
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from .bench import fill_random
from .checkpoint import EXPERT_PAIRS, TEXT_WEIGHTS, TOKENIZER, VAE_WEIGHTS
from .config import ModelConfig, size_arg
from .residency import template
from .vae import official_to_diffusers

GB = 1e9
OFFICIAL_PAIR = EXPERT_PAIRS[0]  # the official layout's expert folders (high, low)
SHARD_BYTES = 5 * 10**9  # the official release's shards are about 5 GB
# umt5-xxl encoder (google/umt5-xxl): vocab, width, heads, FFN width, layers, relative-position buckets
UMT5_XXL = {"vocab": 256384, "dim": 4096, "heads": 64, "ffn": 10240, "layers": 24, "buckets": 32}
UMT5_TINY = {"vocab": 512, "dim": 24, "heads": 4, "ffn": 48, "layers": 2, "buckets": 32}
PROMPT = "a red fox runs through fresh snow at sunset, cinematic"


# ---------------------------------------------------------------------------------------------
# a random root on disk


def random_tensor(name: str, shape: tuple[int, ...], g: torch.Generator, device) -> torch.Tensor:
    """bf16 random values of a sane scale (`bench.fill_random`: gains 1, biases and modulation small,
    weights 1/sqrt(fan-in)), drawn in float32."""
    t = torch.empty(shape, device=device)
    fill_random(name, t, g)
    return t.to(torch.bfloat16)


def _save_shards(tensors, folder: Path, prefix: str, index_name: str) -> None:
    """Write (name, tensor) pairs as `<prefix>-0000i-of-0000n.safetensors` shards of about SHARD_BYTES, one
    shard in host RAM at a time, and the index."""
    written, shard = [], {}  # [(temporary file, names)], the shard being filled

    def flush():
        tmp = folder / f"{prefix}-{len(written):05d}.tmp"
        save_file(shard, tmp)
        written.append((tmp, list(shard)))
        shard.clear()

    for name, t in tensors:
        shard[name] = t.cpu()
        if sum(v.nbytes for v in shard.values()) >= SHARD_BYTES:
            flush()
    if shard:
        flush()
    weight_map = {}
    for i, (tmp, names) in enumerate(written, start=1):
        final = folder / f"{prefix}-{i:05d}-of-{len(written):05d}.safetensors"
        os.replace(tmp, final)
        weight_map |= {n: final.name for n in names}
    (folder / index_name).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}, indent=2) + "\n")


def write_random_expert(cfg: ModelConfig, folder: Path, seed: int, device) -> Path:
    """One expert in the official layout (bf16 shards, index, config.json), generated tensor by tensor."""
    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator(device).manual_seed(seed)
    shapes = {n: tuple(t.shape) for n, t in template(cfg, torch.bfloat16).state_dict().items()}
    _save_shards(((n, random_tensor(n, s, g, device)) for n, s in shapes.items()), folder,
                 "diffusion_pytorch_model", "diffusion_pytorch_model.safetensors.index.json")
    config = {"_class_name": "WanModel", "dim": cfg.dim, "eps": cfg.eps, "ffn_dim": cfg.ffn_dim,
              "freq_dim": cfg.freq_dim, "in_dim": cfg.in_dim, "model_type": "t2v", "num_heads": cfg.num_heads,
              "num_layers": cfg.num_layers, "out_dim": cfg.out_dim, "text_len": cfg.text_len}
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return folder


def umt5_official_shapes(t5: dict) -> dict[str, tuple[int, ...]]:
    """The official `T5Encoder` keys of an umt5 encoder (`wan/modules/t5.py`, shared_pos=False) and shapes."""
    d, f = t5["dim"], t5["ffn"]
    shapes = {"token_embedding.weight": (t5["vocab"], d), "norm.weight": (d,)}
    for i in range(t5["layers"]):
        b = f"blocks.{i}."
        shapes |= {b + "norm1.weight": (d,), b + "norm2.weight": (d,),
                   b + "pos_embedding.embedding.weight": (t5["buckets"], t5["heads"]),
                   b + "ffn.gate.0.weight": (f, d), b + "ffn.fc1.weight": (f, d), b + "ffn.fc2.weight": (d, f)}
        shapes |= {b + f"attn.{x}.weight": (d, d) for x in "qkvo"}
    return shapes


def write_random_root(root: Path, cfg: ModelConfig, *, t5: dict = UMT5_XXL, experts_dir: Path | None = None,
                      seed: int = 0, device="cpu", experts: str = "bf16") -> Path:
    """A Wan2.2-T2V root with random weights (see the module docstring); the experts go to `experts_dir`
    (linked into the root) when given. `experts`: "bf16" (the official release's layout, to be quantized) or
    a folder kind of `bench_files` ("ours-int8", "ours-fp8": the quantized layout written directly, as
    `python -m wan_lite.quantize` writes it). Returns the root."""
    from .bench_files import write_expert

    root.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(OFFICIAL_PAIR):
        folder = (experts_dir or root) / name
        if experts == "bf16":
            write_random_expert(cfg, folder, seed + 1 + i, device)
        else:
            write_expert(experts, folder, cfg, seed=seed + 1 + i, device=device)
        if experts_dir is not None:
            (root / name).symlink_to(folder, target_is_directory=True)
    write_components(root, t5, seed, device)
    return root


def write_components(root: Path, t5: dict, seed: int, device) -> None:
    """The official umt5 .pth, a small tokenizer and the official Wan2.1 VAE .pth, with random weights."""
    from diffusers import AutoencoderKLWan

    from .text import write_small_tokenizer

    g = torch.Generator(device).manual_seed(seed)
    state = {n: random_tensor(n, s, g, device).cpu() for n, s in umt5_official_shapes(t5).items()}
    torch.save(state, root / f"{TEXT_WEIGHTS}.tmp")
    os.replace(root / f"{TEXT_WEIGHTS}.tmp", root / TEXT_WEIGHTS)
    del state
    write_small_tokenizer(root / TOKENIZER)
    torch.manual_seed(seed)
    vae = AutoencoderKLWan().state_dict()  # diffusers' own random init
    torch.save(diffusers_to_official_vae(vae), root / f"{VAE_WEIGHTS}.tmp")
    os.replace(root / f"{VAE_WEIGHTS}.tmp", root / VAE_WEIGHTS)


def diffusers_to_official_vae(sd: dict[str, torch.Tensor], num_res_blocks: int = 2) -> dict[str, torch.Tensor]:
    """`AutoencoderKLWan` keys -> official `WanVAE_` keys: the inverse of `vae.official_to_diffusers`, checked
    by mapping the result back (raises KeyError on a key it does not know)."""
    top = {"quant_conv.": "conv1.", "post_quant_conv.": "conv2.", "encoder.conv_in.": "encoder.conv1.",
           "decoder.conv_in.": "decoder.conv1.", "encoder.norm_out.": "encoder.head.0.",
           "encoder.conv_out.": "encoder.head.2.", "decoder.norm_out.": "decoder.head.0.",
           "decoder.conv_out.": "decoder.head.2."}  # fmt: skip
    resnet = {"norm1.": "residual.0.", "conv1.": "residual.2.", "norm2.": "residual.3.", "conv2.": "residual.6.",
              "conv_shortcut.": "shortcut."}  # fmt: skip
    middle = {"resnets.0": "0", "attentions.0": "1", "resnets.1": "2"}
    per_up = num_res_blocks + 2

    def unres(rest: str) -> str:
        return next((v + rest[len(k):] for k, v in resnet.items() if rest.startswith(k)), rest)

    out = {}
    for key, value in sd.items():
        new = next((v + key[len(k):] for k, v in top.items() if key.startswith(k)), None)
        if new is None and (m := re.fullmatch(r"(encoder|decoder)\.mid_block\.(resnets\.\d|attentions\.0)\.(.+)", key)):
            part, block, rest = m.groups()
            new = f"{part}.middle.{middle[block]}.{rest if block == 'attentions.0' else unres(rest)}"
        elif new is None and (m := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.(.+)", key)):
            new = f"encoder.downsamples.{m.group(1)}.{unres(m.group(2))}"
        elif new is None and (m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.(.+)", key)):
            new = f"decoder.upsamples.{int(m.group(1)) * per_up + per_up - 1}.{m.group(2)}"
        elif new is None and (m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", key)):
            new = f"decoder.upsamples.{int(m.group(1)) * per_up + int(m.group(2))}.{unres(m.group(3))}"
        if new is None:
            raise KeyError(f"no official name for the diffusers VAE key {key!r}")
        out[new] = value
    if set(official_to_diffusers(out)) != set(sd):
        raise KeyError("the VAE renaming does not invert wan_lite.vae.official_to_diffusers")
    return out


# ---------------------------------------------------------------------------------------------
# page cache


def drop_page_cache(root: Path) -> str:
    """Evict `root`'s files from the page cache as far as this machine lets us; returns how."""
    files = [p for p in root.rglob("*") if p.is_file()]
    for p in files:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)  # dirty pages cannot be dropped
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    how = "posix_fadvise(DONTNEED)"
    try:
        Path("/proc/sys/vm/drop_caches").write_text("1\n")
        how += " + drop_caches"
    except OSError:
        pass
    return how


def resident_fraction(root: Path) -> float | None:
    """The share of `root`'s file pages in the page cache (mincore(2) over a private mapping of each file);
    None where mincore is unavailable."""
    libc = ctypes.CDLL(None, use_errno=True)
    page = mmap.PAGESIZE
    total = resident = 0
    for p in (p for p in root.rglob("*") if p.is_file() and p.stat().st_size > 0):
        size = p.stat().st_size
        with open(p, "rb") as f, mmap.mmap(f.fileno(), size, access=mmap.ACCESS_COPY) as m:
            pages = (size + page - 1) // page
            vec = (ctypes.c_ubyte * pages)()
            view = ctypes.c_char.from_buffer(m)
            failed = libc.mincore(ctypes.c_void_p(ctypes.addressof(view)), ctypes.c_size_t(size), vec) != 0
            del view  # the mapping closes only once no pointer into it is left
            if failed:
                return None
            resident += sum(b & 1 for b in vec)
            total += pages
    return resident / total if total else None


# ---------------------------------------------------------------------------------------------
# runs


def parse_run(text: str) -> dict:
    """'1280x720:vram=24:ram=16' -> {'size': '1280x720', 'vram': '24', 'ram': '16'}; `cache=warm` (or cold)
    runs it only that way, whatever --warm says; `read_ahead=off` runs generate with --no-read-ahead;
    `steps=N` and `step_cache=off|N%|easycache|T` are generate's --steps and --step-cache (e.g. issue 18's
    measured 50% run: `1280x720:vram=24:steps=40:step_cache=50%` with --preset official)."""
    from .generate import cache_arg  # noqa: PLC0415 - generate imports the pipeline; only its parser is needed

    size, *opts = text.split(":")
    size_arg(size)  # a bad size is refused here, before the root is written and quantized
    run = {"size": size}
    choices = {"cache": ("cold", "warm"), "read_ahead": ("on", "off")}
    checks = {"steps": lambda v: v.isdigit() and 1 <= int(v) <= 200, "step_cache": _step_cache_ok(cache_arg)}
    for o in opts:
        key, _, value = o.partition("=")
        known = key in ("vram", "ram", *choices, *checks) and value
        if not known or value not in choices.get(key, (value,)) or not checks.get(key, bool)(value):
            raise argparse.ArgumentTypeError(f"--run {text!r}: options are vram=GB, ram=GB, cache=cold|warm, "
                                             "read_ahead=on|off, steps=1..200 and step_cache=off|N%|easycache|T")
        run[key] = value
    return run


def _step_cache_ok(parse):
    def ok(value: str) -> bool:
        try:
            parse(value)
        except argparse.ArgumentTypeError:
            return False
        return True

    return ok


def _python(*args: str, log: Path) -> tuple[int, float]:
    start = time.perf_counter()
    with open(log, "w") as f:
        rc = subprocess.call([sys.executable, *args], stdout=f, stderr=subprocess.STDOUT)
    return rc, time.perf_counter() - start


def run_generate(qroot: Path, work: Path, run: dict, *, label: str, preset: str, frames: int, extra=()) -> dict:
    stats, log = work / f"{label}.stats.json", work / f"{label}.log"  # not {label}.json: the sidecar
    args = ["-m", "wan_lite.generate", "--ckpt", str(qroot), "--prompt", PROMPT, "--size", run["size"],
            "--frames", str(frames), "--preset", preset, "--seed", "1", "--out", str(work / f"{label}.mp4"),
            "--overwrite", "--cache-dir", str(work / f"text-cache-{label}"), "--stats", str(stats), *extra]
    if "vram" in run:
        args += ["--vram-gb", run["vram"]]
    if "ram" in run:
        args += ["--ram-gb", run["ram"]]
    if run.get("read_ahead") == "off":
        args.append("--no-read-ahead")
    if "steps" in run:
        args += ["--steps", run["steps"]]
    if "step_cache" in run:
        args += ["--step-cache", run["step_cache"]]
    rc, wall = _python(*args, log=log)
    out = {"label": label, **run, "rc": rc, "wall_s": round(wall, 2), "log_tail": log.read_text()[-1500:]}
    if rc == 0:
        out.update(json.loads(stats.read_text()))
    return out


def _write_json(path: Path | None, obj) -> None:
    if path is not None:
        path.with_suffix(".partial").write_text(json.dumps(obj, indent=2, default=str) + "\n")
        os.replace(path.with_suffix(".partial"), path)


def _n(x, spec: str = ".1f") -> str:
    return "-" if x is None else format(x, spec)


def summary_row(r: dict) -> str:
    if r.get("rc"):
        return f"{r['label']:<22} FAILED rc={r['rc']}: {r['log_tail'][-300:]!r}"
    ph, host = r["phases_s"], r["host_peak"]
    steps = [b - a for a, b in zip(r["step_ends_s"], r["step_ends_s"][1:])]
    return (f"{r['label']:<22} first step done {_n(r['first_step_done_s'], '6.1f')} s | text {ph.get('text', 0):5.1f} "
            f"load {ph.get('load', 0):5.1f} denoise {ph.get('denoise', 0):6.1f} decode {ph.get('decode', 0):5.1f} "
            f"write {ph.get('write', 0):4.1f} | "
            f"later steps {', '.join(f'{s:.1f}' for s in steps)} s | VRAM {_n(r['peak_vram_allocated_gib'])} GiB "
            f"(held before decode {_n(r.get('vram_held_before_decode_gib'), '.2f')}) | "
            f"host {host['private_gb']:.1f} GB private + {host['file_gb']:.1f} file | "
            f"stall {_n(r['swap_stall_ms'], '.0f')} ms | total {r['total_s']:.1f} s" + _parts_line(r))


def _parts_line(r: dict) -> str:
    """'\n  parts: imports 3.1 ...; read ahead: text 2.0-11.5 s 11.4 GB ...' from generate's --stats (issue 14)."""
    parts = ", ".join(f"{k} {v:.1f}" for k, v in r.get("parts_s", {}).items())
    reads = ", ".join(f"{name} {_n(w['began'])}-{_n(w['ended'])} s {w['gb']:.1f} GB"
                      for name, w in r.get("read_ahead_s", {}).items())
    return f"\n  parts (s): {parts}; read ahead: {reads or 'none'}" if parts else ""


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m wan_lite.bench_generate", description=__doc__.split("\n\n")[0])
    p.add_argument("--work", required=True, type=Path, help="a folder on the local disk for the roots and videos")
    p.add_argument("--source-dir", type=Path, help="where the bf16 source experts go (e.g. /dev/shm/src)")
    p.add_argument("--scheme", default="int8", choices=("int8", "fp8"))
    p.add_argument("--skip-quantize", action="store_true", help="write the --scheme experts directly in our "
                   "quantized layout (random 8-bit weights) instead of a bf16 source quantized by the real command")
    p.add_argument("--run", type=parse_run, action="append", help="WxH[:vram=GB][:ram=GB][:cache=cold|warm]"
                   "[:read_ahead=on|off][:steps=N][:step_cache=off|N%|easycache|T]; "
                   "repeatable (default: 1280x720:vram=24 and 832x480:vram=12:ram=16)")
    p.add_argument("--frames", type=int, default=81)
    p.add_argument("--preset", default="lightning", choices=("lightning", "official"))
    p.add_argument("--warm", action="store_true", help="run each again with the page cache warm")
    p.add_argument("--config", choices=("a14b", "tiny"), default="a14b", help="tiny: the CPU test's model")
    p.add_argument("--keep", action="store_true", help="keep the roots afterwards")
    p.add_argument("--json", type=Path)
    a = p.parse_args(argv)
    runs = a.run or [parse_run("1280x720:vram=24"), parse_run("832x480:vram=12:ram=16")]
    tiny = a.config == "tiny"
    cfg, t5 = (ModelConfig.tiny(text_dim=UMT5_TINY["dim"]), UMT5_TINY) if tiny else (ModelConfig.a14b(), UMT5_XXL)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    a.work.mkdir(parents=True, exist_ok=True)
    src, qroot = a.work / "source", a.work / f"quantized-{a.scheme}"
    results = {"date": time.strftime("%Y-%m-%d"), "device": torch.cuda.get_device_name() if device == "cuda" else
               "cpu", "config": a.config, "scheme": a.scheme, "preset": a.preset, "frames": a.frames, "runs": []}

    start = time.perf_counter()
    if a.skip_quantize:  # our layout written directly: no source, no quantize
        write_random_root(qroot, cfg, t5=t5, device=device, experts=f"ours-{a.scheme}")
        results["write_quantized_root_s"] = round(time.perf_counter() - start, 1)
        print(f"wrote the random {a.scheme} root in {results['write_quantized_root_s']} s", file=sys.stderr)
        return _runs(a, runs, qroot, results)
    write_random_root(src, cfg, t5=t5, experts_dir=a.source_dir, device=device)
    results["write_source_s"] = round(time.perf_counter() - start, 1)
    print(f"wrote the random source root in {results['write_source_s']} s", file=sys.stderr, flush=True)
    rc, secs = _python("-m", "wan_lite.quantize", "--ckpt", str(src), "--out", str(qroot), "--scheme", a.scheme,
                       "--force", "--quiet", log=a.work / "quantize.log")
    results["quantize"] = {"rc": rc, "s": round(secs, 1), "log_tail": (a.work / "quantize.log").read_text()[-800:]}
    _write_json(a.json, results)
    print(f"quantize rc {rc} in {secs:.1f} s", file=sys.stderr, flush=True)
    if rc:
        print(results["quantize"]["log_tail"], file=sys.stderr)
        return 1
    for name in OFFICIAL_PAIR:  # the bf16 experts are not needed any more
        shutil.rmtree((a.source_dir or src) / name, ignore_errors=True)
    return _runs(a, runs, qroot, results, src)


def _runs(a: argparse.Namespace, runs: list[dict], qroot: Path, results: dict, src: Path | None = None) -> int:
    """Each --run, cold and (--warm) warm, through the real generate command; then the roots are removed.
    Cold: the quantized experts' pages, and the text encoder / VAE (linked from `src`), evicted first."""
    for run in runs:
        for state in (run["cache"],) if "cache" in run else ("cold", "warm") if a.warm else ("cold",):
            label = f"{run['size']}-{state}" + ("-no-read-ahead" if run.get("read_ahead") == "off" else "")
            if state == "cold":
                run_how = drop_page_cache(qroot)
                if src is not None:
                    drop_page_cache(src)
            else:
                run_how = "warm (right after the previous run)"
            resident = resident_fraction(qroot.resolve())
            r = run_generate(qroot, a.work, run, label=label, preset=a.preset, frames=a.frames)
            r |= {"cache": state, "evicted_by": run_how, "resident_before": resident}
            results["runs"].append(r)
            print(summary_row(r), flush=True)
            _write_json(a.json, results)  # after each run: a later failure or time-out keeps the earlier ones
    if not a.keep:
        for root in (src, qroot):
            if root is not None:
                shutil.rmtree(root, ignore_errors=True)
    return 0 if all(r["rc"] == 0 for r in results["runs"]) else 1

if __name__ == "__main__":
    sys.exit(main())
