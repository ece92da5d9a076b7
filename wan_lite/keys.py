"""Names and errors every reader of model files shares: the diffusers -> official key renaming, the
error a bad checkpoint raises, and a safetensors opener that names a damaged file. The bottom of the
file-reading floor: `formats`, `lora` and `checkpoint` import it; it imports nothing of wan-lite."""

from __future__ import annotations

import re
from pathlib import Path

from safetensors import safe_open

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

class CheckpointError(ValueError):
    """A checkpoint on disk is missing, incomplete or not in a layout we read. (A damaged quantized
    folder raises `wan_lite.quantized.format.QuantFormatError`, also a ValueError naming the fix.)"""


def diffusers_to_official(name: str) -> str:
    for pattern, repl in _DIFFUSERS_RULES:
        new, n = pattern.subn(repl, name)
        if n:
            return new
    return name


def open_safetensors(file: Path):
    """safe_open that reports a damaged or truncated file as a CheckpointError naming it."""
    try:
        return safe_open(file, framework="pt")
    except Exception as e:  # safetensors raises its own error types for bad headers
        raise CheckpointError(f"cannot read {file} ({e}): the file is damaged or truncated, download it again") from e
