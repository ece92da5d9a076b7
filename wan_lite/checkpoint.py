"""Find and read expert checkpoints: the official layout, the diffusers layout, our quantized layout.

An expert folder holds safetensors (one file, or shards with a `*.safetensors.index.json`) and a
`config.json`. The official config leaves out text_dim, patch_size and other fields, so the model
dimensions are read from tensor shapes; only the head count comes from the config. The diffusers
layout is the same tensors under other names: `DIFFUSERS_TO_OFFICIAL` is a plain renaming.

Loading builds the model on the meta device and assigns memory-mapped tensors cast one at a time,
so peak host RAM stays about one copy of the expert in the target dtype.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open

from .config import ModelConfig
from .model import WanModel

QUANT_MARKER = "wan_lite_quant.json"  # our quantized layout (quant/format.py)
QUANTO_MARKER = "quanto_qmap.json"  # a bare optimum-quanto expert (quant/backends.py reads it)

# diffusers name pattern -> official name (block index carried through)
DIFFUSERS_TO_OFFICIAL = [
    (r"condition_embedder\.text_embedder\.linear_1\.", "text_embedding.0."),
    (r"condition_embedder\.text_embedder\.linear_2\.", "text_embedding.2."),
    (r"condition_embedder\.time_embedder\.linear_1\.", "time_embedding.0."),
    (r"condition_embedder\.time_embedder\.linear_2\.", "time_embedding.2."),
    (r"condition_embedder\.time_proj\.", "time_projection.1."),
    (r"blocks\.(\d+)\.attn1\.to_q\.", r"blocks.\1.self_attn.q."),
    (r"blocks\.(\d+)\.attn1\.to_k\.", r"blocks.\1.self_attn.k."),
    (r"blocks\.(\d+)\.attn1\.to_v\.", r"blocks.\1.self_attn.v."),
    (r"blocks\.(\d+)\.attn1\.to_out\.0\.", r"blocks.\1.self_attn.o."),
    (r"blocks\.(\d+)\.attn1\.norm_q\.", r"blocks.\1.self_attn.norm_q."),
    (r"blocks\.(\d+)\.attn1\.norm_k\.", r"blocks.\1.self_attn.norm_k."),
    (r"blocks\.(\d+)\.attn2\.to_q\.", r"blocks.\1.cross_attn.q."),
    (r"blocks\.(\d+)\.attn2\.to_k\.", r"blocks.\1.cross_attn.k."),
    (r"blocks\.(\d+)\.attn2\.to_v\.", r"blocks.\1.cross_attn.v."),
    (r"blocks\.(\d+)\.attn2\.to_out\.0\.", r"blocks.\1.cross_attn.o."),
    (r"blocks\.(\d+)\.attn2\.norm_q\.", r"blocks.\1.cross_attn.norm_q."),
    (r"blocks\.(\d+)\.attn2\.norm_k\.", r"blocks.\1.cross_attn.norm_k."),
    (r"blocks\.(\d+)\.norm2\.", r"blocks.\1.norm3."),  # official norm3 is diffusers norm2
    (r"blocks\.(\d+)\.ffn\.net\.0\.proj\.", r"blocks.\1.ffn.0."),
    (r"blocks\.(\d+)\.ffn\.net\.2\.", r"blocks.\1.ffn.2."),
    (r"blocks\.(\d+)\.scale_shift_table$", r"blocks.\1.modulation"),
    (r"proj_out\.", "head.head."),
    (r"scale_shift_table$", "head.modulation"),
]
_DIFFUSERS_RULES = [(re.compile("^" + p), r) for p, r in DIFFUSERS_TO_OFFICIAL]

# Weights that run in the requested dtype (bf16 by default); everything else stays float32,
# because the official model computes it in float32 (time embedding, modulation, norms, head).
_LOW_PRECISION = re.compile(r"^(patch_embedding|text_embedding\.\d|blocks\.\d+\.(self_attn|cross_attn)\.[qkvo]"
                            r"|blocks\.\d+\.ffn\.\d)\.(weight|bias)$")


class CheckpointError(ValueError):
    """A checkpoint on disk is missing, incomplete or not in a layout we read."""


def diffusers_to_official(name: str) -> str:
    for pattern, repl in _DIFFUSERS_RULES:
        new, n = pattern.subn(repl, name)
        if n:
            return new
    return name


def param_dtype(name: str, dtype: torch.dtype) -> torch.dtype:
    """The dtype an expert parameter is held in when the model runs in `dtype`."""
    return dtype if _LOW_PRECISION.match(name) else torch.float32


# ---------------------------------------------------------------------------------------------
# layouts


def detect_layout(path: Path) -> str:
    """'official', 'diffusers', 'wan-lite-quant' or 'quanto' for one expert folder; CheckpointError otherwise."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path} is not a folder: pass one expert's folder (e.g. high_noise_model/ "
                              "or transformer/), or a model root to find_experts()")
    if (path / QUANT_MARKER).exists():
        return "wan-lite-quant"
    if (path / QUANTO_MARKER).exists():
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


def _safe_open(file: Path):
    """safe_open that reports a damaged or truncated file as a CheckpointError naming it."""
    try:
        return safe_open(file, framework="pt")
    except Exception as e:  # safetensors raises its own error types for bad headers
        raise CheckpointError(f"cannot read {file} ({e}): the file is damaged or truncated, download it again") from e


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
        raise CheckpointError(f"{path} has no .safetensors files: download the expert's weights into it")
    names = {}
    for f in files:
        with _open(f) as sf:
            names.update({k: f for k in sf.keys()})
    return names


@dataclass
class ExpertSource:
    """Memory-mapped access to one expert's tensors, by our (official) names."""

    path: Path
    layout: str
    config: ModelConfig
    files: dict[str, Path]  # our name -> file
    stored: dict[str, str]  # our name -> name in the file

    def names(self) -> list[str]:
        return list(self.files)

    _handles: dict[Path, object] = field(default_factory=dict, repr=False)  # file -> open safe_open handle

    def tensor(self, name: str) -> torch.Tensor:
        """One tensor in its stored dtype, read from the memory-mapped file (each file opened once:
        streaming reads every block's tensors every step)."""
        file = self.files[name]
        if file not in self._handles:
            self._handles[file] = _safe_open(file)
        return self._handles[file].get_tensor(self.stored[name])

    def fingerprint(self) -> str:
        """Identifies the source: file names, sizes and config, hashed (no full read)."""
        h = hashlib.sha256((self.path / "config.json").read_bytes())
        for f in sorted(set(self.files.values())):
            h.update(f"{f.name}:{f.stat().st_size}".encode())
        return h.hexdigest()[:16]


def open_expert(path) -> ExpertSource:
    """Open one expert folder of the official or diffusers layout."""
    path = Path(path)
    layout = detect_layout(path)
    if layout in ("wan-lite-quant", "quanto"):
        raise CheckpointError(f"{path} is a quantized expert ({layout}): load it with load_expert()")
    stored_files = weight_files(path)
    rename = diffusers_to_official if layout == "diffusers" else (lambda n: n)
    files, stored = {}, {}
    for name, f in stored_files.items():
        ours = rename(name)
        files[ours], stored[ours] = f, name
    return ExpertSource(path, layout, config_from_shapes(path, files, stored, read_config(path)), files, stored)


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


def load_expert(path, *, dtype: torch.dtype = torch.bfloat16, device="cpu") -> WanModel:
    """Load one expert (official, diffusers or wan-lite quantized layout) as a WanModel on `device`.

    Block Linear weights, the patch and text embeddings are held in `dtype`; the time embedding,
    modulation tables, norms and head in float32, as the official model computes them.
    """
    path = Path(path)
    if detect_layout(path) in ("wan-lite-quant", "quanto"):
        from quant import load_quantized_expert  # quantized layouts are quant/'s business

        return load_quantized_expert(path, dtype=dtype, device=device)
    source = open_expert(path)
    with torch.device("meta"):
        model = WanModel(source.config)
    expected = {name: p.shape for name, p in model.state_dict().items()}
    missing = sorted(set(expected) - set(source.files))
    unexpected = sorted(set(source.files) - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            f"{path} does not match a {source.config.num_layers}-layer Wan2.2 expert: "
            + (f"missing keys {_clip(missing)}; " if missing else "")
            + (f"unexpected keys {_clip([source.stored[n] for n in unexpected])}; " if unexpected else "")
            + "re-download the folder or point at the right expert (text encoder and VAE live elsewhere)")
    by_file: dict[Path, list[str]] = {}
    for name in expected:
        by_file.setdefault(source.files[name], []).append(name)
    for file, names in by_file.items():  # check every shape before reading any data
        with _open(file) as f:
            for name in names:
                stored = list(f.get_slice(source.stored[name]).get_shape())
                if stored != list(expected[name]):
                    raise CheckpointError(
                        f"{file}: tensor {source.stored[name]!r} has shape {stored}, the model needs "
                        f"{list(expected[name])}: the shards mix different models, download them again")
    state = {}
    for file, names in by_file.items():
        with _open(file) as f:
            for name in names:
                state[name] = f.get_tensor(source.stored[name]).to(device=device, dtype=param_dtype(name, dtype))
    model.load_state_dict(state, assign=True)
    return model.eval().requires_grad_(False)


def _clip(names: list[str], n: int = 6) -> str:
    return ", ".join(names[:n]) + (f" and {len(names) - n} more" if len(names) > n else "")
