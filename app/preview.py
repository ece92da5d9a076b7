"""The live preview: a small RGB picture of the latents after every denoising step, at no model cost.

The Wan2.1 VAE's 16 latent channels map to RGB nearly linearly, so a fixed 16x3 matrix and a bias
give a recognisable picture without running the decoder. The factors are ComfyUI's
(`comfy/latent_formats.py`, class `Wan21`: `latent_rgb_factors` and `latent_rgb_factors_bias`),
which ComfyUI's own "latent2rgb" preview applies to normalized latents (the space the DiT works in,
as ours) and maps to colour as (rgb + 1) / 2. Wan2.2-T2V-A14B uses the same Wan2.1 VAE.

What is shown is the denoised estimate x0 rather than the noisy latents (ComfyUI previews x0 too):
with flow matching x_t = (1 - sigma) x0 + sigma * noise and the step moves along the velocity
v = dx/dsigma, so after the step sigma_i -> sigma_{i+1}, x0 ~ x_{i+1} - sigma_{i+1} * v with
v ~ (x_{i+1} - x_i) / (sigma_{i+1} - sigma_i) (exactly the model's x0 for the Euler solver; the
effective one for UniPC). Before the first step there is no x_i: the first picture is the latents.

The optional full-VAE preview (`vae_preview`, every N steps, off by default) decodes that estimate with
the run's real VAE: up to PREVIEW_FRAMES latent frames, evenly spaced, each decoded alone as the first
frame of a video (one batched decoder call; a later latent frame out of its causal context is an
approximation of its first picture, enough to judge content and colour), scaled down to
VAE_PREVIEW_HEIGHT. It costs about PREVIEW_FRAMES / F' of the final decode each time.
"""

from __future__ import annotations

import numpy as np
import torch

# ComfyUI comfy/latent_formats.py, class Wan21 (16 latent channels -> R, G, B)
WAN21_RGB_FACTORS = (
    (-0.1299, -0.1692, 0.2932),
    (0.0671, 0.0406, 0.0442),
    (0.3568, 0.2548, 0.1747),
    (0.0372, 0.2344, 0.1420),
    (0.0313, 0.0189, -0.0328),
    (0.0296, -0.0956, -0.0665),
    (-0.3477, -0.4059, -0.2925),
    (0.0166, 0.1902, 0.1975),
    (-0.0412, 0.0267, -0.1364),
    (-0.1293, 0.0740, 0.1636),
    (0.0680, 0.3019, 0.1128),
    (0.0032, 0.0581, 0.0639),
    (-0.1251, 0.0927, 0.1699),
    (0.0060, -0.0633, 0.0005),
    (0.3477, 0.2275, 0.2950),
    (0.1984, 0.0913, 0.1861),
)
WAN21_RGB_BIAS = (-0.1835, -0.0868, -0.3360)
PREVIEW_FRAMES = 4  # latent frames shown side by side (evenly spaced, first and last included)
PREVIEW_HEIGHT = 96  # pixels: latents smaller than this are enlarged by whole pixels
VAE_PREVIEW_HEIGHT = 160  # pixels: decoded previews are scaled down to this height (never up)


def latent_to_rgb(latents: torch.Tensor, frames: int = PREVIEW_FRAMES) -> np.ndarray:
    """latents (B, 16, F', h, w) -> uint8 (h*k, n*w*k, 3): up to `frames` latent frames of the first
    video side by side, each latent pixel one RGB pixel enlarged k times (k >= 1, up to PREVIEW_HEIGHT)."""
    if latents.ndim != 5 or latents.shape[1] != len(WAN21_RGB_FACTORS):
        raise ValueError(f"latents must be (B, 16, F', h, w), got {tuple(latents.shape)}")
    count = latents.shape[2]
    picks = torch.linspace(0, count - 1, min(frames, count)).round().long().tolist()
    z = latents[0, :, picks].float()  # (16, n, h, w), on the latents' device
    factors = torch.tensor(WAN21_RGB_FACTORS, device=z.device)  # (16, 3)
    bias = torch.tensor(WAN21_RGB_BIAS, device=z.device)
    rgb = torch.einsum("cnhw,cr->nhwr", z, factors) + bias  # (n, h, w, 3) in about [-1, 1]
    rgb = ((rgb + 1) / 2).clamp(0, 1).mul(255).round().to(torch.uint8).cpu()
    strip = torch.cat(list(rgb), dim=1)  # (h, n*w, 3)
    k = max(1, PREVIEW_HEIGHT // strip.shape[0])
    return strip.repeat_interleave(k, 0).repeat_interleave(k, 1).numpy()


class Preview:
    """Turns the latents after each step into the picture of the denoised estimate (module docstring)."""

    def __init__(self, sigmas: torch.Tensor):
        self.sigmas = [float(s) for s in sigmas]  # (steps + 1,): the run's grid, 1 -> 0
        self.step = 0  # steps seen
        self.last: torch.Tensor | None = None  # the latents after the previous step (CPU float32 copy)

    def estimate(self, x: torch.Tensor) -> torch.Tensor:
        """x: the latents after step `self.step` (B, 16, F', h, w) -> the x0 estimate, same shape, CPU."""
        x = x.detach().float().cpu()
        i, previous = self.step, self.last
        self.step, self.last = i + 1, x
        if previous is None or i + 1 >= len(self.sigmas):
            return x
        before, after = self.sigmas[i], self.sigmas[i + 1]
        velocity = (x - previous) / (after - before)
        return x - after * velocity

    def __call__(self, x: torch.Tensor) -> np.ndarray:
        return latent_to_rgb(self.estimate(x))


def vae_preview(vae, x0: torch.Tensor, frames: int = PREVIEW_FRAMES, tile: int | None | str = "auto",
                height: int = VAE_PREVIEW_HEIGHT) -> np.ndarray:
    """x0 (B, 16, F', h, w), the denoised estimate -> uint8 (H', n*W', 3): up to `frames` latent frames of the
    first video, evenly spaced, each decoded alone by `vae` (a wan_lite.vae.VAE; module docstring), side by
    side, scaled down to `height` pixels. On a GPU the VAE is moved there for the decode and off again."""
    count = x0.shape[2]
    picks = torch.linspace(0, count - 1, min(frames, count)).round().long().tolist()
    z = x0[:1, :, picks].permute(2, 1, 0, 3, 4)  # (n, 16, 1, h, w): each picked frame as a one-frame video
    vae.model.to(vae.device)
    try:
        video = vae.decode(z, tile=tile)[:, :, 0].float().cpu()  # (n, 3, H, W) in [-1, 1]
    finally:
        if vae.device.type == "cuda":
            vae.unload()
    if video.shape[2] > height:
        width = max(1, round(video.shape[3] * height / video.shape[2]))
        video = torch.nn.functional.interpolate(video, size=(height, width), mode="bilinear", antialias=True)
    rgb = ((video + 1) / 2).clamp(0, 1).mul(255).round().to(torch.uint8).permute(0, 2, 3, 1)  # (n, H', W', 3)
    return torch.cat(list(rgb), dim=1).numpy()
