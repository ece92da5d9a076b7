"""The one owner of the model on disk: roots, expert folders, their weight formats, key maps.

`open_root(path_or_hub_id) -> ModelRoot` is the frozen description of a model that everything else
takes (the pipeline, the app, several GPUs, quantize, calib): layout, the two expert folders, their
weight format (`scheme`, read from metadata, never from a name), config, boundary, and where the text
encoder, tokenizer and VAE are. Nothing outside this module detects a layout.

An expert is read through an *expert source*: `open_expert(path)` gives an object with `config`,
`scheme` ("none" for float weights, "int8" / "fp8" for our W8A8 layout), `linears` (the 8-bit block
Linears), `names()`, `shapes()`, `tensor(name)` (lazy, memory-mapped, official key names) and
`fingerprint()`. `load_source` builds a `WanModel` from any source, the residency packs any source
into its unit buffers, so a new file format is a new source and nothing else changes.

Layouts of an expert folder: official (sharded safetensors + index + `config.json`, which leaves
text_dim, patch_size and more out, so dimensions are read from tensor shapes), diffusers (the same
tensors under other names: `DIFFUSERS_TO_OFFICIAL` is a plain renaming), ours quantized
(`wan_lite_quant.json`, see `wan_lite.quantized.format`), a bare optimum-quanto folder
(`quanto_qmap.json`). Library schemes (optimum-quanto, bitsandbytes) hold tensor subclasses that no
flat buffer can carry: they load as whole modules (`wan_lite.quantized.backends`).

Loading builds the model on the meta device and assigns memory-mapped tensors cast one at a time,
so peak host RAM stays about one copy of the expert in the target dtype.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import re
import threading
import time
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .checks import looks_like_hub_id
from .config import ModelConfig
from .formats import identify, open_expert_file, refuse
from .keys import CheckpointError, diffusers_to_official
from .keys import open_safetensors as _safe_open
from .lora import LoRASource, read_lora
from .model import WanModel
from .quantized import backends
from .quantized.format import (
    META_FILE,
    QUANTO_QMAP,
    check_shard,
    config_from_dict,
    read_meta,
    runtime_dtype,
)
from .quantized.linear import convert_for_runtime

LIBRARY_SCHEMES = ("quanto-int8", "quanto-fp8", "nf4")  # tensor subclasses: loaded and swapped as whole modules

param_dtype = WanModel.param_dtype  # the dtype each tensor runs in: the model class declares it


# ---------------------------------------------------------------------------------------------
# layouts


def detect_layout(path: Path) -> str:
    """'official', 'diffusers', 'wan-lite-quant' or 'quanto' for one expert folder; CheckpointError otherwise."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path} is not a folder: pass one expert's folder (e.g. high_noise_model/ "
                              "or transformer/), or a model root to find_experts()")
    if (path / META_FILE).exists():
        return "wan-lite-quant"
    if (path / QUANTO_QMAP).exists():
        return "quanto"
    experts = [d for d in ("high_noise_model", "transformer") if (path / d).is_dir()]
    if experts and not (path / "config.json").exists():
        raise CheckpointError(f"{path} is a model root, not one expert: pass {path / experts[0]} (one expert "
                              "folder), or use find_experts(root) to get both")
    config = read_config(path)
    if config.get("_class_name") == "WanTransformer3DModel" or "num_attention_heads" in config:
        return "diffusers"
    if config.get("_class_name") == "WanModel" or "num_heads" in config:
        return "official"
    raise CheckpointError(
        f"{path} is in neither the official Wan2.2 layout (config.json with num_heads, as in "
        "Wan-AI/Wan2.2-T2V-A14B/high_noise_model) nor the diffusers layout (config.json of a "
        "WanTransformer3DModel, as in Wan-AI/Wan2.2-T2V-A14B-Diffusers/transformer): point at an expert folder")


def read_config(path: Path) -> dict:
    cfg_file = path / "config.json"
    if not cfg_file.exists():
        raise CheckpointError(f"{cfg_file} is missing: an expert folder needs its config.json "
                              "(download it with the weights)")
    try:
        return json.loads(cfg_file.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{cfg_file} is not valid JSON ({e}): download it again") from e


def find_experts(root) -> tuple[Path, Path]:
    """(high-noise, low-noise) expert folders of a model root in either layout."""
    root = Path(root)
    for high, low in (("high_noise_model", "low_noise_model"), ("transformer", "transformer_2")):
        if (root / high).is_dir() and (root / low).is_dir():
            return root / high, root / low
    raise CheckpointError(
        f"{root} holds no pair of experts: expected high_noise_model/ + low_noise_model/ (official "
        "Wan-AI/Wan2.2-T2V-A14B) or transformer/ + transformer_2/ (Wan-AI/Wan2.2-T2V-A14B-Diffusers)")


@contextmanager
def _open(file: Path):
    with _safe_open(file) as f:
        yield f


def weight_files(path: Path) -> dict[str, Path]:
    """Map each stored tensor name to its file, checking that every shard named by the index exists."""
    indexes = sorted(path.glob("*.safetensors.index.json"))
    if len(indexes) > 1:
        raise CheckpointError(f"{path} has several index files ({', '.join(i.name for i in indexes)}): keep one")
    if indexes:
        weight_map = json.loads(indexes[0].read_text())["weight_map"]
        shards = sorted(set(weight_map.values()))
        missing = [s for s in shards if not (path / s).exists()]
        if missing:
            raise CheckpointError(f"{path}: shard(s) {', '.join(missing)} named in {indexes[0].name} are missing: "
                                  "download them again (the other shards can stay)")
        for shard in shards:  # the index must not promise tensors a shard lacks
            with _open(path / shard) as f:
                absent = sorted({n for n, s in weight_map.items() if s == shard} - set(f.keys()))
            if absent:
                raise CheckpointError(f"{path / shard} lacks {_clip(absent)} that {indexes[0].name} puts there: "
                                      "the shard is damaged or from another model, download it again")
        return {name: path / f for name, f in weight_map.items()}
    files = sorted(path.glob("*.safetensors"))
    if not files:
        gguf = sorted(path.glob("*.gguf"))
        if gguf:
            raise CheckpointError(f"{path} holds {gguf[0].name}, a GGUF file, not an expert folder's safetensors: "
                                  f"pass the file itself (--high {gguf[0]} --low ...low-noise .gguf, with "
                                  "--text-encoder and --vae)")
        others = sorted(p.name for p in path.iterdir() if p.is_file() and p.name != "config.json")
        raise CheckpointError(f"{path} has no .safetensors files"
                              + (f" (only {_clip(others, 4)}, which wan-lite does not read)" if others else "")
                              + ": download the expert's weights (*.safetensors) into it")
    names = {}
    for f in files:
        with _open(f) as sf:
            names.update({k: f for k in sf.keys()})
    return names


@dataclass
class FolderSource:
    """An official or diffusers expert folder as an expert source: memory-mapped tensors by our names."""

    path: Path
    layout: str
    config: ModelConfig
    files: dict[str, Path]  # our name -> file
    stored: dict[str, str]  # our name -> name in the file
    scheme: str = "none"
    linears: dict[str, dict] = field(default_factory=dict)
    _handles: dict[Path, object] = field(default_factory=dict, repr=False)  # file -> open safe_open handle

    def names(self) -> list[str]:
        return list(self.files)

    def shapes(self) -> dict[str, list[int]]:
        """Every tensor's stored shape, from the headers (no data read)."""
        out = {}
        for name in self.files:
            out[name] = list(self._handle(self.files[name]).get_slice(self.stored[name]).get_shape())
        return out

    def _handle(self, file: Path):
        if file not in self._handles:  # each file opened once: streaming reads every block every step
            self._handles[file] = _safe_open(file)
        return self._handles[file]

    def tensor(self, name: str) -> torch.Tensor:
        """One tensor in its stored dtype, read from the memory-mapped file."""
        return self._handle(self.files[name]).get_tensor(self.stored[name])

    def fingerprint(self) -> str:
        """Identifies the source: file names, sizes and config, hashed (no full read)."""
        h = hashlib.sha256((self.path / "config.json").read_bytes())
        for f in sorted(set(self.files.values())):
            h.update(f"{f.name}:{f.stat().st_size}".encode())
        return h.hexdigest()[:16]


@dataclass
class QuantizedSource:
    """A wan-lite int8 / fp8 expert folder (`wan_lite_quant.json`) as an expert source: 8-bit block
    Linears as stored (`.weight` (N, K), `.weight_scale` (N,) float32), everything else as converted."""

    path: Path
    meta: dict
    files: dict[str, Path]  # tensor name -> shard
    config: ModelConfig = field(init=False)
    scheme: str = field(init=False)
    linears: dict[str, dict] = field(init=False)
    _handles: dict[Path, object] = field(default_factory=dict, repr=False)

    def __post_init__(self):
        self.config = config_from_dict(self.meta["config"])
        self.scheme, self.linears = self.meta["scheme"], self.meta["linears"]

    def names(self) -> list[str]:
        return list(self.files)

    def shapes(self) -> dict[str, list[int]]:
        return {n: list(self._handle(f).get_slice(n).get_shape()) for n, f in self.files.items()}

    def _handle(self, file: Path):
        if file not in self._handles:
            self._handles[file] = _safe_open(file)
        return self._handles[file]

    def tensor(self, name: str) -> torch.Tensor:
        return self._handle(self.files[name]).get_tensor(name)

    def fingerprint(self) -> str:
        """The shards' sha256 recorded at conversion (no read)."""
        h = hashlib.sha256(json.dumps([e.get("sha256") for e in self.meta["shards"]]).encode())
        return h.hexdigest()[:16]


def expert_scheme(path) -> str:
    """The weight format of one expert folder, from its metadata: "none" (float weights), our "int8" /
    "fp8", or a library scheme ("quanto-int8", "quanto-fp8", "nf4"). An unknown scheme is an error."""
    path = Path(path)
    layout = detect_layout(path)
    if layout == "wan-lite-quant":
        return read_meta(path)["scheme"]  # QuantFormatError (a ValueError) names the fix
    if layout == "quanto":  # a bare optimum-quanto folder: {module: {"weights": "qint8" | "qfloat8_e4m3fn"}}
        weights = {spec.get("weights") for spec in json.loads((path / QUANTO_QMAP).read_text()).values()}
        known = {"qint8": "quanto-int8", "qfloat8_e4m3fn": "quanto-fp8", "qfloat8": "quanto-fp8"}
        schemes = {known.get(w) for w in weights}
        if len(schemes) != 1 or None in schemes:
            raise CheckpointError(f"{path / QUANTO_QMAP}: quanto weight types {sorted(map(str, weights))} are not "
                                  "one of qint8 / qfloat8_e4m3fn, which wan-lite runs: re-quantize the expert")
        return schemes.pop()
    return "none"


def open_expert(path, *, loras: Sequence[tuple[str | os.PathLike, float]] = (), scheme: str | None = None):
    """Open one expert as an expert source: a folder (official, diffusers or our int8 / fp8 layout) or a
    single file (.safetensors float / fp8-scaled, or .gguf: `wan_lite.formats`, recognised by content),
    with `loras` [(file, strength), ...] merged at read time (`wan_lite.lora.LoRASource`). `scheme`
    ("int8") reads a single file's block Linears requantized to our int8 (what a GPU runs a GGUF file
    as); None reads it as stored (GGUF dequantized to float). Library schemes cannot be sources (no flat
    buffers): `load_expert` loads them as modules."""
    path = Path(path)
    source = open_expert_file(path, scheme=scheme) if path.is_file() else _open_folder(path)
    if loras:
        source = LoRASource(source, [(read_lora(file, source.config), float(s)) for file, s in loras])
    return source


def _open_folder(path: Path):
    layout = detect_layout(path)
    if layout == "wan-lite-quant":
        return _open_quantized(path)
    if layout == "quanto":
        raise CheckpointError(f"{path} is an optimum-quanto expert: load it with load_expert()")
    stored_files = weight_files(path)
    rename = diffusers_to_official if layout == "diffusers" else (lambda n: n)
    files, stored = {}, {}
    for name, f in stored_files.items():
        ours = rename(name)
        files[ours], stored[ours] = f, name
    return FolderSource(path, layout, config_from_shapes(path, files, stored, read_config(path)), files, stored)


def _open_quantized(path: Path) -> QuantizedSource:
    meta = read_meta(path)
    if meta["scheme"] in LIBRARY_SCHEMES:
        raise CheckpointError(f"{path} is a {meta['scheme']} expert: load it with load_expert()")
    for entry in meta["shards"]:
        check_shard(path, entry, meta["scheme"])
    return QuantizedSource(path, meta, {n: path / e["file"] for e in meta["shards"] for n in e["tensors"]})


def config_from_shapes(path: Path, files: dict[str, Path], stored: dict[str, str], config: dict) -> ModelConfig:
    """The model dimensions of an expert from its tensors' shapes (our name -> file, -> stored name)
    and its config.json, which the official release leaves incomplete."""

    def _shape(name: str) -> list[int]:
        if name not in files:
            raise CheckpointError(f"{path}: tensor {stored.get(name, name)!r} is missing, so the model size "
                                  "cannot be read: the checkpoint is incomplete, download it again")
        with _open(files[name]) as f:
            return list(f.get_slice(stored[name]).get_shape())

    dim, in_dim, *patch = _shape("patch_embedding.weight")
    num_heads = config.get("num_heads") or config.get("num_attention_heads")
    if not num_heads:
        raise CheckpointError(f"{path / 'config.json'} has no num_heads / num_attention_heads: "
                              "restore the config.json that came with the weights")
    num_layers = sum(1 for n in files if re.fullmatch(r"blocks\.\d+\.modulation", n))
    head_out = _shape("head.head.weight")[0]
    return ModelConfig(
        dim=dim,
        ffn_dim=_shape("blocks.0.ffn.0.weight")[0],
        num_heads=int(num_heads),
        num_layers=num_layers,
        freq_dim=_shape("time_embedding.0.weight")[1],
        text_dim=_shape("text_embedding.0.weight")[1],
        text_len=int(config.get("text_len", 512)),
        in_dim=in_dim,
        out_dim=head_out // math.prod(patch),
        patch_size=tuple(patch),
        eps=float(config.get("eps", 1e-6)),
    )


# ---------------------------------------------------------------------------------------------
# loading


def load_expert(path, *, dtype: torch.dtype = torch.bfloat16, device="cpu",
                loras: Sequence[tuple[str | os.PathLike, float]] = ()) -> WanModel:
    """Load one expert (a folder: official, diffusers, our quantized layout or a library scheme; or a
    single .safetensors / .gguf file) as a WanModel on `device`, with `loras` [(file, strength), ...]
    merged into the weights (8-bit weights: dequantized, merged, requantized per layer).

    Block Linear weights, the patch and text embeddings are held in `dtype`; the time embedding,
    modulation tables, norms and head in float32, as the official model computes them
    (`WanModel.param_dtype`). Raises CheckpointError naming the file and the fix.
    """
    path = Path(path)
    scheme = "file" if path.is_file() else expert_scheme(path)
    if scheme in LIBRARY_SCHEMES:
        if loras:
            raise CheckpointError(f"{path} is a {scheme} expert: LoRAs merge into float, int8 or fp8 weights; "
                                  "convert the float checkpoint to int8 or fp8 instead")
        return _load_library(path, scheme, dtype=dtype, device=device)
    return load_source(open_expert(path, loras=loras), dtype=dtype, device=device)


def load_source(source, *, dtype: torch.dtype = torch.bfloat16, device="cpu") -> WanModel:
    """A WanModel on `device` from any expert source: every name and shape checked before data is read."""
    with torch.device("meta"):
        model = WanModel(source.config)
    convert_for_runtime(model, source.linears, dtype=dtype)
    expected = {name: list(t.shape) for name, t in model.state_dict().items()}
    shapes = source.shapes()
    missing = sorted(set(expected) - set(shapes))
    unexpected = sorted(set(shapes) - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            f"{source.path} does not match a {source.config.num_layers}-layer Wan2.2 expert: "
            + (f"missing keys {_clip(missing)}; " if missing else "")
            + (f"unexpected keys {_clip(unexpected)}; " if unexpected else "")
            + "re-download the folder or point at the right expert (text encoder and VAE live elsewhere)")
    for name, shape in shapes.items():
        if shape != expected[name]:
            raise CheckpointError(
                f"{source.path}: tensor {name!r} has shape {shape}, the model needs {expected[name]}: the "
                "files mix different models, download them again")
    meta = {"linears": source.linears}
    state = {name: source.tensor(name).to(device=device, dtype=runtime_dtype(name, meta, dtype))
             for name in expected}
    model.load_state_dict(state, assign=True)
    return model.eval().requires_grad_(False)


def _load_library(path: Path, scheme: str, *, dtype, device) -> torch.nn.Module:
    """optimum-quanto / bitsandbytes experts: our folders of those schemes, or a bare quanto folder."""
    if detect_layout(path) == "wan-lite-quant":
        return backends.load_expert(path, read_meta(path), dtype=dtype, device=device)
    cfg, state, qmap = _read_quanto_folder(path)
    return backends.load_quanto(cfg, state, qmap, dtype=dtype, device=device, where=path)


def _read_quanto_folder(path: Path) -> tuple[ModelConfig, dict[str, torch.Tensor], dict[str, dict]]:
    """A bare optimum-quanto folder: safetensors (+ index) with *.weight._data/_scale keys and
    quanto_qmap.json, in official or diffusers key names (renamed); dims from the shapes and config.json."""
    ours, stored, rename = _quanto_names(path)
    qmap = json.loads((path / QUANTO_QMAP).read_text())
    qmap = {rename(name + ".").removesuffix("."): spec for name, spec in qmap.items()}
    for name, spec in qmap.items():
        if spec.get("activations", "none") != "none":
            raise CheckpointError(f"{path / QUANTO_QMAP}: {name} has quanto activation quantization "
                                  f"({spec['activations']}), which wan-lite does not run: quantize weights only")
    cfg = _quanto_config(path, ours, stored)
    state = {}
    for file in sorted(set(ours.values())):
        with _open(file) as f:
            state.update({n: f.get_tensor(stored[n]) for n, fn in ours.items() if fn == file})
    return cfg, state, qmap


IN_DIMS = {36: "an image-to-video expert (in_dim 36: Wan2.2-I2V-A14B, or Wan2.1 I2V/FLF2V)",
           48: "the Wan2.2 TI2V-5B model (in_dim 48, for the Wan2.2 VAE)"}


def check_pair(high_config: ModelConfig, low_config: ModelConfig, high, low) -> ModelConfig:
    """The experts' shared config, checked up front (before any weight loads): text-to-video (16 latent
    channels in and out, what the Wan2.1 VAE makes) and both of one size. CheckpointError naming the path."""
    for config, path in ((high_config, high), (low_config, low)):
        if config.in_dim != 16 or config.out_dim != 16:
            what = IN_DIMS.get(config.in_dim, f"a model with {config.in_dim} input / {config.out_dim} output channels")
            raise CheckpointError(f"{path} is {what}, not a text-to-video expert (16 latent channels): wan-lite runs "
                                  "Wan2.2-T2V-A14B; use its high_noise_model/ and low_noise_model/")
    if high_config != low_config:
        diff = ", ".join(f"{f.name} {getattr(high_config, f.name)} vs {getattr(low_config, f.name)}"
                         for f in dataclasses.fields(ModelConfig)
                         if getattr(high_config, f.name) != getattr(low_config, f.name))
        raise CheckpointError(f"the experts {high} and {low} are different models ({diff}): use the two experts "
                              "of one Wan2.2-T2V-A14B release")
    return high_config


def _quanto_names(path: Path):
    """(our name -> file, our name -> stored name, rename) of a bare optimum-quanto folder, whose keys may be
    official or diffusers names."""
    files = weight_files(path)
    diffusers = any(k.startswith(("condition_embedder.", "proj_out.")) or ".attn1." in k for k in files)
    rename = diffusers_to_official if diffusers else (lambda n: n)
    ours, stored = {}, {}
    for key, file in files.items():
        ours[rename(key)], stored[rename(key)] = file, key
    return ours, stored, rename


def _quanto_config(path: Path, ours: dict, stored: dict) -> ModelConfig:
    """Dims of a bare quanto folder: its quantized weights' shapes sit under `.weight._data`."""
    shape_files = {n.removesuffix("._data"): f for n, f in ours.items() if not n.endswith("._scale")}
    shape_stored = {n.removesuffix("._data"): stored[n] for n in ours if not n.endswith("._scale")}
    return config_from_shapes(path, shape_files, shape_stored, read_config(path))


def expert_config(path) -> ModelConfig:
    """Model dimensions of an expert folder of any layout, from metadata and shapes (no data read)."""
    path = Path(path)
    layout = detect_layout(path)
    if layout == "wan-lite-quant":
        return config_from_dict(read_meta(path)["config"])
    if layout == "quanto":
        return _quanto_config(path, *_quanto_names(path)[:2])
    return open_expert(path).config


# Bytes per read of the read-ahead thread. Each read releases the GIL and takes it back after; while the main
# thread runs Python (the start-up's imports) taking it back can wait a switch interval (5 ms): reads of 8 MiB
# from the page cache ran at 1.5 GB/s against 10.4 GB/s with the main thread busy (this machine, 2026-12-06).
# 64 MiB is 53 ms at the benchmark machine's 1.2 GB/s, so >= 90% of the disk's speed even then.
READ_AHEAD_CHUNK = 64 * 2**20


def files_to_read(path: str | os.PathLike) -> list[Path]:
    """The weight files of a component: the file itself, or a folder's *.safetensors in name order."""
    path = Path(path)
    return [path] if path.is_file() else sorted(path.glob("*.safetensors"))


def files_bytes(path: str | os.PathLike) -> int:
    """The size in bytes of a component's weight files (`files_to_read`)."""
    return sum(f.stat().st_size for f in files_to_read(path))


class ReadAhead(threading.Thread):
    """Reads files into the page cache on a daemon thread, in order, the first `max_bytes` of them, once every
    one of `after` (threads: joined; events: set) is done: so that two read-aheads queued one after the other
    give the disk to the first until it is read, then to the second (the text encoder's weights before the
    high-noise expert's, issue 14). Real reads through one reused buffer, not posix_fadvise(WILLNEED) hints:
    gVisor, where the benchmarks run, ignores every fadvise advice ("This implementation currently ignores the
    provided advice", its fadvise64), and a read tells the thread when the bytes are in. File-backed and
    reclaimable; nothing private but the buffer. An OSError ends the thread quietly: the loader reads the same
    files and reports it. `cancel()` stops it (at the next chunk, or while it waits). Each chunk is read with
    sendfile(2) to /dev/null where the system allows it (the pages land in the page cache without a copy into
    this process), else into one buffer."""

    def __init__(self, files: Sequence[Path], max_bytes: int, after: Sequence = ()):
        super().__init__(name="wan-lite-read-ahead", daemon=True)
        self.files, self.max_bytes, self.after = list(files), max_bytes, tuple(after)
        self.read: dict[Path, int] = {}  # bytes read per file, in the order read
        self.began: float | None = None  # time.perf_counter() when the waits were over and reading began
        self.ended: float | None = None  # ... when the last byte was read (or the thread stopped)
        self._cancelled = threading.Event()

    @property
    def bytes(self) -> int:
        return sum(self.read.values())

    def cancel(self) -> None:
        self._cancelled.set()

    def _wait(self) -> bool:
        """Wait for `after`; False when cancelled meanwhile."""
        for other in self.after:
            while not self._cancelled.is_set():
                if isinstance(other, threading.Event):
                    if other.wait(0.05):
                        break
                else:
                    other.join(0.05)
                    if not other.is_alive():
                        break
        return not self._cancelled.is_set()

    def run(self) -> None:
        self._null = os.open(os.devnull, os.O_WRONLY) if hasattr(os, "sendfile") else None
        self._buffer = None
        try:
            if not self._wait():
                return
            self.began = time.perf_counter()
            left = self.max_bytes
            for file in self.files:
                with open(file, "rb", buffering=0) as f:
                    self.read[file] = 0
                    while left > 0 and not self._cancelled.is_set():
                        n = self._read_chunk(f, self.read[file], min(READ_AHEAD_CHUNK, left))
                        if not n:
                            break
                        self.read[file] += n
                        left -= n
                if left <= 0 or self._cancelled.is_set():
                    return
        except OSError:
            return
        finally:
            self.ended = time.perf_counter()
            if self._null is not None:
                os.close(self._null)
            self._buffer = None

    def _read_chunk(self, f, offset: int, n: int) -> int:
        """Up to `n` bytes of the open file `f` at `offset` into the page cache: sent to /dev/null, else (no
        sendfile, or refused: macOS sends to sockets only) read into the thread's buffer."""
        if self._null is not None:
            try:
                return os.sendfile(self._null, f.fileno(), offset, n)
            except OSError:
                os.close(self._null)
                self._null = None
        if self._buffer is None:
            self._buffer = memoryview(bytearray(READ_AHEAD_CHUNK))
        f.seek(offset)
        return f.readinto(self._buffer[:n])


def read_ahead(path: str | os.PathLike, max_bytes: int, after: Sequence = ()) -> ReadAhead | None:
    """Start reading a component's weight files (`files_to_read`: one expert's shards, the text encoder's
    .pth or folder) into the page cache, the first `max_bytes` of them in file order, once `after` (threads,
    events) are done: see `ReadAhead`. None when there is nothing to do (max_bytes <= 0, no files)."""
    files = files_to_read(path)
    if max_bytes <= 0 or not files:
        return None
    thread = ReadAhead(files, max_bytes, after)
    thread.start()
    return thread


# ---------------------------------------------------------------------------------------------
# model roots

TEXT_WEIGHTS, TOKENIZER, VAE_WEIGHTS = "models_t5_umt5-xxl-enc-bf16.pth", "google/umt5-xxl", "Wan2.1_VAE.pth"
LAYOUT_FILES = {  # what each layout's root must hold (a trailing / marks a folder)
    "official": ["high_noise_model/", "low_noise_model/", TEXT_WEIGHTS, VAE_WEIGHTS, TOKENIZER + "/"],
    "diffusers": ["model_index.json", "transformer/", "transformer_2/", "text_encoder/", "tokenizer/", "vae/"],
}
EXPERT_PAIRS = (("high_noise_model", "low_noise_model"), ("transformer", "transformer_2"))
EXPERT_ENTRIES = {f"{d}/" for pair in EXPERT_PAIRS for d in pair}
HUB_IDS = {"official": "Wan-AI/Wan2.2-T2V-A14B", "diffusers": "Wan-AI/Wan2.2-T2V-A14B-Diffusers"}
BOUNDARY = 0.875  # official boundary ratio; a diffusers root's model_index.json boundary_ratio overrides it


@dataclass(frozen=True)
class ModelRoot:
    """A Wan2.2-T2V-A14B model on disk, described once: what the pipeline, the app, several GPUs,
    quantize and calib take. Reading it touches only small files (configs, headers, metadata)."""

    path: Path  # the root folder
    name: str  # as the user gave it (a path or a hub id): stored in the video's metadata
    layout: str  # "official" | "diffusers" | "files" (the four pieces named one by one)
    high: Path  # the high-noise expert (t >= boundary * 1000)
    low: Path  # the low-noise expert
    scheme: str  # both experts' weight format: "none" (float), "int8", "fp8", or a library scheme
    config: ModelConfig  # one expert's dimensions (both have the same)
    boundary: float  # the ratio 0.875: the high-noise expert runs while t >= boundary * 1000
    text_encoder: Path  # the umt5-xxl weights: a .pth (official), a folder (diffusers) or one .safetensors file
    tokenizer: Path | str  # the google/umt5-xxl tokenizer folder, or that hub id (single-file encoders)
    vae: Path  # Wan2.1_VAE.pth (official), vae/ (diffusers) or wan_2.1_vae.safetensors

    @property
    def run_scheme(self) -> str | None:
        """The scheme a GPU reads single-file experts as (GGUF: requantized to int8); None: as stored."""
        return "int8" if self.scheme == "int8" and any(p.suffix == ".gguf" for p in (self.high, self.low)) else None

    def files(self) -> dict[str, str]:
        """{"high", "low", "text_encoder", "vae", "tokenizer"} -> the path (or tokenizer hub id) each piece is
        read from: what a video's metadata records."""
        return {"high": str(self.high), "low": str(self.low), "text_encoder": str(self.text_encoder),
                "vae": str(self.vae), "tokenizer": str(self.tokenizer)}

    @property
    def library_scheme(self) -> bool:
        """optimum-quanto / bitsandbytes experts: swapped as whole modules, not packed."""
        return self.scheme in LIBRARY_SCHEMES


def _present(root: Path, entry: str) -> bool:
    return (root / entry).is_dir() if entry.endswith("/") else (root / entry).is_file()


def check_root(root: str | os.PathLike) -> str:
    """The layout of a model root; one CheckpointError listing every missing file otherwise."""
    root = Path(root)
    if not root.is_dir():
        raise CheckpointError(f"model root {root} is not a folder")
    if root.name in ("high_noise_model", "low_noise_model", "transformer", "transformer_2") and (
            (root.parent / "high_noise_model").is_dir() or (root.parent / "transformer_2").is_dir()):
        raise CheckpointError(f"{root} is one expert of a model root: pass its parent folder {root.parent}")
    other = _other_wan_model(root)
    if other:
        raise CheckpointError(f"{root} holds {other}, not Wan2.2-T2V-A14B (two experts, high_noise_model/ + "
                              f"low_noise_model/): wan-lite runs Wan2.2-T2V-A14B only; use {HUB_IDS['official']} "
                              f"or {HUB_IDS['diffusers']}")
    # the experts may carry either layout's names (a quantized copy of a diffusers root has
    # high_noise_model/ + low_noise_model/ beside text_encoder/, tokenizer/, vae/): the pair counts for both
    pair = any(all((root / d).is_dir() for d in names) for names in EXPERT_PAIRS)
    found = {layout: [e for e in files if _present(root, e) or (pair and e in EXPERT_ENTRIES)]
             for layout, files in LAYOUT_FILES.items()}
    layout = max(found, key=lambda k: len(found[k]))
    if not found[layout]:
        raise CheckpointError(
            f"{root} is not a Wan2.2-T2V-A14B root: expected {', '.join(LAYOUT_FILES['official'])} (official "
            f"{HUB_IDS['official']}) or {', '.join(LAYOUT_FILES['diffusers'])} ({HUB_IDS['diffusers']})"
        )
    missing = [e for e in LAYOUT_FILES[layout] if e not in found[layout]]
    if missing and pair and set(missing) == set(LAYOUT_FILES[layout]) - set(EXPERT_ENTRIES):
        high, low = next(names for names in EXPERT_PAIRS if all((root / d).is_dir() for d in names))
        raise CheckpointError(  # quantize's output from single files: the two experts and nothing else
            f"{root} holds the two experts only ({high}/, {low}/), no text encoder, VAE or tokenizer: pass "
            f"--high {root / high} --low {root / low} --text-encoder FILE --vae FILE [--tokenizer DIR] (the "
            f"command `python -m wan_lite.quantize` printed), or download {', '.join(missing)} from "
            f"{HUB_IDS[layout]} into {root}")
    if missing:
        raise CheckpointError(
            f"{root} ({layout} layout) is missing {', '.join(missing)}: download them from "
            f"{HUB_IDS[layout]} into {root}"
        )
    return layout


OTHER_MODELS = {("t2v", 1536): "Wan2.1-T2V-1.3B", ("t2v", 5120): "Wan2.1-T2V-14B",
                ("i2v", 5120): "Wan2.1-I2V-14B", ("flf2v", 5120): "Wan2.1-FLF2V-14B", ("ti2v", 3072): "Wan2.2-TI2V-5B",
                ("vace", 5120): "Wan2.1-VACE-14B", ("vace", 1536): "Wan2.1-VACE-1.3B"}


def _other_wan_model(root: Path) -> str | None:
    """The name of another Wan release at `root` (one transformer, no expert pair), from its config.json,
    the diffusers transformer's config or the Wan2.2 VAE (z_dim 48, TI2V-5B's); None for anything else."""
    if any((root / d).is_dir() for d in ("high_noise_model", "low_noise_model", "transformer_2")):
        return None  # an expert pair: checked as Wan2.2-T2V-A14B (an I2V pair is refused by its in_dim)
    index = root / "model_index.json"
    if index.is_file() and "transformer_2" in json.loads(index.read_text()):
        return None  # a diffusers A14B root with an expert not downloaded yet: listed as missing
    config = {}
    for file in (root / "config.json", root / "transformer" / "config.json"):
        if file.is_file():
            try:
                config = json.loads(file.read_text())
            except json.JSONDecodeError:
                continue
            break
    dim = config.get("dim") or (config.get("num_attention_heads", 0) * config.get("attention_head_dim", 0))
    in_dim = config.get("in_dim") or config.get("in_channels")
    kind = config.get("model_type") or {48: "ti2v", 36: "i2v", 16: "t2v"}.get(in_dim)
    if (root / "Wan2.2_VAE.pth").is_file() or in_dim == 48:
        kind, dim = "ti2v", dim or 3072
    if not kind and not dim:
        return None
    name = OTHER_MODELS.get((kind, dim), f"a single-transformer Wan model (model_type {kind}, dim {dim})")
    return f"{name} (one transformer{', in_dim ' + str(in_dim) if in_dim else ''})"


def resolve_root(path_or_hub_id: str | os.PathLike) -> Path:
    """A local folder as is; a Hugging Face id (owner/name) downloaded into the hub cache when online."""
    path = Path(path_or_hub_id).expanduser()
    name = str(path_or_hub_id)
    if path.exists() or not looks_like_hub_id(name):
        if not path.exists():
            raise FileNotFoundError(f"model root {path} does not exist")
        return path
    how = (f"download it first (`hf download {name} --local-dir DIR`, about 126 GB) and pass that folder "
           "as the model path")
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on"):
        raise FileNotFoundError(f"{name} is not a local folder and HF_HUB_OFFLINE is set: {how}")
    from huggingface_hub import snapshot_download  # only when a download is asked for

    try:
        return Path(snapshot_download(repo_id=name))
    except Exception as e:  # network down, unknown or gated repo: all end the same way for the user
        raise FileNotFoundError(
            f"{name} is no local folder, and downloading it from the Hugging Face Hub failed "
            f"({type(e).__name__}: {e}): {how}"
        ) from e


def find_text_encoder(root: str | os.PathLike) -> tuple[str, Path, Path]:
    """(layout, weights, tokenizer folder) of the umt5 encoder in a root of either layout."""
    root = Path(root)
    official = (root / TEXT_WEIGHTS, root / TOKENIZER)
    diffusers = (root / "text_encoder", root / "tokenizer")
    if official[0].is_file():
        layout, (weights, tokenizer) = "official", official
    elif diffusers[0].is_dir():
        layout, (weights, tokenizer) = "diffusers", diffusers
    else:
        raise FileNotFoundError(
            f"no text encoder in {root}: expected {TEXT_WEIGHTS} + {TOKENIZER}/ (official layout) "
            "or text_encoder/ + tokenizer/ (diffusers layout)"
        )
    if not tokenizer.is_dir():
        raise FileNotFoundError(f"the {layout} text encoder in {root} has no tokenizer folder {tokenizer}")
    return layout, weights, tokenizer


def find_vae(root: str | os.PathLike) -> tuple[str, Path]:
    """(layout, path) of the VAE in a model root of either layout."""
    root = Path(root)
    if (root / VAE_WEIGHTS).is_file():
        return "official", root / VAE_WEIGHTS
    if (root / "vae").is_dir():
        return "diffusers", root / "vae"
    raise FileNotFoundError(f"no VAE in {root}: expected {VAE_WEIGHTS} (official layout) or vae/ (diffusers layout)")


def open_root(path_or_hub_id: str | os.PathLike) -> ModelRoot:
    """Describe a model root (either layout, or a quantized copy; a hub id is downloaded when online).
    Raises CheckpointError / FileNotFoundError naming what is missing or wrong and the fix."""
    path = resolve_root(path_or_hub_id)
    if any((path / sub).is_dir() for sub in COMFYUI_FOLDERS["experts"]):
        found = sorted(f.name for sub in COMFYUI_FOLDERS["experts"] if (path / sub).is_dir()
                       for f in (path / sub).iterdir() if f.suffix in (".safetensors", ".gguf"))
        raise CheckpointError(f"{path} is a ComfyUI models folder: name the two experts in it with --high NAME "
                              f"--low NAME (found: {_clip(found) if found else 'no .safetensors / .gguf files'})")
    layout = check_root(path)
    high, low = find_experts(path)
    schemes = {"high": expert_scheme(high), "low": expert_scheme(low)}
    if schemes["high"] != schemes["low"]:
        raise CheckpointError(
            f"{path}: the experts are stored in different formats (high: {schemes['high']}, low: "
            f"{schemes['low']}): convert both (python -m wan_lite.quantize --experts high,low)")
    boundary = BOUNDARY
    if layout == "diffusers":
        boundary = float(json.loads((path / "model_index.json").read_text()).get("boundary_ratio", BOUNDARY))
    _, text_encoder, tokenizer = find_text_encoder(path)
    _, vae = find_vae(path)
    config = check_pair(expert_config(high), expert_config(low), high, low)
    return ModelRoot(path=path, name=str(path_or_hub_id), layout=layout, high=high, low=low,
                     scheme=schemes["high"], config=config, boundary=boundary,
                     text_encoder=text_encoder, tokenizer=tokenizer, vae=vae)


GGUF_AS = "int8"  # GGUF experts run as our int8 (requantized per channel at load; see wan_lite.formats.expert)
TOKENIZER_HUB_ID = "google/umt5-xxl"  # single-file text encoders hold no tokenizer


def _file_scheme(path: Path) -> str:
    """The scheme a single-file expert runs as: its fp8 weights as our fp8, GGUF as int8, float as "none"."""
    scheme = identify(path).scheme
    return GGUF_AS if scheme == "gguf" else "none" if scheme == "none" else "fp8"


def open_components(high, low, *, text_encoder, vae, tokenizer=None, name: str | None = None) -> ModelRoot:
    """Describe a model given as its four pieces (what ComfyUI users have): the two experts (single
    .safetensors / .gguf files, or expert folders), the umt5 text encoder (a single file, a .pth or a
    folder), the Wan2.1 VAE (a file or a folder) and optionally the tokenizer folder (default: the
    google/umt5-xxl hub id, cached or downloaded by transformers). Every piece is identified from its
    header and checked before any weight is read; a wrong file is refused by name."""
    paths = {"high": Path(high), "low": Path(low), "text encoder": Path(text_encoder), "VAE": Path(vae)}
    words = {"high": "high-noise expert", "low": "low-noise expert", "text encoder": "text encoder", "VAE": "VAE"}
    for what, path in paths.items():
        if not path.exists():
            raise FileNotFoundError(f"the {words[what]} file {path} does not exist")
    for what, path in (("expert", paths["high"]), ("expert", paths["low"]), ("text_encoder", paths["text encoder"]),
                       ("vae", paths["VAE"])):
        if path.is_file() and path.suffix in (".safetensors", ".gguf"):
            refuse(identify(path), what)
    schemes = {k: _file_scheme(p) if p.is_file() else expert_scheme(p) for k, p in (("high", paths["high"]),
                                                                                      ("low", paths["low"]))}
    if schemes["high"] != schemes["low"]:
        words = {k: "float (fp32/fp16/bf16)" if v == "none" else v for k, v in schemes.items()}
        raise CheckpointError(f"the experts are stored in different formats (high {paths['high'].name}: "
                              f"{words['high']}, low {paths['low'].name}: {words['low']}): use a matching pair, or "
                              "convert one to the other's format (python -m wan_lite.quantize --high FILE --low FILE "
                              "--out DST --scheme int8|fp8)")
    configs = [open_expert(p).config if p.is_file() else expert_config(p) for p in (paths["high"], paths["low"])]
    config = check_pair(*configs, paths["high"], paths["low"])
    if tokenizer is not None and not Path(tokenizer).is_dir():
        raise FileNotFoundError(f"tokenizer folder {tokenizer} does not exist")
    if tokenizer is None and paths["text encoder"].is_dir() and (paths["text encoder"].parent / "tokenizer").is_dir():
        tokenizer = paths["text encoder"].parent / "tokenizer"  # a diffusers root's text_encoder/ + tokenizer/
    return ModelRoot(path=paths["high"].parent, name=name or f"{paths['high'].name} + {paths['low'].name}",
                     layout="files", high=paths["high"], low=paths["low"], scheme=schemes["high"], config=config,
                     boundary=BOUNDARY, text_encoder=paths["text encoder"],
                     tokenizer=Path(tokenizer) if tokenizer is not None else TOKENIZER_HUB_ID, vae=paths["VAE"])


COMFYUI_FOLDERS = {"experts": ("diffusion_models", "unet"), "text": ("text_encoders", "clip"), "vae": ("vae",)}


def swapped_names(high, low) -> str | None:
    """A warning when the file names say the experts are given the wrong way round (the files themselves
    cannot tell: both experts have the same tensors): 'low'-noise in --high and 'high'-noise in --low."""
    def says(name: str, which: str) -> bool:
        return re.search(rf"{which}[_\-. ]?noise", Path(name).name, re.IGNORECASE) is not None

    if says(high, "low") and says(low, "high"):
        return (f"the file names say the experts are swapped: --high {Path(high).name} looks like the low-noise "
                f"expert and --low {Path(low).name} like the high-noise one; swap them unless the names are wrong")
    return None


def open_comfyui(models, *, high: str, low: str, tokenizer=None) -> ModelRoot:
    """A ComfyUI `models/` folder: the two experts named by the user (file names in diffusion_models/
    or unet/), the umt5-xxl encoder found in text_encoders/ (or clip/) and the Wan2.1 VAE in vae/, each
    recognised by its content (fp16 preferred over fp8 for the encoder). Errors list what was found."""
    models = Path(models)

    def expert(name: str) -> Path:
        for sub in COMFYUI_FOLDERS["experts"]:
            if (models / sub / name).is_file():
                return models / sub / name
        if Path(name).is_file():
            return Path(name)
        raise FileNotFoundError(f"no expert file {name!r} in {models}/diffusion_models or {models}/unet")

    def find(kind: str, model: tuple[str, ...], subs: tuple[str, ...]) -> Path:
        found = []
        for sub in subs:
            for f in sorted((models / sub).glob("*.safetensors")) if (models / sub).is_dir() else []:
                try:
                    info = identify(f)
                except CheckpointError:
                    continue
                if info.kind == kind and info.model in model:
                    found.append((info.scheme != "none", f))  # float first
        if not found:
            raise FileNotFoundError(f"no {model[0]} {kind.replace('_', ' ')} file in {models}/{'/ or '.join(subs)}/: "
                                    "put it there (umt5_xxl_fp16.safetensors / wan_2.1_vae.safetensors), or name it "
                                    "with --text-encoder / --vae")
        return min(found)[1]

    text = find("text_encoder", ("umt5-xxl", "umt5"), COMFYUI_FOLDERS["text"])  # "umt5": other widths (tests)
    return open_components(expert(high), expert(low), text_encoder=text,
                           vae=find("vae", ("wan2.1-vae",), COMFYUI_FOLDERS["vae"]), tokenizer=tokenizer,
                           name=f"{models} ({high} + {low})")


def _clip(names: list[str], n: int = 6) -> str:
    return ", ".join(names[:n]) + (f" and {len(names) - n} more" if len(names) > n else "")
