"""What a weights file says about itself, read without touching its weights.

- safetensors: 8 bytes little-endian header length N, then N bytes of JSON: per tensor
  {"dtype", "shape", "data_offsets": [begin, end]} relative to the end of the header, and an
  optional "__metadata__" (str -> str). (The safetensors format spec, huggingface/safetensors README.)
- GGUF: magic "GGUF", version, tensor count, key/value metadata, tensor infos (name, dims in ggml
  order `ne` = the torch shape reversed, ggml type, offset), then the aligned data. Read with
  `gguf.GGUFReader`, which memory-maps the file and builds views without reading tensor data.

Both readers check that the file is as long as its header promises, so a truncated download fails
here, naming the file, before anything reads a weight.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import struct
from dataclasses import dataclass, field
from pathlib import Path

from wan_lite.keys import CheckpointError

GGUF_MAGIC = b"GGUF"
ORIG_SHAPE_KEY = "comfy.gguf.orig_shape."  # ComfyUI-GGUF: a tensor's torch shape when stored reshaped
REDOWNLOAD = "download it again"


@dataclass(frozen=True)
class TensorInfo:
    name: str  # as stored in the file
    dtype: str  # safetensors dtype ("F16", "F8_E4M3", ...) or ggml type name ("F32", "Q4_K", ...)
    shape: tuple[int, ...]  # torch order (GGUF: `ne` reversed, or comfy.gguf.orig_shape.<name>)


@dataclass(frozen=True)
class Header:
    path: Path
    container: str  # "safetensors" | "gguf"
    tensors: dict[str, TensorInfo]  # stored name -> info
    metadata: dict[str, object]  # safetensors "__metadata__" or GGUF key/values (decoded)
    digest: str  # sha256 of the header bytes and the file size: identifies the file without reading weights
    gguf_reader: object = field(default=None, repr=False, compare=False)  # the open GGUFReader (gguf only)

    @property
    def architecture(self) -> str | None:
        """GGUF `general.architecture` (None for safetensors)."""
        return self.metadata.get("general.architecture") if self.container == "gguf" else None


def read_header(path) -> Header:
    """Parse a .safetensors or .gguf file's header (chosen by the file's first bytes, not its name).

    Raises CheckpointError naming the file when it is missing, truncated or not a weights file.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path} does not exist or is not a file")
    with open(path, "rb") as f:
        magic = f.read(4)
    return _read_gguf(path) if magic == GGUF_MAGIC else _read_safetensors(path)


def truncated(path: Path, promised: int, size: int) -> CheckpointError:
    return CheckpointError(f"{path} is truncated: the header says {promised} bytes, the file has {size}; "
                           f"{REDOWNLOAD}")


# ---------------------------------------------------------------------------------------------
# safetensors


def _read_safetensors(path: Path) -> Header:
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:  # both formats start with an 8-byte length or magic + version
            raise CheckpointError(f"{path} is empty: {REDOWNLOAD}" if size == 0 else
                                  f"{path} ({size} bytes) is too short to be a safetensors or GGUF file: pass the "
                                  f"weights file (or, if this is one cut short, {REDOWNLOAD})")
        (n,) = struct.unpack("<Q", head)
        if 8 + n > size:
            raise truncated(path, 8 + n, size) if n < 100 << 20 else CheckpointError(
                f"{path} is not a safetensors or GGUF file (its first bytes are no header): pass a "
                ".safetensors or .gguf weights file")
        raw = f.read(n)
    try:
        header = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} has a damaged safetensors header ({e}): {REDOWNLOAD}") from e
    metadata = header.pop("__metadata__", None) or {}
    tensors = {name: TensorInfo(name, t["dtype"], tuple(t["shape"])) for name, t in header.items()}
    end = max((t["data_offsets"][1] for t in header.values()), default=0)
    if 8 + n + end > size:
        raise truncated(path, 8 + n + end, size)
    digest = hashlib.sha256(raw + str(size).encode()).hexdigest()
    return Header(path, "safetensors", tensors, dict(metadata), digest)


# ---------------------------------------------------------------------------------------------
# GGUF


def require_gguf(action: str = "reading") -> None:
    """CheckpointError naming the install when the gguf package is missing (`action`: reading | writing)."""
    if importlib.util.find_spec("gguf") is None:
        raise CheckpointError(f"{action} GGUF files needs the gguf package: pip install 'wan-lite[gguf]' "
                              "(or pip install gguf)")


def _checked_reader(path: Path):
    """gguf.GGUFReader that compares the data size the tensor infos promise with the file size
    before it builds its views (GGUFReader itself fails on a short file with a bare reshape error)."""
    import gguf

    class CheckedReader(gguf.GGUFReader):
        def _build_tensors(self, start_offs, fields):  # (gguf 0.19: called once the tensor infos are parsed)
            promised = start_offs
            for f in fields:
                dims, raw_dtype, offset = f.parts[3], f.parts[4], f.parts[5]
                block, type_size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(int(raw_dtype[0]))]
                n_elems = 1
                for d in dims.tolist():
                    n_elems *= int(d)
                promised = max(promised, start_offs + int(offset[0]) + n_elems * type_size // block)
            if promised > len(self.data):
                raise truncated(path, promised, len(self.data))
            super()._build_tensors(start_offs, fields)

    return CheckedReader(path)


def _field_value(f):
    """A GGUF metadata value as Python (str, int, float, list)."""
    value = f.contents()
    return value.tolist() if hasattr(value, "tolist") else value


def _read_gguf(path: Path) -> Header:
    require_gguf()
    try:
        reader = _checked_reader(path)
    except CheckpointError:
        raise
    except Exception as e:  # gguf raises ValueError / struct errors on a damaged header
        raise CheckpointError(f"cannot read {path} as GGUF ({type(e).__name__}: {e}): the file is damaged or "
                              f"truncated, {REDOWNLOAD}") from e
    metadata = {name: _field_value(f) for name, f in reader.fields.items() if not name.startswith("GGUF.")}
    tensors = {}
    for t in reader.tensors:
        shape = metadata.get(ORIG_SHAPE_KEY + t.name) or list(reversed(t.shape.tolist()))
        shape = tuple(int(d) for d in shape)
        n = 1
        for d in shape:
            n *= d
        if n != int(t.n_elements):
            raise CheckpointError(f"{path}: {ORIG_SHAPE_KEY}{t.name} is {list(shape)} ({n} values) but the tensor "
                                  f"holds {int(t.n_elements)}: the file is damaged, {REDOWNLOAD}")
        tensors[t.name] = TensorInfo(t.name, t.tensor_type.name, shape)
    digest = hashlib.sha256(bytes(reader.data[: reader.data_offset]) + str(len(reader.data)).encode()).hexdigest()
    return Header(path, "gguf", tensors, metadata, digest, reader)


def check_keys(expected, found, file, what: str) -> None:
    """Raise CheckpointError naming `file` when the tensor names `found` lack any of `expected` or hold others.

    `what` names the model the file should hold ("a 40-block Wan2.2 expert", "the Wan2.1 VAE", ...).
    """
    missing, unexpected = sorted(set(expected) - set(found)), sorted(set(found) - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            f"{file} does not hold {what}: "
            + (f"missing {clip(missing)}; " if missing else "")
            + (f"unexpected {clip(unexpected)}; " if unexpected else "")
            + f"the file is incomplete or another model's: {REDOWNLOAD} or pass the right file")


def clip(names: list[str], n: int = 6) -> str:
    return ", ".join(names[:n]) + (f" and {len(names) - n} more" if len(names) > n else "")
