"""Shared fixtures: the repository's config folder and a copy of it that tests may edit."""
import shutil
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    """Two cores shared with other jobs: one thread per test process is much faster than oversubscribing."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def presets(tmp_path) -> Path:
    """An editable copy of config/ (study file and presets)."""
    return Path(shutil.copytree(REPO / "config", tmp_path / "config"))


@pytest.fixture
def study_dict(presets) -> dict:
    """The embedded study as a plain dict, pointing at the editable presets."""
    data = OmegaConf.to_container(OmegaConf.load(presets / "config.yaml"))
    data["presets"] = str(presets)
    return data
