"""Bad inputs give one clear error that names the file or key and says what to do; nothing is
half-loaded and the checkpoint folder is left as it was."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from builders import OFFICIAL_INDEX, official_shard_files
from safetensors.torch import load_file, save_file

import wan_lite
from wan_lite import SamplingConfig, sample
from wan_lite.checkpoint import CheckpointError

# A message says how to fix the problem: it carries one of these words.
FIX_WORDS = re.compile(r"download|point at|pass |use |truncate|restore|keep|remove|choose|re-export|rename", re.I)


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*")}


def load_error(folder: Path, *fragments: str) -> str:
    """load_expert(folder) raises one CheckpointError naming every fragment and a fix; folder untouched."""
    before = snapshot(folder)
    with pytest.raises(CheckpointError) as info:
        wan_lite.load_expert(folder, dtype=torch.float32)
    assert isinstance(info.value, ValueError)
    msg = str(info.value)
    for fragment in fragments:
        assert fragment in msg, f"{fragment!r} not in: {msg}"
    assert FIX_WORDS.search(msg), f"no fix in: {msg}"
    assert snapshot(folder) == before
    return msg


def shard_of(folder: Path, key: str) -> Path:
    index = json.loads((folder / OFFICIAL_INDEX).read_text())
    return folder / index["weight_map"][key]


def rewrite_shard(folder: Path, key: str, edit) -> Path:
    """Load the shard holding `key`, apply edit(state) and save it back."""
    shard = shard_of(folder, key)
    state = load_file(shard)
    edit(state)
    save_file(state, shard)
    return shard


def rewrite_index(folder: Path, edit) -> None:
    path = folder / OFFICIAL_INDEX
    index = json.loads(path.read_text())
    edit(index["weight_map"])
    path.write_text(json.dumps(index))


# ---------------------------------------------------------------------------------------------
# layout


def test_folder_in_neither_layout(tmp_path):
    folder = tmp_path / "some_model"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"_class_name": "UNet2DConditionModel", "sample_size": 64}))
    save_file({"w": torch.zeros(2)}, folder / "model.safetensors")
    msg = load_error(folder, "some_model")
    assert "official" in msg.lower() and "diffusers" in msg.lower()


def test_empty_folder(tmp_path):
    folder = tmp_path / "empty_expert"
    folder.mkdir()
    load_error(folder, "empty_expert")


def test_model_root_instead_of_expert_folder(official_root, tmp_path):
    """A common slip: passing the model root (high_noise_model/ + low_noise_model/) to load_expert.
    The way out is to point at an expert subfolder, so the message must name one."""
    root = Path(shutil.copytree(official_root.root, tmp_path / "Wan2.2-T2V-A14B"))
    load_error(root, "Wan2.2-T2V-A14B", "high_noise_model")


def test_missing_path(tmp_path):
    with pytest.raises(CheckpointError, match="does_not_exist"):
        wan_lite.load_expert(tmp_path / "does_not_exist")


def test_official_folder_without_weights(official_expert_copy):
    for shard in official_shard_files(official_expert_copy):
        shard.unlink()
    (official_expert_copy / OFFICIAL_INDEX).unlink()
    load_error(official_expert_copy, "high_noise_model")


# ---------------------------------------------------------------------------------------------
# shards and keys


def test_missing_shard(official_expert_copy):
    shard = official_shard_files(official_expert_copy)[1]
    shard.unlink()
    load_error(official_expert_copy, shard.name)


def test_missing_key_removed_from_shard_and_index(official_expert_copy):
    key = "blocks.1.self_attn.q.bias"
    rewrite_shard(official_expert_copy, key, lambda s: s.pop(key))
    rewrite_index(official_expert_copy, lambda m: m.pop(key))
    load_error(official_expert_copy, key)


def test_key_listed_in_index_but_absent_from_shard(official_expert_copy):
    """A damaged shard: the index names the tensor, the file lacks it."""
    key = "blocks.1.cross_attn.norm_k.weight"
    shard = rewrite_shard(official_expert_copy, key, lambda s: s.pop(key))
    load_error(official_expert_copy, key, shard.name)


def test_missing_key_needed_to_read_the_config(official_expert_copy):
    key = "text_embedding.0.weight"  # text_dim is read from its shape
    rewrite_shard(official_expert_copy, key, lambda s: s.pop(key))
    rewrite_index(official_expert_copy, lambda m: m.pop(key))
    load_error(official_expert_copy, key)


def test_missing_key_single_file(official_single_file, tmp_path):
    folder = Path(shutil.copytree(official_single_file, tmp_path / "high_noise_model"))
    key = "blocks.0.ffn.2.bias"
    path = folder / "diffusion_pytorch_model.safetensors"
    state = load_file(path)
    del state[key]
    save_file(state, path)
    load_error(folder, key)


def test_unexpected_key(official_expert_copy):
    key = "blocks.0.self_attn.extra.weight"
    anchor = "blocks.0.self_attn.q.weight"
    shard = rewrite_shard(official_expert_copy, anchor, lambda s: s.__setitem__(key, torch.zeros(4)))
    rewrite_index(official_expert_copy, lambda m: m.__setitem__(key, shard.name))
    load_error(official_expert_copy, key)


def test_unexpected_key_diffusers_names_the_stored_key(diffusers_root, tmp_path):
    folder = Path(shutil.copytree(diffusers_root.high, tmp_path / "transformer"))
    path = folder / "diffusion_pytorch_model.safetensors"
    state = load_file(path)
    key = "blocks.0.attn2.add_k_proj.weight"  # an I2V-only tensor: not a T2V expert
    state[key] = torch.zeros(32, 32)
    save_file(state, path)
    load_error(folder, key)


def test_shape_mismatch(official_expert_copy):
    key = "blocks.1.ffn.0.weight"  # ffn_dim is read from blocks.0, so blocks.1 disagrees
    rewrite_shard(official_expert_copy, key, lambda s: s.__setitem__(key, torch.zeros(48, 32)))
    msg = load_error(official_expert_copy, key)
    assert "48" in msg and "64" in msg


def test_truncated_shard(official_expert_copy):
    shard = official_shard_files(official_expert_copy)[-1]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    load_error(official_expert_copy, shard.name)


# ---------------------------------------------------------------------------------------------
# inputs


@pytest.fixture(scope="module")
def tiny_model(tiny_cfg):
    return wan_lite.WanModel(tiny_cfg).eval()


def test_context_longer_than_512_tokens(tiny_model, tiny_cfg):
    x = torch.randn(1, 16, 1, 2, 2)
    with pytest.raises(ValueError) as info:
        tiny_model(x, torch.tensor([500]), torch.randn(1, 513, tiny_cfg.text_dim))
    msg = str(info.value)
    assert "513" in msg and "512" in msg and FIX_WORDS.search(msg), msg
    tiny_model(x, torch.tensor([500]), torch.randn(1, 512, tiny_cfg.text_dim))  # 512 is fine


def test_context_longer_than_512_tokens_in_sample(tiny_model, tiny_cfg):
    noise = torch.randn(1, 16, 1, 2, 2)
    long, short = torch.randn(1, 600, tiny_cfg.text_dim), torch.randn(1, 5, tiny_cfg.text_dim)
    for ctx, null in ((long, short), (short, long)):
        with pytest.raises(ValueError, match="600"):
            sample(tiny_model, tiny_model, noise, ctx, null, SamplingConfig(steps=2))


@pytest.mark.parametrize(
    "shape, word", [((1, 16, 1, 3, 4), "height"), ((1, 16, 2, 4, 5), "width"), ((2, 16, 1, 5, 7), "height")]
)
def test_odd_latent_height_or_width(tiny_model, tiny_cfg, shape, word):
    x = torch.randn(shape)
    t = torch.full((shape[0],), 500)
    ctx = torch.randn(shape[0], 4, tiny_cfg.text_dim)
    with pytest.raises(ValueError) as info:
        tiny_model(x, t, ctx)
    msg = str(info.value)
    assert word in msg and str(shape[3] if word == "height" else shape[4]) in msg, msg
    with pytest.raises(ValueError, match=word):
        sample(tiny_model, tiny_model, x, ctx, ctx, SamplingConfig(steps=2))
