"""One attention entry point for the DiT.

`attention(q, k, v)` takes and returns (B, H, L, D) tensors. Kernel choice lives here and nowhere
else.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(D)) v over all keys (no mask): (B, H, Lq, D) x (B, H, Lk, D) -> (B, H, Lq, D)."""
    return F.scaled_dot_product_attention(q, k, v)
