"""A results table: the summary over seeds of its runs, the best method per column, its Markdown and LaTeX forms.

Every rendering comes from the summary (<table>_summary.csv), which the plots and notebooks read too, so a
number reads the same in the paper table, the report and a notebook.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import pandas as pd

METRICS = {"fid": "min", "isc_mean": "max", "precision": "max", "recall": "max", "val_nll": "min"}  # better is
COSTS = ["train_wall_s", "train_teacher_forwards", "train_rollout_steps"]  # the cost columns the tables show
REFERENCES = ("real", "teacher", "student_init")  # rows for reference: shown, never compared or marked best
DECIMALS = {"fid": 2, "isc_mean": 2, "precision": 3, "recall": 3, "val_nll": 3}
LABELS = {"backbone": "Backbone", "method": "Method", "fid": "FID", "isc_mean": "IS", "precision": "Precision",
          "recall": "Recall", "val_nll": "NLL", "train_wall_s": "Train s", "train_teacher_forwards": "Teacher fwd",
          "train_rollout_steps": "Rollout steps"}


def summarise(runs: pd.DataFrame, sweeps: Sequence[dict[str, Any]] = ()) -> pd.DataFrame:
    """Per (backbone, method): n runs, mean and std over seeds of every metric and train_* cost, plus a
    sweep_<name> column per sweep (Study.sweep_points) with the value of the swept key on the sweep's rows.

    Rows: real images first, then a block per backbone: its teacher, its student init, its methods in the runs' order.
    """
    values = [c for c in runs if c in METRICS or c.startswith("train_")]
    groups = runs.groupby(["backbone", "method"], sort=False)
    summary = groups[values].agg(["mean", "std"])
    summary.columns = [f"{column}_{stat}" for column, stat in summary.columns]
    summary.insert(0, "n", groups.size())
    summary = summary.reset_index()
    if sweeps:
        points = pd.DataFrame(sweeps)
        axes = points.pivot(index=["backbone", "method"], columns="sweep", values="value")[points["sweep"].unique()]
        summary = summary.merge(axes.add_prefix("sweep_"), left_on=["backbone", "method"], right_index=True, how="left")
    blocks = {backbone: i for i, backbone in enumerate(dict.fromkeys(summary["backbone"]))}
    position = {"backbone": blocks.get, "method": lambda m: REFERENCES.index(m) if m in REFERENCES else len(REFERENCES)}
    summary = summary.sort_values(["backbone", "method"], key=lambda column: column.map(position[column.name]))
    return summary.reset_index(drop=True)  # sorting by two columns is stable: the methods keep the runs' order


def best(summary: pd.DataFrame) -> pd.DataFrame:
    """Per metric, True on each backbone's best compared method (mean at the shown precision: ties all marked)."""
    compared = ~summary["method"].isin(REFERENCES)
    marks = pd.DataFrame(index=summary.index)
    for metric, better in METRICS.items():
        if f"{metric}_mean" in summary:
            shown = summary[f"{metric}_mean"].round(DECIMALS[metric]).where(compared)
            marks[metric] = shown.eq(shown.groupby(summary["backbone"]).transform(better))
    return marks


def mean_std(mean: float, std: float, decimals: int, pm: str = " ± ") -> str:
    """`mean ± std` at the metric's precision; the mean alone for one seed; empty where there is no value."""
    if pd.isna(mean):
        return ""
    return f"{mean:.{decimals}f}" if pd.isna(std) else f"{mean:.{decimals}f}{pm}{std:.{decimals}f}"


def _cells(summary: pd.DataFrame, bold: Callable[[str], str], italic: Callable[[str], str], pm: str,
           escape: Callable[[str], str] = str) -> pd.DataFrame:
    """The shown table: metrics as mean ± std with the best in bold, costs as means, reference rows in italics."""
    marks = best(summary)
    shown = pd.DataFrame({"backbone": summary["backbone"].map(escape),
                          "method": [italic(escape(m)) if m in REFERENCES else escape(m) for m in summary["method"]],
                          "n": summary["n"]})
    for metric in marks:
        means, stds = summary[f"{metric}_mean"], summary[f"{metric}_std"]
        cells = [mean_std(a, b, DECIMALS[metric], pm) for a, b in zip(means, stds)]
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
    """The table in Markdown (the .md file, the notebooks): mean ± std, best in bold, reference rows in italics."""
    shown = _cells(summary, lambda c: f"**{c}**", lambda m: f"*{m}*", " ± ")
    return shown.rename(columns=header).to_markdown(index=False)


_TEX_SPECIAL = {c: "\\" + c for c in "&%$#_{}"}


def _tex(text: Any) -> str:
    return "".join(_TEX_SPECIAL.get(c, c) for c in str(text))


def latex(summary: pd.DataFrame) -> str:
    """A booktabs tabular (\\usepackage{booktabs}) to \\input in a table: a block per backbone, reference rows
    first and in italics, mean $\\pm$ std over seeds, each backbone's best compared method in bold."""
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
    """Each compared method minus `against` on the same backbone, per metric: the difference of the means and its
    standard error sqrt(s1²/n1 + s2²/n2) (NaN with one seed: no spread to judge the difference by)."""
    rows = []
    for backbone, block in summary[~summary["method"].isin(REFERENCES)].groupby("backbone", sort=False):
        base = block[block["method"] == against]
        if base.empty:
            continue
        base = base.iloc[0]
        for _, row in block[block["method"] != against].iterrows():
            for metric in METRICS:
                if f"{metric}_mean" in summary:
                    mean, std = f"{metric}_mean", f"{metric}_std"
                    rows.append({"backbone": backbone, "method": row["method"], "metric": metric,
                                 "difference": row[mean] - base[mean],
                                 "se": np.sqrt(row[std] ** 2 / row["n"] + base[std] ** 2 / base["n"])})
    return pd.DataFrame(rows, columns=["backbone", "method", "metric", "difference", "se"])


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
        return cls(Path(results), name, pd.read_csv(folder / f"{name}.csv"),
                   pd.read_csv(folder / f"{name}_summary.csv"))

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
            if not path.is_file():
                raise FileNotFoundError(f"{path} does not exist (the workflow's diagnose rule makes it)")
            frames.append(pd.read_csv(path))
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
