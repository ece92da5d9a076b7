"""Tiny single files in the formats people download, all written from one official-layout state dict.

Every writer returns the float32 values the file holds once dequantized (`intended`): the tests load
the official model with those and compare its forward with wan-lite's model built from the file.

- `write_safetensors`: fp32 / fp16 / bf16, optional ComfyUI prefix (`model.diffusion_model.`).
- `write_fp8_legacy`: ComfyUI / Kijai fp8 scaled: fp8 (e4m3fn or e5m2) weights, float32 scalar
  `<layer>.scale_weight` (absmax / fp8 max), `<layer>.scale_input`, empty `scaled_fp8`, the rest fp16.
- `write_fp8_comfy`: the newer ComfyUI form: e4m3fn weights, per-channel `<layer>.weight_scale`,
  `<layer>.input_scale`, `<layer>.comfy_quant` (uint8 JSON) and `_quantization_metadata` in the header.
- `write_gguf`: `gguf.GGUFWriter`, block Linears quantized with `gguf.quants.quantize` (Q8_0, Q4_0,
  Q5_0, F16, F32), 1-D tensors and modulation F32, other matrices F16, the 5-D patch embedding stored
  2-D with `comfy.gguf.orig_shape.<name>`; optionally one Linear as Q6_K packed here block by block
  (`pack_q6_k`), stored (n/256, 256) with its torch shape in `comfy.gguf.orig_shape.<name>`.
- `write_skeleton`: only the tensors `identify` reads, at a released model's real shapes (I2V-A14B,
  TI2V-5B, Wan2.2 VAE): enough for the refusals, which come before any completeness check.
- The tiny test experts have dim 32 and 2 heads; dim // 128 would give 0 heads, so every file
  carries `wan_lite.num_heads` in its header metadata (the rule in wan_lite/formats/expert.py).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

BLOCK_LINEAR = re.compile(r"^blocks\.\d+\.(self_attn\.[qkvo]|cross_attn\.[qkvo]|ffn\.[02])\.weight$")
OTHER_LINEAR = re.compile(r"^(text_embedding\.[02]|time_embedding\.[02]|time_projection\.1|head\.head)\.weight$")
FP8_MAX = {torch.float8_e4m3fn: 448.0, torch.float8_e5m2: 57344.0}
NUM_HEADS = {"wan_lite.num_heads": "2"}


def official_state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().float().contiguous() for k, v in model.state_dict().items()}


def _save(tensors: dict, path, prefix: str = "", metadata: dict | None = None) -> Path:
    path = Path(path)
    metadata = {**NUM_HEADS, **(metadata or {})}
    save_file({prefix + k: v.contiguous() for k, v in tensors.items()}, path, metadata=metadata)
    return path


def write_safetensors(state, path, dtype=torch.float32, prefix: str = "", metadata=None):
    """(path, intended): every tensor cast to `dtype`."""
    stored = {k: v.to(dtype) for k, v in state.items()}
    return _save(stored, path, prefix, metadata), {k: v.float() for k, v in stored.items()}


def _fp8(w: torch.Tensor, dtype, per_channel: bool):
    """w (N, K) float32 -> (fp8 (N, K), scale () or (N,) float32): absmax / fp8 max."""
    amax = w.abs().amax(dim=1) if per_channel else w.abs().max()
    scale = (amax / FP8_MAX[dtype]).float()
    q = (w / (scale[:, None] if per_channel else scale)).to(dtype)
    return q, scale


def write_fp8_legacy(state, path, dtype=torch.float8_e4m3fn, quantize_other: bool = False, prefix: str = ""):
    """(path, intended): legacy fp8 scaled (block Linears, and with `quantize_other` also the embeddings/head)."""
    stored, intended = {"scaled_fp8": torch.empty(0, dtype=dtype)}, {}
    for name, w in state.items():
        if BLOCK_LINEAR.match(name) or (quantize_other and OTHER_LINEAR.match(name)):
            layer = name.removesuffix(".weight")
            q, scale = _fp8(w, dtype, per_channel=False)
            stored[name], stored[layer + ".scale_weight"] = q, scale
            stored[layer + ".scale_input"] = torch.tensor(1.0)
            intended[name] = q.float() * scale
        else:
            stored[name] = w.half()
            intended[name] = stored[name].float()
    return _save(stored, path, prefix), intended


def write_fp8_comfy(state, path, prefix: str = "model.diffusion_model.", fmt: str = "float8_e4m3fn"):
    """(path, intended): newer ComfyUI form, per-channel weight_scale, comfy_quant tensors and header metadata."""
    stored, intended, layers = {}, {}, {}
    for name, w in state.items():
        if BLOCK_LINEAR.match(name):
            layer = name.removesuffix(".weight")
            q, scale = _fp8(w, torch.float8_e4m3fn, per_channel=True)
            conf = {"format": fmt}
            stored.update({name: q, layer + ".weight_scale": scale, layer + ".input_scale": torch.tensor(0.02),
                           layer + ".comfy_quant": torch.tensor(list(json.dumps(conf).encode()), dtype=torch.uint8)})
            layers[prefix + layer] = conf
            intended[name] = q.float() * scale[:, None]
        else:
            stored[name] = w.half()
            intended[name] = stored[name].float()
    meta = {"_quantization_metadata": json.dumps({"format_version": "1.0", "layers": layers})}
    return _save(stored, path, prefix, meta), intended


# ---------------------------------------------------------------------------------------------
# GGUF


def pack_q6_k(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """x (n, 256) float32 -> (Q6_K blocks (n, 210) uint8, the values they decode to (n, 256) float32).

    Q6_K super-block (ggml `block_q6_K`, read as in gguf.quants.Q6_K): ql[128] low 4 bits, qh[64]
    high 2 bits, scales[16] int8 (one per 16 values), d fp16; value = d * scale * (q - 32), q in 0..63.
    Value v = 128*h + 64*s + b (h half, s shift, b < 64) has its low nibble in ql[64*h + b] at bit 4*s;
    v = 128*h + 32*s + b (b < 32) has its high 2 bits in qh[32*h + b] at bit 2*s.
    """
    n = x.shape[0]
    groups = x.reshape(n, 16, 16)
    amax = np.abs(groups).max(axis=2)  # (n, 16)
    d = (amax.max(axis=1) / (31 * 127)).astype(np.float16)  # (n,)
    d = np.where(d == 0, np.float16(1), d)
    sc = np.clip(np.rint(amax / (31 * d.astype(np.float32)[:, None])), 1, 127).astype(np.int8)  # (n, 16)
    step = (d.astype(np.float32)[:, None] * sc.astype(np.float32))[:, :, None]  # (n, 16, 1)
    q = (np.clip(np.rint(groups / step), -32, 31) + 32).astype(np.uint8).reshape(n, 256)  # 0..63
    low, high = q & 0x0F, q >> 4
    ql = np.zeros((n, 128), np.uint8)
    qh = np.zeros((n, 64), np.uint8)
    for h in range(2):
        for s in range(2):
            ql[:, 64 * h : 64 * h + 64] |= low[:, 128 * h + 64 * s : 128 * h + 64 * s + 64] << (4 * s)
        for s in range(4):
            qh[:, 32 * h : 32 * h + 32] |= high[:, 128 * h + 32 * s : 128 * h + 32 * s + 32] << (2 * s)
    packed = np.concatenate([ql, qh, sc.view(np.uint8), d.reshape(n, 1).view(np.uint8)], axis=1)  # (n, 210)
    values = (step * (q.reshape(n, 16, 16).astype(np.float32) - 32)).reshape(n, 256)
    return packed, values


def write_gguf(state, path, qtype: str = "Q8_0", arch: str = "wan", q6_k: tuple[str, ...] = (), num_heads=True,
               prefix: str = ""):
    """(path, intended): a ComfyUI-GGUF style expert; `qtype` for the block Linears, names in `q6_k` as Q6_K."""
    import gguf

    Q = gguf.GGMLQuantizationType
    writer = gguf.GGUFWriter(str(path), arch)
    if num_heads:
        writer.add_uint32("wan_lite.num_heads", 2)
    intended = {}
    for name, w in state.items():
        a = w.numpy().astype(np.float32)
        if name in q6_k:
            packed, values = pack_q6_k(a.reshape(-1, 256))
            writer.add_tensor(prefix + name, packed, raw_dtype=Q.Q6_K)
            writer.add_array("comfy.gguf.orig_shape." + prefix + name, list(a.shape))
            intended[name] = torch.from_numpy(values.reshape(a.shape))
            continue
        if a.ndim == 5:  # the patch embedding: GGUF holds at most 4 dims
            writer.add_array("comfy.gguf.orig_shape." + prefix + name, list(a.shape))
            a = a.reshape(a.shape[0], -1)
        kind = Q[qtype] if BLOCK_LINEAR.match(name) else (Q.F16 if a.ndim == 2 else Q.F32)
        data = gguf.quants.quantize(a, kind)
        writer.add_tensor(prefix + name, data, raw_dtype=kind)
        intended[name] = torch.from_numpy(gguf.quants.dequantize(data, kind).reshape(w.shape).copy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return Path(path), intended


# ---------------------------------------------------------------------------------------------
# other files


SKELETONS = {
    # the tensors identify() reads, at the released shapes (wan/configs: i2v_A14B, ti2v_5B; vae2_2.py)
    "wan2.2-i2v-a14b": {"patch_embedding.weight": (5120, 36, 1, 2, 2), "head.head.weight": (64, 5120),
                        "blocks.0.modulation": (1, 6, 5120)},
    "wan2.2-ti2v-5b": {"patch_embedding.weight": (3072, 48, 1, 2, 2), "head.head.weight": (192, 3072),
                       "blocks.0.modulation": (1, 6, 3072)},
    "wan2.1-t2v-14b": {"patch_embedding.weight": (5120, 16, 1, 2, 2), "head.head.weight": (64, 5120),
                       "blocks.0.modulation": (1, 6, 5120)},
    "wan2.2-vae": {"conv1.weight": (96, 96, 1, 1, 1), "conv2.weight": (48, 48, 1, 1, 1),
                   "encoder.conv1.weight": (160, 12, 3, 3, 3), "decoder.conv1.weight": (1024, 48, 3, 3, 3)},
}


def write_skeleton(model: str, path) -> Path:
    return _save({k: torch.zeros(s, dtype=torch.float16) for k, s in SKELETONS[model].items()}, path)


def write_lora(path, rank: int = 4, dim: int = 32) -> Path:
    """A Lightning/ComfyUI style LoRA: diffusion_model.<layer>.lora_down/lora_up.weight + .alpha."""
    g = torch.Generator().manual_seed(0)
    t = {}
    for layer in ("blocks.0.self_attn.q", "blocks.0.ffn.0"):
        t[f"diffusion_model.{layer}.lora_down.weight"] = torch.randn(rank, dim, generator=g)
        t[f"diffusion_model.{layer}.lora_up.weight"] = torch.randn(dim, rank, generator=g)
        t[f"diffusion_model.{layer}.alpha"] = torch.tensor(float(rank))
    return _save(t, path)


def write_t5(path, d_model: int = 24) -> Path:
    """A tiny transformers T5 encoder (relative attention bias in block 0 only), HF names."""
    from transformers import T5Config, T5EncoderModel

    cfg = T5Config(vocab_size=64, d_model=d_model, d_kv=6, d_ff=48, num_layers=2, num_heads=4,
                   feed_forward_proj="gated-gelu")
    sd = T5EncoderModel(cfg).state_dict()
    sd.pop("encoder.embed_tokens.weight")  # tied to shared (safetensors stores no shared memory)
    return _save(sd, path)


def write_text_encoder(hf_state, path, fp8: bool) -> tuple[Path, dict]:
    """(path, intended) for HF-named UMT5 tensors: fp16, or fp8 e4m3 scaled (legacy) for the block matrices."""
    stored, intended = {}, {}
    for name, w in hf_state.items():
        if name == "encoder.embed_tokens.weight":
            continue
        if fp8 and name.startswith("encoder.block.") and w.ndim == 2 and "relative_attention_bias" not in name:
            q, scale = _fp8(w.float(), torch.float8_e4m3fn, per_channel=False)
            stored[name], stored[name.removesuffix(".weight") + ".scale_weight"] = q, scale
            intended[name] = q.float() * scale
        else:
            stored[name] = w.half()
            intended[name] = stored[name].float()
    if fp8:
        stored["scaled_fp8"] = torch.empty(0, dtype=torch.float8_e4m3fn)
    return _save(stored, path), intended


def truncate(src, dst, keep: int) -> Path:
    """A copy of `src` cut to its first `keep` bytes (an interrupted download)."""
    Path(dst).write_bytes(Path(src).read_bytes()[:keep])
    return Path(dst)
