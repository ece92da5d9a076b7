"""Comparing two code paths that compute the same thing.

Bitwise equality holds only where the same kernels see the same memory. Two paths that hold the same
weights in different memory (views into the residency's flat unit buffers vs separately allocated
parameters, a memory-mapped file vs a copy) may take different CPU kernels: oneDNN / MKL pick blocking
and vectorisation by alignment, stride and the CPU's features, so an AMD EPYC and an Intel Xeon can
round differently (seen: 2.7e-6 absolute on values of about 5). Such paths are compared with a stated
fp32 tolerance; bitwise checks stay where the same tensors go through the same ops.
"""

from __future__ import annotations

import torch

FP32_RTOL = 1e-5  # the project's parity bound for fp32 (relative Frobenius error)


def rel_error(got: torch.Tensor, ref: torch.Tensor) -> float:
    """||got - ref|| / ||ref|| in float64."""
    got, ref = got.double(), ref.double()
    return ((got - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def assert_close_fp32(got: torch.Tensor, ref: torch.Tensor, rtol: float = FP32_RTOL) -> None:
    """Same shape and dtype, finite, and within `rtol` relative error of `ref`."""
    assert got.shape == ref.shape and got.dtype == ref.dtype, (got.shape, got.dtype, ref.shape, ref.dtype)
    assert torch.isfinite(got).all()
    err = rel_error(got, ref)
    assert err < rtol, f"relative error {err:.3g} >= {rtol:g}"
