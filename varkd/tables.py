"""A results table: the summary over seeds of its runs, the clear best per column, differences to a reference method
with their standard errors, its Markdown and LaTeX forms.

Every rendering comes from the summary (<table>_summary.csv), which the plots and notebooks read too, so a
number reads the same in the paper table, the report and a notebook.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import pandas as pd

from varkd.io import read_csv

# test split; better is. sfid: ADM's sFID, only in metrics.json files of evaluate.protocol=adm with Inception
METRICS = {"fid": "min", "sfid": "min", "isc_mean": "max", "precision": "max", "recall": "max", "nll": "min"}
VALIDATION = {f"val_{m}": better for m, better in METRICS.items()}  # the same on the val split: every choice uses these
COSTS = ["train_wall_s", "train_teacher_forwards", "train_rollout_steps"]  # the cost columns the tables show
REFERENCES = ("real", "teacher", "student_init")  # rows for reference: shown, never compared or marked best
DECIMALS = {"fid": 2, "sfid": 2, "isc_mean": 2, "precision": 3, "recall": 3, "nll": 3}
DECIMALS.update({f"val_{m}": d for m, d in DECIMALS.items()})
LABELS = {"backbone": "Backbone", "method": "Method", "fid": "FID", "sfid": "sFID", "isc_mean": "IS",
          "precision": "Precision", "recall": "Recall", "nll": "NLL", "train_wall_s": "Train s",
          "train_teacher_forwards": "Teacher fwd", "train_rollout_steps": "Rollout steps"}
LABELS.update({f"val_{m}": f"val {LABELS[m]}" for m in METRICS})
SIGNIFICANCE = 2.0  # a difference counts when it exceeds this many standard errors (~95% for a normal difference)


def summarise(runs: pd.DataFrame, sweeps: Sequence[dict[str, Any]] = ()) -> pd.DataFrame:
    """Per (backbone, method): n runs, and the mean, standard deviation and standard error (std / sqrt(n)) over
    seeds of every metric (test and val_*) and train_* cost, plus a sweep_<name> column per sweep
    (Study.sweep_points) with the value of the swept key on the sweep's rows.

    Rows: real images first, then a block per backbone: its teacher, its student init, its methods in the runs' order.
    """
    values = [c for c in runs if c in METRICS or c in VALIDATION or c.startswith("train_")]
    groups = runs.groupby(["backbone", "method"], sort=False)
    summary = groups[values].agg(["mean", "std"])
    summary.columns = [f"{column}_{stat}" for column, stat in summary.columns]
    summary.insert(0, "n", groups.size())
    for column in values:
        summary[f"{column}_se"] = summary[f"{column}_std"] / np.sqrt(groups[column].count())
    summary = summary.reset_index()
    if sweeps:
        points = pd.DataFrame(sweeps)
        axes = points.pivot(index=["backbone", "method"], columns="sweep", values="value")[points["sweep"].unique()]
        summary = summary.merge(axes.add_prefix("sweep_"), left_on=["backbone", "method"], right_index=True, how="left")
    blocks = {backbone: i for i, backbone in enumerate(dict.fromkeys(summary["backbone"]))}
    position = {"backbone": blocks.get, "method": lambda m: REFERENCES.index(m) if m in REFERENCES else len(REFERENCES)}
    summary = summary.sort_values(["backbone", "method"], key=lambda column: column.map(position[column.name]))
    return summary.reset_index(drop=True)  # sorting by two columns is stable: the methods keep the runs' order


def outside_noise(difference: float, se: float) -> bool:
    """A difference the seeds can tell from zero: |d| > SIGNIFICANCE * se (never with an unknown se)."""
    return bool(np.isfinite(se) and abs(difference) > SIGNIFICANCE * se)


def best(summary: pd.DataFrame) -> pd.DataFrame:
    """Per metric, True on each backbone's best compared method when it beats every other compared method of the
    backbone by more than the noise (outside_noise of the difference of means, its standard error from both rows'
    seeds); False everywhere when the best is within the noise of another, or a row has a single seed."""
    compared = ~summary["method"].isin(REFERENCES)
    marks = pd.DataFrame(False, index=summary.index, columns=[m for m in METRICS if f"{m}_mean" in summary])
    for metric in marks:
        sign = 1 if METRICS[metric] == "min" else -1  # sign * mean: lower is better
        for _, block in summary[compared].groupby("backbone", sort=False):
            score = sign * block[f"{metric}_mean"]
            if score.isna().all() or len(block) < 2:
                continue
            top, rest = score.idxmin(), score.drop(score.idxmin()).index
            se = np.sqrt(block.loc[rest, f"{metric}_se"] ** 2 + block.loc[top, f"{metric}_se"] ** 2)
            gaps = score[rest] - score[top]
            marks.loc[top, metric] = all(outside_noise(g, e) for g, e in zip(gaps, se))
    return marks


def mean_std(mean: float, spread: float, decimals: int, pm: str = " ± ") -> str:
    """`mean ± spread` at the metric's precision; the mean alone for one seed; empty where there is no value."""
    if pd.isna(mean):
        return ""
    return f"{mean:.{decimals}f}" if pd.isna(spread) else f"{mean:.{decimals}f}{pm}{spread:.{decimals}f}"


def _cells(summary: pd.DataFrame, bold: Callable[[str], str], italic: Callable[[str], str], pm: str,
           escape: Callable[[str], str] = str) -> pd.DataFrame:
    """The shown table: metrics as mean ± standard error with a clear best in bold, costs as means, reference rows
    in italics."""
    marks = best(summary)
    shown = pd.DataFrame({"backbone": summary["backbone"].map(escape),
                          "method": [italic(escape(m)) if m in REFERENCES else escape(m) for m in summary["method"]],
                          "n": summary["n"]})
    for metric in marks:
        means, errors = summary[f"{metric}_mean"], summary[f"{metric}_se"]
        cells = [mean_std(a, b, DECIMALS[metric], pm) for a, b in zip(means, errors)]
        shown[metric] = [bold(c) if mark else c for c, mark in zip(cells, marks[metric])]
    for cost in COSTS:
        if f"{cost}_mean" in summary:
            shown[cost] = ["" if pd.isna(v) else f"{v:,.0f}" for v in summary[f"{cost}_mean"]]
    return shown


def header(column: str, down: str = "↓", up: str = "↑") -> str:
    """A column's label, with the better direction for a metric."""
    label = LABELS.get(column, column)
    return f"{label} {down if METRICS[column] == 'min' else up}" if column in METRICS else label


def markdown(summary: pd.DataFrame) -> str:
    """The table in Markdown (the .md file, the notebooks): mean ± standard error, a clear best in bold, reference
    rows in italics."""
    shown = _cells(summary, lambda c: f"**{c}**", lambda m: f"*{m}*", " ± ")
    return shown.rename(columns=header).to_markdown(index=False)


_TEX_SPECIAL = {c: "\\" + c for c in "&%$#_{}"}


def _tex(text: Any) -> str:
    return "".join(_TEX_SPECIAL.get(c, c) for c in str(text))


def latex(summary: pd.DataFrame) -> str:
    """A booktabs tabular (\\usepackage{booktabs}) to \\input in a table: a block per backbone, reference rows
    first and in italics, mean $\\pm$ standard error over seeds, each backbone's clear best compared method in bold."""
    shown = _cells(summary, lambda c: rf"\textbf{{{c}}}", lambda m: rf"\textit{{{m}}}", r" $\pm$ ", _tex)
    labels = ["$n$" if c == "n" else header(c, r"$\downarrow$", r"$\uparrow$") for c in shown]
    lines = [rf"\begin{{tabular}}{{ll{'r' * (shown.shape[1] - 2)}}}", r"\toprule", " & ".join(labels) + r" \\"]
    previous = None
    for row in shown.itertuples(index=False):
        if row.backbone != previous:
            lines.append(r"\midrule")
        lines.append(" & ".join(["" if row.backbone == previous else row.backbone, *map(str, row[1:])]) + r" \\")
        previous = row.backbone
    return "\n".join([*lines, r"\bottomrule", r"\end{tabular}"]) + "\n"


def differences(summary: pd.DataFrame, against: str) -> pd.DataFrame:
    """Each compared method minus `against` on the same backbone, per metric: the difference of the means, its
    standard error sqrt(se1² + se2²) (NaN with one seed: no spread to judge the difference by) and whether it is
    outside the noise."""
    rows = []
    for backbone, block in summary[~summary["method"].isin(REFERENCES)].groupby("backbone", sort=False):
        base = block[block["method"] == against]
        if base.empty:
            continue
        base = base.iloc[0]
        for _, row in block[block["method"] != against].iterrows():
            for metric in METRICS:
                if f"{metric}_mean" in summary:
                    mean, se = f"{metric}_mean", f"{metric}_se"
                    difference = row[mean] - base[mean]
                    error = np.sqrt(row[se] ** 2 + base[se] ** 2)
                    rows.append({"backbone": backbone, "method": row["method"], "metric": metric,
                                 "difference": difference, "se": error,
                                 "outside_noise": outside_noise(difference, error)})
    return pd.DataFrame(rows, columns=["backbone", "method", "metric", "difference", "se", "outside_noise"])


def differences_markdown(summary: pd.DataFrame, against: str) -> str:
    """The differences to `against` as a table (difference ± standard error), those outside the noise in bold."""
    diff = differences(summary, against)
    if diff.empty:
        return ""
    diff["shown"] = [(lambda c: f"**{c}**" if sig else c)(mean_std(d, se, DECIMALS[m]))
                     for d, se, m, sig in zip(diff["difference"], diff["se"], diff["metric"], diff["outside_noise"])]
    wide = diff.pivot(index=["backbone", "method"], columns="metric", values="shown")
    wide = wide.loc[diff.set_index(["backbone", "method"]).index.unique(), [m for m in METRICS if m in wide]]
    return wide.rename(columns=header).reset_index().rename(columns=header).to_markdown(index=False)


def find_results(results_dir: str | Path, start: str | Path = ".") -> Path:
    """A study's results folder (holding tables/): `results_dir` if absolute, else under `start` or the nearest of
    its parents holding it, so that a notebook finds its own clone's results (Jupyter starts it in notebooks/)."""
    path, start = Path(results_dir), Path(start).resolve()
    candidates = [path] if path.is_absolute() else [folder / path for folder in (start, *start.parents)]
    found = next((folder for folder in candidates if (folder / "tables").is_dir()), None)
    if found is None:
        where = "" if path.is_absolute() else f" under {start} or a parent"
        raise FileNotFoundError(f"no results folder {results_dir} with a tables/ folder{where}: run the study "
                                "(snakemake -c2 all) or give the folder's path")
    return found


@dataclass
class Table:
    """A results table as `varkd aggregate` wrote it: its runs (<table>.csv) and summary (<table>_summary.csv),
    with the results folder their run_dir columns are relative to."""

    results: Path
    name: str
    runs: pd.DataFrame
    summary: pd.DataFrame

    @classmethod
    def load(cls, results: str | Path, name: str) -> "Table":
        folder = Path(results) / "tables"
        return cls(Path(results), name, read_csv(folder / f"{name}.csv", "results table"),
                   read_csv(folder / f"{name}_summary.csv", "results table summary"))

    @property
    def compared(self) -> pd.DataFrame:
        """The runs of the compared methods (not the reference rows)."""
        return self.runs[~self.runs["method"].isin(REFERENCES)]

    @property
    def diagnosed(self) -> pd.DataFrame:
        """The runs the study diagnoses (Study.diagnostics_files): each backbone's student init and the first run
        of each compared method, its first seed (the table lists a method's runs in the study's seed order)."""
        runs = self.runs[(self.runs["method"] == "student_init") | ~self.runs["method"].isin(REFERENCES)]
        return runs.drop_duplicates(["backbone", "method"])

    def diagnostics(self) -> pd.DataFrame:
        """The diagnosed runs' diagnostics.csv files (varkd.diagnostics) in one long frame, in the table's order."""
        frames = []
        for run in self.diagnosed.itertuples():
            path = self.results / run.run_dir / "diagnostics.csv"
            frames.append(read_csv(path, "diagnostics file (the workflow's diagnose rule makes it)"))
        return pd.concat(frames, ignore_index=True)


def horizon(diagnostics: pd.DataFrame) -> pd.DataFrame:
    """Per backbone, method, context and quantity: the mean over every position, over the first quarter of the
    raster order and over its last quarter (how the teacher's reliability changes along the decoding horizon)."""
    keys = ["backbone", "method", "context", "quantity"]
    position = diagnostics["position"]
    length = diagnostics.groupby(keys, sort=False)["position"].transform("max") + 1
    spans = {"all": position >= 0, "first_quarter": position < length / 4, "last_quarter": position >= 3 * length / 4}
    columns = {span: diagnostics[rows].groupby(keys, sort=False)["mean"].mean() for span, rows in spans.items()}
    return pd.DataFrame(columns).reset_index()
