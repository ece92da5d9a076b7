"""The flow-matching sampler: shifted sigma grid, UniPC (bh2, order 2, x0-prediction) and Euler steps.

Our own code, no scheduler library at run time. It reproduces the official
`FlowUniPCMultistepScheduler` as Wan2.2 drives it (built with shift=1, `set_timesteps(steps,
shift=s)`, `lower_order_final=True`, predictor-corrector with the corrector on from step 1).
The model predicts the flow velocity v = noise - x0; with x_sigma = (1 - sigma) x0 + sigma noise,
the x0 prediction is x - sigma v.

Deliberately unsupported: other UniPC orders, bh1, thresholding, dynamic shifting.
"""

from __future__ import annotations

import math

import numpy as np
import torch

# The official scheduler's largest training sigma, 1 - 1/1000, as the float32 value it stores.
SIGMA_MAX = float(np.float32(0.999))


def shift_sigmas(sigmas, shift: float):
    """sigma' = s*sigma / (1 + (s-1)*sigma)."""
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def sigma_grid(steps: int, shift: float, num_train_timesteps: int = 1000) -> tuple[torch.Tensor, torch.Tensor]:
    """The official grid: `steps + 1` sigmas (float64 holding float32 values, last = 0) and `steps` timesteps.

    sigmas = shift(linspace(0.999, 0, steps + 1)[:-1]); timesteps = int64(sigma * 1000), truncated.
    """
    sigmas = shift_sigmas(np.linspace(SIGMA_MAX, 0.0, steps + 1)[:-1], shift)  # float64, (steps,)
    timesteps = torch.from_numpy(sigmas * num_train_timesteps).to(torch.int64)  # truncation, as official
    sigmas = np.concatenate([sigmas, [0.0]]).astype(np.float32).astype(np.float64)  # (steps + 1,)
    return torch.from_numpy(sigmas), timesteps


def lightning_grid(steps: int, shift: float, num_train_timesteps: int = 1000) -> tuple[torch.Tensor, torch.Tensor]:
    """The Wan2.2-Lightning grid: `steps + 1` sigmas (float64 holding float32 values, last = 0) and `steps`
    float32 timesteps, not truncated.

    As Wan2.2-Lightning's `EulerScheduler` (wan/utils/fm_solvers_euler.py) computes them, in float32:
    sigmas = shift(linspace(1000, 0, steps + 1) / 1000), timesteps = sigmas * 1000. 4 steps at shift 5:
    1000, 937.5, 833.3333, 625.
    """
    base = np.linspace(num_train_timesteps, 0, steps + 1, dtype=np.float32) / np.float32(num_train_timesteps)
    sigmas = shift_sigmas(base, np.float32(shift))  # float32, (steps + 1,), last 0
    timesteps = torch.from_numpy(sigmas[:-1] * np.float32(num_train_timesteps))  # float32, (steps,)
    return torch.from_numpy(sigmas.astype(np.float64)), timesteps


def euler_step(x: torch.Tensor, v: torch.Tensor, sigma: float, sigma_next: float) -> torch.Tensor:
    """Flow-matching Euler: x_next = x + (sigma_next - sigma) * v."""
    return x + (sigma_next - sigma) * v


def _lam(sigma: float) -> float:
    """Log signal-to-noise ratio, log(alpha) - log(sigma) with alpha = 1 - sigma."""
    return math.log(1.0 - sigma) - math.log(sigma)


class UniPC:
    """Multistep UniPC (B(h) = e^h - 1, order 2, predicting x0) over a fixed sigma grid.

    `step(i, x, v)` takes the sample and model velocity at grid index i and returns the sample at
    i + 1: first the corrector refines x with the new model output (from i >= 1), then the
    predictor extrapolates. Holds the last two x0 predictions.
    """

    order = 2

    def __init__(self, sigmas: torch.Tensor):
        self.sigmas = [float(s) for s in sigmas]  # steps + 1 values, the last 0
        self.steps = len(self.sigmas) - 1
        self.x0s: list[torch.Tensor] = []  # x0 predictions of earlier steps, newest last
        self.last_sample: torch.Tensor | None = None
        self.last_order = 0

    def step(self, i: int, x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        x0 = x - self.sigmas[i] * v
        if i > 0:
            x = self._correct(i, x, x0)
        self.x0s = (self.x0s + [x0])[-self.order:]
        order = min(self.order, self.steps - i, len(self.x0s))  # warm-up and lower-order final step
        self.last_sample, self.last_order = x, order
        return self._predict(i, x, order)

    def _predict(self, i: int, x: torch.Tensor, order: int) -> torch.Tensor:
        """UniP from sigma_i to sigma_{i+1}."""
        s0, t = self.sigmas[i], self.sigmas[i + 1]
        m0 = self.x0s[-1]
        if t == 0.0:  # alpha_t = 1, sigma_t = 0: lambda_t = inf, the update collapses to x0
            assert order == 1, "the final step is first order (lower_order_final)"
            return m0.clone()
        h = _lam(t) - _lam(s0)
        phi = math.expm1(-h)  # h*phi_1(h) = B(h) for bh2
        x_next = (t / s0) * x - (1.0 - t) * phi * m0
        if order == 2:
            rk = (_lam(self.sigmas[i - 1]) - _lam(s0)) / h
            d1 = (self.x0s[-2] - m0) / rk
            x_next = x_next - (1.0 - t) * phi * 0.5 * d1
        return x_next

    def _correct(self, i: int, x: torch.Tensor, x0_new: torch.Tensor) -> torch.Tensor:
        """UniC: refine the sample at sigma_i with the model output there, from the step i-1 -> i."""
        s0, t = self.sigmas[i - 1], self.sigmas[i]
        m0, x_prev, order = self.x0s[-1], self.last_sample, self.last_order
        h = _lam(t) - _lam(s0)
        hh = -h
        phi = math.expm1(hh)
        if order == 1:
            rho_d1, rho_t = None, 0.5
        else:
            rk = (_lam(self.sigmas[i - 2]) - _lam(s0)) / h
            b1 = (phi / hh - 1) / phi
            b2 = ((phi / hh - 1) / hh - 0.5) * 2 / phi
            # solve [[1, 1], [rk, 1]] @ [rho_d1, rho_t] = [b1, b2]
            rho_d1 = (b1 - b2) / (1 - rk)
            rho_t = b1 - rho_d1
        x_t = (t / s0) * x_prev - (1.0 - t) * phi * m0
        corr = rho_t * (x0_new - m0)
        if rho_d1 is not None:
            corr = corr + rho_d1 * (self.x0s[-2] - m0) / rk
        return x_t - (1.0 - t) * phi * corr
