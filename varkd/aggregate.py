"""metrics.json files -> a results table in its folder: <name>.csv (one row per run), <name>_summary.csv (mean and
std over seeds, what plots and notebooks read), <name>.md to read and <name>.tex (booktabs) for a paper."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import pandas as pd

from varkd import tables
from varkd.io import atomic_path, atomic_write_text, load_json

# the cost of a training run, from its checkpoint's summary; metrics.json stores each as train_<key>
TRAIN_COSTS = ("wall_s", "steps", "student_forwards", "teacher_forwards", "rollouts", "rollout_tokens",
               "rollout_steps", "replayed")
COLUMNS = ["backbone", "method", "seed", "fid", "sfid", "isc_mean", "precision", "recall", "nll", "isc_std",
           "num_samples", "num_real", "val_fid", "val_sfid", "val_isc_mean", "val_precision", "val_recall", "val_nll",
           "val_num_samples", "feature_extractor", "protocol", *(f"train_{key}" for key in TRAIN_COSTS), "run_dir"]
IDENTITY = ("backbone", "method", "seed")
REFERENCE_METHODS = ("ce", "fkl")  # the differences sections: to the student alone, and to standard KD


def load_metrics(paths: list[str], results: str | Path) -> pd.DataFrame:
    """One row per metrics file; run_dir is its folder (train_log.csv, samples.npz) relative to `results`."""
    rows = []
    for path in paths:
        row = load_json(path, "metrics file")
        missing = [key for key in IDENTITY if not isinstance(row, dict) or row.get(key) in (None, "")]
        if missing:
            raise ValueError(f"metrics file {path} has no {missing} (its run's identity): it cannot be placed in a "
                             "table; rerun its evaluation")
        rows.append({**row, "run_dir": Path(os.path.relpath(Path(path).parent, results)).as_posix()})
    frame = pd.DataFrame(rows)
    return frame[[c for c in COLUMNS if c in frame]]


def noise_caption(paths: Sequence[str]) -> str:
    """The measured noise floor, one clause per backbone: FID's standard deviation over sampling seeds of one model."""
    clauses = []
    for path in paths:
        noise = load_json(path, "noise file")
        try:
            clauses.append(f"{noise['backbone']} {noise['sd']['fid']:.2f} ({noise['method']}, {noise['noise_seeds']} "
                           f"sampling seeds x {noise['num_samples']:,} samples)")
        except (KeyError, TypeError) as err:
            raise ValueError(f"noise file {path} lacks {err}") from None
    if not clauses:
        return "The sampling noise floor was not measured (evaluate.noise_seeds: 0)."
    return ("Noise floor, the standard deviation of FID over sampling seeds of one model: " + "; ".join(clauses)
            + ". A single run's FID moves by about this much with its sampling seed alone.")


def aggregate(paths: list[str], out_dir: str | Path, name: str = "main", sweeps: Sequence[dict[str, Any]] = (),
              noise: Sequence[str] = ()) -> pd.DataFrame:
    """Write the table's files into out_dir, the tables folder of the results folder (run_dir's base).

    `sweeps`: where the sweep runs sit on their axes (Study.sweep_points), kept as the summary's sweep_<name> columns.
    `noise`: the backbones' noise.json files (NoiseFloorJob), quoted in the caption.
    """
    out_dir = Path(out_dir)
    runs = load_metrics(paths, out_dir.parent)
    summary = tables.summarise(runs, sweeps)
    for suffix, frame in ((".csv", runs), ("_summary.csv", summary)):
        with atomic_path(out_dir / f"{name}{suffix}", suffix=".csv") as tmp:
            frame.to_csv(tmp, index=False)
    legend = ("Test split. Mean ± standard error over n seeds (standard deviation / sqrt(n); a single seed shows its "
              "value alone). Bold: a backbone's best compared method, only where it beats every other compared method "
              f"by more than {tables.SIGNIFICANCE:g} standard errors of the difference; with one seed nothing is "
              "bold, since the seeds' spread is unknown. Italics: reference rows (real training images against the "
              "test images, the teacher, the CE-pretrained student every method starts from). FID and NLL (test "
              "negative log-likelihood per code, nats) lower is better, IS, precision and recall higher. Costs: "
              "training wall time, teacher forward passes and sequential decoding steps of the rollouts (means). "
              + noise_caption(noise))
    sections = [f"# Results: {name}\n\n{legend}\n\n{tables.markdown(summary)}"]
    for against in REFERENCE_METHODS:
        diff = tables.differences_markdown(summary, against)
        if diff:
            sections.append(f"## Differences to {against}\n\nEach method minus {against} on the same backbone: "
                            f"difference ± its standard error; bold: outside the noise (more than "
                            f"{tables.SIGNIFICANCE:g} standard errors).\n\n{diff}")
    sections.append(f"## Every run\n\n{runs.to_markdown(index=False, floatfmt='.4g')}")
    atomic_write_text(out_dir / f"{name}.md", "\n\n".join(sections) + "\n")
    atomic_write_text(out_dir / f"{name}.tex", f"% varkd results table {name!r}. {legend}\n{tables.latex(summary)}")
    print(tables.markdown(summary))
    return runs
