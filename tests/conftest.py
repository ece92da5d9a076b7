"""Shared fixtures: tiny config, tiny random experts on disk in both layouts, the official references.

Checkpoints are session-scoped (written once, read by many tests); a test that damages a checkpoint
writes its own copy (see `official_expert_copy`).
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest
import torch

# wan_lite from this checkout (without requiring `pip install -e .`); builders/reference by name.
_TESTS = Path(__file__).resolve().parent
for _path in (_TESTS.parent, _TESTS):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

from builders import make_checkpoint_root, make_official_model, save_official_expert  # noqa: E402

torch.set_num_threads(2)

HIGH_SEED, LOW_SEED = 1, 2


def pytest_configure(config):
    # The official modules wrap fp32 regions in autocast('cuda'), which warns on a CPU-only torch.
    config.addinivalue_line("filterwarnings", "ignore:CUDA is not available:UserWarning")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def tiny_cfg():
    from wan_lite.config import ModelConfig

    return ModelConfig.tiny()


@pytest.fixture(scope="session")
def reference_experts(tiny_cfg):
    """(high, low) official models, the exact weights the checkpoint fixtures hold."""
    return make_official_model(tiny_cfg, HIGH_SEED), make_official_model(tiny_cfg, LOW_SEED)


@pytest.fixture(scope="session")
def official_root(tmp_path_factory, tiny_cfg):
    """Both experts in the official layout (sharded): high_noise_model/, low_noise_model/."""
    return make_checkpoint_root(tmp_path_factory.mktemp("official"), tiny_cfg, "official", (HIGH_SEED, LOW_SEED))


@pytest.fixture(scope="session")
def diffusers_root(tmp_path_factory, tiny_cfg):
    """Both experts in the diffusers layout: transformer/, transformer_2/, model_index.json."""
    return make_checkpoint_root(tmp_path_factory.mktemp("diffusers"), tiny_cfg, "diffusers", (HIGH_SEED, LOW_SEED))


@pytest.fixture(scope="session")
def official_single_file(tmp_path_factory, reference_experts):
    """The high expert in the official layout as one diffusion_pytorch_model.safetensors (no index)."""
    return save_official_expert(reference_experts[0], tmp_path_factory.mktemp("single") / "high_noise_model", None)


@pytest.fixture
def official_expert_copy(tmp_path, official_root):
    """A private copy of the official high-noise expert, for tests that damage it."""
    return Path(shutil.copytree(official_root.high, tmp_path / "high_noise_model"))
