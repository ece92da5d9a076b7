"""The on-disk format of a wan-lite quantized expert, and loading it.

An expert folder (`DST/high_noise_model/`, `DST/low_noise_model/`) holds:

- `model-0000i-of-0000n.safetensors` shards. Each shard's safetensors header metadata carries
  `format` ("wan-lite-quant"), `format_version`, `scheme` and `expert`, so a lone shard says what it is.
- `model.safetensors.index.json`: the usual {"weight_map": {tensor: shard}}.
- `wan_lite_quant.json` (written last: its presence means the folder is complete): scheme, format
  version, the model config dims, which Linears are quantized and how, the dtype every other tensor
  is stored in, SmoothQuant settings, the source's layout and fingerprint, wan-lite's version and,
  per shard, its byte size and sha256.

Tensor names are the official checkpoint keys. A quantized Linear `blocks.i.ffn.0` is stored as
`.weight` (8-bit, (N, K)), `.weight_scale` ((N,) float32), `.bias` (float32) and, with smoothing that
no preceding op absorbed, `.smooth` ((K,) float32). Everything else (embeddings, norms, modulation
tables, time projection, head) keeps the source precision (float32 for the official release).
The scheme is read from this metadata and nothing else; a file name proves nothing.

Schemes: int8, fp8 (ours, `QuantLinear`); quanto-int8, quanto-fp8 (optimum-quanto), nf4
(bitsandbytes): the last three are loaded by `wan_lite.quantized.backends`.

This module is the runtime's reader of the format (the runtime never imports the offline toolchain in
the top-level `quant/`, which writes it); `wan_lite.checkpoint` opens such a folder as an expert source.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors import safe_open

from ..config import ModelConfig
from ..model import WanModel

FORMAT = "wan-lite-quant"
FORMAT_VERSION = 1
META_FILE = "wan_lite_quant.json"
INDEX_FILE = "model.safetensors.index.json"
QUANTO_QMAP = "quanto_qmap.json"  # optimum-quanto's map of quantized modules (a bare quanto folder has only it)
SCHEMES = ("int8", "fp8", "quanto-int8", "quanto-fp8", "nf4")

# The big Linears of the blocks: these are quantized, nothing else is.
QUANTIZED_LINEAR = re.compile(r"^blocks\.\d+\.(self_attn\.[qkvo]|cross_attn\.[qkvo]|ffn\.[02])$")

FIX_HINT = "rebuild it with: python -m wan_lite.quantize --ckpt SRC --out DST --scheme SCHEME --force"


class QuantFormatError(ValueError):
    """A quantized expert on disk is incomplete, damaged or of a scheme/version we do not read."""


def is_quantized_linear(module_name: str) -> bool:
    return QUANTIZED_LINEAR.match(module_name) is not None


def quantized_linears(cfg: ModelConfig, scheme: str) -> dict[str, dict]:
    """The `linears` record of an expert of `cfg` whose block Linears are all `scheme` ({} for "none")."""
    if scheme == "none":
        return {}
    with torch.device("meta"):
        names = [n for n, _ in WanModel(cfg).named_modules() if QUANTIZED_LINEAR.match(n)]
    return {n: {"scheme": scheme, "smooth": False} for n in names}


def shard_name(i: int, n: int) -> str:
    return f"model-{i + 1:05d}-of-{n:05d}.safetensors"


def shard_header(scheme: str, expert: str) -> dict[str, str]:
    """The safetensors header metadata every shard carries (strings only, as safetensors requires)."""
    return {"format": FORMAT, "format_version": str(FORMAT_VERSION), "scheme": scheme, "expert": expert}


def config_to_dict(cfg) -> dict:
    d = asdict(cfg)
    d["patch_size"] = list(d["patch_size"])
    return d


def config_from_dict(d: dict) -> ModelConfig:
    return ModelConfig(**{**d, "patch_size": tuple(d["patch_size"])})


def is_quantized_folder(path) -> bool:
    """True for a wan-lite quantized expert folder, or a bare optimum-quanto one (quanto_qmap.json)."""
    path = Path(path)
    return (path / META_FILE).is_file() or (path / QUANTO_QMAP).is_file()


def read_meta(path) -> dict:
    """Read and check `wan_lite_quant.json` of an expert folder: format, version, scheme."""
    meta_file = Path(path) / META_FILE
    if not meta_file.is_file():
        raise QuantFormatError(f"{meta_file} is missing: {Path(path)} is not a (complete) wan-lite quantized "
                               f"expert; {FIX_HINT}")
    try:
        meta = json.loads(meta_file.read_text())
    except json.JSONDecodeError as e:
        raise QuantFormatError(f"{meta_file} is not valid JSON ({e}): {FIX_HINT}") from e
    if meta.get("format") != FORMAT:
        raise QuantFormatError(f"{meta_file}: format {meta.get('format')!r} is not {FORMAT!r}: {FIX_HINT}")
    version = meta.get("format_version")
    if version != FORMAT_VERSION:
        raise QuantFormatError(
            f"{meta_file}: format version {version} is not the version {FORMAT_VERSION} this wan-lite reads: "
            + ("upgrade wan-lite" if isinstance(version, int) and version > FORMAT_VERSION else FIX_HINT))
    if meta.get("scheme") not in SCHEMES:
        raise QuantFormatError(f"{meta_file}: unknown quantization scheme {meta.get('scheme')!r} (this wan-lite "
                               f"reads {', '.join(SCHEMES)}): upgrade wan-lite, or {FIX_HINT}")
    return meta


def check_shard(folder: Path, entry: dict, scheme: str) -> None:
    """Size and header check of one shard (cheap: no data read); raises QuantFormatError naming the file."""
    file = folder / entry["file"]
    if not file.is_file():
        raise QuantFormatError(f"{file} is missing: {FIX_HINT}")
    size = file.stat().st_size
    if size != entry["bytes"]:
        raise QuantFormatError(f"{file} has {size} bytes, {META_FILE} records {entry['bytes']}: the file is "
                               f"truncated or damaged; {FIX_HINT}")
    try:
        with safe_open(file, framework="pt") as f:
            header = f.metadata() or {}
            keys = set(f.keys())
    except Exception as e:  # safetensors raises its own error types for damaged headers
        raise QuantFormatError(f"{file} is not a readable safetensors file ({e}): {FIX_HINT}") from e
    if header.get("format") != FORMAT or header.get("scheme") != scheme:
        raise QuantFormatError(f"{file}: header says format {header.get('format')!r}, scheme "
                               f"{header.get('scheme')!r}; {META_FILE} says {scheme!r}: the folder mixes "
                               f"conversions; {FIX_HINT}")
    if keys != set(entry["tensors"]):
        raise QuantFormatError(f"{file} holds other tensors than {META_FILE} lists: {FIX_HINT}")


def runtime_dtype(name: str, meta: dict, dtype: torch.dtype) -> torch.dtype | None:
    """The dtype a stored tensor is held in at runtime (None: keep the stored dtype)."""
    module, _, leaf = name.rpartition(".")
    if module in meta["linears"]:
        return dtype if leaf == "bias" else None  # 8-bit weight, float32 scales/smooth as stored
    return WanModel.param_dtype(name, dtype)
