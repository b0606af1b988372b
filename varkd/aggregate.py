"""metrics.json files -> a results table in its folder: <name>.csv (one row per run), <name>_summary.csv (mean and
std over seeds, what plots and notebooks read), <name>.md to read and <name>.tex (booktabs) for a paper."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Sequence

import pandas as pd

from varkd import tables
from varkd.io import atomic_path, atomic_write_text

# the cost of a training run, from its checkpoint's summary; metrics.json stores each as train_<key>
TRAIN_COSTS = ("wall_s", "steps", "student_forwards", "teacher_forwards", "rollouts", "rollout_tokens",
               "rollout_steps", "replayed")
COLUMNS = ["backbone", "method", "seed", "fid", "isc_mean", "precision", "recall", "val_nll", "isc_std",
           "num_samples", "num_real", "feature_extractor", *(f"train_{key}" for key in TRAIN_COSTS), "run_dir"]


def load_metrics(paths: list[str], results: str | Path) -> pd.DataFrame:
    """One row per metrics file; run_dir is its folder (train_log.csv, samples.npz) relative to `results`."""
    rows = []
    for path in paths:
        try:
            row = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise ValueError(f"cannot read metrics file {path}: {err}") from None
        rows.append({**row, "run_dir": Path(os.path.relpath(Path(path).parent, results)).as_posix()})
    frame = pd.DataFrame(rows)
    return frame[[c for c in COLUMNS if c in frame]]


def aggregate(paths: list[str], out_dir: str | Path, name: str = "main",
              sweeps: Sequence[dict[str, Any]] = ()) -> pd.DataFrame:
    """Write the table's files into out_dir, the tables folder of the results folder (run_dir's base).

    `sweeps`: where the sweep runs sit on their axes (Study.sweep_points), kept as the summary's sweep_<name> columns.
    """
    out_dir = Path(out_dir)
    runs = load_metrics(paths, out_dir.parent)
    summary = tables.summarise(runs, sweeps)
    for suffix, frame in ((".csv", runs), ("_summary.csv", summary)):
        with atomic_path(out_dir / f"{name}{suffix}", suffix=".csv") as tmp:
            frame.to_csv(tmp, index=False)
    legend = ("Mean ± standard deviation over n seeds; bold: each backbone's best compared method at the shown "
              "precision; italics: reference rows (real images against held-out ones, the teacher, the CE-pretrained "
              "student every method starts from). FID and NLL (held-out negative log-likelihood per code, nats) "
              "lower is better, IS, precision and recall higher. Costs: training wall time, teacher forward "
              "passes and sequential decoding steps of the rollouts (means).")
    atomic_write_text(out_dir / f"{name}.md", f"# Results: {name}\n\n{legend}\n\n{tables.markdown(summary)}\n\n"
                                              f"## Every run\n\n{runs.to_markdown(index=False, floatfmt='.4g')}\n")
    atomic_write_text(out_dir / f"{name}.tex", f"% varkd results table {name!r}. {legend}\n{tables.latex(summary)}")
    print(tables.markdown(summary))
    return runs
