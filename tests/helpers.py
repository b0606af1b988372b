"""Helpers shared by the test modules (fixtures are in conftest.py): tiny models and training jobs, the kill-and-resume
check, LlamaGen's reference key lists and the miniature study run through Snakemake. Test modules import them from
here, never from one another."""
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from varkd import sources
from varkd.codes import CodeSet
from varkd.config import MethodConfig, OptimConfig, TermConfig, TrainJob
from varkd.loop import BatchOrder
from varkd.models.gpt import GPT, GPTConfig
from varkd.models.vq import VQConfig

REPO = Path(__file__).resolve().parents[1]


# --- tiny models and training jobs ------------------------------------------------------------------------------
TINY = dict(dim=32, n_layer=2, n_head=2, vocab_size=16, num_classes=3, block_size=16, multiple_of=16)
# No dropout and no label dropout: no random draw in a ground-truth step, so its result does not depend on how the
# batch is split (micro-batches, ranks) or on how a compiled model draws random numbers.
DETERMINISTIC = dict(TINY, dropout_p=0.0, token_dropout_p=0.0, class_dropout_prob=0.0)


def job(codes, out, method="ce", steps=12, kd=None, **kw) -> TrainJob:
    kd = kd or MethodConfig(terms=[TermConfig(divergence=method)])
    kw = {"model": GPTConfig(**TINY), "optim": OptimConfig(steps=steps, batch_size=8, lr=3e-3, warmup_steps=2,
                                                           checkpoint_every=4, log_every=1, precision="fp32"), **kw}
    return TrainJob(study="t", backbone="tiny", method=method, seed=3, kd=kd, codes_train=str(codes / "train"),
                    codes_val=str(codes / "val"), out_dir=str(out), **kw)


def tiny_model(seed=0, **overrides) -> GPT:
    """A 64-code, 10-class GPT with a random output layer (LlamaGen zero-inits it: every logit would tie)."""
    torch.manual_seed(seed)
    cfg = {**dict(dim=64, n_layer=2, n_head=4, vocab_size=64, num_classes=10, block_size=16), **overrides}
    model = GPT(GPTConfig(**cfg))
    torch.nn.init.normal_(model.output.weight, std=1.0)  # LlamaGen zero-inits it: all logits would tie
    return model


def random_gpt(seed):
    """A TINY GPT with a random output layer (tests/test_sources.py's)."""
    torch.manual_seed(seed)
    model = GPT(GPTConfig(**TINY))
    torch.nn.init.normal_(model.output.weight, std=0.5)  # zero-init output would make every model uniform
    return model


def step_data(method, student, teacher=None, n=48, batch=8):
    """A KD step's data source over n random TINY sequences (tests/test_sources.py's)."""
    sequences = CodeSet(torch.randint(0, 16, (n, 1, 16)).numpy(), np.arange(n) % 3, "test codes")
    return sources.StepData(method, sequences, BatchOrder(n, batch, seed=0), student=student, teacher=teacher,
                            seed=5, total_steps=100, validation=lambda: 1.0, device=torch.device("cpu"))


def tiny_config(**overrides) -> VQConfig:
    """32x32 -> 8x8 tokens, the embedded study's shape, small enough for CPU tests."""
    kw = dict(codebook_size=64, codebook_embed_dim=8, encoder_ch_mult=[1, 2, 2], decoder_ch_mult=[1, 2, 2],
              z_channels=16, ch=8, num_res_blocks=1, norm_groups=4)
    kw.update(overrides)
    return VQConfig(**kw)


# --- checks -----------------------------------------------------------------------------------------------------
def resume_after_kill(run, out, monkeypatch, at_call: int, straight: dict, counts: tuple[str, ...]) -> None:
    """Kill the training run `run(out)` at its `at_call`-th batch draw (after a checkpoint), rerun it, and assert
    that the resumed model and the run's `counts` equal those of the uninterrupted run `straight` (a checkpoint)."""
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


# --- LlamaGen's key lists (tests/data/backbone-keys.txt) and files in its layouts --------------------------------
KEYS_FILE = Path(__file__).parent / "data" / "backbone-keys.txt"


def section(title: str) -> list[str]:
    """The lines after the header line that starts with `== title`, up to the next header."""
    lines = KEYS_FILE.read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"== {title}"))
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("==")), len(lines))
    return lines[start + 1 : end]


def parse_shapes(lines: list[str]) -> dict[str, tuple[int, ...]]:
    shapes = {}
    for line in lines:
        m = re.fullmatch(r"\s+(\S+): \[([\d, ]*)\]", line)
        if m:
            shapes[m.group(1)] = tuple(int(s) for s in m.group(2).split(","))
    return shapes


def vq16_shapes() -> dict[str, tuple[int, ...]]:
    return parse_shapes(section("LlamaGen VQ-16 state_dict"))


def random_state(shapes: dict[str, tuple[int, ...]], seed: int = 0) -> dict[str, torch.Tensor]:
    """Real values in the file layout: matrices N(0, 1/fan_in), norm scales 1, biases 0, usage buffer 0."""
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in shapes.items():
        if key.endswith(".bias") or key == "quantize.codebook_used":
            state[key] = torch.zeros(shape)
        elif len(shape) == 1:
            state[key] = torch.ones(shape)
        else:
            state[key] = torch.randn(shape, generator=gen) / math.sqrt(math.prod(shape[1:]))
    return state


def save(path: Path, state: dict, layout: str = "model") -> Path:
    torch.save(state if layout == "bare" else {layout: state}, path)
    return path


# --- the miniature study (tests/test_workflow.py) and Snakemake on it ------------------------------------------
MINIATURE = {
    "data": {"val_per_class": 5, "test_per_class": 10},
    "tokenizer": {"model": {"ch": 8, "z_channels": 16, "norm_groups": 4}, "min_codebook_usage": 0.02,  # 30 steps
                  "optim": {"steps": 30, "checkpoint_every": 10, "log_every": 10}},
    "classifier": {"optim": {"steps": 30, "checkpoint_every": 10, "log_every": 10}},
    "backbones": ["tiny"],
    "seeds": [0],
    "student_optim": {"steps": 6, "batch_size": 16, "checkpoint_every": 3, "log_every": 3, "eval_every": 0},
    "student_pretrain": {"steps": 6, "batch_size": 16, "checkpoint_every": 3, "log_every": 3, "eval_every": 0},
    "sample": {"num_samples": 20, "val_num_samples": 20, "batch_size": 20},
    "evaluate": {"isc_splits": 2, "noise_seeds": 2},
}
MINI_BACKBONE = {"teacher": {"dim": 32, "n_layer": 1, "n_head": 2}, "student": {"dim": 16, "n_layer": 1, "n_head": 2},
                 "teacher_optim": {"steps": 30, "checkpoint_every": 10, "log_every": 10, "eval_every": 0}}


def merge(base: dict, over: dict) -> dict:
    return {k: merge(base[k], v) if isinstance(v, dict) and isinstance(base.get(k), dict) else v
            for k, v in {**base, **over}.items()}


def snakemake(workdir: Path, *args: str, check: bool = True, umask: int | None = None, background: bool = False):
    """Snakemake on the workflow in `workdir` (under `umask` if given); a Popen in its own session (so that a
    Ctrl-C can reach its whole process group) when `background`."""
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    cmd = [sys.executable, "-m", "snakemake", "-s", str(REPO / "workflow" / "Snakefile"), "--directory", str(workdir),
           "--cores", "2", *args]
    options = dict(text=True, env=env, preexec_fn=None if umask is None else (lambda: os.umask(umask)))
    if background:
        return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
                                **options)
    result = subprocess.run(cmd, capture_output=True, timeout=900, **options)
    if check and result.returncode != 0:
        raise AssertionError(f"snakemake {' '.join(args)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}")
    return result


def files_of(root: Path) -> list[Path]:
    """Every file under `root` but job locks (which runs leave behind or not), relative to it."""
    return sorted(p.relative_to(root) for p in root.rglob("*") if p.is_file() and not p.name.endswith(".lock"))


def make_miniature(presets: Path) -> dict:
    """Turn the editable copy of config/ into the miniature study; returns the study dict."""
    study = merge(yaml.safe_load((presets / "config.yaml").read_text()), MINIATURE)
    (presets / "config.yaml").write_text(yaml.safe_dump(study))
    backbone = presets / "backbones" / "tiny.yaml"
    backbone.write_text(yaml.safe_dump(merge(yaml.safe_load(backbone.read_text()), MINI_BACKBONE)))
    return study
