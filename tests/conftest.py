"""Shared fixtures: the repository's config folder and a copy of it that tests may edit."""
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from omegaconf import OmegaConf

from varkd.codes import save_code_set
from varkd.config import MethodConfig, OptimConfig, TermConfig, TrainJob
from varkd.models.gpt import GPTConfig

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    """Two cores shared with other jobs: one thread per test process is much faster than oversubscribing."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def miniature_study(tmp_path_factory) -> Path:
    """A workdir holding the miniature study (tests/test_workflow.py) after `snakemake all`, shared by the workflow
    and fault tests: each leaves it complete (a test that breaks it reruns it) and its `all` files as they were."""
    from tests.test_workflow import make_miniature, snakemake

    root = tmp_path_factory.mktemp("miniature")
    make_miniature(Path(shutil.copytree(REPO / "config", root / "config")))
    snakemake(root, "all")
    return root


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


TINY = dict(dim=32, n_layer=2, n_head=2, vocab_size=16, num_classes=3, block_size=16, multiple_of=16)
# No dropout and no label dropout: no random draw in a ground-truth step, so its result does not depend on how the
# batch is split (micro-batches, ranks) or on how a compiled model draws random numbers.
DETERMINISTIC = dict(TINY, dropout_p=0.0, token_dropout_p=0.0, class_dropout_prob=0.0)


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


def job(codes, out, method="ce", steps=12, kd=None, **kw) -> TrainJob:
    kd = kd or MethodConfig(terms=[TermConfig(divergence=method)])
    kw = {"model": GPTConfig(**TINY), "optim": OptimConfig(steps=steps, batch_size=8, lr=3e-3, warmup_steps=2,
                                                           checkpoint_every=4, log_every=1, precision="fp32"), **kw}
    return TrainJob(study="t", backbone="tiny", method=method, seed=3, kd=kd, codes_train=str(codes / "train"),
                    codes_val=str(codes / "val"), out_dir=str(out), **kw)


def resume_after_kill(run, out, monkeypatch, at_call: int, straight: dict, counts: tuple[str, ...]) -> None:
    """Kill the training run `run(out)` at its `at_call`-th batch draw (after a checkpoint), rerun it, and assert
    that the resumed model and the run's `counts` equal those of the uninterrupted run `straight` (a checkpoint)."""
    from varkd import sources

    real, calls = sources.StepData.__call__, {"n": 0}

    def killed(self, *args):
        calls["n"] += 1
        if calls["n"] == at_call:
            raise KeyboardInterrupt
        return real(self, *args)

    monkeypatch.setattr(sources.StepData, "__call__", killed)
    with pytest.raises(KeyboardInterrupt):
        run(out)
    monkeypatch.setattr(sources.StepData, "__call__", real)
    resumed = torch.load(run(out), weights_only=True)
    for key in straight["model"]:
        assert torch.equal(straight["model"][key], resumed["model"][key]), key
    for key in counts:
        assert straight["train"][key] == resumed["train"][key], key


def assert_summary_matches_metrics_files(results: Path, table: str) -> None:
    """The table's summary holds, per (backbone, method), the count, mean and std over seeds of the metrics of the
    metrics.json files under `results` with that identity, computed here straight from the files."""
    summary = pd.read_csv(results / "tables" / f"{table}_summary.csv").set_index(["backbone", "method"])
    files = pd.DataFrame([json.loads(p.read_text()) for p in results.rglob("metrics.json")])
    groups = files[files.set_index(["backbone", "method"]).index.isin(summary.index)].groupby(["backbone", "method"])
    assert len(groups) == len(summary)
    for key, runs in groups:
        row = summary.loc[key]
        assert row["n"] == len(runs), key
        for metric in ("fid", "isc_mean", "precision", "recall", "val_nll"):
            values = runs[metric].to_numpy(float) if metric in runs else np.array([np.nan])
            std = np.std(values, ddof=1) if len(values) > 1 else np.nan
            assert np.allclose([row[f"{metric}_mean"], row[f"{metric}_std"]], [np.mean(values), std], equal_nan=True), \
                (key, metric)
