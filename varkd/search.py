"""A search over readings of a method by successive halving, on the validation split only (target varkd_search).

Each stage trains the candidates still in (StudyConfig.search) with every search seed and ranks them by the mean of
their ranks in validation FID and validation NLL, each a mean over seeds: FID is what the paper reports, NLL the
likelihood the student was distilled to raise, and neither alone picks a reading that trades one for the other.
Ties in the mean rank go to the lower val FID. The best `keep` go on to the next stage; the last stage's first is
the winner. Test metrics are never read here.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from varkd import tables
from varkd.aggregate import load_metrics
from varkd.io import atomic_path, atomic_write_text, read_csv

RANKED = ("val_fid", "val_nll")  # lower is better for both
SHOWN = ("val_fid", "val_nll", "val_precision", "val_recall", "val_isc_mean", "train_wall_s")


def candidate_of(method: str) -> str:
    """search-<candidate>-r<stage> -> <candidate>."""
    return method.removeprefix("search-").rsplit("-r", 1)[0]


def rank_stage(metrics: Sequence[str], keep: int) -> pd.DataFrame:
    """One row per candidate, best first: n seeds, mean and standard error of each shown metric, the ranks, and
    `kept` on the first `keep` rows."""
    runs = load_metrics(list(metrics), ".")
    missing = [c for c in RANKED if c not in runs or runs[c].isna().any()]
    if missing:
        raise ValueError(f"search runs lack validation metrics {missing}: set sample.val_num_samples > 0")
    runs["candidate"] = runs["method"].map(candidate_of)
    groups = runs.groupby("candidate", sort=False)
    stage = pd.DataFrame({"n": groups.size()})
    for column in [c for c in SHOWN if c in runs]:
        stage[f"{column}_mean"] = groups[column].mean()
        stage[f"{column}_se"] = groups[column].std() / np.sqrt(groups[column].count())
    for column in RANKED:
        stage[f"rank_{column}"] = stage[f"{column}_mean"].rank(method="average")
    stage["score"] = stage[[f"rank_{c}" for c in RANKED]].mean(axis=1)
    stage = stage.sort_values(["score", "val_fid_mean"]).reset_index()
    stage.insert(1, "rank", np.arange(1, len(stage) + 1))
    stage["kept"] = stage["rank"] <= keep
    best = stage.iloc[0]
    for column in RANKED:  # each candidate's gap to the winner, and whether the seeds can tell it from zero
        gap = stage[f"{column}_mean"] - best[f"{column}_mean"]
        se = np.sqrt(stage[f"{column}_se"] ** 2 + best[f"{column}_se"] ** 2)
        stage[f"{column}_gap"] = gap
        stage[f"{column}_beyond_noise"] = [tables.outside_noise(g, e) for g, e in zip(gap, se)]
    return stage


def write_stage(metrics: Sequence[str], keep: int, out: str | Path) -> pd.DataFrame:
    stage = rank_stage(metrics, keep)
    with atomic_path(out, suffix=".csv") as tmp:
        stage.to_csv(tmp, index=False)
    print(stage[["candidate", "rank", "n", "val_fid_mean", "val_nll_mean", "score", "kept"]].to_string(index=False))
    return stage


def kept(stage_csv: str | Path) -> list[str]:
    """The candidates a stage sends on, best first."""
    stage = read_csv(stage_csv, "search stage table")
    return stage.loc[stage["kept"], "candidate"].tolist()


def report(stage_csvs: Sequence[str], reads: dict[str, str], steps: Sequence[int], out_dir: str | Path,
           figure: str | Path) -> pd.DataFrame:
    """search.csv (every stage's rows), search.md (a table per stage, the winner, the legend) and the figure
    (val FID against val NLL, one panel per stage) from the stage tables."""
    stages = [read_csv(path, "search stage table").assign(stage=i, steps=steps[i]) for i, path in enumerate(stage_csvs)]
    every = pd.concat(stages, ignore_index=True)
    every.insert(1, "reads", every["candidate"].map(reads).fillna(""))
    out_dir = Path(out_dir)
    with atomic_path(out_dir / "search.csv", suffix=".csv") as tmp:
        every.to_csv(tmp, index=False)
    winner = stages[-1].iloc[0]["candidate"]
    legend = (f"Validation split only. Mean ± standard error over n training seeds. Candidates are ranked by the mean "
              f"of their ranks in val FID and val NLL (ties: lower val FID); each stage's best `kept` go on. A gap "
              f"to the stage's first in bold is more than {tables.SIGNIFICANCE:g} standard errors of the difference; "
              "the others are within the noise of the seeds.")
    sections = [f"# Search\n\nWinner: **{winner}** ({reads.get(winner, '')}).\n\n{legend}"]
    for i, stage in enumerate(stages):
        sections.append(f"## Stage {i}: {steps[i]} steps, {len(stage)} candidates\n\n{_stage_markdown(stage, reads)}")
    atomic_write_text(out_dir / "search.md", "\n\n".join(sections) + "\n")
    _figure(stages, steps, figure)
    print(f"winner: {winner}")
    return every


def _stage_markdown(stage: pd.DataFrame, reads: dict[str, str]) -> str:
    shown = pd.DataFrame({"rank": stage["rank"], "candidate": stage["candidate"],
                          "reads": stage["candidate"].map(reads).fillna(""), "n": stage["n"]})
    for column in SHOWN:
        if f"{column}_mean" not in stage:
            continue
        decimals = tables.DECIMALS.get(column, 0)
        cells = [tables.mean_std(m, s, decimals) for m, s in zip(stage[f"{column}_mean"], stage[f"{column}_se"])]
        if f"{column}_beyond_noise" in stage:
            cells = [f"**{c}**" if far else c for c, far in zip(cells, stage[f"{column}_beyond_noise"])]
        shown[tables.LABELS.get(column, column)] = cells
    shown["kept"] = stage["kept"].map({True: "yes", False: ""})
    return shown.to_markdown(index=False)


def _figure(stages: Sequence[pd.DataFrame], steps: Sequence[int], out: str | Path) -> None:
    """val FID against val NLL per candidate (standard errors as bars), one panel per stage: the lower left wins."""
    import matplotlib.pyplot as plt  # here: the workflow imports this module to read stage tables while parsing

    fig, axes = plt.subplots(1, len(stages), figsize=(5.5 * len(stages), 4.5), squeeze=False)
    for ax, stage, n in zip(axes[0], stages, steps):
        ax.errorbar(stage["val_nll_mean"], stage["val_fid_mean"], xerr=stage["val_nll_se"], yerr=stage["val_fid_se"],
                    fmt="o", ms=4, capsize=2)
        for _, row in stage.iterrows():
            ax.annotate(row["candidate"], (row["val_nll_mean"], row["val_fid_mean"]), fontsize=7,
                        xytext=(3, 3), textcoords="offset points", weight="bold" if row["rank"] == 1 else "normal")
        ax.set(xlabel="val NLL (nats per code)", ylabel="val FID", title=f"{n} steps")
    fig.tight_layout()
    for ext in ("png", "pdf"):
        with atomic_path(Path(f"{out}.{ext}"), suffix=f".{ext}") as tmp:
            fig.savefig(tmp, dpi=150, bbox_inches="tight")
    plt.close(fig)
