"""One expert in one file (safetensors or GGUF), presented as an expert source (see checkpoint.py).

What each file maps to (`open_expert_file(path, scheme=None)`):

- safetensors fp32/fp16/bf16, keys native, prefixed `model.diffusion_model.` / `diffusion_model.`, or
  diffusers names: scheme "none", every tensor as stored.
- fp8 scaled, legacy (`<layer>.scale_weight`, `scaled_fp8`) or newer ComfyUI (`<layer>.weight_scale`,
  `comfy_quant`): scheme "fp8"; block Linears keep their stored float8_e4m3fn weight and take the
  scale as (N,) float32; any other fp8 tensor (text/time embedding, head) is dequantized, w.float()*scale.
- GGUF (`general.architecture` "wan"): scheme "none", every tensor dequantized to float32; with
  scheme="int8" the block Linears are dequantized and requantized per output channel to int8.

Facts relied on, from the public converters and loaders:
- legacy fp8 scaled (ComfyUI `comfy/utils.py` `convert_old_quants`): a marker tensor `scaled_fp8`,
  per layer `<layer>.scale_weight` (float32 scalar, W = w.float() * scale_weight) and optionally
  `<layer>.scale_input`. Kijai's `_e5m2_` files store float8_e5m2 weights the same way.
- newer ComfyUI (`comfy/quant_ops.py` QUANT_ALGOS, `comfy/utils.py`): per layer `<layer>.comfy_quant`,
  a uint8 tensor holding JSON bytes such as {"format": "float8_e4m3fn"}, and/or the header metadata
  `_quantization_metadata` = JSON {"layers": {<full key of the layer>: {"format": ...}}}; parameters
  `<layer>.weight_scale` and `<layer>.input_scale`. Formats float8_e4m3fn and float8_e5m2 are read
  (weight_scale a scalar or one value per output channel); nvfp4, mxfp8, int8 layouts are refused.
- input scales (`scale_input` / `input_scale`) are ignored: the runtime quantizes activations per token.
- GGUF (ComfyUI-GGUF `loader.py`): native key names (a `model.diffusion_model.` prefix is stripped
  when present); the torch shape is the ggml `ne` reversed, or `comfy.gguf.orig_shape.<name>` when the
  tensor was stored reshaped (the 5-D patch embedding); F32/F16 are read in place from the memory map,
  every other type is dequantized (here in torch: `formats.ggml`, which falls back to
  `gguf.quants.dequantize` for the types it does not decode).

Decisions:
- float8_e5m2 block weights become e4m3fn with a power-of-two rescale per output channel
  (`e5m2_to_e4m3`): e4m3 has one more mantissa bit, so every value within 2^14 of its row's absmax is
  kept exactly; smaller ones round to e4m3 subnormals (absolute error below absmax * 2^-17).
- GGUF int8 (`scheme="int8"`): each block weight is dequantized and requantized symmetric per output
  channel (`wan_lite.quantized.linear.quantize_linear_weight`, absmax/127) when `tensor()` is asked for it. This adds
  the int8 rounding error on top of the GGUF one (tests/test_formats.py measures it). The int8 work
  (`ggml.dequantize_rows_int8`) runs in torch on the CPU, on all its cores: on the H200 machine (16
  threads, `python -m wan_lite.bench_gguf`, 2026-11-29) 0.049 s (Q8_0) / 0.102 s (Q4_K) for an A14B ffn.0
  weight, against 0.058 / 0.060 s through the GPU with its transfers (and the low-noise expert is filled
  while the high-noise steps use the GPU).
- num_heads: an explicit `num_heads=`, else the header metadata key `wan_lite.num_heads` (which the
  test files write), else dim // 128: every Wan release has head_dim 128 (1.3B 12 heads, 5B 24, 14B 40).
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import threading
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open

from wan_lite.config import ModelConfig
from wan_lite.keys import CheckpointError
from wan_lite.model import WanModel

from ..quantized.linear import convert_for_runtime, quantize_linear_weight
from . import ggml
from .headers import REDOWNLOAD, Header, check_keys
from .identify import FP8_DTYPES, FileInfo, official_names, refuse, scan

BLOCK_LINEAR = re.compile(r"^blocks\.\d+\.(self_attn\.[qkvo]|cross_attn\.[qkvo]|ffn\.[02])$")  # the 8-bit ones
HEAD_DIM = 128  # every Wan release
NUM_HEADS_KEY = "wan_lite.num_heads"  # optional header metadata (safetensors __metadata__ or GGUF key/value)
COMFY_FP8_FORMATS = ("float8_e4m3fn", "float8_e5m2")
MARKERS = (".scale_weight", ".scale_input", ".input_scale", ".comfy_quant")  # read, never model parameters
SCHEMES = (None, "none", "int8", "fp8")


# ---------------------------------------------------------------------------------------------
# fp8 helpers


def row_scale(scale: torch.Tensor, rows: int, name: str, file: Path) -> torch.Tensor:
    """A stored weight scale (scalar, (1,), (N,) or (N, 1)) as (N,) float32 (a scalar broadcast)."""
    if scale.numel() == 1:
        return scale.float().reshape(1).expand(rows).contiguous()
    if scale.numel() == rows and scale.squeeze().ndim == 1:
        return scale.float().reshape(rows)
    raise CheckpointError(f"{file}: {name} has shape {list(scale.shape)}; a weight scale is a scalar or one "
                          f"value per output channel ({rows}): this fp8 layout is not read by wan-lite")


def e5m2_to_e4m3(w: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, K) float8_e5m2 weight, (N,) float32 scale -> (N, K) float8_e4m3fn, (N,) float32 scale, same W.

    Each row is divided by 2^k (exact in float32), k the smallest integer that brings its absmax to
    <= 448, and 2^k moves into the scale. e4m3 has 3 mantissa bits to e5m2's 2: values >= 2^-7 after
    the shift (within 2^14 of the absmax) are exact, smaller ones round to e4m3 subnormals.
    """
    wf = w.float()  # (N, K), exact
    amax = wf.abs().amax(dim=1)  # (N,)
    k = torch.where(amax > 0, torch.ceil(torch.log2(amax / 448.0)), torch.zeros_like(amax))  # (N,)
    q = (wf * torch.exp2(-k)[:, None]).to(torch.float8_e4m3fn)  # (N, K)
    return q, scale * torch.exp2(k)


# ---------------------------------------------------------------------------------------------
# the two containers


@dataclass
class SafetensorsWeights:
    """Tensors of one safetensors file by our name; fp8 weights carry their scale name (or None)."""

    path: Path
    header: Header
    stored: dict[str, str]  # our name -> stored name (parameters only)
    scales: dict[str, str | None]  # fp8 layer (our module name) -> stored name of its weight scale
    _handle: object = field(default=None, repr=False)

    def _get(self, stored: str) -> torch.Tensor:
        if self._handle is None:
            self._handle = safe_open(self.path, framework="pt")  # memory-mapped
        return self._handle.get_tensor(stored)

    def fp8(self, layer: str) -> tuple[torch.Tensor, torch.Tensor]:
        """The stored fp8 (N, K) weight of `layer` and its scale as (N,) float32 (1 when the file has none)."""
        w = self._get(self.stored[layer + ".weight"])
        scale_name = self.scales[layer]
        scale = self._get(scale_name) if scale_name else torch.ones(1)
        return w, row_scale(scale, w.shape[0], scale_name, self.path)

    def float_tensor(self, name: str) -> torch.Tensor:
        """One tensor as a float: stored float dtype as is, fp8 dequantized (w.float() * scale) to float32."""
        layer = name.removesuffix(".weight")
        if name.endswith(".weight") and layer in self.scales:
            w, scale = self.fp8(layer)
            return w.float() * scale.reshape(-1, *[1] * (w.ndim - 1))  # (N, K) * (N, 1)
        return self._get(self.stored[name])


@dataclass
class GGUFWeights:
    """Tensors of one GGUF file by our name, dequantized one at a time from the memory map (`formats.ggml`)."""

    path: Path
    header: Header
    stored: dict[str, str]  # our name -> stored name
    _by_name: dict = field(default_factory=dict, repr=False)

    def raw(self, name: str) -> tuple[torch.Tensor, str, tuple[int, ...]]:
        """(the stored bytes as a CPU tensor viewing the memory map, ggml type name, torch shape) of one tensor."""
        if not self._by_name:
            self._by_name = {t.name: t for t in self.header.gguf_reader.tensors}
        t = self._by_name[self.stored[name]]
        with warnings.catch_warnings():  # the memmap is read-only; torch only reads it
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            data = torch.from_numpy(t.data)  # uint8 blocks, or the values of F32 / F16
        return data, t.tensor_type.name, tuple(self.header.tensors[t.name].shape)

    def float_tensor(self, name: str) -> torch.Tensor:
        """One tensor in its torch shape: F32/F16/BF16 viewed from the memory map, other types dequantized
        to float32 on the CPU (torch, all its threads; `ggml.dequantize`)."""
        data, qtype, shape = self.raw(name)
        if qtype in ggml.FLOATS:
            return data.reshape(-1).view(torch.uint8).view(ggml.FLOATS[qtype]).reshape(shape)
        return ggml.dequantize(data, qtype, shape)

    def int8(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """A block Linear weight as our int8 (q (N, K) int8, scale (N,) float32), dequantized and requantized
        per output channel on the CPU: `ggml.dequantize_rows_int8`."""
        data, qtype, shape = self.raw(name)
        return ggml.dequantize_rows_int8(data, qtype, shape)


# ---------------------------------------------------------------------------------------------
# the expert source


@dataclass
class ExpertFile:
    """An expert source (the contract in checkpoint.py) over one file: names, lazy tensors, 8-bit Linears."""

    path: Path
    info: FileInfo
    config: ModelConfig
    scheme: str  # "none" | "int8" | "fp8": how the block Linears come out of tensor()
    linears: dict[str, dict]  # 8-bit block Linear -> {"scheme": "int8"|"fp8", "smooth": False}
    weights: SafetensorsWeights | GGUFWeights = field(repr=False)
    native_fp8: frozenset = field(default=frozenset(), repr=False)  # layers whose stored fp8 weight is used
    _params: list[str] = field(default_factory=list, repr=False)  # the model's parameter names
    _cached: threading.local = field(default_factory=threading.local, repr=False)  # .pair per reading thread

    def names(self) -> list[str]:
        """The runtime model's state_dict names: an 8-bit Linear X gives X.weight, X.weight_scale, X.bias."""
        out = []
        for name in self._params:
            out.append(name)
            if name.removesuffix(".weight") in self.linears and name.endswith(".weight"):
                out.append(name.removesuffix(".weight") + ".weight_scale")
        return out

    def shapes(self) -> dict[str, list[int]]:
        """Every tensor's shape as `tensor()` gives it (checked against the model when the file was opened)."""
        with torch.device("meta"):
            model = WanModel(self.config)
        convert_for_runtime(model, self.linears)
        state = model.state_dict()
        return {name: list(state[name].shape) for name in self.names()}

    def tensor(self, name: str) -> torch.Tensor:
        """One tensor, read lazily: 8-bit weight (N, K) / scale (N,) float32 for the 8-bit Linears, else a float."""
        layer, _, leaf = name.rpartition(".")
        if layer in self.linears and leaf in ("weight", "weight_scale"):
            w, scale = self._eight_bit(layer)
            return w if leaf == "weight" else scale
        return self.weights.float_tensor(name)

    def _eight_bit(self, layer: str) -> tuple[torch.Tensor, torch.Tensor]:
        """The loader asks a layer's weight and its weight_scale: the last layer quantized is kept, one per
        thread (the residency's prefetch thread reads units while the calling thread may read others)."""
        pair = getattr(self._cached, "pair", None)  # (layer, (weight, scale))
        if pair is None or pair[0] != layer:
            pair = self._cached.pair = (layer, self._quantize(layer))
        return pair[1]

    def _quantize(self, layer: str) -> tuple[torch.Tensor, torch.Tensor]:
        if layer in self.native_fp8:
            w, scale = self.weights.fp8(layer)
            return (w, scale) if w.dtype == torch.float8_e4m3fn else e5m2_to_e4m3(w, scale)
        scheme = self.linears[layer]["scheme"]
        if scheme == "int8" and isinstance(self.weights, GGUFWeights):
            return self.weights.int8(layer + ".weight")
        return quantize_linear_weight(self.weights.float_tensor(layer + ".weight"), scheme)

    def fingerprint(self) -> str:
        """sha256 of the file's header bytes, its size and the scheme it is read as (no weight read)."""
        return hashlib.sha256(f"{self.weights.header.digest}|{self.scheme}".encode()).hexdigest()[:16]


def open_expert_file(path, *, scheme: str | None = None, num_heads: int | None = None) -> ExpertFile:
    """Open one expert file (.safetensors or .gguf, recognised by content) as an expert source.

    scheme: None keeps the file's own form (float -> "none", fp8 scaled -> "fp8", GGUF -> "none");
    "none" dequantizes everything to float; "int8" / "fp8" quantize every block Linear per output
    channel at `tensor()` time (an fp8 file's e4m3 weights are kept as they are under "fp8").
    num_heads: overrides the head count (see the module docstring for the default rule).

    Raises CheckpointError, before any weight is read, for a file that is not a T2V expert (I2V,
    TI2V, a LoRA, a text encoder, a VAE, another GGUF architecture), is truncated, lacks or has extra
    tensors, or uses a quantized layout wan-lite does not read.
    """
    if scheme not in SCHEMES:
        raise ValueError(f"scheme must be one of None, 'none', 'int8', 'fp8', not {scheme!r}")
    info, header, names = scan(path)
    refuse(info, "expert")
    path = header.path
    fp8_layers = _fp8_layers(header, names)
    if header.container == "safetensors":
        _check_comfy_formats(header, names, fp8_layers)
    params = {n: s for n, s in names.items() if not _is_marker(n, fp8_layers)}
    shapes = {n: header.tensors[s].shape for n, s in params.items()}
    config = config_from_shapes(shapes, header.metadata, path, num_heads)
    _check_model(config, shapes, path)
    if header.container == "gguf":
        weights = GGUFWeights(path, header, params)
    else:
        weights = SafetensorsWeights(path, header, params, fp8_layers)
    block = [n.removesuffix(".weight") for n in shapes if BLOCK_LINEAR.match(n.removesuffix(".weight"))
             and n.endswith(".weight")]
    native = frozenset(n for n in block if n in fp8_layers) if scheme in (None, "fp8") else frozenset()
    eight_bit = block if scheme in ("int8", "fp8") else sorted(native)
    linears = {n: {"scheme": scheme or "fp8", "smooth": False} for n in eight_bit}
    final = (scheme or "fp8") if linears else "none"
    return ExpertFile(path, info, config, final, linears, weights, native, list(shapes))


# ---------------------------------------------------------------------------------------------
# checks before any weight is read


def _fp8_layers(header: Header, names: dict[str, str]) -> dict[str, str | None]:
    """fp8-stored weights: our module name -> stored name of its scale (`.weight_scale` or legacy `.scale_weight`)."""
    out = {}
    for ours, stored in names.items():
        if ours.endswith(".weight") and header.tensors[stored].dtype in FP8_DTYPES:
            base = stored.removesuffix(".weight")
            scale = next((base + s for s in (".weight_scale", ".scale_weight") if base + s in header.tensors), None)
            out[ours.removesuffix(".weight")] = scale
    return out


def _is_marker(name: str, fp8_layers) -> bool:
    if name == "scaled_fp8" or name.endswith(MARKERS):
        return True
    return name.endswith(".weight_scale") and name.removesuffix(".weight_scale") in fp8_layers


def _comfy_layer_formats(header: Header, names: dict[str, str]) -> dict[str, str]:
    """Our module name -> ComfyUI quant format, from `_quantization_metadata` and `<layer>.comfy_quant` tensors."""
    formats = {}
    meta = header.metadata.get("_quantization_metadata")
    if meta:
        try:
            layers = json.loads(meta)["layers"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{header.path}: the _quantization_metadata header is not the ComfyUI JSON "
                                  f"{{'layers': {{...}}}} ({e}): {REDOWNLOAD}") from e
        renamed = official_names([k + ".weight" for k in layers])  # the layers' full keys, prefixed like the tensors
        formats.update({ours.removesuffix(".weight"): layers[s.removesuffix(".weight")].get("format")
                        for ours, s in renamed.items()})
    markers = [n for n in names if n.endswith(".comfy_quant")]
    if markers:
        with safe_open(header.path, framework="pt") as f:  # a few bytes each: the layers' JSON
            for n in markers:
                conf = json.loads(bytes(f.get_tensor(names[n]).tolist()).decode())
                formats[n.removesuffix(".comfy_quant")] = conf.get("format")
    return formats


def _check_comfy_formats(header: Header, names: dict[str, str], fp8_layers: dict) -> None:
    for layer, fmt in _comfy_layer_formats(header, names).items():
        if fmt not in COMFY_FP8_FORMATS:
            raise CheckpointError(f"{header.path}: layer {layer} is stored in the ComfyUI quantized format {fmt!r}, "
                                  "which wan-lite does not read (only float8_e4m3fn / float8_e5m2): use the fp16 "
                                  "or fp8_scaled file of this expert")
        if layer not in fp8_layers:
            raise CheckpointError(f"{header.path}: layer {layer} is marked {fmt} but its weight is not stored as "
                                  f"fp8: the file is damaged, {REDOWNLOAD}")


def config_from_shapes(shapes: dict[str, tuple], metadata: dict, path: Path, num_heads: int | None) -> ModelConfig:
    """The expert's dimensions from tensor shapes (our names); num_heads by the rule in the module docstring."""
    needed = ("patch_embedding.weight", "head.head.weight", "blocks.0.ffn.0.weight", "time_embedding.0.weight",
              "text_embedding.0.weight")
    missing = [n for n in needed if n not in shapes]
    if missing:
        raise CheckpointError(f"{path} lacks {', '.join(missing)}, so the model size cannot be read: the file is "
                              f"incomplete, {REDOWNLOAD}")
    dim, in_dim, *patch = shapes["patch_embedding.weight"]
    heads = num_heads or int(metadata.get(NUM_HEADS_KEY) or 0)
    if not heads and dim % HEAD_DIM:
        raise CheckpointError(f"{path}: dim {dim} is not a multiple of {HEAD_DIM} (the head width of every Wan "
                              f"release), so the head count is unknown: pass num_heads=, or write "
                              f"{NUM_HEADS_KEY} in the file's metadata")
    heads = heads or dim // HEAD_DIM
    return ModelConfig(
        dim=dim,
        ffn_dim=shapes["blocks.0.ffn.0.weight"][0],
        num_heads=heads,
        num_layers=sum(1 for n in shapes if re.fullmatch(r"blocks\.\d+\.modulation", n)),
        freq_dim=shapes["time_embedding.0.weight"][1],
        text_dim=shapes["text_embedding.0.weight"][1],
        in_dim=in_dim,
        out_dim=shapes["head.head.weight"][0] // math.prod(patch),
        patch_size=tuple(patch),
    )


def _check_model(config: ModelConfig, shapes: dict[str, tuple], path: Path) -> None:
    """Every parameter of the model present with its shape, nothing else (header only)."""
    with torch.device("meta"):
        expected = {n: tuple(p.shape) for n, p in WanModel(config).state_dict().items()}
    check_keys(expected, shapes, path, f"a {config.num_layers}-block Wan2.2 expert")
    for name, shape in expected.items():
        if tuple(shapes[name]) != shape:
            raise CheckpointError(f"{path}: tensor {name} has shape {list(shapes[name])}, the model needs "
                                  f"{list(shape)}: the file mixes different models, {REDOWNLOAD}")
