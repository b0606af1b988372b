"""metrics.json files -> a results table: one row per run (<name>.csv) and a readable Markdown copy (<name>.md)."""
from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from varkd.io import atomic_path, atomic_write_text

# the cost of a training run, from its checkpoint's summary; metrics.json stores each as train_<key>
TRAIN_COSTS = ("wall_s", "steps", "student_forwards", "teacher_forwards", "rollouts", "rollout_tokens",
               "rollout_steps", "replayed")
COLUMNS = ["backbone", "method", "seed", "fid", "isc_mean", "precision", "recall", "val_nll", "isc_std",
           "num_samples", "num_real", "feature_extractor", *(f"train_{key}" for key in TRAIN_COSTS)]
METRICS = ["fid", "isc_mean", "precision", "recall", "val_nll"]


def load_metrics(paths: list[str]) -> pd.DataFrame:
    rows = []
    for path in paths:
        try:
            rows.append(json.loads(Path(path).read_text()))
        except (OSError, json.JSONDecodeError) as err:
            raise ValueError(f"cannot read metrics file {path}: {err}") from None
    frame = pd.DataFrame(rows)
    return frame[[c for c in COLUMNS if c in frame]]


def summarise(frame: pd.DataFrame) -> pd.DataFrame:
    """Mean and standard deviation over seeds per (backbone, method), in first-appearance order."""
    groups = frame.groupby(["backbone", "method"], sort=False)
    summary = groups[[m for m in METRICS if m in frame]].agg(["mean", "std"])
    summary.columns = [f"{m}_{stat}" for m, stat in summary.columns]
    summary.insert(0, "seeds", groups.size())
    return summary.reset_index()


def _mean_pm_std(summary: pd.DataFrame) -> pd.DataFrame:
    shown = summary[["backbone", "method", "seeds"]].copy()
    for m in METRICS:
        if f"{m}_mean" in summary:
            mean, std = summary[f"{m}_mean"], summary[f"{m}_std"]
            shown[m] = [f"{a:.3f}" if pd.isna(b) else f"{a:.3f} ± {b:.3f}" if pd.notna(a) else ""
                        for a, b in zip(mean, std)]
    return shown


def aggregate(paths: list[str], out_dir: str | Path, name: str = "main") -> pd.DataFrame:
    frame = load_metrics(paths)
    out_dir = Path(out_dir)
    with atomic_path(out_dir / f"{name}.csv", suffix=".csv") as tmp:
        frame.to_csv(tmp, index=False)
    summary = summarise(frame)
    text = (f"# Results: {name}\n\nMean ± standard deviation over seeds. FID lower is better, IS higher; "
            "val_nll is the held-out negative log-likelihood per code (nats).\n\n"
            + _mean_pm_std(summary).to_markdown(index=False)
            + "\n\n## Every run\n\n" + frame.to_markdown(index=False, floatfmt=".4g") + "\n")
    atomic_write_text(out_dir / f"{name}.md", text)
    print(_mean_pm_std(summary).to_string(index=False))
    return frame
