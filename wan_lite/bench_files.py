"""Random full-size experts written in the on-disk formats people have, and the bench over them.

    python -m wan_lite.bench_files write --kind KIND --out FILE_OR_DIR [--layers N] [--seed S] [--config tiny]
    python -m wan_lite.bench_files suite --dir DIR [--res 480p,720p] [--kinds K,K,...] [--json out.json]
    python -m wan_lite.bench --pairs LABEL=HIGH,LOW ...   (or --high FILE --low FILE [--label NAME])

Kinds (`KINDS`), each one expert of `ModelConfig.a14b()` (`--layers` fewer blocks, `--config tiny` the
test model) with random weights of a sane scale (weights ~ 1/sqrt(fan_in), so activations stay finite):
- `ours-int8` / `ours-fp8`: our quantized expert folder (wan_lite.quantized.format): block Linears
  int8 / float8_e4m3fn (N, K) + `.weight_scale` (N,) float32 + `.bias` float32, every other tensor float32,
  shards of at most `SHARD_BYTES`, `wan_lite_quant.json` written last. The shards' sha256 is not computed
  (recorded as null: a random benchmark file; only the size and header are checked on open).
- `fp8-scaled`: ComfyUI's legacy fp8 scaled single file (DESIGN.md section 5): block Linear weights
  float8_e4m3fn with a float32 scalar `<layer>.scale_weight` and `<layer>.scale_input`, the empty marker
  `scaled_fp8`, every other tensor fp16; native key names.
- `gguf-q8_0` / `gguf-q4_k_m`: a ComfyUI-GGUF style file (`general.architecture` "wan", native names).
  Mix written: block Linears Q8_0, or Q4_K for all of them (a real Q4_K_M keeps some, e.g. attention v
  and half the FFN down projections, in Q6_K; not written here: the runtime requantizes every block
  Linear to int8 either way, so the mix changes the load time, not the step); 1-D tensors, tensors of
  at most 1024 values, the modulation tables and `time_embedding.*` F32 (ComfyUI-GGUF's convert.py keeps
  these and 1-D tensors in F32); the other matrices F16; the 5-D patch embedding stored as (n/256, 256)
  F16 with its torch shape in `comfy.gguf.orig_shape.<name>` (an INT32 array, what the loader reads).
  A block Linear whose rows are not a whole number of blocks (only the tiny test model) is stored
  reshaped the same way, or F16 when even that does not divide.

Blocks are built directly, not by the (slow, numpy) quantizer: Q8_0 = fp16 d + 32 int8 per 32 values
(34 bytes); Q4_K = super-blocks of 256 values in 144 bytes: fp16 d, fp16 dmin, 12 bytes of eight 6-bit
scales and eight 6-bit mins, 128 bytes of 4-bit q (value = d * scale_j * q - dmin * min_j, j the 32-value
sub-block). Sizes from gguf-py's `GGML_QUANT_SIZES`; the packing as gguf-py's `Q4_K.get_scale_min` and
`dequantize_blocks` read it (tests compare with `gguf.quants.dequantize` on the bytes written).

Fast: random data is drawn on the GPU when there is one (tensor by tensor, one generator), copied to
the host and written with `os.pwrite` at its offset by a pool of threads (safetensors: the header is
built here; GGUF: `gguf.GGUFWriter` writes the header, key/values and tensor infos, the data follows at
the offsets those infos promise). Every file is written under a temporary name and renamed when complete.

The bench over files (`bench_pair`): each pair of expert files is opened as the runtime opens them
(`checkpoint.open_expert`, GGUF read as our int8, `checkpoint.GGUF_AS`), placed on the host as the
planner says (`make_plan(...).host`: pinned RAM or served from the memory-mapped file) through
`residency.host_experts`, then timed by `bench.bench_ours` at each resolution. Load time is the time to
build the host experts (open + fill the pinned RAM). With `load_threads` > 1 the units are packed by
that many threads, each with its own opened source (the same `Layout.pack` as `HostExpert.fill`); the
runtime's one-thread time is then estimated from the embed, head and first block packed alone first.
One file given as both experts (the suite does this to save disk and time) is read once and its
pinned buffers serve both experts: the swap still copies every unit, host RAM and load time count one
expert. Each pair's speed is reported as a ratio to the baseline pair of the same run scheme (the first
pair that is our own folder: fp8-scaled against ours-fp8, GGUF against ours-int8), with the goal of
issue 12 (`GOALS`).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch

from .config import ModelConfig
from .formats.headers import require_gguf
from .keys import CheckpointError
from .model import WanModel
from .quantized.format import (
    FORMAT,
    FORMAT_VERSION,
    INDEX_FILE,
    META_FILE,
    QUANTIZED_LINEAR,
    config_to_dict,
    shard_header,
    shard_name,
)
from .residency import host_buffers

GB = 1e9
KINDS = ("ours-fp8", "fp8-scaled", "ours-int8", "gguf-q8_0", "gguf-q4_k_m")  # the suite's order: baselines first
FOLDER_KINDS = {"ours-int8": "int8", "ours-fp8": "fp8"}
SUFFIX = {"fp8-scaled": ".safetensors", "gguf-q8_0": ".gguf", "gguf-q4_k_m": ".gguf"}
GOALS = {"fp8-file": 0.97, "gguf": 0.9}  # issue 12: speed vs ours-fp8 / ours-int8
SHARD_BYTES = 5 * 10**9  # our folder's shards
QK8_0, QK_K = 32, 256  # values per Q8_0 block / K-quant super-block
BLOCK_BYTES = {"q8_0": 34, "q4_k": 144}  # gguf-py GGML_QUANT_SIZES: Q8_0 (32, 34), Q4_K (256, 144)
Q_STD = {"int8": math.sqrt((255**2 - 1) / 12), "q4_k": 258.0}  # std of q (int8 uniform -127..127; Q4_K sc*q-7.5m)
FP8_STD = 64.0  # fp8 weights drawn N(0, 64^2), clamped to e4m3's +-448
ST_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.int8: "I8", torch.float8_e4m3fn: "F8_E4M3"}
WRITE_THREADS = 8


def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# what each kind stores


@dataclass(frozen=True)
class Stored:
    """One tensor of a file: its stored name, torch shape and format; `rows` the stored 2-D view of a
    GGUF tensor (None: as `shape`), with `orig` True when the torch shape goes into comfy.gguf.orig_shape."""

    name: str
    shape: tuple[int, ...]
    fmt: str  # f32 | f16 | i8 | e4m3 | q8_0 | q4_k
    rows: tuple[int, int] | None = None
    orig: bool = False

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        if self.fmt in BLOCK_BYTES:
            return self.numel // (QK8_0 if self.fmt == "q8_0" else QK_K) * BLOCK_BYTES[self.fmt]
        return self.numel * {"f32": 4, "f16": 2, "i8": 1, "e4m3": 1}[self.fmt]


def model_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every parameter of the official model, in model order (meta device: no memory)."""
    with torch.device("meta"):
        return {n: tuple(t.shape) for n, t in WanModel(cfg).state_dict().items()}


def _block_linear(name: str) -> bool:
    return name.endswith(".weight") and QUANTIZED_LINEAR.match(name.removesuffix(".weight")) is not None


def plan_folder(cfg: ModelConfig, scheme: str) -> list[Stored]:
    """Our int8 / fp8 folder: 8-bit weight + (N,) float32 scale per block Linear, the rest float32."""
    out = []
    for name, shape in model_shapes(cfg).items():
        if _block_linear(name):
            layer = name.removesuffix(".weight")
            out += [Stored(name, shape, "i8" if scheme == "int8" else "e4m3"),
                    Stored(layer + ".weight_scale", shape[:1], "f32")]
        else:
            out.append(Stored(name, shape, "f32"))
    return out


def plan_fp8_scaled(cfg: ModelConfig) -> list[Stored]:
    """ComfyUI's legacy fp8 scaled file: e4m3 block Linears with scalar scales, the marker, the rest fp16."""
    out = [Stored("scaled_fp8", (0,), "e4m3")]
    for name, shape in model_shapes(cfg).items():
        if _block_linear(name):
            layer = name.removesuffix(".weight")
            out += [Stored(name, shape, "e4m3"), Stored(layer + ".scale_weight", (), "f32"),
                    Stored(layer + ".scale_input", (), "f32")]
        else:
            out.append(Stored(name, shape, "f16"))
    return out


def _gguf_float(name: str, shape: tuple[int, ...]) -> Stored:
    numel = math.prod(shape)
    if len(shape) == 1 or numel <= 1024 or name.endswith("modulation") or name.startswith("time_embedding."):
        return Stored(name, shape, "f32")
    if len(shape) > 2:  # GGUF holds at most 4 dims; ComfyUI-GGUF stores such tensors as (n/256, 256)
        rows = (numel // 256, 256) if numel % 256 == 0 else (shape[0], numel // shape[0])
        return Stored(name, shape, "f16", rows, orig=True)
    return Stored(name, shape, "f16")


def plan_gguf(cfg: ModelConfig, qtype: str) -> list[Stored]:
    """The GGUF mix in the module docstring: block Linears `qtype` (q8_0 | q4_k), the rest F32 / F16."""
    block = QK8_0 if qtype == "q8_0" else QK_K
    out = []
    for name, shape in model_shapes(cfg).items():
        if not _block_linear(name):
            out.append(_gguf_float(name, shape))
        elif shape[1] % block == 0:
            out.append(Stored(name, shape, qtype))
        elif math.prod(shape) % 256 == 0:  # rows shorter than a block (the tiny test model only)
            out.append(Stored(name, shape, qtype, (math.prod(shape) // 256, 256), orig=True))
        else:
            out.append(Stored(name, shape, "f16"))
    return out


def plan_kind(kind: str, cfg: ModelConfig) -> list[Stored]:
    if kind in FOLDER_KINDS:
        return plan_folder(cfg, FOLDER_KINDS[kind])
    if kind == "fp8-scaled":
        return plan_fp8_scaled(cfg)
    if kind in ("gguf-q8_0", "gguf-q4_k_m"):
        return plan_gguf(cfg, "q8_0" if kind == "gguf-q8_0" else "q4_k")
    raise ValueError(f"unknown kind {kind!r}: choose one of {', '.join(KINDS)}")


# ---------------------------------------------------------------------------------------------
# random values, built in bulk on the device


def random_q8_0(n_blocks: int, k: int, g: torch.Generator, device, values: bool = False):
    """(n_blocks, 34) uint8 Q8_0 blocks (fp16 d, 32 int8 q; W = d * q, std ~ 1/sqrt(k)), and with `values`
    the (n_blocks, 32) float32 values they decode to."""
    q = torch.randint(-127, 128, (n_blocks, QK8_0), generator=g, device=device, dtype=torch.int8)
    d = torch.full((n_blocks, 1), 1.0 / (Q_STD["int8"] * math.sqrt(k)), device=device).half()
    blocks = torch.cat([d.view(torch.uint8), q.view(torch.uint8)], dim=1)  # (n, 2 + 32)
    return blocks, (d.float() * q.float() if values else None)


def random_q4_k(n_blocks: int, k: int, g: torch.Generator, device, values: bool = False):
    """(n_blocks, 144) uint8 Q4_K super-blocks with random 6-bit scales/mins and 4-bit q, fp16 d and
    dmin = 7.5 d (centres the values; std ~ 1/sqrt(k)); with `values` the (n_blocks, 256) float32 values."""
    u8 = dict(generator=g, device=device, dtype=torch.uint8)
    sc, mn = torch.randint(0, 64, (n_blocks, 8), **u8), torch.randint(0, 64, (n_blocks, 8), **u8)
    q = torch.randint(0, 16, (n_blocks, 256), **u8)
    d = torch.full((n_blocks, 1), 1.0 / (Q_STD["q4_k"] * math.sqrt(k)), device=device).half()
    dmin = (d.float() * 7.5).half()
    scales = torch.cat([sc[:, :4] | ((sc[:, 4:] >> 4) << 6),  # bytes 0-3: scale j, top bits of scale j+4
                        mn[:, :4] | ((mn[:, 4:] >> 4) << 6),  # bytes 4-7: min j, top bits of min j+4
                        (sc[:, 4:] & 15) | ((mn[:, 4:] & 15) << 4)], dim=1)  # bytes 8-11: low bits (n, 12)
    qv = q.view(n_blocks, 4, 2, 32)  # chunk c of 64 values: sub-block 2c in the low nibbles, 2c+1 in the high
    qs = (qv[:, :, 0] | (qv[:, :, 1] << 4)).reshape(n_blocks, 128)
    blocks = torch.cat([d.view(torch.uint8), dmin.view(torch.uint8), scales, qs], dim=1)  # (n, 144)
    if not values:
        return blocks, None
    step = d.float() * sc.float()  # (n, 8)
    offset = dmin.float() * mn.float()  # (n, 8)
    vals = step[:, :, None] * q.view(n_blocks, 8, 32).float() - offset[:, :, None]  # (n, 8, 32)
    return blocks, vals.reshape(n_blocks, 256)


def random_tensor(s: Stored, g: torch.Generator, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(the stored bytes as a flat uint8 tensor on `device`, the float32 values they hold in torch shape)."""
    from .bench import fill_random

    k = s.shape[1] if len(s.shape) > 1 else 1
    if s.fmt in ("q8_0", "q4_k"):
        per = QK8_0 if s.fmt == "q8_0" else QK_K
        maker = random_q8_0 if s.fmt == "q8_0" else random_q4_k
        blocks, vals = maker(s.numel // per, k, g, device, values=True)
        return blocks.reshape(-1), vals.reshape(s.shape)
    if s.fmt == "i8":
        t = torch.randint(-127, 128, s.shape, generator=g, device=device, dtype=torch.int8)
        return t.view(torch.uint8).reshape(-1), t.float()
    if s.fmt == "e4m3":
        t = torch.randn(s.shape, generator=g, device=device).mul_(FP8_STD).clamp_(-448, 448).to(torch.float8_e4m3fn)
        return t.view(torch.uint8).reshape(-1), t.float()
    t = torch.empty(s.shape, device=device)
    if s.name.endswith(".scale_input"):  # read, never used (the runtime quantizes activations per token)
        t.fill_(1.0)
    else:
        fill_random(s.name, t, g)
    t = t.half() if s.fmt == "f16" else t
    return t.reshape(-1).view(torch.uint8), t.float()


def _scale_values(plan: list[Stored], kind: str) -> dict[str, float]:
    """The scale of each 8-bit layer (per output channel or per tensor), from its fan-in: std 1/sqrt(K)."""
    std = Q_STD["int8"] if kind == "ours-int8" else FP8_STD
    return {s.name.removesuffix(".weight"): 1.0 / (std * math.sqrt(s.shape[1])) for s in plan if s.fmt in ("i8", "e4m3")
            and len(s.shape) == 2}


def tensors(plan: list[Stored], kind: str, seed: int, device,
            keep: dict[str, torch.Tensor] | None = None) -> Iterator[tuple[Stored, torch.Tensor]]:
    """(tensor, its bytes on the host as a flat uint8 tensor) in plan order, drawn from one generator on
    `device`; `keep` (tiny files) receives the float32 value each stored tensor holds."""
    g = torch.Generator(device).manual_seed(seed)
    scales = _scale_values(plan, kind)
    for s in plan:
        layer = s.name.rsplit(".", 1)[0]
        if s.name.endswith((".weight_scale", ".scale_weight")):  # a constant scale: std 1/sqrt(K) weights
            t = torch.full(s.shape, scales[layer], device=device)
            data, vals = t.reshape(-1).view(torch.uint8), t
        else:
            data, vals = random_tensor(s, g, device)
        if keep is not None:
            keep[s.name] = vals.cpu()
        yield s, data.cpu()


# ---------------------------------------------------------------------------------------------
# writing: offsets first, then the data with pwrite from a pool of threads


def _pwrite_all(fd: int, data: torch.Tensor, offset: int) -> None:
    view = memoryview(data.numpy()).cast("B")
    while view:
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n


def write_at(path: Path, size: int, items: Iterator[tuple[int, torch.Tensor]]) -> None:
    """Fill the file `path` (created, `size` bytes) with each (offset, flat uint8 tensor) of `items`,
    written by `WRITE_THREADS` threads while the next tensor is drawn (at most 2x threads in flight)."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        os.ftruncate(fd, size)
        with ThreadPoolExecutor(WRITE_THREADS) as pool:
            pending = []
            for offset, data in items:
                pending.append(pool.submit(_pwrite_all, fd, data, offset))
                while len(pending) > 2 * WRITE_THREADS:
                    pending.pop(0).result()
            for f in pending:
                f.result()
    finally:
        os.close(fd)


def write_safetensors(path: Path, plan: list[Stored], data: Iterator[tuple[Stored, torch.Tensor]],
                      metadata: dict[str, str]) -> None:
    """A safetensors file: the JSON header (sorted by element size, so every tensor is aligned, data
    contiguous as the format requires), padded with spaces to 8 bytes, then the tensors."""
    dtype = {"f32": "F32", "f16": "F16", "i8": "I8", "e4m3": "F8_E4M3"}
    size = {"f32": 4, "f16": 2, "i8": 1, "e4m3": 1}
    order = sorted(plan, key=lambda s: (-size[s.fmt], s.name))
    header, offsets, pos = {"__metadata__": metadata}, {}, 0
    for s in order:
        header[s.name] = {"dtype": dtype[s.fmt], "shape": list(s.shape), "data_offsets": [pos, pos + s.nbytes]}
        offsets[s.name], pos = pos, pos + s.nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    start = 8 + len(text)
    with open(path, "wb") as f:
        f.write(len(text).to_bytes(8, "little") + text)
    write_at(path, start + pos, ((start + offsets[s.name], d) for s, d in data if s.nbytes))


def write_gguf(path: Path, plan: list[Stored], data: Iterator[tuple[Stored, torch.Tensor]],
               metadata: dict[str, int]) -> None:
    """A GGUF file: gguf.GGUFWriter writes the header, key/values and tensor infos; the data section
    starts at the next multiple of the alignment, each tensor at the offset its info gives (sizes padded
    to the alignment, as GGUFWriter.write_ti_data_to_file counts them)."""
    import gguf
    import numpy as np

    writer = gguf.GGUFWriter(str(path), "wan")
    for key, value in metadata.items():
        writer.add_uint32(key, value)
    ggml = {"f32": gguf.GGMLQuantizationType.F32, "f16": gguf.GGMLQuantizationType.F16,
            "q8_0": gguf.GGMLQuantizationType.Q8_0, "q4_k": gguf.GGMLQuantizationType.Q4_K}
    offsets, pos = {}, 0
    for s in plan:
        shape = s.rows or s.shape
        if s.orig:
            writer.add_array(f"comfy.gguf.orig_shape.{s.name}", [int(n) for n in s.shape])
        if s.fmt in BLOCK_BYTES:  # byte shape (rows, bytes per row): the writer turns it into the value shape
            writer.add_tensor_info(s.name, (shape[0], s.nbytes // shape[0]), np.dtype(np.uint8), s.nbytes,
                                   raw_dtype=ggml[s.fmt])
        else:
            writer.add_tensor_info(s.name, shape, np.dtype(np.float32 if s.fmt == "f32" else np.float16), s.nbytes)
        offsets[s.name], pos = pos, pos + gguf.GGUFWriter.ggml_pad(s.nbytes, writer.data_alignment)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    start = gguf.GGUFWriter.ggml_pad(writer.fout[0].tell(), writer.data_alignment)
    writer.close()
    write_at(path, start + pos, ((start + offsets[s.name], d) for s, d in data if s.nbytes))


def _num_heads_meta(cfg: ModelConfig) -> dict[str, int]:
    """`wan_lite.num_heads` only where dim // 128 would be wrong (the tiny model): real files lack it."""
    return {} if cfg.dim // 128 == cfg.num_heads else {"wan_lite.num_heads": cfg.num_heads}


def _tmp(out: Path) -> Path:
    return out.with_name(f".{out.name}.tmp")


def write_folder(out: Path, cfg: ModelConfig, scheme: str, seed: int, device, keep=None) -> None:
    """Our quantized expert folder (see wan_lite.quantized.format), shards of at most SHARD_BYTES."""
    plan = plan_folder(cfg, scheme)
    shards, size = [[]], 0
    for s in plan:  # in model order; a layer's weight and scale stay together (the scale is tiny)
        if shards[-1] and size + s.nbytes > SHARD_BYTES and not s.name.endswith(".weight_scale"):
            shards.append([])
            size = 0
        shards[-1].append(s)
        size += s.nbytes
    tmp = _tmp(out)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    data = tensors(plan, f"ours-{scheme}", seed, device, keep)
    entries = []
    for i, group in enumerate(shards):
        name = shard_name(i, len(shards))
        chunk = (next(data) for _ in group)  # the generator yields in plan order, shard by shard
        write_safetensors(tmp / name, group, chunk, shard_header(scheme, out.name))
        entries.append({"file": name, "bytes": (tmp / name).stat().st_size, "sha256": None,
                        "tensors": sorted(s.name for s in group)})
    linears = {s.name.removesuffix(".weight"): {"scheme": scheme, "bias": True, "smooth": False}
               for s in plan if s.fmt in ("i8", "e4m3")}
    meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "scheme": scheme, "config": config_to_dict(cfg),
            "weights": f"random {scheme} weights (wan_lite.bench_files, seed {seed}), per output channel scales",
            "linears": linears, "kept": {s.name: "float32" for s in plan if s.fmt == "f32"
                                         and s.name.removesuffix(".weight_scale") not in linears},
            "smoothing": None, "source": {"path": None, "layout": "random", "fingerprint": f"random-{seed}"},
            "shards": entries}
    (tmp / INDEX_FILE).write_text(json.dumps({"metadata": {"format": FORMAT, "scheme": scheme},
                                              "weight_map": {t: e["file"] for e in entries for t in e["tensors"]}}))
    (tmp / META_FILE).write_text(json.dumps(meta, indent=1))  # last: its presence marks the folder complete
    shutil.rmtree(out, ignore_errors=True)
    os.rename(tmp, out)


def write_expert(kind: str, out, cfg: ModelConfig | None = None, seed: int = 0, device=None,
                 keep: dict[str, torch.Tensor] | None = None) -> Path:
    """Write one random expert of `kind` (KINDS) at `out` (a folder for ours-*, else a file); returns `out`.

    `cfg` defaults to ModelConfig.a14b(); `device` to the GPU when there is one (the random draws);
    `keep` (tiny models) receives every stored tensor's float32 value by stored name (GGUF blocks decoded
    by the format's rule, fp8 / int8 as stored, without their scale). Raises ValueError for an unknown kind,
    CheckpointError naming the install for a GGUF kind without the gguf package (both before any work).
    """
    cfg = cfg or ModelConfig.a14b()
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    out = Path(out)
    plan = plan_kind(kind, cfg)  # ValueError for an unknown kind, before anything is written
    if kind.startswith("gguf"):
        require_gguf("writing")
    out.parent.mkdir(parents=True, exist_ok=True)
    if kind in FOLDER_KINDS:
        write_folder(out, cfg, FOLDER_KINDS[kind], seed, device, keep)
        return out
    tmp = _tmp(out)
    data = tensors(plan, kind, seed, device, keep)
    if kind == "fp8-scaled":
        write_safetensors(tmp, plan, data, {k: str(v) for k, v in _num_heads_meta(cfg).items()})
    else:
        write_gguf(tmp, plan, data, _num_heads_meta(cfg))
    os.replace(tmp, out)
    return out


def kind_bytes(kind: str, cfg: ModelConfig | None = None) -> int:
    """Bytes of tensor data a file of `kind` holds (its size within headers and padding)."""
    return sum(s.nbytes for s in plan_kind(kind, cfg or ModelConfig.a14b()))


# ---------------------------------------------------------------------------------------------
# the bench over files: open and place the experts as the runtime does, then bench.bench_ours


def family(path) -> str:
    """'ours' (our int8 / fp8 folder), 'gguf', 'fp8-file' (fp8 scaled or ComfyUI quantized single file),
    'float' (a float single file, an official or diffusers folder), from the content, not the name."""
    from .formats import identify

    path = Path(path)
    if path.is_dir():
        return "ours" if (path / META_FILE).is_file() else "float"
    scheme = identify(path).scheme
    return "gguf" if scheme == "gguf" else "float" if scheme == "none" else "fp8-file"


def open_as_runtime(path):
    """The expert source as T2VPipeline opens it: a GGUF file as our int8 (checkpoint.GGUF_AS), else as stored."""
    from .checkpoint import GGUF_AS, open_expert

    return open_expert(path, scheme=GGUF_AS if family(path) == "gguf" else None)


def parse_pairs(specs: list[str]) -> list[tuple[str, Path, Path]]:
    """'LABEL=HIGH,LOW' -> (label, high, low); both paths must exist. Raises ValueError naming the fix."""
    pairs = []
    for spec in specs:
        label, eq, paths = spec.partition("=")
        parts = paths.split(",")
        if not eq or not label or len(parts) != 2 or not all(parts):
            raise ValueError(f"--pairs {spec!r}: write LABEL=HIGH,LOW (e.g. gguf-q8_0=high.gguf,low.gguf; one file "
                             "twice for both experts)")
        for p in parts:
            if not Path(p).exists():
                raise ValueError(f"--pairs {spec!r}: {p} does not exist")
        if label in (lab for lab, _, _ in pairs):
            raise ValueError(f"--pairs: the label {label!r} is used twice: give each pair its own")
        pairs.append((label, Path(parts[0]), Path(parts[1])))
    return pairs


def fill_host(host, path, threads: int) -> dict:
    """Fill `host`'s pinned RAM (nothing for an expert served from its file); returns the timings.

    threads 1: `HostExpert.fill`, as the runtime does. More: embed, head and blocks.0 are packed alone
    first (timed: the one-thread estimate is their time + blocks.0's x the number of blocks + the
    allocation), then the other blocks by `threads` threads, each with its own source (`open_as_runtime`).
    """
    if not host.in_ram or host.flats is not None:
        return {}
    t0 = time.perf_counter()
    if threads <= 1:
        host.fill()
        return {"fill_s": time.perf_counter() - t0, "threads": 1}
    flats = host_buffers({u: lay.nbytes for u, lay in host.layouts.items()}, host.pin)  # as HostExpert.fill
    alloc_s = time.perf_counter() - t0
    units = list(host.layouts)
    alone = {}
    for u in (units[0], units[1], units[-1]):  # embed, blocks.0, head
        start = time.perf_counter()
        host.layouts[u].pack(host.read, flats[u])
        alone[u] = time.perf_counter() - start
    local = threading.local()

    def pack(u: str) -> None:
        if not hasattr(local, "source"):
            local.source = open_as_runtime(path)
        host.layouts[u].pack(local.source.tensor, flats[u])

    intra = torch.get_num_threads()
    torch.set_num_threads(1)  # one core per unit: no oversubscription of torch's pool by `threads` callers
    try:
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(pack, units[2:-1]))
    finally:
        torch.set_num_threads(intra)
    host.flats = flats
    serial = alloc_s + alone[units[0]] + alone[units[-1]] + alone[units[1]] * (len(units) - 2)
    return {"fill_s": time.perf_counter() - t0, "threads": threads, "one_thread_estimate_s": serial,
            "block0_s": alone[units[1]]}


def load_pair(high, low, *, in_ram, threads: int = 1):
    """(template, (high, low) host experts, record): opened as the runtime opens them, placed by `in_ram`
    ((high, low) booleans, or None: what the RAM holds), filled now and timed. One file given twice,
    both in RAM: read once, its buffers serve both experts (`shared`)."""
    from .hostmem import host_memory
    from .residency import host_experts

    t0 = time.perf_counter()
    template, h, lo = host_experts(open_as_runtime(high), open_as_runtime(low), dtype=torch.bfloat16,
                                   in_ram=in_ram, defer=True)
    shared = Path(high).resolve() == Path(low).resolve() and h.in_ram and lo.in_ram
    open_s = time.perf_counter() - t0
    fills = {"high": fill_host(h, high, threads)}
    if shared:
        lo = h
    else:
        fills["low"] = fill_host(lo, low, threads)
    record = {"load_s": time.perf_counter() - t0, "open_s": open_s, "fill": fills, "shared": shared,
              "placement": {"high": "ram" if h.in_ram else "file", "low": "ram" if lo.in_ram else "file"},
              "experts_gb": h.nbytes / GB, "host_memory_loaded": host_memory().to_dict()}
    one = [f.get("one_thread_estimate_s", f.get("fill_s")) for f in fills.values() if f]
    record["load_one_thread_s"] = open_s + sum(one)
    return template, (h, lo), record


def _plan(cfg, scheme: str, res: str, frames: int, vram_gb, mode):
    """bench.main's plan: (plan or None, mode, cfg_batched, ffn_chunk, attention, note)."""
    from .planner import RESOLUTIONS, PlanError, budget_scheme, make_plan

    height, width = RESOLUTIONS[res]
    try:
        plan = make_plan(vram_gb or 1000.0, height=height, width=width, frames=frames, scheme=budget_scheme(scheme),
                         cfg=cfg, mode=mode)
        return plan, plan.mode, plan.cfg_batched, plan.ffn_chunk, plan.attention, None
    except PlanError as e:  # measure anyway, as bench.main does
        return None, mode or "streaming", False, None, None, f"planner: {e}"


def file_gb(path) -> float:
    path = Path(path)
    files = path.rglob("*") if path.is_dir() else [path]
    return sum(f.stat().st_size for f in files if f.is_file()) / GB


def bench_pair(label: str, high, low, *, resolutions: list[str], frames: int = 81, vram_gb: float | None = 24.0,
               steps: int = 1, mode: str | None = None, compile_blocks: bool = True, load_threads: int = 1,
               overrides: dict | None = None, record: Callable[[dict], None] = print,
               deadline: float | None = None, run: Callable | None = None) -> None:
    """Bench one pair of expert files at each resolution: one "pair" record (load, placement, host RAM
    peak) and one "run" record per resolution (bench.bench_ours's, or a skip past `deadline`, a
    time.perf_counter() value). `overrides`: attention / cfg_batched / ffn_chunk as bench.main takes them."""
    from . import attention
    from .bench import _empty_host_cache, bench_ours
    from .hostmem import PeakSampler
    from .planner import RESOLUTIONS

    run = run or bench_ours
    overrides = overrides or {}
    fam = family(high)
    probe = open_as_runtime(high)
    plans = {res: _plan(probe.config, probe.scheme, res, frames, vram_gb, mode) for res in resolutions}
    placed = [plans[r][0] for r in sorted(resolutions, key=lambda r: math.prod(RESOLUTIONS[r])) if plans[r][0]]
    in_ram = (placed[-1].host.high == "ram", placed[-1].host.low == "ram") if placed else None
    memory = PeakSampler().start()
    template, hosts, loaded = load_pair(high, low, in_ram=in_ram, threads=load_threads)
    pair = {"record": "pair", "pair": label, "family": fam, "scheme": probe.scheme, "high": str(high), "low": str(low),
            "file_gb": file_gb(high) + (0 if loaded["shared"] else file_gb(low)),
            "host_plan": placed[-1].host.mode if placed else None, **loaded}
    del probe
    how = "one file for both experts, read once" if loaded["shared"] else "each expert from its file"
    _log(f"{label}: loaded in {loaded['load_s']:.1f} s ({how})")
    for res in resolutions:
        plan, run_mode, batched, chunk, attn, note = plans[res]
        height, width = RESOLUTIONS[res]
        base = {"record": "run", "pair": label, "family": fam, "scheme": pair["scheme"], "res": res,
                "shared": loaded["shared"], "planner": note}
        if deadline is not None and time.perf_counter() + estimate_run(res, steps) > deadline:
            record({**base, "skipped": "time limit: run it in another call (--kinds / --res)"})
            continue
        attn = overrides.get("attention") or attn
        attention.set_backend(attn)
        batched = batched if overrides.get("cfg_batched") is None else overrides["cfg_batched"]
        chunk = chunk if overrides.get("ffn_chunk") is None else (overrides["ffn_chunk"] or None)
        common = dict(height=height, width=width, frames=frames, mode=run_mode, cfg_batched=batched, vram_gb=vram_gb,
                      steps=steps, ffn_chunk=chunk)
        out = run(template, hosts, label=f"{label} {run_mode} attention={attn}", compile_blocks=compile_blocks,
                  **common)
        if compile_blocks and "error" in out and not out["error"].startswith("OOM"):  # measure eager instead
            out = run(template, hosts, label=f"{label} {run_mode} (eager: compile failed)", **common)
        record({**base, "attention": attn, **out})
    pair["host_peak"] = memory.stop().to_dict()
    record(pair)
    del template, hosts
    if torch.cuda.is_available():
        _empty_host_cache()


# ---------------------------------------------------------------------------------------------
# the table: each pair against its baseline


def baseline_of(run: dict, runs: list[dict]) -> dict | None:
    """The first finished run of our own folder with the same run scheme at the same resolution."""
    return next((r for r in runs if r.get("record") == "run" and r["family"] == "ours" and r["scheme"] == run["scheme"]
                 and r["res"] == run["res"] and "high_step_s" in r), None)


def compare(runs: list[dict]) -> list[dict]:
    """Each finished run with `vs` = (baseline label, speed ratios high / low / 40-step: baseline time over
    this time, > 1 faster) and `goal` (GOALS by family; None for the baselines themselves)."""
    out = []
    for r in runs:
        if r.get("record") != "run" or "high_step_s" not in r:
            continue
        b = baseline_of(r, runs)
        vs = None
        if b is not None:
            vs = {"baseline": b["pair"], "high": b["high_step_s"] / r["high_step_s"],
                  "low": b["low_step_s"] / r["low_step_s"], "total": b["denoise_total_s"] / r["denoise_total_s"]}
        goal = GOALS.get(r["family"])
        met = None if goal is None or vs is None else vs["total"] >= goal
        out.append({**r, "vs": vs, "goal": goal, "goal_met": met})
    return out


def table(records: list[dict]) -> str:
    """The results as a Markdown table, one row per run (a skipped or failed run says so)."""
    pairs = {r["pair"]: r for r in records if r.get("record") == "pair"}
    compared = {(r["pair"], r["res"]): r for r in compare(records)}
    lines = ["| pair | res | file GB | host | load s (1 thread) | s/step high / low "
             "| vs baseline high / low / 40 steps | goal | stall ms | peak VRAM alloc / reserved GB "
             "| host RAM private / file / shmem GB |",
             "|" + "---|" * 11]
    for r in records:
        if r.get("record") != "run":
            continue
        p = pairs.get(r["pair"], {})
        load = (f"{p['load_s']:.1f} ({p['load_one_thread_s']:.0f})" if p else "-")
        where = (f"{p.get('host_plan')}{', shared' if p.get('shared') else ''}" if p else "-")
        head = f"| {r['pair']} | {r['res']} | {p.get('file_gb', 0):.1f} | {where} | {load} |"
        if "skipped" in r or "error" in r:
            lines.append(f"{head} {r.get('skipped') or r.get('error')} |" + " |" * 5)
            continue
        c = compared[(r["pair"], r["res"])]
        vs = (f"{c['vs']['high']:.3f} / {c['vs']['low']:.3f} / **{c['vs']['total']:.3f}** ({c['vs']['baseline']})"
              if c["vs"] else "-")
        goal = "-" if c["goal"] is None else f">= {c['goal']}: {'met' if c['goal_met'] else 'MISSED'}"
        hm = r.get("host_memory", {})
        lines.append(f"{head} {r['high_step_s']:.3f} / {r['low_step_s']:.3f} | {vs} | {goal} | "
                     f"{r.get('swap_stall_ms') or 0:.1f} | "
                     f"{r['peak_allocated_gb']:.2f} / {r['peak_reserved_gb']:.2f} | "
                     f"{hm.get('private_gb', 0):.1f} / {hm.get('file_gb', 0):.1f} / {hm.get('shmem_gb', 0):.1f} |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# the expected time (H200 figures from BENCHMARKS.md; the load rates measured on the CPU)

STEP_S = {"480p": 4.2, "720p": 18.0}  # s per guided step, 8-bit experts, fp8 attention, H200, 81 frames
COMPILE_S = 45.0  # the first run at a resolution: torch.compile of the blocks, kernel autotuning
RUN_OVERHEAD_S = 5.0  # per run: the device skeleton, the first load of the slots, the cap
WRITE_GB_S = 3.0  # writing a file (random draws on the GPU, pwrite from 8 threads into /dev/shm or a disk)
READ_GB_S = 4.0  # filling pinned RAM from a memory-mapped float / 8-bit file
# values per second and core: gguf.quants.dequantize + our int8 requantization (22e6 measured on one A14B
# block, Q8_0, on a 2-core VM: 16 s; the GPU machines' cores are assumed a little faster)
GGUF_VALUES_S = 30e6


def estimate_run(res: str, steps: int) -> float:
    """One bench_ours run: a warm-up pass and 2 x `steps` timed steps (without compilation)."""
    return (2 * steps + 1) * STEP_S.get(res, STEP_S["720p"]) + RUN_OVERHEAD_S


def estimate_kind(kind: str, cfg: ModelConfig, threads: int) -> tuple[float, float]:
    """(write s, load s) of one file of `kind` serving both experts."""
    size = kind_bytes(kind, cfg) / GB
    if kind.startswith("gguf"):
        params = sum(math.prod(s.shape) for s in plan_kind(kind, cfg) if s.fmt in BLOCK_BYTES)
        load = params / (GGUF_VALUES_S * max(1, threads)) * (1.3 if threads > 1 else 1.0) + size / READ_GB_S
    else:
        load = size / READ_GB_S
    return size / WRITE_GB_S + 3.0, load


def estimate_suite(kinds, cfg: ModelConfig, resolutions, steps: int, threads: int) -> tuple[float, list[str]]:
    """(seconds, one line per kind) for the whole suite."""
    lines, total = [], len(resolutions) * COMPILE_S
    for kind in kinds:
        write, load = estimate_kind(kind, cfg, threads)
        runs = sum(estimate_run(r, steps) for r in resolutions)
        total += write + load + runs
        lines.append(f"  {kind:12s} write {write:5.0f} s, load {load:5.0f} s, {len(resolutions)} runs {runs:5.0f} s "
                     f"({kind_bytes(kind, cfg) / GB:.1f} GB, one file for both experts)")
    lines.append(f"  + compilation at each resolution, about {COMPILE_S:.0f} s each")
    return total, lines


# ---------------------------------------------------------------------------------------------
# the command lines


class Results:
    """Records printed as they come and the JSON rewritten after each (a killed run keeps what it had)."""

    def __init__(self, path, argv):
        self.path = path
        self.data = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                     "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
                     "torch": torch.__version__, "argv": list(argv), "records": []}

    def __call__(self, record: dict) -> None:
        self.data["records"].append(record)
        print(json.dumps(record), flush=True)
        self.save()

    def save(self) -> None:
        if self.path:
            tmp = Path(f"{self.path}.tmp")
            tmp.write_text(json.dumps(self.data, indent=1))
            os.replace(tmp, self.path)

    def finish(self) -> None:
        self.data["table"] = table(self.data["records"])
        print(self.data["table"], flush=True)
        self.save()


def run_pairs(args) -> int:
    """`python -m wan_lite.bench --high F --low F` / `--pairs L=H,L ...` (bench.main hands over here)."""
    try:
        pairs = parse_pairs(list(args.pairs or []))
        if args.high or args.low:
            if not (args.high and args.low):
                raise ValueError("--high and --low go together: name both experts (one file twice is fine)")
            pairs = parse_pairs([f"{args.label}={args.high},{args.low}"]) + pairs
    except ValueError as e:
        print(e, file=sys.stderr)
        return 2
    results = Results(args.json, sys.argv)
    overrides = {"attention": args.attention, "ffn_chunk": args.ffn_chunk,
                 "cfg_batched": None if args.cfg_batched is None else args.cfg_batched == "yes"}
    for label, high, low in pairs:
        bench_pair(label, high, low, resolutions=[args.res], frames=args.frames, vram_gb=args.vram_gb or None,
                   steps=args.steps, mode=args.mode, compile_blocks=args.compile == "yes",
                   load_threads=args.load_threads, overrides=overrides, record=results)
    results.finish()
    return 0


def suite(directory, *, kinds=KINDS, resolutions=("480p", "720p"), frames: int = 81, vram_gb: float | None = 24.0,
          steps: int = 1, seed: int = 0, json_path=None, time_limit: float = 570.0, keep: bool = False,
          load_threads: int = 1, compile_blocks: bool = True, cfg: ModelConfig | None = None, run=None,
          argv=()) -> dict:
    """Write one file per kind into `directory` (it serves as both experts), bench it at each resolution,
    delete it (unless `keep`), in the order given (KINDS: each baseline before the pairs measured against
    it). A run that would end past `time_limit` seconds is skipped and recorded so. Returns the results."""
    cfg = cfg or ModelConfig.a14b()
    directory = Path(directory)
    if any(k.startswith("gguf") for k in kinds):
        require_gguf("writing")  # CheckpointError naming the install, before any file or folder is written
    directory.mkdir(parents=True, exist_ok=True)
    need = max(kind_bytes(k, cfg) for k in kinds) * 1.01  # one file at a time
    free = shutil.disk_usage(directory).free
    if free < need:
        raise OSError(f"{directory} has {free / GB:.1f} GB free, the largest file needs {need / GB:.1f} GB: pass a "
                      "--dir with more room (a /dev/shm limited by the container, or a disk folder)")
    expected, lines = estimate_suite(kinds, cfg, resolutions, steps, load_threads)
    print(f"expected wall time about {expected / 60:.1f} min ({expected:.0f} s; limit {time_limit:.0f} s):",
          *lines, sep="\n", flush=True)
    results = Results(json_path, argv)
    results.data["suite"] = {"kinds": list(kinds), "resolutions": list(resolutions), "frames": frames,
                             "vram_gb": vram_gb, "steps": steps, "load_threads": load_threads,
                             "expected_s": expected, "note": "one file per kind serves as both experts: "
                             "load time and host RAM count one expert"}
    start = time.perf_counter()
    deadline = start + time_limit
    for kind in kinds:
        write_s, load_s = estimate_kind(kind, cfg, load_threads)
        if time.perf_counter() + write_s + load_s + estimate_run(resolutions[0], steps) > deadline:
            results({"record": "run", "pair": kind, "family": None, "scheme": None, "res": ",".join(resolutions),
                     "skipped": f"time limit: run it in another call (--kinds {kind})"})
            continue
        path = directory / (kind + SUFFIX.get(kind, ""))
        t0 = time.perf_counter()
        write_expert(kind, path, cfg, seed)
        wrote = {"record": "write", "kind": kind, "path": str(path), "write_s": time.perf_counter() - t0,
                 "file_gb": file_gb(path)}
        results(wrote)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        try:
            bench_pair(kind, path, path, resolutions=list(resolutions), frames=frames, vram_gb=vram_gb, steps=steps,
                       compile_blocks=compile_blocks, load_threads=load_threads, record=results, deadline=deadline,
                       run=run)
        finally:
            if not keep:
                shutil.rmtree(path) if path.is_dir() else path.unlink()
    results.data["wall_s"] = time.perf_counter() - start
    results.finish()
    return results.data


def main(argv=None) -> int:
    from .planner import RESOLUTIONS

    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(prog="python -m wan_lite.bench_files", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    w = sub.add_parser("write", help="write one random expert file (or our folder) of a kind")
    w.add_argument("--kind", choices=KINDS, required=True)
    w.add_argument("--out", required=True, help="the file (a folder for ours-int8 / ours-fp8)")
    w.add_argument("--layers", type=int, help="fewer blocks than the model's (a smaller file, same widths)")
    w.add_argument("--seed", type=int, default=0)
    w.add_argument("--config", choices=("a14b", "tiny"), default="a14b", help="tiny: the test model (CPU tests)")
    s = sub.add_parser("suite", help="write each kind and bench it against its baseline (needs a CUDA GPU)")
    s.add_argument("--dir", required=True, help="where the files go (e.g. /dev/shm/wan-bench); deleted after use")
    s.add_argument("--kinds", default=",".join(KINDS), help=f"comma list, in order (default {','.join(KINDS)})")
    s.add_argument("--res", default="480p,720p", help="comma list of " + ", ".join(sorted(RESOLUTIONS)))
    s.add_argument("--frames", type=int, default=81)
    s.add_argument("--vram-gb", type=float, default=24.0, help="cap PyTorch's allocator (GB, 1e9); 0: none")
    s.add_argument("--steps", type=int, default=1, help="measured steps per expert (after one warm-up pass)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--load-threads", type=int, default=min(16, os.cpu_count() or 1),
                   help="threads filling the pinned RAM (1: as the runtime does; more: its time is estimated)")
    s.add_argument("--time-limit", type=float, default=570.0, help="skip the runs that would end later (s)")
    s.add_argument("--compile", choices=("yes", "no"), default="yes")
    s.add_argument("--keep", action="store_true", help="keep the files")
    s.add_argument("--json", help="write the results here (rewritten after each record)")
    args = p.parse_args(argv)
    try:  # a GGUF kind without the gguf package: one line naming the install, before any work
        if any(k.startswith("gguf") for k in ([args.kind] if args.command == "write" else args.kinds.split(","))):
            require_gguf("writing")
    except CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.command == "write":
        cfg = ModelConfig.tiny() if args.config == "tiny" else ModelConfig.a14b()
        if args.layers:
            cfg = ModelConfig(**{**cfg.__dict__, "num_layers": args.layers})
        t0 = time.perf_counter()
        out = write_expert(args.kind, args.out, cfg, args.seed)
        print(f"wrote {out}: {file_gb(out):.2f} GB in {time.perf_counter() - t0:.1f} s")
        return 0
    kinds, res = args.kinds.split(","), args.res.split(",")
    bad = sorted(set(kinds) - set(KINDS)) + sorted(set(res) - set(RESOLUTIONS))
    if bad:
        p.error(f"unknown {', '.join(bad)}: kinds are {', '.join(KINDS)}; resolutions {', '.join(sorted(RESOLUTIONS))}")
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")  # as bench.main, before CUDA starts
    if not torch.cuda.is_available():
        print("the benchmark needs a CUDA GPU (python -m wan_lite.bench_files write works without one)",
              file=sys.stderr)
        return 2
    suite(args.dir, kinds=kinds, resolutions=res, frames=args.frames, vram_gb=args.vram_gb or None, steps=args.steps,
          seed=args.seed, json_path=args.json, time_limit=args.time_limit, keep=args.keep,
          load_threads=args.load_threads, compile_blocks=args.compile == "yes", argv=sys.argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
