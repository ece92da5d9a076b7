"""Wan2.1 VAE decode against the official Wan2_1_VAE (real architecture, random weights), tiling, layouts."""

from __future__ import annotations

import pytest
import torch
from builders_t2v import vae_files
from reference import official

from wan_lite.checkpoint import find_vae
from wan_lite.vae import VAE, tile_for_memory

GiB = 2**30


@pytest.fixture(scope="module")
def files():
    return vae_files()  # (Wan2.1_VAE.pth, vae/)


@pytest.fixture(scope="module")
def latents():
    return torch.randn(1, 16, 2, 4, 4, generator=torch.Generator().manual_seed(0))  # -> 5 frames of 32x32


@pytest.fixture(scope="module")
def expected(files, latents):
    """The official decode: Wan2_1_VAE (its mean/std, frame-by-frame causal cache, clamp), fp32."""
    ref = official().vae2_1.Wan2_1_VAE(vae_pth=str(files[0]), dtype=torch.float32, device="cpu")
    with torch.no_grad():
        return ref.decode([latents[0]])[0].unsqueeze(0)  # (1, 3, 5, 32, 32)


@pytest.fixture(scope="module")
def vaes(files):
    return {layout: VAE.from_pretrained(path, device="cpu") for layout, path in zip(("official", "diffusers"), files)}


@pytest.mark.parametrize("layout", ["official", "diffusers"])
def test_parity_with_official_decode(vaes, latents, expected, layout):
    """fp32, same random weights: rel L2 < 1e-5, max abs < 1e-4 (measured 1.0e-6 and 2.8e-6)."""
    got = vaes[layout].decode(latents, tile=None)
    assert got.shape == (1, 3, 5, 32, 32) and got.dtype == torch.float32
    assert got.min() >= -1 and got.max() <= 1
    assert ((got - expected).norm() / expected.norm()).item() < 1e-5
    assert (got - expected).abs().max().item() < 1e-4


def test_tiled_decode_vs_untiled(vaes):
    """Tiles of 32 px (overlap 8) on a 48x48 frame against one untiled decode.

    With random weights the decoder has no locality, so a 4x4-latent tile misses context that the
    untiled decode sees: measured rel L2 0.41 (max abs 0.76) here. On the GPU at real tile sizes (random weights,
    480x832): 256 px tiles rel L2 0.051 (max abs 0.32), 384 px tiles 0.029 (max abs 0.19). A tile
    at least as large as the frame gives the untiled result exactly.
    """
    z = torch.randn(1, 16, 1, 6, 6, generator=torch.Generator().manual_seed(1))
    vae = vaes["diffusers"]
    full = vae.decode(z, tile=None)
    assert torch.equal(vae.decode(z, tile=64), full)
    tiled = vae.decode(z, tile=32)
    assert tiled.shape == full.shape == (1, 3, 1, 48, 48)
    assert ((tiled - full).norm() / full.norm()).item() < 0.5
    assert tiled.min() >= -1 and tiled.max() <= 1


def test_tile_choice_from_free_memory():
    # bf16 720p x 81: ~14 GB of activations untiled, fits 22 GiB free
    assert tile_for_memory(720, 1280, 81, 22 * GiB, 2) is None
    # fp32 needs ~28 GB untiled: tiled on a 24 GB card, the largest tile that fits
    tile = tile_for_memory(720, 1280, 81, 22 * GiB, 4)
    assert tile is not None and tile % 32 == 0 and 512 <= tile < 1280
    assert tile_for_memory(720, 1280, 81, 10 * GiB, 4) < tile
    assert tile_for_memory(480, 832, 81, 70 * GiB, 4) is None
    with pytest.raises(MemoryError, match="decode on the CPU"):
        tile_for_memory(720, 1280, 81, 3 * GiB, 4)


def test_bad_input_and_missing_vae(vaes, tmp_path):
    with pytest.raises(ValueError, match=r"\[B, 16, F', H/8, W/8\]"):
        vaes["official"].decode(torch.zeros(1, 4, 2, 4, 4))
    with pytest.raises(ValueError, match="multiple of 32"):
        vaes["official"].decode(torch.zeros(1, 16, 1, 8, 8), tile=40)
    with pytest.raises(FileNotFoundError, match="Wan2.1_VAE.pth"):
        find_vae(tmp_path)


def test_official_names_are_the_official_models_and_diffusers_models(files):
    """`official_names` (what `check_vae` checks a file against, without diffusers): the official `WanVAE_`'s
    state dict (the .pth the builders write from it) and, renamed, diffusers' `AutoencoderKLWan`'s."""
    from diffusers import AutoencoderKLWan

    from wan_lite.vae import official_names, official_to_diffusers

    names = official_names()
    assert len(names) == len(set(names))
    assert set(names) == set(torch.load(files[0], map_location="cpu", mmap=True, weights_only=True))
    with torch.device("meta"):
        model = AutoencoderKLWan()
    assert set(official_to_diffusers(dict.fromkeys(names))) == set(model.state_dict())
