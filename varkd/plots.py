"""Figures of a results table, from its CSV files and its runs' folders: one function per figure, each returning
a matplotlib figure, so `varkd plot` (PNG and PDF for the report) and the notebooks draw the same thing."""
from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.lines import Line2D

from varkd import figures
from varkd.io import atomic_path, load_npz, read_csv
from varkd.npz import npz_rows
from varkd.tables import METRICS, REFERENCES, Table, header

# the teacher's and the init's runs as lines across the metric panels (not real images: far off the methods' range,
# they would flatten the differences between methods; the tables have them)
REFERENCE_LINES = {"teacher": "--", "student_init": ":"}


def _palette(table: Table) -> dict[str, Any]:
    """One colour per backbone, the same in every figure."""
    backbones = [b for b in dict.fromkeys(table.runs["backbone"]) if b in set(table.compared["backbone"])]
    return dict(zip(backbones, sns.color_palette(n_colors=len(backbones))))


def _metrics(frame: pd.DataFrame) -> list[str]:
    return [m for m in METRICS if m in frame and frame[m].notna().any()]


def metrics(table: Table) -> plt.Figure:
    """Each metric per method and backbone: mean and standard deviation over seeds. Lines: the backbone's teacher
    (dashed) and CE-pretrained student init (dotted) in its colour."""
    runs, palette = table.compared, _palette(table)
    long = runs.melt(id_vars=["backbone", "method", "seed"], value_vars=_metrics(runs), var_name="metric")
    long["metric"] = long["metric"].map(header)
    grid = sns.catplot(long, x="method", y="value", hue="backbone", row="metric", kind="point", errorbar="sd",
                       palette=palette, dodge=0.3 if len(palette) > 1 else False,  # seaborn 0.13 fails on one level
                       linestyle="none", capsize=0.15, sharey=False, height=2.2,
                       aspect=max(2.5, 0.45 * runs["method"].nunique()), legend=False)
    legend = {b: Line2D([], [], color=c, marker="o", linestyle="none") for b, c in palette.items()}
    for row in table.runs[table.runs["method"].isin(REFERENCE_LINES)].itertuples():
        style = {"color": palette.get(row.backbone, "black"), "linestyle": REFERENCE_LINES[row.method], "linewidth": 1}
        for metric in _metrics(runs):
            grid.axes_dict[header(metric)].axhline(getattr(row, metric), **style)
        legend[f"{row.backbone} / {row.method}"] = Line2D([], [], **style)
    grid.add_legend(legend_data=legend)
    grid.set_titles("{row_name}").set_axis_labels("", "")
    grid.tick_params(axis="x", rotation=90)
    return grid.figure


def sweeps(table: Table) -> plt.Figure:
    """Each sweep (columns) against each metric (rows): mean and standard deviation over seeds per swept value,
    the preset's own value among them."""
    names = [c for c in table.summary if c.startswith("sweep_")]
    shown = _metrics(table.compared)
    fig, axes = plt.subplots(len(shown), len(names), figsize=(3.2 * len(names), 2.2 * len(shown)), squeeze=False,
                             sharey="row", layout="constrained")
    for j, name in enumerate(names):
        axis = table.summary.loc[table.summary[name].notna(), ["backbone", "method", name]]
        points = table.runs.merge(axis, on=["backbone", "method"]).sort_values(name)
        points[name] = points[name].map(lambda v: f"{v:g}")
        for i, metric in enumerate(shown):
            sns.pointplot(points, x=name, y=metric, hue="backbone", palette=_palette(table), errorbar="sd",
                          capsize=0.15, ax=axes[i, j], legend=i == j == 0)
            axes[i, j].set(xlabel=name.removeprefix("sweep_") if i == len(shown) - 1 else "",
                           ylabel=header(metric) if j == 0 else "")
    return fig


def curves(table: Table) -> plt.Figure:
    """Training loss, validation NLL and, for methods that choose their data (GKD, ImitKD, DistiLLM), the share of
    student samples among the sequences trained on so far, against step per method (mean and spread over seeds)
    and backbone. Each method's loss is its own divergence; the validation NLL compares them."""
    logs = pd.concat([read_csv(table.results / run.run_dir / "train_log.csv", "training log").assign(
        backbone=run.backbone, method=run.method, seed=run.seed) for run in table.compared.itertuples()])
    quantities = [q for q in ("loss", "val_nll", "student_share") if q in logs and logs[q].notna().any()]
    long = logs.melt(id_vars=["backbone", "method", "seed", "step"], value_vars=quantities, var_name="quantity")
    grid = sns.relplot(long.dropna(), kind="line", x="step", y="value", hue="method", row="quantity",
                       col="backbone", errorbar="sd", marker="o", height=2.6, aspect=1.5,
                       facet_kws={"sharey": "row"})
    grid.set_titles("{col_name}: {row_name}").set_axis_labels("step", "")
    return grid.figure


def cost(table: Table) -> plt.Figure:
    """Quality against training cost: test FID and NLL against training wall time, one point per run."""
    runs = table.compared
    long = runs.melt(id_vars=["backbone", "method", "seed", "train_wall_s"],
                     value_vars=[m for m in ("fid", "nll") if m in _metrics(runs)], var_name="metric")
    long["metric"] = long["metric"].map(header)
    grid = sns.relplot(long, x="train_wall_s", y="value", hue="method", style="backbone", col="metric",
                       s=60, height=3.2, facet_kws={"sharey": False})
    grid.set_titles("{col_name}").set_axis_labels("training wall time (s)", "")
    return grid.figure


MAX_CLASSES = 10  # columns of the samples figure: all of the embedded study's digits, 10 of ImageNet's 1,000
GAP = 4  # white pixels between classes


def samples(table: Table, seed: int | None = None, per_class: int = 2, classes: list[int] | None = None
            ) -> plt.Figure:
    """The first `per_class` samples of `classes` (columns; default: up to MAX_CLASSES spread over the label range)
    for each run (rows) of one seed (default: the first), the reference runs above their backbone's methods: every
    run decodes from the same sampling seed. Reads only the images it shows (a paper-scale samples.npz is 9.8 GB)."""
    seed = table.compared["seed"].min() if seed is None else seed
    runs = table.summary[["backbone", "method"]].merge(table.runs)  # in the summary's order: blocks per backbone
    runs = runs[(runs["method"] != "real") & (runs["method"].isin(REFERENCES) | (runs["seed"] == seed))]
    files = [table.results / run.run_dir / "samples.npz" for run in runs.itertuples()]
    labels = [load_npz(f, ["labels"], "samples")["labels"] for f in files]
    if classes is None:
        present = np.unique(labels[0])
        classes = present[np.linspace(0, len(present) - 1, min(MAX_CLASSES, len(present))).round().astype(int)]
    k = min([per_class] + [int((y == c).sum()) for y in labels for c in classes])
    rows = []
    for f, y in zip(files, labels):  # a row: each class's k images side by side, a white gap between classes
        shown = npz_rows(f, "arr_0", np.concatenate([np.flatnonzero(y == c)[:k] for c in classes]))
        blocks = [np.concatenate(shown[i * k:(i + 1) * k], axis=1) for i in range(len(classes))]
        rows.append(np.concatenate([np.pad(b, ((GAP // 2,) * 2, (GAP // 2,) * 2, (0, 0)), constant_values=255)
                                    for b in blocks], axis=1))
    mosaic = np.concatenate(rows, axis=0)
    fig, ax = plt.subplots(figsize=(mosaic.shape[1] / 60 + 1.5, mosaic.shape[0] / 60 + 0.5), layout="constrained")
    ax.imshow(mosaic, interpolation="nearest")
    cell_h, cell_w = mosaic.shape[0] / len(rows), mosaic.shape[1] / len(classes)
    ax.set_yticks([(i + 0.5) * cell_h for i in range(len(rows))],
                  [f"{run.backbone} / {run.method}" for run in runs.itertuples()])
    ax.set_xticks([(i + 0.5) * cell_w for i in range(len(classes))], [str(c) for c in classes])
    ax.set(xlabel="class", title=f"seed {seed}")
    ax.tick_params(length=0)
    ax.grid(False)
    sns.despine(ax=ax, left=True, bottom=True)
    return fig


DIAGNOSTICS = {"teacher_nll": "teacher NLL of x_n (nats)", "teacher_entropy": "teacher entropy H(p_T) (nats)",
               "teacher_confidence": "teacher confidence max p_T", "acceptance": "acceptance min(1, p_T(x_n)/q_S(x_n))",
               "top1_agreement": "top-1 agreement", "forward_kl": "KL(p_T || q_S) (nats)"}
CONTEXT_STYLES = {"ground_truth": "-", "student": "--"}
MAX_POINTS = 64  # per line: longer sequences (paper scale: 256 positions) are shown in bins of consecutive positions


def _position_bins(frame: pd.DataFrame, size: int) -> pd.DataFrame:
    """Each line's positions averaged in bins of `size`, at the bin's centre. The band is the bins' mean standard
    error, an upper bound on the standard error of the bin's mean whatever the positions' correlation."""
    if size == 1:
        return frame
    binned = frame.assign(position=frame["position"] // size * size + (size - 1) / 2)
    keys = ["backbone", "method", "context", "quantity", "position"]
    return binned.groupby(keys, sort=False)[["mean", "se"]].mean().reset_index()


def diagnostics(table: Table) -> plt.Figure:
    """Per raster position: each diagnostic (rows) per backbone (columns), the mean over sequences and a band of
    ±2 standard errors, per method (colour; the student init black) and context (held-out sequences solid, the
    student's samples dashed). Over MAX_POINTS positions, consecutive positions are averaged in bins."""
    frame = table.diagnostics()
    quantities = [q for q in DIAGNOSTICS if q in set(frame["quantity"])]
    backbones = list(dict.fromkeys(frame["backbone"]))
    methods = list(dict.fromkeys(frame["method"]))
    compared = [m for m in methods if m != "student_init"]
    palette = sns.color_palette("tab10" if len(compared) <= 10 else "tab20", len(compared))
    colours = {**dict(zip(compared, palette)), "student_init": "black"}
    length = int(frame["position"].max()) + 1
    size = -(-length // MAX_POINTS)
    frame = _position_bins(frame, size)
    fig, axes = plt.subplots(len(quantities), len(backbones), figsize=(6.5 * len(backbones), 2.0 * len(quantities)),
                             squeeze=False, sharex=True, sharey="row", layout="constrained")
    for (backbone, method, context, quantity), line in frame.groupby(["backbone", "method", "context", "quantity"],
                                                                      sort=False):
        ax = axes[quantities.index(quantity), backbones.index(backbone)]
        x, y, band = line["position"], line["mean"], 2 * line["se"].fillna(0)
        ax.plot(x, y, color=colours[method], linestyle=CONTEXT_STYLES[context], linewidth=0.9)
        ax.fill_between(x, y - band, y + band, color=colours[method], alpha=0.12, linewidth=0)
    row = max(1, round(length**0.5))  # one row of the raster grid: ticks every row, or every few rows
    for (i, quantity), (j, backbone) in itertools.product(enumerate(quantities), enumerate(backbones)):
        axes[i, j].set(xlim=(0, length - 1), xticks=range(0, length + 1, row * max(1, row // 8)))
        axes[i, j].set_title(f"{backbone}: {DIAGNOSTICS[quantity]}", fontsize="medium")
    binned = f", means of {size} positions" if size > 1 else ""
    for ax in axes[-1]:
        ax.set_xlabel(f"position (raster order{binned})")
    handles = {m: Line2D([], [], color=colours[m]) for m in methods}
    handles.update({f"context: {c}": Line2D([], [], color="0.6", linestyle=s) for c, s in CONTEXT_STYLES.items()})
    fig.legend(handles.values(), handles.keys(), loc="outside right center", fontsize="small")
    return fig


FIGURES = {name: globals()[name] for name in (*figures.FIGURES, figures.SWEEPS)}  # each drawn by its namesake


def plot(figure: str, results: str | Path, table: str, out: str | Path) -> None:
    """Draw one figure of a table and save it as <out>.png and <out>.pdf."""
    if figure not in FIGURES:
        raise KeyError(f"unknown figure {figure!r}; figures: {list(FIGURES)}")
    sns.set_theme(style="whitegrid", context="paper")
    fig = FIGURES[figure](Table.load(results, table))
    for ext in ("png", "pdf"):
        with atomic_path(f"{out}.{ext}", suffix=f".{ext}") as tmp:
            fig.savefig(tmp, dpi=150, bbox_inches="tight")
    plt.close(fig)
