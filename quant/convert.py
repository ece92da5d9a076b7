"""Offline conversion of a model root into wan-lite's quantized layout: streaming and resumable.

`convert_checkpoint(src, dst, scheme)` writes, for each expert of SRC (official `high_noise_model/` +
`low_noise_model/`, or diffusers `transformer/` + `transformer_2/`), `DST/high_noise_model/` and
`DST/low_noise_model/` in the format of `quant.format`, and hard-links (or copies, across file
systems) every other file of the root (text encoder, VAE, tokenizer) so DST is a complete model root.

Streaming: tensors are read one at a time from the memory-mapped source (the official experts are
float32, ~57 GB each), converted, and gathered into shards of at most `max_shard_bytes` (512 MiB)
that are written as soon as they fill. Peak host memory is about two shards plus one source tensor
(~1.5 GB), whatever the model size.

Single files (`convert_files({"high": FILE, "low": FILE}, dst, scheme)`): the experts people already
have, opened by `wan_lite.checkpoint.open_expert` (recognised by content; a LoRA, an I2V expert, a text
encoder or VAE is refused before any weight is read), written as `DST/high_noise_model/` and
`DST/low_noise_model/` (no text encoder, VAE or tokenizer: `generate --high DST/high_noise_model --low
DST/low_noise_model --text-encoder FILE --vae FILE` runs them). How each file kind becomes our scheme
(`source_notes`, also recorded in the metadata):
- fp32 / fp16 / bf16: quantized per output channel, exactly as a model root's expert.
- fp8 scaled (legacy `scale_weight` or ComfyUI `weight_scale`) to fp8: the e4m3 bytes are kept bit for
  bit, the file's scale (a scalar broadcast) becomes our per-output-channel scale; no second rounding.
  e5m2 weights are moved into e4m3 with a power-of-two rescale per output channel, as the runtime
  reads them (`wan_lite.formats.e5m2_to_e4m3`): exact within 2^14 of each row's maximum.
- fp8 scaled to int8, GGUF to int8 / fp8: dequantized, then quantized per output channel: the weights
  are rounded a second time (said on the console and in the metadata).

Resumable: everything is written under `DST.partial/`. Each shard goes to a temporary name, is
fsynced and renamed, then its sha256 is recorded in `DST.partial/<expert>/progress.json` together
with the plan (scheme, format version, source fingerprint, calibration digest, shard layout).
A rerun with the same settings re-verifies the finished shards against their sha256, keeps them
and converts the rest; a rerun with other settings stops unless `force` discards the partial work.
`DST.partial` becomes `DST` only when every shard of every expert has been verified. An existing DST
is replaced only with `force`.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import save_file
from tqdm import tqdm

import wan_lite
from wan_lite.checkpoint import check_pair, find_experts, open_expert
from wan_lite.model import WanModel
from wan_lite.quantized import backends
from wan_lite.quantized.backends import QUANTO_QTYPES
from wan_lite.quantized.format import (
    FORMAT,
    FORMAT_VERSION,
    INDEX_FILE,
    META_FILE,
    QUANTIZED_LINEAR,
    QUANTO_QMAP,
    SCHEMES,
    check_shard,
    config_to_dict,
    shard_header,
    shard_name,
)
from wan_lite.quantized.linear import quantize_linear_weight

from .smooth import Smoother

EXPERT_DIRS = {"high": "high_noise_model", "low": "low_noise_model"}
PROGRESS_FILE = "progress.json"
MAX_SHARD_BYTES = 512 * 2**20
_UMASK = os.umask(0o022)
os.umask(_UMASK)

ShardHook = Callable[[str, int, Path], None]  # (expert dir, shard index, shard path), after each commit


class ConversionError(RuntimeError):
    """The conversion cannot proceed as asked (existing output, mismatched partial work, bad source)."""


# ---------------------------------------------------------------------------------------------
# one tensor / one Linear


def quantize_linear(scheme: str, weight: torch.Tensor) -> dict[str, torch.Tensor]:
    """The tensors stored for one quantized Linear's (already smoothed) weight, by suffix (`weight`, ...)."""
    if scheme in ("int8", "fp8"):
        q, scale = quantize_linear_weight(weight, scheme)
        return {"weight": q, "weight_scale": scale}
    if scheme == "nf4":
        return backends.nf4_quantize_weight(weight)
    return backends.quanto_quantize_weight(weight, scheme)


def _stored_bytes(scheme: str, name: str, shape: torch.Size) -> int:
    """Estimated bytes a source tensor takes in the output (for the shard plan only)."""
    n = shape.numel()
    if name.endswith(".weight") and QUANTIZED_LINEAR.match(name[: -len(".weight")]):
        return n // 2 if scheme == "nf4" else n + 4 * shape[0]
    return 4 * n


# ---------------------------------------------------------------------------------------------
# one expert


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    return h.hexdigest()


def _write_json(path: Path, obj) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, path)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def plan_shards(cfg, scheme: str, max_shard_bytes: int = MAX_SHARD_BYTES) -> list[list[str]]:
    """Source tensor names grouped into shards, in model order; a block never splits unless it must."""
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in WanModel(cfg).state_dict().items()}
    shards, current, size = [], [], 0
    for name, shape in shapes.items():
        nbytes = _stored_bytes(scheme, name, shape)
        if current and size + nbytes > max_shard_bytes:
            shards.append(current)
            current, size = [], 0
        current.append(name)
        size += nbytes
    return shards + ([current] if current else [])


def open_source(src, scheme: str, *, smoothing: bool = False):
    """The expert source `convert_expert` reads (header and metadata only; refusals name the file and the fix).

    A folder (official or diffusers) as stored: float weights, quantized here. A single file
    (`wan_lite.formats`: safetensors fp32/fp16/bf16, fp8 scaled, GGUF) with its block Linears already in
    `scheme` when that is int8 / fp8 (an fp8-scaled file's e4m3 weights as stored, any other weight
    quantized per output channel by the same `quantize_linear_weight`), or all float for the library
    schemes and for smoothing (which scales float weights before they are quantized).
    """
    src = Path(src)
    if src.is_file():
        return open_expert(src, scheme=scheme if scheme in ("int8", "fp8") and not smoothing else "none")
    source = open_expert(src)
    if source.scheme != "none":
        raise ConversionError(f"{src} is already quantized ({source.scheme}): convert from the float expert it "
                              "was made from")
    return source


def source_notes(source, scheme: str) -> list[str]:
    """How a single file's weights become `scheme`, one line each (printed by the CLI, kept in the metadata);
    [] for a folder (float weights quantized once)."""
    info = getattr(source, "info", None)
    if info is None:
        return []
    name, stored = info.path.name, info.scheme  # "none" | "fp8" | "fp8-scaled" | "comfy-quant" | "gguf"
    if stored == "none":
        return [f"{name}: float weights quantized to {scheme} ({_scheme_description(scheme)})"]
    if stored == "gguf":
        measured = " (int8 adds about 9e-3 relative weight error at A14B width, on top of the file's own)" \
            if scheme == "int8" else ""  # measured for int8 only (README); fp8's figure is not known here
        return [f"{name}: GGUF weights dequantized, then quantized to {scheme}: they are rounded a second "
                f"time{measured}"]
    if scheme != "fp8":
        return [f"{name}: fp8 weights dequantized, then quantized to {scheme}: they are rounded twice (fp8, then "
                f"{scheme}); --scheme fp8 keeps the file's own weights"]
    kept = len(source.native_fp8)
    notes = [f"{name}: fp8 {'e5m2' if info.facts.get('weights') == 'F8_E5M2' else 'e4m3'} weights of {kept} "
             "block Linears kept, their scale (a scalar broadcast) as our per-output-channel scale"]
    if info.facts.get("weights") == "F8_E5M2":
        notes.append(f"{name}: e5m2 weights moved into e4m3 with a power-of-two rescale per output channel, as the "
                     "runtime reads them: exact within 2^14 of each row's maximum, smaller values round to e4m3 "
                     "subnormals")
    if kept < len(source.linears):
        notes.append(f"{name}: {len(source.linears) - kept} block Linears stored as float quantized to fp8")
    return notes


def source_record(src, source, scheme: str) -> dict:
    """The metadata's `source`: where the weights came from and how they were stored."""
    path = Path(src).resolve()
    record = {"path": str(path), "fingerprint": source.fingerprint()}
    if not path.is_file():
        return {**record, "layout": source.layout}
    info = source.info
    return {**record, "layout": "file", "file": path.name, "container": info.container, "stored": info.scheme,
            "model": info.model, "notes": source_notes(source, scheme)}


def convert_expert(src, out, scheme: str, *, stats: dict[str, torch.Tensor] | None = None, alpha: float = 0.5,
                   force: bool = False, max_shard_bytes: int = MAX_SHARD_BYTES, on_shard: ShardHook | None = None,
                   progress: bool = True) -> dict:
    """Convert one expert (a folder, or a single file: see `open_source`) into `out` (created; resumed if
    it holds matching partial work).

    Returns the metadata written to `out/wan_lite_quant.json`.
    """
    source = open_source(src, scheme, smoothing=stats is not None)
    cfg, out = source.config, Path(out)
    plan = plan_shards(cfg, scheme, max_shard_bytes)
    planned = {n for group in plan for n in group}
    names = set(source.names()) - {f"{m}.weight_scale" for m in source.linears}  # 8-bit: scale beside its weight
    if planned != names:
        missing, extra = sorted(planned - names), sorted(names - planned)
        raise ConversionError(f"{src} is not a complete {cfg.num_layers}-layer Wan2.2 expert (missing {missing[:4]}, "
                              f"unexpected {extra[:4]}): download it again")
    linears = sorted({n.rpartition(".")[0] for n in planned if QUANTIZED_LINEAR.match(n.rpartition(".")[0])})
    if stats is not None and scheme not in ("int8", "fp8"):
        raise ConversionError(f"--calib smoothing works with the int8 and fp8 schemes, not {scheme}: leave --calib out")
    smoother = Smoother(stats, source.tensor, linears, planned, alpha) if stats is not None else None
    calib_digest = None
    if stats is not None:
        h = hashlib.sha256(f"alpha={alpha}".encode())
        for k in sorted(linears):
            h.update(k.encode() + stats[k].float().numpy().tobytes())
        calib_digest = h.hexdigest()[:16]
    plan_record = {"format": FORMAT, "format_version": FORMAT_VERSION, "scheme": scheme,
                   "source": source.fingerprint(), "calib": calib_digest, "shards": plan}
    plan_id = hashlib.sha256(json.dumps(plan_record, sort_keys=True).encode()).hexdigest()[:16]

    # resume or start
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob(".*.tmp"):  # a shard being written when the last run stopped
        stale.unlink()
    progress_file = out / PROGRESS_FILE
    done: dict[str, dict] = {}
    if progress_file.exists():
        record = json.loads(progress_file.read_text())
        if record.get("plan_id") != plan_id:
            if not force:
                raise ConversionError(f"{out} holds unfinished work of a conversion with other settings (scheme, "
                                      "source or calibration): pass --force to discard it, or delete "
                                      f"{out.parent} yourself")
            shutil.rmtree(out)
            out.mkdir(parents=True)
        else:
            done = record["done"]
    elif any(out.iterdir()):
        if not force:
            raise ConversionError(f"{out} is not empty and has no {PROGRESS_FILE}: pass --force to discard it")
        shutil.rmtree(out)
        out.mkdir(parents=True)

    n = len(plan)
    header = shard_header(scheme, out.name)
    linear_specs: dict[str, dict] = {}
    kept: dict[str, str] = {}
    bar = tqdm(total=sum(len(g) for g in plan), desc=f"{out.name} -> {scheme}", unit="tensor", disable=not progress)
    for i, group in enumerate(plan):
        fname = shard_name(i, n)
        path = out / fname
        entry = done.get(fname)
        # per-Linear records are needed for the metadata, whether the shard is rewritten or kept
        for name in group:
            module, _, leaf = name.rpartition(".")
            if module in linears:
                spec = linear_specs.setdefault(module, {"scheme": scheme, "bias": False, "smooth": False})
                spec["bias"] |= leaf == "bias"
                spec["smooth"] = bool(smoother and smoother.runtime_smooth(module))
                if smoother and not spec["smooth"]:
                    spec["smooth_folded_into"] = smoother.absorbed_by(module)
            else:
                kept[name] = "float32"
        if entry is not None and path.is_file() and _sha256(path) == entry["sha256"]:
            bar.update(len(group))
            continue  # finished in an earlier run and verified: keep it untouched
        tensors: dict[str, torch.Tensor] = {}
        for name in group:
            module, _, leaf = name.rpartition(".")
            if module in source.linears and leaf == "weight":  # already `scheme` (see open_source): as read
                tensors[name] = source.tensor(name).contiguous()
                tensors[f"{module}.weight_scale"] = source.tensor(f"{module}.weight_scale").contiguous()
                bar.update(1)
                continue
            t, s = source.tensor(name), None
            if smoother is not None:  # W * s, and the 1/s of a following Linear folded into v / norm3
                t, s = smoother.apply(name, t)
            if module in linears and leaf == "weight":
                for suffix, v in quantize_linear(scheme, t).items():
                    tensors[f"{module}.{suffix}"] = v.contiguous()
                if linear_specs[module]["smooth"]:  # no preceding op took the 1/s: the Linear applies it
                    tensors[f"{module}.smooth"] = s.contiguous()
            else:
                tensors[name] = t.to(torch.float32).contiguous()
            del t
            bar.update(1)
        tmp = out / f".{fname}.tmp"
        save_file(tensors, tmp, metadata=header)
        os.chmod(tmp, 0o666 & ~_UMASK)  # safetensors creates 0600 files; model files are shared read-only
        _fsync(tmp)
        os.replace(tmp, path)
        done[fname] = {"file": fname, "bytes": path.stat().st_size, "sha256": _sha256(path),
                       "tensors": sorted(tensors)}
        del tensors
        _write_json(progress_file, {"plan_id": plan_id, "plan": plan_record, "done": done})
        if on_shard is not None:
            on_shard(out.name, i, path)
    bar.close()

    shards = [done[shard_name(i, n)] for i in range(n)]
    for entry in shards:  # re-open every shard: header, size and key check
        check_shard(out, entry, scheme)
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "scheme": scheme,
        "wan_lite_version": wan_lite.__version__,
        "config": config_to_dict(cfg),
        "weights": _scheme_description(scheme),
        "linears": linear_specs,
        "kept": kept,
        "smoothing": None if stats is None else {"method": "smoothquant", "alpha": alpha, "calib": calib_digest},
        "source": source_record(src, source, scheme),
        "shards": shards,
    }
    _write_json(out / INDEX_FILE, {"metadata": {"format": FORMAT, "scheme": scheme},
                                   "weight_map": {t: e["file"] for e in shards for t in e["tensors"]}})
    if scheme.startswith("quanto-"):
        _write_json(out / QUANTO_QMAP, {m: {"weights": QUANTO_QTYPES[scheme], "activations": "none"}
                                        for m in linear_specs})
    _write_json(out / META_FILE, meta)  # last: its presence marks the folder complete
    return meta


def _scheme_description(scheme: str) -> str:
    return {
        "int8": "int8 weight, symmetric per output channel, scale = absmax/127 (float32)",
        "fp8": "float8_e4m3fn weight, symmetric per output channel, scale = absmax/448 (float32)",
        "quanto-int8": "optimum-quanto qint8 weight (per output channel, bf16 scale)",
        "quanto-fp8": "optimum-quanto qfloat8_e4m3fn weight (per output channel, bf16 scale)",
        "nf4": "bitsandbytes NF4, blocksize 64, double-quantized absmax",
    }[scheme]


# ---------------------------------------------------------------------------------------------
# a model root


def link_tree(src: Path, dst: Path, skip: set[str] = frozenset()) -> None:
    """Hard-link every file under src into dst (copy where links fail); existing same-size files are kept."""
    dst.mkdir(parents=True, exist_ok=True)
    for entry in sorted(src.iterdir()):
        if entry.name in skip:
            continue
        target = dst / entry.name
        if entry.is_dir():
            link_tree(entry, target)
        elif not (target.exists() and target.stat().st_size == entry.stat().st_size):
            target.unlink(missing_ok=True)
            try:
                os.link(entry.resolve(), target)
            except OSError:  # another file system, or links not allowed
                _copy(entry, target)


def _copy(entry: Path, target: Path) -> None:
    """Copy one file that could not be linked, after checking it fits (an expert is ~57 GB in fp32)."""
    size, free = entry.stat().st_size, shutil.disk_usage(target.parent).free
    if size > free:
        raise ConversionError(
            f"{entry} ({size / 1e9:.1f} GB) does not fit in {target.parent} ({free / 1e9:.1f} GB free): it is "
            "copied because it cannot be hard-linked there (another file system). Free space, or put --out on "
            "the same file system as --ckpt so unquantized files are linked; the conversion resumes where it stopped")
    shutil.copy2(entry, target)


def _check_request(scheme: str, experts) -> None:
    if scheme not in SCHEMES:
        raise ValueError(f"unknown scheme {scheme!r}: choose one of {', '.join(SCHEMES)}")
    unknown = set(experts) - set(EXPERT_DIRS)
    if unknown or not experts:
        raise ValueError(f"--experts takes a comma list of high, low; got {','.join(experts)}")


def check_out(dst: Path, sources: list[Path], force: bool) -> None:
    """DST is free (or `force`) and is not and holds no source; raises ConversionError naming the fix."""
    for src in sources:
        if dst.resolve() == src.resolve() or dst.resolve() in src.resolve().parents:
            raise ConversionError(f"--out {dst} is or holds the source {src}: write the quantized model somewhere "
                                  "else")
    if dst.exists() and not force:
        raise ConversionError(f"{dst} already exists: pass --force to replace it, or choose another --out")


def _begin(dst: Path, sources: list[Path], force: bool) -> Path:
    """DST.partial/, created, after `check_out`."""
    check_out(dst, sources, force)
    partial = dst.with_name(dst.name + ".partial")
    partial.mkdir(parents=True, exist_ok=True)
    return partial


def _publish(partial: Path, dst: Path, experts, scheme: str) -> Path:
    """Re-check every shard of the converted experts, then rename DST.partial to DST (replacing an old DST)."""
    for key in experts:  # nothing is published until every shard re-opens with the right header and keys
        out = partial / EXPERT_DIRS[key]
        meta = json.loads((out / META_FILE).read_text())
        for entry in meta["shards"]:
            check_shard(out, entry, scheme)
        (out / PROGRESS_FILE).unlink(missing_ok=True)
    if dst.exists():
        old = dst.with_name(f"{dst.name}.replaced-{os.getpid()}")
        os.replace(dst, old)
        os.replace(partial, dst)
        shutil.rmtree(old)
    else:
        os.replace(partial, dst)
    return dst


def convert_checkpoint(src, dst, scheme: str, *, experts=("high", "low"), calib=None, alpha: float = 0.5,
                       force: bool = False, max_shard_bytes: int = MAX_SHARD_BYTES,
                       on_shard: ShardHook | None = None, progress: bool = True) -> Path:
    """Convert the experts of a model root into DST (see the module docstring). Returns DST.

    `experts`: which to quantize ("high", "low"); the others are linked unquantized.
    `calib`: activation statistics {"high": {linear: absmax}, "low": {...}} (calib.collect) for smoothing.
    """
    _check_request(scheme, experts)
    src, dst = Path(src), Path(dst)
    sources = dict(zip(("high", "low"), find_experts(src)))
    partial = _begin(dst, [src], force)
    link_tree(src, partial, skip={p.name for p in sources.values()})
    for key, expert_src in sources.items():
        out = partial / EXPERT_DIRS[key]
        if key in experts:
            convert_expert(expert_src, out, scheme, stats=None if calib is None else calib[key], alpha=alpha,
                           force=force, max_shard_bytes=max_shard_bytes, on_shard=on_shard, progress=progress)
        else:
            link_tree(expert_src, out)
    return _publish(partial, dst, experts, scheme)


def open_files(experts: dict, scheme: str) -> dict:
    """{"high": source, "low": source} of experts given one by one (either may be left out), checked from
    their headers: each exists, is a text-to-video expert (refusals name the file and what to use), and
    the two are of one size. No weight is read."""
    _check_request(scheme, tuple(experts))
    paths = {key: Path(p) for key, p in experts.items()}
    for key, path in paths.items():
        if not path.exists():
            raise FileNotFoundError(f"the {key}-noise expert {path} does not exist")
    sources = {key: open_source(path, scheme) for key, path in paths.items()}
    first, last = next(iter(paths)), list(paths)[-1]  # one expert alone is checked against itself
    check_pair(sources[first].config, sources[last].config, paths[first], paths[last])
    return sources


def convert_files(experts: dict, dst, scheme: str, *, force: bool = False, max_shard_bytes: int = MAX_SHARD_BYTES,
                  on_shard: ShardHook | None = None, progress: bool = True) -> Path:
    """Convert experts given one by one, {"high": FILE, "low": FILE} (single files or expert folders; one
    alone is allowed), into DST/high_noise_model/ and DST/low_noise_model/ (see the module docstring).

    Every source is opened and checked (kind of file, completeness, a text-to-video pair of one size)
    before any weight is read. Returns DST. Raises CheckpointError naming a wrong file, ConversionError.
    """
    paths = {key: Path(p) for key, p in experts.items()}
    open_files(paths, scheme)
    dst = Path(dst)
    partial = _begin(dst, list(paths.values()), force)
    for key, path in paths.items():
        convert_expert(path, partial / EXPERT_DIRS[key], scheme, force=force, max_shard_bytes=max_shard_bytes,
                       on_shard=on_shard, progress=progress)
    return _publish(partial, dst, tuple(paths), scheme)
