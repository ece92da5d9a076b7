"""One attention entry point for the DiT: kernel choice and the memory-bounded block-wise path.

`attention(q, k, v)` takes and returns (B, H, L, D) tensors, no mask, scale 1/sqrt(D). Which kernel
runs is decided here and nowhere else, in this order:

1. the `backend=` argument of the call (tests),
2. the environment variable `WAN_LITE_ATTENTION` (a user's explicit override, read when the run's
   plan is applied by `set_backend`, or on the first call: never on every call),
3. `set_backend(name)` (what the planner chose for this run),
4. the device default: cuDNN SDPA on Hopper (1.6x its flash backend at Wan shapes, DESIGN section 2),
   flash SDPA on other CUDA GPUs of compute capability >= 8.0, memory-efficient SDPA on older ones,
   flash SDPA on the CPU (torch has a fused CPU kernel: 5x the math backend at L=8192 and flat in
   memory, where the math backend materializes L x L), and the block-wise path on other devices.

Backends: `sdpa-cudnn`, `sdpa-flash`, `sdpa-efficient`, `sdpa-math` pin one torch SDPA backend and
fail loudly when it cannot run these inputs; `fp8` is the 8-bit Triton kernel of wan_lite.attention8
(Q.K^T and P.V in FP8 e4m3; bf16/fp16, head_dim 128, CUDA sm89+), never a device default: where it
cannot run, the planner's choice of it falls back to the device default and a name given to the call
or in the environment raises; `blockwise` is exact attention over query and head blocks, one
math-SDPA call per block, so at most `max_block_bytes` of scores (and their softmax, as much again)
exist at once (75,600^2 scores x 40 heads would be 457 GB). It runs anywhere, in any dtype: the
fallback where no fused kernel exists, and the exact reference the fused ones are tested against.
The device default and the planner's `set_backend` choice let torch fall back down a priority list
(e.g. cuDNN -> flash -> efficient -> math) when the first choice does not support the inputs (fp32 on
CUDA, say); a name given to the call or in the environment never falls back.

Deliberately unsupported: masks, dropout, causal attention, GQA. The Wan DiT uses none of them.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

ENV = "WAN_LITE_ATTENTION"
SDPA_BACKENDS = {
    "sdpa-cudnn": SDPBackend.CUDNN_ATTENTION,
    "sdpa-flash": SDPBackend.FLASH_ATTENTION,
    "sdpa-efficient": SDPBackend.EFFICIENT_ATTENTION,
    "sdpa-math": SDPBackend.MATH,
}
FP8 = "fp8"  # wan_lite.attention8, imported only on CUDA (it needs Triton)
FP8_MIN_CAPABILITY = (8, 9)  # FP8 e4m3 tensor cores: Ada, Hopper
BACKENDS = (*SDPA_BACKENDS, FP8, "blockwise")
DEFAULT_BLOCK_BYTES = 256 * 2**20  # scores one block of the block-wise path may hold

_chosen: str | None = None  # set_backend()
_block_bytes: int = DEFAULT_BLOCK_BYTES
_resolved: dict[torch.device, tuple[str, bool]] = {}  # device -> (backend, explicit), resolved once


def set_backend(name: str | None, *, max_block_bytes: int | None = None) -> None:
    """Choose the kernel for this process (None: the device default); applying a plan calls this.
    The environment override is read again here, so a changed WAN_LITE_ATTENTION takes effect."""
    global _chosen, _block_bytes
    _chosen = _check(name) if name is not None else None
    _block_bytes = max_block_bytes or DEFAULT_BLOCK_BYTES
    _resolved.clear()
    if FP8 in (_chosen, os.environ.get(ENV)) and torch.cuda.is_available():  # import (register the op) eagerly
        _fp8_device_problem(torch.device("cuda", torch.cuda.current_device()))


def device_default(device: torch.device, capability: tuple[int, int] | None = None) -> str:
    """The backend that runs when nothing overrides it (`capability`: plan for a CUDA card not present)."""
    if device.type == "cpu":
        return "sdpa-flash"
    if device.type != "cuda":
        return "blockwise"
    major, _ = capability or torch.cuda.get_device_capability(device)
    return "sdpa-cudnn" if major == 9 else "sdpa-flash" if major >= 8 else "sdpa-efficient"


def resolve(device: torch.device, backend: str | None = None) -> tuple[str, bool]:
    """(backend name, explicit?) for a call on `device`: argument > env > set_backend > device default."""
    for name in (backend, os.environ.get(ENV) or None):
        if name is not None:
            return _check(name), True
    if _chosen is not None:  # the planner's choice may fall back (fp32 inputs on cuDNN, say)
        return _chosen, False
    return device_default(device), False


def resolved(device: torch.device) -> tuple[str, bool]:
    """`resolve(device)`, once per device until the next `set_backend`: what `attention` runs there.

    A compiled model calls this before its first call (`residency`): filled inside the trace of the first
    compiled block instead, the cache changes under that block's guard (`device not in _resolved`), and the
    second block compiles again (2 Dynamo compiles of Block.forward instead of 1: tests/test_startup.py)."""
    if device not in _resolved:
        _resolved[device] = resolve(device)
    return _resolved[device]


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, backend: str | None = None
) -> torch.Tensor:
    """softmax(q k^T / sqrt(D)) v over all keys: (B, H, Lq, D) x (B, H, Lk, D) -> (B, H, Lq, D)."""
    name, explicit = (_check(backend), True) if backend is not None else resolved(q.device)
    if name == FP8:
        problem = fp8_unsupported(q, k, v)  # the card once per device, then dtype / shape attribute reads
        if problem is None:  # an opaque custom op: torch.compile'd blocks call the Triton kernels as they are
            return torch.ops.wan_lite.attention_fp8(q, k, v)
        if explicit:
            raise RuntimeError(f"attention backend {FP8!r} cannot run here: {problem}; name another backend "
                               f"(the device default here is {device_default(q.device)!r}) or unset {ENV}")
        name = device_default(q.device)  # the planner's choice falls back
    if name == "blockwise":
        return blockwise_attention(q, k, v, max_block_bytes=_block_bytes)
    first = SDPA_BACKENDS[name]
    order = [first] if explicit else [first, *(b for b in _FALLBACK if b != first)]
    with sdpa_kernel(order, set_priority=not explicit):
        return F.scaled_dot_product_attention(q, k, v)


def blockwise_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, max_block_bytes: int = DEFAULT_BLOCK_BYTES
) -> torch.Tensor:
    """Exact attention over query and head blocks, each block one math-SDPA call over all keys.

    Every query row sees every key, so each block's softmax is the full softmax: the result is the
    plain attention, computed with at most `max_block_bytes` of fp32 scores alive at once.
    """
    B, H, Lq, _ = q.shape  # (B, H, Lq, D)
    Lk = k.shape[2]
    rows = max(1, max_block_bytes // (B * Lk * 4))  # (head, query) rows one block may hold
    heads = min(H, max(1, rows // Lq))
    queries = min(Lq, max(1, rows // heads))
    out = torch.empty_like(q)
    with sdpa_kernel([SDPBackend.MATH]):
        for h0 in range(0, H, heads):
            kh, vh = k[:, h0 : h0 + heads], v[:, h0 : h0 + heads]  # (B, heads, Lk, D)
            for q0 in range(0, Lq, queries):
                qb = q[:, h0 : h0 + heads, q0 : q0 + queries]  # (B, heads, queries, D)
                out[:, h0 : h0 + heads, q0 : q0 + queries] = F.scaled_dot_product_attention(qb, kh, vh)
    return out


_fp8_device: dict[torch.device, str | None] = {}  # device -> why the fp8 kernel cannot run there (None: it can)


def _fp8_device_problem(device: torch.device) -> str | None:
    """Checked once per device; on a capable card this imports wan_lite.attention8 (Triton), which
    registers the `wan_lite::attention_fp8` op (set_backend does it before any compiled call)."""
    if device not in _fp8_device:
        if device.type != "cuda":
            _fp8_device[device] = f"it needs a CUDA GPU with FP8 tensor cores (sm89+), the inputs are on {device.type}"
        elif (cap := torch.cuda.get_device_capability(device)) < FP8_MIN_CAPABILITY:
            _fp8_device[device] = f"it needs FP8 tensor cores (sm89+), this GPU is sm{cap[0]}{cap[1]}"
        elif importlib.util.find_spec("triton") is None:
            _fp8_device[device] = "it needs Triton, which this torch build lacks"
        else:
            importlib.import_module(f"{__package__}.attention8")
            _fp8_device[device] = None
    return _fp8_device[device]


def fp8_unsupported(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> str | None:
    """Why the fp8 backend cannot run these inputs on their device (None: it can)."""
    problem = _fp8_device_problem(q.device)
    if problem is not None:
        return problem
    return sys.modules[f"{__package__}.attention8"].unsupported(q, k, v)


# tried after the device default, in this order
_FALLBACK = (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH)


def _check(name: str) -> str:
    if name not in BACKENDS:
        choices = ", ".join(BACKENDS)
        raise ValueError(f"unknown attention backend {name!r}: choose one of {choices} (or unset {ENV})")
    return name
