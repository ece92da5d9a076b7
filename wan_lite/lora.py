"""LoRAs for a Wan2.2 expert: read a .safetensors LoRA in any public key format, merge it as tensors are read.

Key formats (detected from the keys, never from the file name; facts from the public files and the
runtimes that load them: ComfyUI `comfy/lora.py`, diffusers `_convert_non_diffusers_wan_lora_to_diffusers`):
- "comfyui": `diffusion_model.<official module>.lora_down.weight` (rank, in), `.lora_up.weight` (out, rank)
  and `.alpha` (scalar): Wan2.2-Lightning, LightX2V, ComfyUI. The `.lora_A` / `.lora_B` spelling under the
  same prefix is diffusion-pipe's (seen in tdrussell/diffusion-pipe issue 114). `model.diffusion_model.`
  or no prefix reads the same.
- "kohya": `lora_unet_<official module, "." -> "_">.lora_down.weight`, `.lora_up.weight`, `.alpha`
  (Kohya sd-scripts, musubi-tuner).
- "diffusers": `transformer.<diffusers module>.lora_A.weight`, `.lora_B.weight` (PEFT), no alpha keys:
  scale 1, unless the header's `lora_adapter_metadata` (written by diffusers' save_lora_weights) holds
  PEFT's `transformer.lora_alpha` (scale alpha / rank, alpha / sqrt(rank) with use_rslora); per-module
  alpha_pattern and use_dora are refused. Renamed with `checkpoint.diffusers_to_official`; `.lora_B.bias`
  is a bias delta.
- full deltas (LightX2V, with the comfyui prefix): `<module>.diff` adds to the module's weight,
  `.diff_b` to its bias, `blocks.N.diff_m` to the block's modulation table.
A pair of factors adds strength * alpha / rank * up @ down (rank = down's rows; no alpha: scale 1, as
ComfyUI and PEFT at lora_alpha = r); a full delta adds strength * diff. Deliberately unsupported: DoRA
(`dora_scale` changes the merge, refused), LyCORIS LoHa / LoKr, LoRAs of the text encoder.

Refused before any model weight is read (`CheckpointError`): a file whose keys match nothing in the model
(the message lists a few and says which format they look like); a LoRA for Wan I2V (`k_img` / `v_img` /
`img_emb` keys); factors whose shapes do not fit the model (another width: TI2V-5B, Wan2.1-1.3B).
A partially matching file is read, and `read_lora` warns (`PartialLoRAWarning`, via `warnings.warn`) with
how many keys it used and a few it ignored; `LoRA.used` / `LoRA.ignored` hold the same counts for a caller
that prints its own summary or writes metadata.

Merging for 8-bit experts: merge before quantizing, not a low-rank side path. `LoRASource` dequantizes the
8-bit Linear (w * scale), adds the delta and requantizes per output channel, once at load. Why:
- speed: a side path costs 2 * L * r * (in + out) FLOPs per Linear per pass, the merged weight zero. At
  720p (L = 75,600 tokens) and rank 128 that is 0.2 TFLOP for a 5120 x 5120 Linear (5 % of its 4.0 TFLOP
  GEMM) and 0.37 TFLOP for each FFN Linear (3.4 %); over the 6 Linears of a block that see all L tokens
  plus the FFN, 1.9 TFLOP a block, 77 TFLOP a pass, 300 TFLOP for the 4 Lightning passes. It would run in
  bf16 (not on the 8-bit tensor cores that run at twice the rate), as thin (L x 128) GEMMs that reread the
  activations, so its time share exceeds its FLOP share (about 10 % of the 8-bit GEMM time). The merge
  costs 2 * out * in * r FLOPs per Linear once: 3.6 TFLOP an expert, well under a second on a GPU.
- memory: a side path keeps the factors on the GPU: rank 128 is 0.6 G parameters (1.2 GB bf16) an
  expert, against a 24 GB budget; merged costs nothing.
- accuracy: the float W is gone from an 8-bit file, so the merged weight is rounded twice (the file's
  quantization, then the requantization of w * scale + dW): the error against the float merged model is
  about the root-sum-square of the two, 1.3-1.6x the scheme's usual error (tests/test_lora.py measures it:
  int8 3.2e-3 -> 4.3-5.5e-3, fp8 1.6e-2 -> 2.0-2.6e-2 on the tiny expert). A side path would keep 1.0x;
  quantizing the float expert with the LoRA merged (once) would too, and is the way to the least error.
The price: a new LoRA or strength needs the expert reloaded (it is streamed from disk anyway).

Memory: factors are read memory-mapped one tensor at a time; a merged weight exists for one Linear at a
time (an 8-bit Linear's requantized weight and scale are computed together and dropped once both are
read), so loading two Lightning LoRAs does not double host RAM.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import struct
import warnings
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from .config import ModelConfig
from .formats.identify import identify
from .keys import CheckpointError, diffusers_to_official
from .keys import open_safetensors as _safe_open
from .model import WanModel
from .quantized.linear import quantize_linear_weight

FORMATS = ("comfyui", "kohya", "diffusers")

# stored-key prefix -> format
_PREFIXES = (("model.diffusion_model.", "comfyui"), ("diffusion_model.", "comfyui"), ("transformer.", "diffusers"),
             ("lora_unet_", "kohya"))
# stored-key suffix -> what it is
_SUFFIXES = ((".lora_down.weight", "down"), (".lora_up.weight", "up"), (".lora_A.weight", "down"),
             (".lora_B.weight", "up"), (".lora_B.bias", "diff_b"), (".alpha", "alpha"), (".diff_b", "diff_b"),
             (".diff_m", "diff_m"), (".diff", "diff"))
_DIFFUSERS_ONLY = re.compile(r"(attn[12]\.|condition_embedder|proj_out|ffn\.net|scale_shift_table)")
_I2V = re.compile(r"(k_img|v_img|img_emb)")  # Wan I2V's image cross-attention and image embedding
_WIDTHS = {5120: "Wan2.x 14B (T2V-A14B, I2V-A14B, Wan2.1-14B)", 3072: "Wan2.2-TI2V-5B", 1536: "Wan2.1-T2V-1.3B"}


class PartialLoRAWarning(UserWarning):
    """Some keys of a LoRA matched nothing in the model and were ignored."""


@dataclass(frozen=True)
class Term:
    """One addend of a tensor's delta: factors (keys = (up, down), scale = alpha / rank) or a full delta
    (keys = (diff,), scale 1)."""

    keys: tuple[str, ...]
    scale: float
    shape: tuple[int, ...]  # the target tensor's shape


@dataclass(frozen=True, eq=False)
class LoRA:
    """One LoRA file, parsed and checked against a model config; its tensors stay on disk until `delta`."""

    path: Path
    format: str  # "comfyui" | "kohya" | "diffusers" (see the module docstring)
    config: ModelConfig = field(repr=False)  # the model it was checked against
    terms: dict[str, tuple[Term, ...]] = field(repr=False)  # our tensor name (official key) -> the addends of its delta
    rank: int | None  # the largest factor rank (None: full deltas only)
    alpha: float | None  # the alpha all factor pairs share (None: none stored, i.e. scale 1, or they differ)
    used: int  # stored keys that went into a term
    ignored: tuple[str, ...] = field(repr=False)  # stored keys that matched nothing in the model
    digest: str = field(repr=False)  # sha256 of the header and size
    _handle: list = field(default_factory=list, repr=False)  # the open safe_open handle, once read

    def fingerprint(self) -> str:
        return self.digest

    def tensor(self, key: str) -> torch.Tensor:
        """One stored tensor, memory-mapped (the file is opened once)."""
        if not self._handle:
            self._handle.append(_safe_open(self.path))
        return self._handle[0].get_tensor(key)


# ---------------------------------------------------------------------------------------------
# reading


def read_lora(path, config: ModelConfig | None = None) -> LoRA:
    """Read a LoRA's header, map its keys to our tensor names and check them against `config` (default:
    one A14B expert). No tensor data is read except the scalar alphas. Raises CheckpointError (see the
    module docstring); warns `PartialLoRAWarning` when only some keys match."""
    path, config = Path(path), config or ModelConfig.a14b()
    if not path.is_file():
        raise CheckpointError(f"LoRA file {path} does not exist: check the path")
    info = identify(path)  # a GGUF or an expert / encoder / VAE given as a LoRA: said by name
    if info.kind in ("expert", "text_encoder", "vae") or info.container == "gguf":
        raise CheckpointError(f"{path} is {info.describe()}, not a LoRA: give it as --high / --low (an expert) or "
                              "pass a LoRA file (e.g. Wan2.2-Lightning_T2V-A14B-4steps-lora_HIGH_fp16.safetensors)")
    with _safe_open(path) as f:
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
        alphas = {k: float(f.get_tensor(k).float().item()) for k in shapes if k.endswith(".alpha")}
        peft = _peft_alpha(path, f.metadata() or {})
    if not shapes:
        raise CheckpointError(f"{path} holds no tensors: it is not a LoRA")
    _refuse_other_models(path, shapes)
    fmt = Counter(_split_prefix(k)[1] for k in shapes).most_common(1)[0][0]
    groups = _group(shapes, config)  # our module -> {kind: stored key}
    expected = _expected_shapes(config)
    terms: dict[str, list[Term]] = {}
    used, bad_shapes = set(), []
    for module, parts in groups.items():
        for target, term, keys in _module_terms(module, parts, shapes, alphas, peft):
            if target not in expected:
                continue
            if not _fits(term, shapes, expected[target]):
                bad_shapes.append((keys[0], shapes[keys[0]], target, expected[target]))
                continue
            terms.setdefault(target, []).append(Term(term.keys, term.scale, tuple(expected[target])))
            used.update(keys)
    if bad_shapes:
        raise CheckpointError(_shape_message(path, bad_shapes, config))
    ignored = sorted(set(shapes) - used)
    if not terms:
        raise CheckpointError(f"{path}: none of its {len(shapes)} keys match a tensor of the Wan2.2 expert "
                              f"({_clip(ignored)}; they look like {_looks_like(ignored)}): use a LoRA made for "
                              "Wan2.2-T2V-A14B (or Wan2.1-T2V-14B) in the ComfyUI, Kohya or diffusers format")
    if ignored:
        warnings.warn(f"{path.name}: used {len(used)} of {len(shapes)} keys; ignored {len(ignored)} that match "
                      f"nothing in the model ({_clip(ignored, 3)}; they look like {_looks_like(ignored)})",
                      PartialLoRAWarning, stacklevel=2)
    pairs = [t for ts in terms.values() for t in ts if len(t.keys) == 2]
    ranks = [shapes[t.keys[1]][0] for t in pairs]
    stored_alphas = {alphas[a] for t in pairs if (a := _alpha_key(t.keys[1])) in alphas}
    has_all_alphas = all(_alpha_key(t.keys[1]) in alphas for t in pairs)
    if peft[0] is not None and not alphas:
        stored_alphas, has_all_alphas = {peft[0]}, True
    return LoRA(path=path, format=fmt, config=config, terms={k: tuple(v) for k, v in terms.items()},
                rank=max(ranks) if ranks else None,
                alpha=stored_alphas.pop() if len(stored_alphas) == 1 and has_all_alphas else None,
                used=len(used), ignored=tuple(ignored), digest=_digest(path))


def _peft_alpha(path: Path, metadata: dict) -> tuple[float | None, bool]:
    """(lora_alpha, use_rslora) from diffusers' `lora_adapter_metadata` header entry; (None, False) without."""
    raw = metadata.get("lora_adapter_metadata")
    if not raw:
        return None, False
    meta = {k.removeprefix("transformer."): v for k, v in json.loads(raw).items()}
    if meta.get("alpha_pattern") or meta.get("use_dora"):
        raise CheckpointError(f"{path}: its PEFT metadata sets per-module alphas (alpha_pattern) or DoRA, which "
                              "are not supported; save the LoRA with one lora_alpha")
    alpha = meta.get("lora_alpha")
    return (float(alpha) if alpha is not None else None), bool(meta.get("use_rslora"))


def _refuse_other_models(path: Path, shapes: dict) -> None:
    i2v = [k for k in shapes if _I2V.search(k)]
    if i2v:
        raise CheckpointError(f"{path} is a LoRA for Wan I2V (image-to-video): it has image cross-attention keys "
                              f"({_clip(i2v, 3)}) that a text-to-video expert lacks; use a T2V LoRA")
    dora = [k for k in shapes if k.endswith("dora_scale")]
    if dora:
        raise CheckpointError(f"{path} is a DoRA ({_clip(dora, 3)}): DoRA rescales the merged weight and is not "
                              "supported; use a plain LoRA")


def _split_prefix(key: str) -> tuple[str, str]:
    """(key without its format prefix, format). Unprefixed keys are diffusers names when they use
    diffusers module names, else official (comfyui) names."""
    for prefix, fmt in _PREFIXES:
        if key.startswith(prefix):
            return key[len(prefix):], fmt
    return key, "diffusers" if _DIFFUSERS_ONLY.search(key) else "comfyui"


def _group(shapes: dict, config: ModelConfig) -> dict[str, dict[str, str]]:
    """Stored keys grouped by our module name and kind ("down", "up", "alpha", "diff", "diff_b", "diff_m").
    Keys of unknown suffix or module are left out (the caller reports them as ignored)."""
    groups: dict[str, dict[str, str]] = {}
    kohya = _kohya_names(config)
    for key in shapes:
        rest, fmt = _split_prefix(key)
        suffix, kind = next(((s, k) for s, k in _SUFFIXES if rest.endswith(s)), (None, None))
        if kind is None:
            continue
        module = rest[: -len(suffix)]
        if fmt == "kohya":
            module = _from_kohya(module, kohya)
        elif fmt == "diffusers":
            module = diffusers_to_official(f"{module}.weight").removesuffix(".weight")
        if module is not None:
            groups.setdefault(module, {})[kind] = key
    return groups


def _kohya_names(config: ModelConfig) -> tuple[dict[str, str], dict[str, str]]:
    """Underscored -> dotted module names: (inside a block, outside the blocks)."""
    with torch.device("meta"):
        model = WanModel(replace(config, num_layers=1))
    names = [n for n, _ in model.named_modules() if n]
    block = {n[len("blocks.0."):].replace(".", "_"): n[len("blocks.0."):] for n in names if n.startswith("blocks.0.")}
    top = {n.replace(".", "_"): n for n in names if not n.startswith("blocks")}
    return block, top


def _from_kohya(name: str, tables: tuple[dict[str, str], dict[str, str]]) -> str | None:
    block, top = tables
    if m := re.fullmatch(r"blocks_(\d+)(?:_(.+))?", name):
        if m[2] is None:
            return f"blocks.{m[1]}"
        return f"blocks.{m[1]}.{block[m[2]]}" if m[2] in block else None
    return top.get(name)


def _module_terms(module: str, parts: dict[str, str], shapes: dict, alphas: dict, peft: tuple[float | None, bool]):
    """(target tensor name, Term without its shape, stored keys used) for one module's stored keys.
    `peft`: (lora_alpha, use_rslora) of the header's PEFT metadata, for pairs without an alpha key."""
    if "down" in parts and "up" in parts:
        down, up = parts["down"], parts["up"]
        rank = shapes[down][0]
        alpha_key = parts.get("alpha")
        if alpha_key is not None:
            scale = alphas[alpha_key] / rank
        elif peft[0] is not None:
            scale = peft[0] / (math.sqrt(rank) if peft[1] else rank)
        else:
            scale = 1.0
        keys = (up, down) + ((alpha_key,) if alpha_key else ())
        yield f"{module}.weight", Term((up, down), scale, ()), keys
    for kind, leaf in (("diff", "weight"), ("diff_b", "bias"), ("diff_m", "modulation")):
        if kind in parts:
            yield f"{module}.{leaf}", Term((parts[kind],), 1.0, ()), (parts[kind],)


def _alpha_key(down_key: str) -> str:
    for suffix in (".lora_down.weight", ".lora_A.weight"):
        if down_key.endswith(suffix):
            return down_key[: -len(suffix)] + ".alpha"
    return down_key


def _expected_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):
        return {n: tuple(p.shape) for n, p in WanModel(config).state_dict().items()}


def _fits(term: Term, shapes: dict, target: tuple[int, ...]) -> bool:
    """Factors: up (out, r, ...), down (r, in, ...) give out x prod(in...) = the target; a full delta has
    the target's element count (stored squeezed or not)."""
    if len(term.keys) == 1:
        return math.prod(shapes[term.keys[0]]) == math.prod(target)
    up, down = shapes[term.keys[0]], shapes[term.keys[1]]
    return (len(up) >= 2 and up[0] == target[0] and up[1] == down[0] and math.prod(up[2:]) == 1
            and math.prod(down[1:]) == math.prod(target[1:]))


def _shape_message(path: Path, bad: list, config: ModelConfig) -> str:
    key, shape, target, want = bad[0]
    widths = {d for _, s, _, _ in bad for d in s if d in _WIDTHS and d != config.dim}
    which = f"a model of width {min(widths)} ({_WIDTHS[min(widths)]})" if widths else "another model"
    return (f"{path} is a LoRA for {which}: {len(bad)} of its tensors do not fit this expert (width {config.dim}"
            f"{', ' + _WIDTHS[config.dim] if config.dim in _WIDTHS else ''}), e.g. {key} {list(shape)} for "
            f"{target} {list(want)}; use a LoRA made for Wan2.2-T2V-A14B")


def _looks_like(keys: list[str]) -> str:
    """A guess at where keys come from, for error messages."""
    k = keys[0] if keys else ""
    if k.startswith("lora_te"):
        return "a text-encoder LoRA (lora_te)"
    if re.search(r"(down_blocks|up_blocks|input_blocks|double_blocks|single_blocks|transformer_blocks)", k):
        return "a LoRA for another model family (UNet / Flux / HunyuanVideo block names)"
    if re.search(r"(lokr_|hada_)", k):
        return "a LyCORIS LoKr / LoHa (not supported)"
    fmt = _split_prefix(k)[1]
    return {"comfyui": "the ComfyUI / Lightning format (diffusion_model.<layer>)",
            "kohya": "the Kohya format (lora_unet_<layer>)",
            "diffusers": "the diffusers PEFT format (transformer.<layer>)"}[fmt] + " with unknown layer names"


def _digest(path: Path) -> str:
    """sha256 of the safetensors header (names, shapes, offsets) and the file size: no full read."""
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = f.read(n)
    json.loads(header)  # a damaged header was refused by safe_open already; this only asserts the layout
    return hashlib.sha256(header + str(path.stat().st_size).encode()).hexdigest()[:16]


def _clip(names: list[str], n: int = 5) -> str:
    return ", ".join(names[:n]) + (f" and {len(names) - n} more" if len(names) > n else "")


# ---------------------------------------------------------------------------------------------
# merging


def delta(name: str, lora: LoRA, strength: float = 1.0, device=None) -> torch.Tensor | None:
    """The float32 delta `lora` adds to tensor `name` at `strength` (None: it adds nothing), on `device`.

    Factors: strength * alpha / rank * up @ down (a conv's down is flattened over its kernel); full
    deltas: strength * diff. The result has the target tensor's shape.
    """
    out = None
    for term in lora.terms.get(name, ()):
        if len(term.keys) == 2:
            up, down = (lora.tensor(k).to(device=device, dtype=torch.float32) for k in term.keys)
            d = up.flatten(1) @ down.flatten(1)  # (out, r) @ (r, in * kernel) -> (out, in * kernel)
        else:
            d = lora.tensor(term.keys[0]).to(device=device, dtype=torch.float32)
        d = d.reshape(term.shape).mul_(strength * term.scale)
        out = d if out is None else out.add_(d)
    return out


class LoRASource:
    """An expert source (the contract of wan_lite.checkpoint) with LoRAs merged into its tensors as they are
    read: same names, config, scheme and Linears as `base`.

    A float tensor comes back as W + sum(strength * delta) in W's dtype (one rounding when the loader
    casts to the same dtype). An 8-bit Linear's weight and weight_scale come back requantized per output
    channel from w * scale + sum(strength * delta), computed once for both and dropped when both were read.
    Tensors no LoRA touches come back from `base` unchanged. `device`: where merges run and merged tensors
    are returned (None: the CPU); use the GPU when there is one.
    """

    def __init__(self, base, loras: Sequence[tuple[LoRA, float]], *, device=None):
        self.base = base
        self.path, self.config, self.scheme, self.linears = base.path, base.config, base.scheme, base.linears
        self.device = device
        self.loras = [(lora if lora.config == base.config else read_lora(lora.path, base.config), float(s))
                      for lora, s in loras]
        self.targets = {name for lora, _ in self.loras for name in lora.terms}
        self._check()
        self._pending: dict[str, dict[str, torch.Tensor]] = {}  # 8-bit module -> merged tensors not yet read

    def _check(self) -> None:
        names = set(self.base.names())
        for lora, _ in self.loras:
            missing = sorted(set(lora.terms) - names)
            if missing:
                raise CheckpointError(f"{lora.path} changes {_clip(missing)}, which {self.path} does not hold")
            smoothed = [m for m in self.linears if f"{m}.weight" in lora.terms and self.linears[m].get("smooth")]
            if smoothed:
                raise CheckpointError(f"{self.path} stores {_clip(smoothed)} with SmoothQuant factors, which LoRA "
                                      "merging does not support: quantize without --smooth, or use the bf16 expert")

    def shapes(self) -> dict[str, list[int]]:
        return self.base.shapes()  # a merge changes values, never shapes

    def names(self) -> list[str]:
        return self.base.names()

    def fingerprint(self) -> str:
        parts = [self.base.fingerprint()] + [f"{lora.fingerprint()}:{s!r}" for lora, s in self.loras]
        return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]

    def tensor(self, name: str) -> torch.Tensor:
        module, _, leaf = name.rpartition(".")
        if module in self.linears and leaf in ("weight", "weight_scale"):
            return self._requantized(module, leaf)
        if name not in self.targets:
            return self.base.tensor(name)
        w = self.base.tensor(name)
        return self._merged(w, name).to(w.dtype)

    def _merged(self, w: torch.Tensor, name: str) -> torch.Tensor:
        """w as float32 on `device` plus every LoRA's delta for `name`, added one LoRA at a time."""
        w = w.to(device=self.device, dtype=torch.float32, copy=True)
        for lora, strength in self.loras:
            d = delta(name, lora, strength, self.device)
            if d is not None:
                w += d
        return w

    def _requantized(self, module: str, leaf: str) -> torch.Tensor:
        """`leaf` of the 8-bit Linear `module` with the LoRAs merged: dequantize, add, requantize per row."""
        weight = f"{module}.weight"
        if weight not in self.targets:
            return self.base.tensor(f"{module}.{leaf}")
        if leaf not in self._pending.get(module, {}):
            w = self.base.tensor(weight).to(device=self.device, dtype=torch.float32)  # (N, K)
            scale = self.base.tensor(f"{module}.weight_scale").to(device=self.device, dtype=torch.float32)  # (N,)
            q, s = quantize_linear_weight(self._merged(w * scale[:, None], weight), self.linears[module]["scheme"])
            self._pending[module] = {"weight": q, "weight_scale": s}
        entry = self._pending[module]
        out = entry.pop(leaf)
        if not entry:
            del self._pending[module]
        return out
