"""SmoothQuant-style smoothing of the block Linears, from calibrated activation statistics.

For a Linear with input x (.., K) and weight W (N, K), per input channel j:

    s_j = max|X_j|^alpha / max|W_{:,j}|^(1 - alpha)        (alpha = 0.5)

and y = (x / s) @ (W * s)^T: the same function in exact arithmetic, with the activation outliers
moved into the weight, where per-output-channel scales absorb them better. W * s is quantized
offline. The 1/s goes where it costs nothing when a preceding op is linear in that channel:

| Linear          | 1/s folded into                                                  |
|-----------------|------------------------------------------------------------------|
| self_attn.o     | self_attn.v rows and bias (attention is linear in v's channels)  |
| cross_attn.o    | cross_attn.v rows and bias                                       |
| cross_attn.q    | norm3 weight and bias (the affine LayerNorm)                     |
| everything else | nothing can: the QuantLinear stores `smooth` and divides x by it |
|                 | inside the fused activation-quantization kernel                  |

(self_attn q/k/v and ffn.0 read a LayerNorm modulated by the timestep; cross_attn k/v read the text
embedding shared by all blocks; ffn.2 reads a GELU.)

Channels with no activation or no weight mass get s = 1; s is clamped to [1e-5, 1e5].
`Smoother` computes the factors lazily, reading the source weights it needs through a callback,
so the streaming converter never holds more than one source tensor.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import torch

ALPHA = 0.5

# Linear (relative to its block) -> (kind, module it folds into)
ABSORBERS = {
    "self_attn.o": ("linear_rows", "self_attn.v"),
    "cross_attn.o": ("linear_rows", "cross_attn.v"),
    "cross_attn.q": ("affine_norm", "norm3"),
}
_BLOCK = re.compile(r"^(blocks\.\d+)\.(.+)$")


def smoothing_factors(act_absmax: torch.Tensor, weight: torch.Tensor, alpha: float = ALPHA) -> torch.Tensor:
    """s (K,) float32 from the activation absmax (K,) and the weight (N, K)."""
    a = act_absmax.float()
    w = weight.float().abs().amax(dim=0)  # (K,)
    s = a.pow(alpha) / w.pow(1 - alpha)
    s = torch.where((a > 0) & (w > 0), s, torch.ones_like(s))
    return s.clamp(1e-5, 1e5)


def absorber(linear: str, names: set[str]) -> tuple[str, str] | None:
    """(kind, module) that absorbs 1/s of `linear`'s input, if the checkpoint has it (`names`: tensor names)."""
    m = _BLOCK.match(linear)
    if not m or m[2] not in ABSORBERS:
        return None
    kind, target = ABSORBERS[m[2]]
    target = f"{m[1]}.{target}"
    return (kind, target) if f"{target}.weight" in names else None


class Smoother:
    """Smoothing factors for the quantized Linears of one expert, and the folds they imply.

    `stats`: Linear name -> activation absmax (K,); `read(name)`: source tensor by name;
    `linears`: the Linears to smooth; `names`: every tensor name of the expert.
    """

    def __init__(self, stats: dict[str, torch.Tensor], read: Callable[[str], torch.Tensor], linears,
                 names, alpha: float = ALPHA):
        missing = sorted(set(linears) - set(stats))
        if missing:
            raise ValueError(f"the calibration statistics have no entry for {missing[:4]}"
                             f"{' ...' if len(missing) > 4 else ''}: collect them for this model "
                             "(python -m calib.collect) or leave --calib out")
        self.stats, self.read, self.alpha = stats, read, alpha
        self.linears, self.names = set(linears), set(names)
        self._cache: dict[str, torch.Tensor] = {}
        # module that absorbs -> (kind, Linear whose 1/s it absorbs)
        self.folds = {}
        for lin in self.linears:
            if (ab := absorber(lin, self.names)) is not None:
                self.folds[ab[1]] = (ab[0], lin)

    def factor(self, linear: str, weight: torch.Tensor | None = None) -> torch.Tensor:
        """s for `linear`, from its own source weight (read unless given); cached (K floats).

        Always the unfolded source weight, also for v (whose rows absorb o's 1/s): per-output-channel
        quantization is blind to row scaling, and the factors stay independent of processing order."""
        if linear not in self._cache:
            w = weight if weight is not None else self.read(f"{linear}.weight")
            self._cache[linear] = smoothing_factors(self.stats[linear], w, self.alpha)
        return self._cache[linear]

    def apply(self, name: str, tensor: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One source tensor -> (smoothed float32 tensor, s if it is a smoothed Linear's weight else None).

        A Linear's weight becomes W * s (columns), after the rows took the 1/s of a following Linear
        (v for o); an absorbing norm's weight and bias take 1/s; everything else is unchanged.
        """
        module, _, leaf = name.rpartition(".")
        s = self.factor(module, tensor) if module in self.linears and leaf == "weight" else None
        t = self.fold(name, tensor).float()
        return (t * s[None, :], s) if s is not None else (t, None)

    def absorbed_by(self, linear: str) -> str | None:
        """The module whose weights took `linear`'s 1/s, or None."""
        ab = absorber(linear, self.names)
        return None if ab is None else ab[1]

    def runtime_smooth(self, linear: str) -> bool:
        """True when no preceding op absorbs 1/s: the QuantLinear divides its input by `smooth`."""
        return absorber(linear, self.names) is None

    def fold(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        """Apply the 1/s of a following Linear to a tensor of the module that absorbs it (else unchanged).

        linear_rows: rows of weight (N, K) and bias (N,) of the absorbing Linear; affine_norm: the
        norm's weight and bias (C,). The absorbing Linear's own (input-side) smoothing is separate.
        """
        module, _, leaf = name.rpartition(".")
        if module not in self.folds or leaf not in ("weight", "bias"):
            return tensor
        _, lin = self.folds[module]
        inv = 1.0 / self.factor(lin)
        t = tensor.float()
        return t * inv[:, None] if t.dim() == 2 else t * inv
