"""FP8 attention through cuDNN's fused FP8 SDPA (Hopper and newer), for the `fp8` attention backend.

softmax(q k^T / sqrt(D)) v with Q.K^T and P.V on FP8 e4m3 tensor cores inside one cuDNN kernel (the FP8
flash-attention forward cuDNN 9 ships for sm90+), reached through NVIDIA's Python frontend
(`pip install nvidia-cudnn-frontend`, module `cudnn`), which loads the libcudnn PyTorch already ships.

Arithmetic (what the tests check against exact attention):
- k is smoothed first: its mean over tokens is subtracted per (batch, head) (softmax is unchanged by a
  shift shared by all keys of a row; it removes the large shared offset trained K's carry, so e4m3's
  range covers the part that differs between keys);
- q, the smoothed k and v are each scaled by one factor per tensor (FP8_RANGE / absmax) and rounded to
  e4m3; cuDNN takes the inverse factors (descale_q/k/v) as device tensors, so no host sync happens;
- cuDNN rounds the unnormalised probabilities exp(s - rowmax) (in [0, 1]) times P_SCALE to e4m3 for P.V;
- the output is written in q's dtype (bf16 or fp16) with q's strides.

Facts used, from cuDNN's and cudnn-frontend's public documentation and tests (`sdpa_fp8` operation):
per-tensor float32 scalars descale_q, descale_k, descale_v, descale_s, scale_s, scale_o; outputs O,
Stats (training only), amax_S and amax_O; FP8 forward supports head_dim 128, no mask, and O in
e4m3/e5m2 or fp16/bf16 depending on the cuDNN version (`build` tries bf16/fp16 first).

One compiled cuDNN plan per (shape, strides, output dtype, device), kept for the process.
"""

from __future__ import annotations

import functools
import importlib.util
import math
import threading

import torch

FP8_RANGE = 384.0  # absmax maps here: below e4m3's 448 so that bf16 rounding of x * scale never overflows
P_SCALE = 256.0  # P in [0, 1] times this before the e4m3 rounding (cuDNN's scale_s); 1/P_SCALE descales it
HEAD_DIM = 128
MIN_CAPABILITY = (9, 0)  # cuDNN's FP8 attention forward: Hopper and newer


@functools.cache
def unavailable(device: torch.device) -> str | None:
    """Why cuDNN FP8 attention cannot run on `device` (None: it can). Reads no tensor; once per device."""
    if device.type != "cuda":
        return f"cuDNN FP8 attention needs a CUDA GPU, the tensors are on {device.type}"
    cap = torch.cuda.get_device_capability(device)
    if cap < MIN_CAPABILITY:
        return f"cuDNN FP8 attention needs compute capability 9.0+ (Hopper), this GPU is {cap[0]}.{cap[1]}"
    if importlib.util.find_spec("cudnn") is None:
        return "the cuDNN frontend is not installed: pip install nvidia-cudnn-frontend"
    return None


def _cudnn():
    import cudnn  # noqa: PLC0415 - optional: only Hopper+ runs with the frontend installed import it

    return cudnn


@functools.cache
def _handle(index: int):
    return _cudnn().create_handle()


_lock = threading.Lock()
_plans: dict[tuple, _Plan] = {}


class _Plan:
    """One built cuDNN graph for one (shape, strides, output dtype) on one card."""

    def __init__(self, q8: torch.Tensor, k8: torch.Tensor, v8: torch.Tensor, out: torch.Tensor):
        cudnn = _cudnn()
        B, H, Lq, D = q8.shape
        Lk = k8.shape[2]
        self.handle = _handle(out.device.index)
        g = cudnn.pygraph(io_data_type=cudnn.data_type.FP8_E4M3, intermediate_data_type=cudnn.data_type.FLOAT,
                          compute_data_type=cudnn.data_type.FLOAT, handle=self.handle)
        fp8 = cudnn.data_type.FP8_E4M3
        self.q = g.tensor(name="q", dim=[B, H, Lq, D], stride=list(q8.stride()), data_type=fp8)
        self.k = g.tensor(name="k", dim=[B, H, Lk, D], stride=list(k8.stride()), data_type=fp8)
        self.v = g.tensor(name="v", dim=[B, H, Lk, D], stride=list(v8.stride()), data_type=fp8)
        names = ("descale_q", "descale_k", "descale_v", "descale_s", "scale_s", "scale_o")
        self.scalars = [g.tensor(name=n, dim=[1, 1, 1, 1], stride=[1, 1, 1, 1], data_type=cudnn.data_type.FLOAT)
                        for n in names]
        o, _, amax_s, amax_o = g.sdpa_fp8(q=self.q, k=self.k, v=self.v, descale_q=self.scalars[0],
                                          descale_k=self.scalars[1], descale_v=self.scalars[2],
                                          descale_s=self.scalars[3], scale_s=self.scalars[4],
                                          scale_o=self.scalars[5], is_inference=True,
                                          attn_scale=1.0 / math.sqrt(D), use_causal_mask=False)
        out_type = {torch.bfloat16: cudnn.data_type.BFLOAT16, torch.float16: cudnn.data_type.HALF}[out.dtype]
        o.set_output(True).set_dim([B, H, Lq, D]).set_stride(list(out.stride())).set_data_type(out_type)
        for a in (amax_s, amax_o):
            a.set_output(True).set_dim([1, 1, 1, 1]).set_stride([1, 1, 1, 1]).set_data_type(cudnn.data_type.FLOAT)
        self.o, self.amax = o, (amax_s, amax_o)
        g.build([cudnn.heur_mode.A, cudnn.heur_mode.FALLBACK])
        self.graph = g
        self.workspace_bytes = g.get_workspace_size()
        self.constants = torch.tensor([1.0 / P_SCALE, P_SCALE, 1.0], device=out.device)  # descale_s, scale_s, scale_o

    def __call__(self, q8, k8, v8, descales: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """descales: (3,) float32 on the device (q, k, v); out: q's shape and strides, written."""
        cudnn = _cudnn()
        amax = torch.empty(2, device=out.device)
        workspace = torch.empty(self.workspace_bytes, dtype=torch.uint8, device=out.device)
        pack = {self.q: q8, self.k: k8, self.v: v8, self.o: out,
                self.amax[0]: amax[0:1], self.amax[1]: amax[1:2]}
        for i in range(3):
            pack[self.scalars[i]] = descales[i:i + 1]
            pack[self.scalars[3 + i]] = self.constants[i:i + 1]
        cudnn.set_stream(handle=self.handle, stream=torch.cuda.current_stream(out.device).cuda_stream)
        self.graph.execute(pack, workspace, handle=self.handle)
        return out


def _plan(q8: torch.Tensor, k8: torch.Tensor, v8: torch.Tensor, out: torch.Tensor) -> _Plan:
    key = (out.device.index, out.dtype, *((tuple(t.shape), t.stride()) for t in (q8, k8, v8, out)))
    with _lock:
        if key not in _plans:
            _plans[key] = _Plan(q8, k8, v8, out)
        return _plans[key]


def _to_fp8(x: torch.Tensor, absmax: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x (any shape, bf16/fp16) -> (x * s rounded to e4m3 with x's strides, 1/s as a (1,) float32), s =
    FP8_RANGE / absmax, all on the device."""
    scale = (FP8_RANGE / absmax.float().clamp_min(1e-30)).to(x.dtype)  # the factor as x's dtype multiplies
    return (x * scale).to(torch.float8_e4m3fn), (1.0 / scale.float()).reshape(1)


def quantize(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
    """(q8, k8, v8, descales (3,) float32): per-tensor e4m3 of q, k minus its mean over tokens, v."""
    kmean = torch.mean(k, dim=2, keepdim=True, dtype=torch.float32).to(k.dtype)  # (B, H, 1, D)
    ks = k - kmean
    q8, dq = _to_fp8(q, q.abs().amax())
    k8, dk = _to_fp8(ks, ks.abs().amax())
    del ks
    v8, dv = _to_fp8(v, v.abs().amax())
    return q8, k8, v8, torch.cat([dq, dk, dv])


def unsupported(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> str | None:
    """Why these inputs cannot run (None: they can), the card's support aside (see `unavailable`)."""
    if q.dim() != 4 or k.shape != v.shape or q.shape[:2] != k.shape[:2] or q.shape[3] != k.shape[3]:
        return "q, k, v must be (B, H, L, D) with one B, H and D, got " + ", ".join(str(tuple(t.shape))
                                                                                   for t in (q, k, v))
    if q.shape[-1] != HEAD_DIM:
        return f"head_dim must be {HEAD_DIM}, got {q.shape[-1]}"
    if q.dtype not in (torch.bfloat16, torch.float16) or not (q.dtype == k.dtype == v.dtype):
        return f"inputs must be bf16 or fp16, got {q.dtype}, {k.dtype}, {v.dtype}"
    if any(t.stride(-1) != 1 for t in (q, k, v)) or k.stride() != v.stride():
        return "the head_dim axis must be contiguous and k, v must share strides"
    return None


def attention_fp8_cudnn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(D)) v in FP8 through cuDNN: (B, H, Lq, D) x (B, H, Lk, D) x2 -> (B, H, Lq, D),
    q's dtype and strides. Raises ValueError for inputs it does not run, RuntimeError where the card or the
    installed cuDNN cannot (the message names the fix)."""
    problem = unsupported(q, k, v) or unavailable(q.device)
    if problem:
        raise ValueError(f"cuDNN FP8 attention cannot run these inputs: {problem}")
    q8, k8, v8, descales = quantize(q, k, v)
    out = torch.empty_like(q)  # keeps q's strides: (B, L, H, D) storage stays that way
    return _plan(q8, k8, v8, out)(q8, k8, v8, descales, out)


@torch.library.custom_op("wan_lite::attention_fp8_cudnn", mutates_args=())
def attention_fp8_cudnn_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """`attention_fp8_cudnn` as an operator torch.compile treats as opaque (the blocks are compiled)."""
    return attention_fp8_cudnn(q, k, v)


@attention_fp8_cudnn_op.register_fake
def _(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(q)  # what attention_fp8_cudnn allocates: q's shape, dtype and strides
