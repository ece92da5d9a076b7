"""The runtime quantized Linear, and the two verbs around it.

- `quantize_linear_weight(w, scheme, smooth)`: offline, one (N, K) float weight -> 8-bit weight and
  (N,) float32 scales, symmetric per output channel (absmax/127 for int8, absmax/448 for fp8 e4m3),
  after folding the SmoothQuant factors in (W' = W * s per input channel).
- `convert_for_runtime(model, linears, dtype)`: swap the named nn.Linear modules of a (meta-device)
  model for `QuantLinear`s of the same shapes, ready for `load_state_dict(assign=True)`.

`QuantLinear` holds `weight` (N, K) int8 / float8_e4m3fn, `weight_scale` (N,) float32, `bias` (N,)
in the compute dtype and, when calibrated smoothing could not be folded into a preceding op,
`smooth` (K,) float32: y = (x / smooth) @ (weight * weight_scale)^T + bias. The kernel is chosen once
per device by `kernels.select_kernel` (override with `kernel=`, `set_kernel(model, name)` or
WAN_LITE_QUANT_KERNEL, read when the module first runs on a device), not on every call.

`Module.to(dtype)` / `.half()` change the compute dtype and the bias only: the 8-bit weight and the
float32 scales keep their dtype (a bf16 round trip of the scales would cost accuracy for nothing).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from .kernels import QDTYPE, quant_linear, quantize_rows_reference, select_kernel


def quantize_linear_weight(w: torch.Tensor, scheme: str, smooth: torch.Tensor | None = None):
    """(N, K) float weight [* smooth per input channel] -> (q (N, K) 8-bit, scale (N,) float32)."""
    w = w.float()
    if smooth is not None:
        w = w * smooth.float()[None, :]
    q, scale = quantize_rows_reference(w, scheme)
    return q, scale[:, 0]


class QuantLinear(nn.Module):
    def __init__(self, in_features: int, out_features: int, scheme: str, *, bias: bool = True,
                 smooth: bool = False, dtype: torch.dtype = torch.bfloat16, kernel: str | None = None,
                 device=None):
        super().__init__()
        if scheme not in QDTYPE:
            raise ValueError(f"QuantLinear supports {', '.join(QDTYPE)}, not {scheme!r}")
        self.in_features, self.out_features, self.scheme = in_features, out_features, scheme
        self.kernel = kernel  # None: kernels.select_kernel decides per device
        self._chosen: tuple[torch.device, str] | None = None  # (device, kernel) resolved on first use there
        self.dtype = dtype  # compute / output dtype
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=QDTYPE[scheme], device=device),
                                   requires_grad=False)
        self.register_buffer("weight_scale", torch.empty(out_features, dtype=torch.float32, device=device))
        self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype, device=device), requires_grad=False) \
            if bias else None
        self.register_buffer("smooth", torch.empty(in_features, dtype=torch.float32, device=device)
                             if smooth else None)

    @classmethod
    def from_linear(cls, linear: nn.Linear, scheme: str, smooth: torch.Tensor | None = None,
                    dtype: torch.dtype = torch.bfloat16, kernel: str | None = None) -> QuantLinear:
        """Quantize an nn.Linear in memory (tests, benchmarks); checkpoints go through quant.convert."""
        q = cls(linear.in_features, linear.out_features, scheme, bias=linear.bias is not None,
                smooth=smooth is not None, dtype=dtype, kernel=kernel, device=linear.weight.device)
        w, scale = quantize_linear_weight(linear.weight.detach(), scheme, smooth)
        q.weight.data, q.weight_scale = w, scale
        if linear.bias is not None:
            q.bias.data = linear.bias.detach().to(dtype)
        if smooth is not None:
            q.smooth = smooth.float().to(linear.weight.device)
        return q

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._chosen is None or self._chosen[0] != x.device:  # once per device, not per call
            self._chosen = (x.device, select_kernel(x.device, self.scheme, self.kernel))
        return quant_linear(x, self.weight, self.weight_scale, self.bias, self.smooth, self.scheme,
                            self._chosen[1], self.dtype)

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The float (N, K) weight this module computes with, smoothing undone: W' / s = W (approx)."""
        w = self.weight.to(torch.float32) * self.weight_scale[:, None]
        if self.smooth is not None:
            w = w / self.smooth[None, :]
        return w.to(dtype)

    def _apply(self, fn, recurse=True):
        # .data: Module._apply may overwrite a Parameter's data in place, a detached alias keeps the original
        fixed = {"weight": self.weight.data, "weight_scale": self.weight_scale, "smooth": self.smooth}
        super()._apply(fn, recurse)
        if self.weight_scale.dtype != torch.float32:  # fn was a float cast: it sets the compute dtype
            self.dtype = self.weight_scale.dtype
        for name, before in fixed.items():
            after = getattr(self, name)
            if before is not None and after.dtype != before.dtype:  # keep the move, undo the cast
                moved = before.to(after.device)
                if name == "weight":
                    self.weight = nn.Parameter(moved, requires_grad=False)
                else:
                    setattr(self, name, moved)
        return self

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, scheme={self.scheme}, "
                f"bias={self.bias is not None}, smooth={self.smooth is not None}, dtype={self.dtype}")


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def convert_for_runtime(model: nn.Module, linears: dict[str, dict], dtype: torch.dtype = torch.bfloat16,
                        kernel: str | None = None) -> nn.Module:
    """Swap each named nn.Linear for an empty QuantLinear of the same shape, on the Linear's device.

    `linears` maps module name -> {"scheme": "int8"|"fp8", "smooth": bool} (the `linears` record of
    wan_lite_quant.json). Call it on a meta-device model, then load_state_dict(..., assign=True).
    """
    for name, spec in linears.items():
        old = model.get_submodule(name)
        if not isinstance(old, nn.Linear):
            raise TypeError(f"{name} is a {type(old).__name__}, not an nn.Linear: the checkpoint does not match")
        _set_module(model, name, QuantLinear(old.in_features, old.out_features, spec["scheme"],
                                             bias=old.bias is not None, smooth=bool(spec.get("smooth")),
                                             dtype=dtype, kernel=kernel, device=old.weight.device))
    return model


def set_kernel(model: nn.Module, kernel: str | None) -> nn.Module:
    """Pin every QuantLinear of `model` to `kernel` ("w8a8" | "w8a16"; None: choose per device again)."""
    for m in model.modules():
        if isinstance(m, QuantLinear):
            m.kernel, m._chosen = kernel, None
    return model
