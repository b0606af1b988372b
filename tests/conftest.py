"""Shared fixtures: the repository's config folder and a copy of it that tests may edit (plain helpers are in
tests/helpers.py)."""
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from tests.helpers import REPO, files_of, make_miniature, snakemake
from varkd.codes import save_code_set


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    """Two cores shared with other jobs: one thread per test process is much faster than oversubscribing."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


_FILES_AFTER_ALL: dict[Path, set[Path]] = {}  # what `snakemake all` made, recorded before any test adds to it


@pytest.fixture(scope="session")
def miniature_study(tmp_path_factory) -> Path:
    """A workdir holding the miniature study (tests/test_workflow.py) after `snakemake all`, shared by the workflow
    and fault tests: each leaves it complete (a test that breaks it reruns it) and its `all` files as they were."""
    root = tmp_path_factory.mktemp("miniature")
    make_miniature(Path(shutil.copytree(REPO / "config", root / "config")))
    snakemake(root, "all")
    _FILES_AFTER_ALL[root] = set(files_of(root / "results" / "embedded"))
    return root


@pytest.fixture(scope="session")
def miniature_files(miniature_study) -> set[Path]:
    """The files under results/embedded of the miniature study right after its `snakemake all` (tests that run
    more targets on the shared study add files later)."""
    return _FILES_AFTER_ALL[miniature_study]


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


@pytest.fixture
def codes(tmp_path):
    """Synthetic code sets train/ and val/ (one view): class c sequences prefer tokens near 5c (learnable)."""
    rng = np.random.default_rng(0)

    def make(n):
        labels = rng.integers(0, 3, n)
        codes = (labels[:, None] * 5 + rng.integers(0, 4, (n, 16))) % 16
        return codes.astype(np.int32), labels.astype(np.int64)

    for split, n in (("train", 96), ("val", 24)):
        c, y = make(n)
        save_code_set(tmp_path / split, c[:, None], y, vocab_size=16)
    return tmp_path

