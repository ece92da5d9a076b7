"""What a weights file is, from its header alone, and the refusal when it is not what was asked for.

`identify(path)` tells a Wan expert from a text encoder, a VAE, a LoRA or anything else by tensor
names and shapes (never by the file name), names the model, the container and the weight scheme.
`refuse(info, wanted)` raises a CheckpointError that says what the file is and which file to use.

The facts the shapes give (DESIGN.md section 5; the official Wan2.1/Wan2.2 configs):
- T2V-A14B expert: dim 5120, in_dim 16, out_dim 16, 40 blocks. Wan2.1-T2V-14B has the very same
  shapes and key names: no header tells them apart (nor the high-noise expert from the low-noise one),
  so both are reported as "wan2.2-t2v-a14b" and the user names which file is which.
- Wan2.2 I2V-A14B: in_dim 36 (16 noise + 4 mask + 16 image latent channels), no CLIP image embedding.
- Wan2.1 I2V / FLF2V-14B: in_dim 36 and `img_emb.*` (the CLIP image projection).
- Wan2.2 TI2V-5B: dim 3072, in_dim 48, out_dim 48 (the Wan2.2 VAE's z_dim). Wan2.1-T2V-1.3B: dim 1536.
- T2V-layout experts of other sizes (in_dim 16, out_dim 16) are "wan-t2v": custom and test models.
- UMT5 (umt5-xxl: vocab 256384, d_model 4096, 24 layers) has a relative attention bias in every
  block; the original T5 only in block 0 (transformers' T5 vs UMT5 `has_relative_attention_bias`).
- Wan VAE: `conv2` is CausalConv3d(z_dim, z_dim, 1): z_dim 16 is the Wan2.1 VAE, 48 the Wan2.2 VAE.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path

from wan_lite.keys import CheckpointError, diffusers_to_official

from .headers import Header, read_header

PREFIXES = ("model.diffusion_model.", "diffusion_model.")  # ComfyUI single files
LORA_SUFFIXES = (".lora_down.weight", ".lora_up.weight", ".lora_A.weight", ".lora_B.weight", ".diff", ".diff_b",
                 ".diff_m")
FP8_DTYPES = ("F8_E4M3", "F8_E5M2")
T2V_EXPERTS = ("wan2.2-t2v-a14b", "wan-t2v")  # the experts wan-lite runs

USE_EXPERTS = ("use wan2.2_t2v_high_noise_14B_*.safetensors and wan2.2_t2v_low_noise_14B_*.safetensors "
               "(or Wan2.2-T2V-A14B-HighNoise-*.gguf / -LowNoise-*.gguf)")
USE_TEXT = "use umt5_xxl_fp16.safetensors or umt5_xxl_fp8_e4m3fn_scaled.safetensors"
USE_VAE = "use wan_2.1_vae.safetensors (or a diffusers vae/ folder: pass the folder, not its file)"

MODEL_NAMES = {
    "wan2.2-t2v-a14b": "a Wan2.2 T2V-A14B expert (or Wan2.1-T2V-14B: same shapes)",
    "wan-t2v": "a Wan text-to-video expert of a custom size",
    "wan2.2-i2v-a14b": "the Wan2.2 I2V-A14B image-to-video expert",
    "wan2.1-i2v-14b": "a Wan2.1 I2V/FLF2V-14B image-to-video model",
    "wan2.2-ti2v-5b": "the Wan2.2 TI2V-5B model",
    "wan2.1-t2v-1.3b": "the Wan2.1 T2V-1.3B model",
    "wan2.1-vace": "a Wan2.1 VACE model",
    "wan-other": "a Wan-family diffusion model of another kind",
    "umt5-xxl": "the umt5-xxl text encoder",
    "umt5": "a UMT5 text encoder of another size",
    "t5": "a T5 text encoder (not UMT5)",
    "wan2.1-vae": "the Wan2.1 VAE",
    "wan2.2-vae": "the Wan2.2 VAE",
    "wan-vae": "a Wan-style VAE of another latent width",
    "lora": "a LoRA",
}


@dataclass(frozen=True)
class FileInfo:
    path: Path
    kind: str  # "expert" | "text_encoder" | "vae" | "lora" | "unknown"
    model: str  # a MODEL_NAMES key, or "gguf:<architecture>" for a GGUF of another architecture, or "unknown"
    container: str  # "safetensors" | "gguf"
    scheme: str  # weights: "none" (float) | "fp8" (plain cast) | "fp8-scaled" (legacy) | "comfy-quant" | "gguf"
    facts: dict = field(default_factory=dict, compare=False)  # dims and dtypes read from the header

    def describe(self) -> str:
        """One phrase for messages: what the file is, its sizes, how its weights are stored."""
        name = MODEL_NAMES.get(self.model) or (f"a GGUF of architecture {self.model[5:]!r}"
                                               if self.model.startswith("gguf:") else "an unrecognised file")
        details = ", ".join(f"{k} {v}" for k, v in self.facts.items() if k != "first keys")
        storage = {"none": "", "fp8": "fp8 (unscaled)", "fp8-scaled": "fp8 scaled (legacy scale_weight)",
                   "comfy-quant": "ComfyUI quantized (comfy_quant)", "gguf": "GGUF"}[self.scheme]
        parts = [p for p in (details, storage, self.container) if p]
        return f"{name} ({'; '.join(parts)})"


def identify(path) -> FileInfo:
    """What the weights file at `path` is, read from its header only (no weight is read).

    Returns a FileInfo; raises CheckpointError naming the file when it is missing, truncated
    ("the header says N bytes, the file has M") or not a safetensors/GGUF file.
    """
    return scan(path)[0]


def scan(path) -> tuple[FileInfo, Header, dict[str, str]]:
    """(info, header, our name -> stored name): `identify` plus what the readers need next."""
    header = read_header(path)
    names = official_names(header.tensors)
    shapes = {ours: header.tensors[stored].shape for ours, stored in names.items()}
    kind, model, facts = _classify(header, shapes)
    return FileInfo(header.path, kind, model, header.container, _scheme(header), facts), header, names


def official_names(stored_names) -> dict[str, str]:
    """Our (official Wan) name -> stored name, for an iterable of stored names: ComfyUI prefixes stripped,
    diffusers names renamed (checkpoint.diffusers_to_official)."""
    out = {}
    for stored in stored_names:
        name = next((stored[len(p):] for p in PREFIXES if stored.startswith(p)), stored)
        out[name] = stored
    if any(n.startswith("condition_embedder.") for n in out):
        out = {diffusers_to_official(n): s for n, s in out.items()}
    return out


def _scheme(header: Header) -> str:
    if header.container == "gguf":
        return "gguf"
    names = header.tensors
    if "_quantization_metadata" in header.metadata or any(n.endswith(".comfy_quant") for n in names):
        return "comfy-quant"
    if any(n.endswith("scaled_fp8") or n.endswith(".scale_weight") for n in names):
        return "fp8-scaled"
    if any(t.dtype in FP8_DTYPES for t in names.values()):
        return "fp8"
    return "none"


# ---------------------------------------------------------------------------------------------
# what the shapes say


def _classify(header: Header, shapes: dict[str, tuple]) -> tuple[str, str, dict]:
    arch = header.architecture
    if header.container == "gguf" and arch != "wan":
        kind = "text_encoder" if arch in ("t5", "t5encoder") else "unknown"
        return kind, f"gguf:{arch}", {"architecture": arch}
    if any(n.endswith(LORA_SUFFIXES) or n.startswith("lora_unet_") for n in shapes):
        return "lora", "lora", _lora_facts(shapes)
    if "patch_embedding.weight" in shapes and any(n.startswith("blocks.0.") for n in shapes):
        return "expert", *_expert(shapes, header)
    if "encoder.block.0.layer.0.SelfAttention.q.weight" in shapes and "shared.weight" in shapes:
        return "text_encoder", *_text_encoder(shapes)
    if {"conv2.weight", "encoder.conv1.weight", "decoder.conv1.weight"} <= set(shapes):
        z_dim = shapes["conv2.weight"][0]
        model = {16: "wan2.1-vae", 48: "wan2.2-vae"}.get(z_dim, "wan-vae")
        return "vae", model, {"z_dim": z_dim}
    return "unknown", "unknown", {"first keys": sorted(header.tensors)[:4]}


def _expert(shapes: dict[str, tuple], header: Header) -> tuple[str, dict]:
    dim, in_dim, *patch = shapes["patch_embedding.weight"]
    out_dim = shapes["head.head.weight"][0] // math.prod(patch) if "head.head.weight" in shapes else None
    layers = sum(1 for n in shapes if re.fullmatch(r"blocks\.\d+\.modulation", n))
    facts = {"dim": dim, "in_dim": in_dim, "out_dim": out_dim, "blocks": layers}
    weights = [header.tensors[n].dtype for n in header.tensors if n.endswith("self_attn.q.weight")][:1]
    if weights:
        facts["weights"] = weights[0]
    if any(n.startswith("vace_blocks.") for n in shapes):
        return "wan2.1-vace", facts
    if any(n.startswith("img_emb.") for n in shapes):
        return "wan2.1-i2v-14b", facts
    if in_dim == 36:
        return ("wan2.2-i2v-a14b" if dim == 5120 else "wan-other"), facts
    if dim == 3072 and in_dim == 48:
        return "wan2.2-ti2v-5b", facts
    if in_dim == 16 and out_dim == 16:
        return {5120: "wan2.2-t2v-a14b", 1536: "wan2.1-t2v-1.3b"}.get(dim, "wan-t2v"), facts
    return "wan-other", facts


def _text_encoder(shapes: dict[str, tuple]) -> tuple[str, dict]:
    vocab, d_model = shapes["shared.weight"]
    layers = sum(1 for n in shapes if re.fullmatch(r"encoder\.block\.\d+\.layer\.0\.SelfAttention\.q\.weight", n))
    with_bias = sum(1 for n in shapes if re.fullmatch(
        r"encoder\.block\.\d+\.layer\.0\.SelfAttention\.relative_attention_bias\.weight", n))
    facts = {"vocab": vocab, "d_model": d_model, "layers": layers}
    if with_bias < layers:  # T5: block 0 only (or none); UMT5: every block
        return "t5", facts
    return ("umt5-xxl" if (vocab, d_model, layers) == (256384, 4096, 24) else "umt5"), facts


def _lora_facts(shapes: dict[str, tuple]) -> dict:
    downs = [s for n, s in shapes.items() if n.endswith((".lora_down.weight", ".lora_A.weight"))]
    facts = {"layers": len(downs) or sum(1 for n in shapes if n.endswith(".diff"))}
    if downs:
        facts["rank"] = downs[0][0]
    return facts


# ---------------------------------------------------------------------------------------------
# refusals


def refusal(info: FileInfo, wanted: str) -> str | None:
    """Why `info` cannot serve as `wanted` ("expert" | "text_encoder" | "vae"), naming the file to use instead;
    None when it can."""
    p, what = info.path, info.describe()
    if info.kind == "unknown" and info.model.startswith("gguf:"):
        arch = info.model[5:]
        return (f"{p}: this is a GGUF of architecture {arch!r}, not a Wan model (general.architecture 'wan'): "
                + {"expert": USE_EXPERTS, "text_encoder": USE_TEXT, "vae": USE_VAE}[wanted])
    if wanted == "expert":
        return _expert_refusal(info, p, what)
    if wanted == "text_encoder":
        if info.model.startswith("gguf:"):
            return f"{p}: GGUF text encoders are not read by wan-lite: {USE_TEXT}"
        if info.model == "t5":
            return (f"{p}: this is a T5 encoder (relative attention bias only in block 0), not UMT5; Wan2.2 needs "
                    f"umt5-xxl: {USE_TEXT}")
        if info.kind != "text_encoder":
            return f"{p}: this is {what}, not a text encoder: {USE_TEXT}"
        return None
    if wanted == "vae":
        if info.model == "wan2.2-vae":
            return f"{p}: this is the Wan2.2 VAE (z_dim 48), which is for TI2V-5B; {USE_VAE}"
        if info.model != "wan2.1-vae":
            return f"{p}: this is {what}, not the Wan2.1 VAE: {USE_VAE}"
        return None
    raise ValueError(f"wanted must be 'expert', 'text_encoder' or 'vae', not {wanted!r}")


def _expert_refusal(info: FileInfo, p: Path, what: str) -> str | None:
    if info.kind == "expert" and info.model in T2V_EXPERTS:
        return None
    if info.kind == "expert":
        return f"{p}: this is {what}; wan-lite runs Wan2.2 T2V-A14B: {USE_EXPERTS}"
    if info.kind == "lora":
        return (f"{p}: this is {what}, not an expert: pass the base expert (wan2.2_t2v_{{high,low}}_noise_14B_*"
                ".safetensors or a Wan2.2-T2V-A14B GGUF) and apply the LoRA on top of it (--lora-high FILE / "
                "--lora-low FILE, or the app's LoRA pickers)")
    if info.kind in ("text_encoder", "vae"):
        usable = {"text_encoder": ("umt5-xxl", "umt5"), "vae": ("wan2.1-vae",)}[info.kind]
        role = " as the text encoder" if info.kind == "text_encoder" else " as the VAE"
        hint = f"pass it{role}; " if info.model in usable else ""
        return f"{p}: this is {what}, not a diffusion expert: {hint}for the experts {USE_EXPERTS}"
    return (f"{p}: not a Wan2.2 expert, text encoder, VAE or LoRA that wan-lite recognises (keys begin "
            f"{', '.join(info.facts.get('first keys', []))}): {USE_EXPERTS}")


def refuse(info: FileInfo, wanted: str) -> None:
    """Raise CheckpointError (what the file is, what to use instead) unless `info` can serve as `wanted`."""
    problem = refusal(info, wanted)
    if problem:
        raise CheckpointError(problem)
