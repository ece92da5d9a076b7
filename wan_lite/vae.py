"""Wan2.1 VAE decoding: latents [B, 16, F', H/8, W/8] -> video [B, 3, 4(F'-1)+1, H, W] in [-1, 1].

diffusers' `AutoencoderKLWan` is the decoder; this module finds its weights in either layout, renames
the official `Wan2.1_VAE.pth` keys (`wan/modules/vae2_1.py` `WanVAE_`) onto it, undoes the per-channel
latent normalization and picks the spatial tile size.

- official: `Wan2.1_VAE.pth`, a plain state_dict; the latent mean/std are the 16-vectors hard-coded in
  the official `Wan2_1_VAE` (copied below).
- diffusers: `vae/` (a saved `AutoencoderKLWan`); mean/std come from its config
  (`latents_mean` / `latents_std`).

Tiling: the decoder runs frame by frame with a causal cache, so its memory grows with the frame's
area, not with the frame count. Large frames are decoded in overlapping spatial tiles, each through
all frames, and blended linearly across the overlap (diffusers' `tiled_decode`, which keeps a
separate causal cache per tile and so is correct for this decoder). The tile size is chosen from the
free GPU memory unless given (`tile=`): the whole frame when it fits, else the largest tile that
does. Tiles change the output slightly near seams (see tests/test_vae.py for the measured size).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch

from .formats import check_keys, read_header, read_vae_file, refuse
from .formats.expert import _fp8_layers, _is_marker
from .formats.identify import scan
from .keys import CheckpointError

STRIDE = (4, 8, 8)  # (t, h, w) compression of the Wan2.1 VAE

# The official latent statistics (wan/modules/vae2_1.py Wan2_1_VAE): z_model = z_norm * std + mean.
LATENTS_MEAN = (
    -0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
    0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921,
)  # fmt: skip
LATENTS_STD = (
    2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
    3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160,
)  # fmt: skip

# Decoder memory per pixel of one tile (any frame count: it decodes one latent frame at a time), by
# element size. Measured on an H100 with the real architecture: 22.7 KB/px allocated in fp32 and
# 11.3 KB/px in bf16, 1.24-1.37x that reserved by the caching allocator. On an H200 (diffusers 0.42,
# 2026-11-29) the fp32 decode of 720p x 81 in 672 px tiles peaked at 11.6 GB allocated (18.6 KB/px beyond
# the videos and weights) and took 11.3 s, as long as 768 px tiles (11.4 s); but a whole 720p run through
# `generate` under a 24 GB cap ran out of memory decoding 768 px tiles at 21.3 GiB, with about 8 GiB held
# by something other than the decode (not identified: the device time ran out). 40 KB/px (20 in bf16)
# leaves that margin at no measured cost in speed.
BYTES_PER_PIXEL = {4: 40_000, 2: 20_000}
MARGIN_BYTES = 512 << 20  # cuDNN workspaces and allocator slack beyond the per-pixel figure
MIN_TILE = 128  # pixels; tiles are square, a multiple of 32, overlapping by a quarter of their side


# ---------------------------------------------------------------------------------------------------
# Official .pth -> diffusers AutoencoderKLWan


def _rename_resnet(rest: str) -> str:
    """Inside one residual block: residual.{0,2,3,6} / shortcut -> norm1 / conv1 / norm2 / conv2 / conv_shortcut."""
    for old, new in (
        ("residual.0.", "norm1."),
        ("residual.2.", "conv1."),
        ("residual.3.", "norm2."),
        ("residual.6.", "conv2."),
        ("shortcut.", "conv_shortcut."),
    ):
        if rest.startswith(old):
            return new + rest[len(old) :]
    raise KeyError(rest)


def official_to_diffusers(sd: dict[str, torch.Tensor], num_res_blocks: int = 2) -> dict[str, torch.Tensor]:
    """Rename official `WanVAE_` keys to `AutoencoderKLWan` keys (a plain renaming, no reshapes)."""
    top = {"conv1.": "quant_conv.", "conv2.": "post_quant_conv.", "encoder.conv1.": "encoder.conv_in.",
           "decoder.conv1.": "decoder.conv_in.", "encoder.head.0.": "encoder.norm_out.",
           "encoder.head.2.": "encoder.conv_out.", "decoder.head.0.": "decoder.norm_out.",
           "decoder.head.2.": "decoder.conv_out."}  # fmt: skip
    middle = {"0": "resnets.0", "1": "attentions.0", "2": "resnets.1"}
    per_up = num_res_blocks + 2  # decoder stage: num_res_blocks + 1 resnets, then one upsampler
    out = {}
    for key, value in sd.items():
        new = next((v + key[len(k) :] for k, v in top.items() if key.startswith(k)), None)
        if new is None and (m := re.fullmatch(r"(encoder|decoder)\.middle\.(\d)\.(.+)", key)):
            part, idx, rest = m.groups()
            rest = rest if idx == "1" else _rename_resnet(rest)
            new = f"{part}.mid_block.{middle[idx]}.{rest}"
        elif new is None and (m := re.fullmatch(r"encoder\.downsamples\.(\d+)\.(.+)", key)):
            idx, rest = m.groups()  # the encoder keeps one flat list
            rest = rest if rest.startswith(("resample.", "time_conv.")) else _rename_resnet(rest)
            new = f"encoder.down_blocks.{idx}.{rest}"
        elif new is None and (m := re.fullmatch(r"decoder\.upsamples\.(\d+)\.(.+)", key)):
            idx, rest = int(m.group(1)), m.group(2)
            stage, pos = divmod(idx, per_up)
            if pos == per_up - 1:
                new = f"decoder.up_blocks.{stage}.upsamplers.0.{rest}"
            else:
                new = f"decoder.up_blocks.{stage}.resnets.{pos}.{_rename_resnet(rest)}"
        if new is None:
            raise KeyError(f"unexpected key {key!r} in the official Wan2.1 VAE checkpoint")
        out[new] = value
    return out


def check_vae_keys(sd: dict, model, path: Path) -> None:
    """Every official key maps to the model and every model key is there; CheckpointError naming the file."""
    found = []
    for name in sd:
        try:
            found += list(official_to_diffusers({name: None}))
        except KeyError:
            found.append(name)  # not an official VAE key: reported as unexpected
    check_keys(model.state_dict(), found, path, "the Wan2.1 VAE (names as diffusers' AutoencoderKLWan)")


def official_names(dim: int = 96, dim_mult=(1, 2, 4, 4), num_res_blocks: int = 2,
                   temporal_down=(False, True, True)) -> list[str]:
    """Every tensor name of the official `WanVAE_` (wan/modules/vae2_1.py) with the Wan2.1 configuration,
    from its architecture: what `Wan2.1_VAE.pth` holds. Lets `check_vae` check a VAE file without importing
    diffusers (1.2 s here, with the bitsandbytes it imports, which looks up the hub), which then loads only
    for the decode; tests/test_vae.py checks these names against diffusers' `AutoencoderKLWan`."""
    conv, norm = (".weight", ".bias"), (".gamma",)

    def resblock(prefix: str, in_dim: int, out_dim: int) -> list[str]:
        parts = [("residual.0", norm), ("residual.2", conv), ("residual.3", norm), ("residual.6", conv)]
        parts += [("shortcut", conv)] if in_dim != out_dim else []
        return [f"{prefix}.{part}{end}" for part, ends in parts for end in ends]

    def middle(prefix: str, d: int) -> list[str]:
        attn = [f"{prefix}.1.{part}{end}" for part, ends in (("norm", norm), ("to_qkv", conv), ("proj", conv))
                for end in ends]
        return resblock(f"{prefix}.0", d, d) + attn + resblock(f"{prefix}.2", d, d)

    def resample(prefix: str, temporal: bool) -> list[str]:
        return [f"{prefix}.resample.1{end}" for end in conv] + ([f"{prefix}.time_conv{end}" for end in conv]
                                                                 if temporal else [])

    names = [f"{top}{end}" for top in ("encoder.conv1", "conv1", "conv2", "decoder.conv1") for end in conv]
    dims, i = [dim * m for m in (1, *dim_mult)], 0  # encoder: (in, out) per stage
    for stage, (d_in, d_out) in enumerate(zip(dims[:-1], dims[1:])):
        for _ in range(num_res_blocks):
            names += resblock(f"encoder.downsamples.{i}", d_in, d_out)
            d_in, i = d_out, i + 1
        if stage != len(dim_mult) - 1:
            names += resample(f"encoder.downsamples.{i}", temporal_down[stage])
            i += 1
    names += middle("encoder.middle", dims[-1]) + [f"encoder.head.{k}{end}" for k, ends in ((0, norm), (2, conv))
                                                   for end in ends]
    dims, i = [dim * m for m in (dim_mult[-1], *dim_mult[::-1])], 0  # decoder
    temporal_up = temporal_down[::-1]
    names += middle("decoder.middle", dims[0])
    for stage, (d_in, d_out) in enumerate(zip(dims[:-1], dims[1:])):
        d_in = d_in // 2 if stage in (1, 2, 3) else d_in  # the upsampler before halves the channels
        for _ in range(num_res_blocks + 1):
            names += resblock(f"decoder.upsamples.{i}", d_in, d_out)
            d_in, i = d_out, i + 1
        if stage != len(dim_mult) - 1:
            names += resample(f"decoder.upsamples.{i}", temporal_up[stage])
            i += 1
    return names + [f"decoder.head.{k}{end}" for k, ends in ((0, norm), (2, conv)) for end in ends]


def check_vae(path: str | os.PathLike) -> None:
    """Check a Wan2.1 VAE (`Wan2.1_VAE.pth`, a diffusers `vae/` folder or a single .safetensors file)
    from its config and tensor names only, no weight read: the pipeline calls this before any model
    loads, so a wrong or incomplete VAE is not found after the denoise. A file's names are checked against
    `official_names()` (no diffusers import: it loads for the decode); a folder's against diffusers' model
    built from its config. Raises CheckpointError naming the file: the Wan2.2 VAE (z_dim 48, TI2V-5B's),
    another model, a missing or unexpected key."""
    import json

    path = Path(path)
    if path.is_dir():
        from diffusers import AutoencoderKLWan

        config_file = path / "config.json"
        if not config_file.is_file():
            raise CheckpointError(f"{path} is not a diffusers vae/ folder (no config.json): download it again")
        config = json.loads(config_file.read_text())
        if config.get("z_dim", 16) != 16:
            raise CheckpointError(f"{config_file}: z_dim {config['z_dim']} is not the Wan2.1 VAE's 16 (z_dim 48 is "
                                  "the Wan2.2 VAE of TI2V-5B): use the Wan2.1 VAE of Wan2.2-T2V-A14B")
        with torch.device("meta"):
            model = AutoencoderKLWan.from_config(config)
        files = sorted(path.glob("*.safetensors"))
        if not files:
            raise CheckpointError(f"{path} has no .safetensors weights: download the VAE folder again")
        found = [name for f in files for name in read_header(f).tensors]
        check_keys(model.state_dict(), found, files[0] if len(files) == 1 else path, "the Wan2.1 VAE")
        return
    if path.suffix == ".safetensors":
        info, header, stored = scan(path)
        refuse(info, "vae")  # the Wan2.2 VAE, an expert, a text encoder: named
        fp8 = _fp8_layers(header, stored)
        names = [n for n in stored if not _is_marker(n, fp8)]  # as read_vae_file keeps them
    else:
        names = torch.load(path, map_location="cpu", mmap=True, weights_only=True)  # keys; data stays on disk
    check_keys(official_names(), names, path, "the Wan2.1 VAE (official WanVAE_ names)")


# ---------------------------------------------------------------------------------------------------
# Tile choice


def tile_for_memory(height: int, width: int, frames: int, free_bytes: int, element_size: int) -> int | None:
    """Square tile side in pixels (a multiple of 32) that fits `free_bytes`; None when the whole frame fits.

    Besides the tile's activations, the decoded tiles of the whole video (with overlap), the blended
    video and its fp32 copy stay on the device: at most 3 fp32 videos' worth of memory.
    """
    video_bytes = 3 * frames * height * width * 4  # one fp32 video (B=1)
    budget = free_bytes - MARGIN_BYTES - 3 * video_bytes
    per_px = BYTES_PER_PIXEL[element_size]
    if budget >= per_px * height * width:
        return None
    side = int((max(budget, 0) / per_px) ** 0.5) // 32 * 32
    if side < MIN_TILE:
        need = MARGIN_BYTES + 3 * video_bytes + per_px * MIN_TILE**2
        raise MemoryError(
            f"VAE decode of {frames}x{height}x{width} needs about {need / 2**30:.1f} GiB free on the GPU "
            f"(tiles of {MIN_TILE}px), only {free_bytes / 2**30:.1f} GiB is free: free memory first, "
            "or decode on the CPU (device='cpu')"
        )
    return side


# ---------------------------------------------------------------------------------------------------
# The decoder


class VAE:
    """Wan2.1 VAE decoder with latent de-normalization and spatial tiling."""

    def __init__(self, model, mean, std, *, device: torch.device, dtype: torch.dtype):
        self.model = model.to(device).eval().requires_grad_(False)
        self.device, self.dtype = device, dtype
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1, 1)  # (1, 16, 1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1, 1)

    @classmethod
    def from_pretrained(
        cls, path: str | os.PathLike, device: str | torch.device = "cuda", dtype: torch.dtype = torch.float32
    ) -> VAE:
        """Load the Wan2.1 VAE from `Wan2.1_VAE.pth` (official), a `vae/` folder (diffusers) or a single
        `.safetensors` file with the official key names (ComfyUI's `wan_2.1_vae.safetensors`); a model
        root's VAE is `checkpoint.open_root(root).vae`. fp32 is the official dtype."""
        from diffusers import AutoencoderKLWan

        path = Path(path)
        if path.is_dir():
            if not (path / "config.json").is_file():
                raise CheckpointError(f"{path} is not a diffusers vae/ folder (no config.json): pass the VAE file "
                                      "or folder itself (a model root's is checkpoint.open_root(root).vae)")
            model = AutoencoderKLWan.from_pretrained(path, torch_dtype=dtype)
            return cls(model, model.config.latents_mean, model.config.latents_std, device=torch.device(device),
                       dtype=dtype)
        with torch.device("meta"):
            model = AutoencoderKLWan()  # the default config is the Wan2.1 VAE
        if path.suffix == ".safetensors":
            sd = read_vae_file(path)  # refuses the Wan2.2 VAE and other files by name
            check_vae_keys(sd, model, path)
        else:
            sd = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
        try:
            sd = {k: v.to(dtype) for k, v in official_to_diffusers(sd).items()}
            model.load_state_dict(sd, strict=True, assign=True)
        except (KeyError, RuntimeError) as e:  # an unknown key, or missing / unexpected / mis-shaped ones
            raise CheckpointError(f"{path} is not a complete Wan2.1 VAE ({' '.join(str(e).split())[:400]}): "
                                  "download it again (the official release's VAE, or wan_2.1_vae.safetensors)") from e
        return cls(model, LATENTS_MEAN, LATENTS_STD, device=torch.device(device), dtype=dtype)

    def unload(self) -> None:
        """Move the weights off the GPU."""
        self.model.to("cpu")
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def choose_tile(self, height: int, width: int, frames: int) -> int | None:
        """Tile side for a video of this size on this device (None: untiled). CPU decodes untiled."""
        if self.device.type != "cuda":
            return None
        free, _ = torch.cuda.mem_get_info(self.device)
        free += torch.cuda.memory_reserved(self.device) - torch.cuda.memory_allocated(self.device)
        return tile_for_memory(height, width, frames, free, torch.finfo(self.dtype).bits // 8)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, tile: int | None | str = "auto") -> torch.Tensor:
        """latents [B, 16, F', h, w] (normalized, as the DiT makes them) -> video [B, 3, 4(F'-1)+1, 8h, 8w].

        The video is fp32 in [-1, 1] on the decode device.

        tile: "auto" picks from free memory; None decodes the whole frame at once; an int is the tile
        side in pixels (a multiple of 32; neighbouring tiles overlap by a quarter of it).
        """
        if latents.ndim != 5 or latents.shape[1] != self.mean.shape[1]:
            raise ValueError(f"latents must be [B, {self.mean.shape[1]}, F', H/8, W/8], got {tuple(latents.shape)}")
        height, width = latents.shape[-2] * STRIDE[1], latents.shape[-1] * STRIDE[2]
        if tile == "auto":
            tile = self.choose_tile(height, width, (latents.shape[2] - 1) * STRIDE[0] + 1)
        z = latents.float().cpu() * self.std + self.mean  # (B, 16, F', h, w): undo the per-channel normalization
        z = z.to(self.device, self.dtype)
        if tile is None or (tile >= height and tile >= width):
            self.model.disable_tiling()
        else:
            if tile % 32 or tile <= 0:
                raise ValueError(f"tile must be a positive multiple of 32 pixels, got {tile}")
            stride = tile - tile // 4
            self.model.enable_tiling(tile, tile, stride, stride)
        video = self.model.decode(z).sample  # (B, 3, F, H, W), already clamped to [-1, 1]
        return video.float().clamp_(-1, 1)
