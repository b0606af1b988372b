"""The paper's qualitative claims, each set against the study's own measurements: tables/claims.{csv,md}.

The abstract of VarKD (arXiv 2606.06078) makes five claims a miniature can test. Each is measured as differences
of means with their standard errors (from the seeds for the metrics, from the sequences for the diagnostics), and
judged: `holds` when the evidence is on the claim's side outside the noise (more than tables.SIGNIFICANCE standard
errors), `does not hold` when it is on the other side outside the noise, `within noise` otherwise, and
`not measured` when the study lacks the runs (a method, a second seed, a diagnostics file).
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from varkd import tables
from varkd.io import atomic_path, atomic_write_text, read_csv

CLAIMS = {
    "kd_beats_ce": "Standard distillation (forward KL on data) beats training the student alone (CE)",
    "llm_methods_do_not_transfer": "Recent LLM distillation methods give no gain over standard distillation",
    "student_contexts_less_reliable": "Teacher supervision is less reliable under student-sampled contexts than "
                                      "under ground-truth ones, increasingly along the decoding horizon",
    "varkd_beats_baselines": "VarKD beats every distillation baseline",
    "components_help": "Each component of VarKD helps: the student is worse without it",
}
# the ablation presets (config/methods) and the component each removes; SJD rollouts (varkd_ar_rollouts) are not
# here: parallel decoding is lossless (tests/test_sjd.py), so it changes the cost, not the result
COMPONENTS = {"varkd_gt_data": "distilling on student samples", "varkd_no_selective": "selective supervision",
              "varkd_no_reweight": "reweighting", "varkd_no_clusters": "the compressed token space"}
LLM_METHODS = ("imitkd", "gkd", "onpolicy_rkl", "distillm", "distillm2")  # LLM-style KD baselines of the study
COMPARED = ("fid", "nll")  # the quality metrics the verdicts rest on (test split)
# diagnostics (varkd.diagnostics) that say how reliable the teacher's supervision is; +1: higher is less reliable
RELIABILITY = {"teacher_nll": +1, "acceptance": -1, "fkl": +1}


def verdict(difference: float, se: float, claim_side: int) -> str:
    """`claim_side` is the sign of the difference that supports the claim."""
    if not np.isfinite(difference) or not np.isfinite(se):
        return "not measured"
    if not tables.outside_noise(difference, se):
        return "within noise"
    return "holds" if np.sign(difference) == claim_side else "does not hold"


def _row(claim: str, backbone: str, evidence: str, metric: str, difference: float, se: float, side: int) -> dict:
    return {"claim": claim, "backbone": backbone, "evidence": evidence, "metric": metric, "difference": difference,
            "se": se, "verdict": verdict(difference, se, side)}


def _better_side(metric: str) -> int:
    """The sign of (method - reference) when the method is better on this metric."""
    return -1 if tables.METRICS[metric] == "min" else 1


def metric_claims(summary: pd.DataFrame) -> list[dict]:
    """Claims on the test metrics, from a table summary holding the methods they compare."""
    rows = []
    for backbone in dict.fromkeys(summary.loc[~summary["method"].isin(tables.REFERENCES), "backbone"]):
        block = summary[summary["backbone"] == backbone].set_index("method")

        def compare(method: str, against: str, metric: str):
            if method not in block.index or against not in block.index:
                return np.nan, np.nan
            a, b = block.loc[method], block.loc[against]
            return (a[f"{metric}_mean"] - b[f"{metric}_mean"],
                    float(np.sqrt(a[f"{metric}_se"] ** 2 + b[f"{metric}_se"] ** 2)))

        for metric in COMPARED:
            side = _better_side(metric)
            rows.append(_row("kd_beats_ce", backbone, "fkl - ce", metric, *compare("fkl", "ce", metric), side))
            for method in LLM_METHODS:
                if method in block.index:  # better than fkl would contradict the claim
                    rows.append(_row("llm_methods_do_not_transfer", backbone, f"{method} - fkl", metric,
                                     *compare(method, "fkl", metric), -side))
            if "varkd" in block.index:
                baselines = [m for m in block.index  # the distillation baselines: not CE, not VarKD's variants
                             if m not in tables.REFERENCES and m != "ce" and not m.startswith("varkd")]
                for method in baselines:
                    rows.append(_row("varkd_beats_baselines", backbone, f"varkd - {method}", metric,
                                     *compare("varkd", method, metric), side))
                for ablation, component in COMPONENTS.items():
                    if ablation in block.index:  # the ablation worse than varkd supports the claim
                        rows.append(_row("components_help", backbone, f"{ablation} - varkd (without {component})",
                                         metric, *compare(ablation, "varkd", metric), -side))
    return rows


def diagnostic_claims(diagnostics: pd.DataFrame) -> list[dict]:
    """Teacher reliability under student vs ground-truth contexts, from `diagnose` outputs (long form: backbone,
    method, context, position, quantity, mean, se). Per quantity: the mean over positions, with the mean of the
    positions' standard errors as its standard error (an upper bound, whatever the correlation between positions);
    the two contexts' sequences are independent, so their errors add in quadrature. The horizon: the same
    student-minus-ground-truth gap in the last quarter of positions minus that in the first quarter."""
    rows = []
    for (backbone, method), block in diagnostics.groupby(["backbone", "method"], sort=False):
        T = block["position"].max() + 1
        quarter = max(1, T // 4)
        for quantity, side in RELIABILITY.items():
            part = block[block["quantity"] == quantity]
            if part.empty:
                continue

            def stats(context: str, positions: range) -> tuple[float, float]:
                rows_ = part[(part["context"] == context) & part["position"].isin(positions)]
                return rows_["mean"].mean(), rows_["se"].mean()

            (s, s_se), (g, g_se) = stats("student", range(T)), stats("ground_truth", range(T))
            rows.append(_row("student_contexts_less_reliable", backbone, f"{method}: student - ground truth",
                             quantity, s - g, float(np.hypot(s_se, g_se)), side))
            early = [stats(c, range(quarter)) for c in ("student", "ground_truth")]
            late = [stats(c, range(T - quarter, T)) for c in ("student", "ground_truth")]
            gap = (late[0][0] - late[1][0]) - (early[0][0] - early[1][0])
            se = float(np.sqrt(sum(e ** 2 for _, e in early + late)))
            rows.append(_row("student_contexts_less_reliable", backbone,
                             f"{method}: gap in the last minus the first quarter of positions", quantity, gap, se,
                             side))
    return rows


def claims(summaries: Sequence[pd.DataFrame], diagnostics: pd.DataFrame) -> pd.DataFrame:
    """Every claim's evidence rows, from the tables' summaries (duplicate (backbone, method) rows across tables are
    the same runs: the first is kept) and the diagnostics."""
    summary = pd.concat(summaries).drop_duplicates(["backbone", "method"]) if summaries else pd.DataFrame()
    rows = (metric_claims(summary) if not summary.empty else []) + diagnostic_claims(diagnostics)
    frame = pd.DataFrame(rows, columns=["claim", "backbone", "evidence", "metric", "difference", "se", "verdict"])
    frame["order"] = frame["claim"].map(list(CLAIMS).index)
    return frame.sort_values(["order", "backbone"], kind="stable").drop(columns="order").reset_index(drop=True)


def overall(frame: pd.DataFrame, claim: str) -> str:
    """A claim's verdict over its evidence: `holds` only if every row holds; `does not hold` if any row contradicts it;
    `not measured` without rows; else `within noise` (some rows hold or are within noise, none contradicts)."""
    verdicts = set(frame.loc[frame["claim"] == claim, "verdict"]) - {"not measured"}
    if not verdicts:
        return "not measured"
    if "does not hold" in verdicts:
        return "does not hold"
    return "holds" if verdicts == {"holds"} else "within noise"


def markdown(frame: pd.DataFrame) -> str:
    lines = ["# The paper's claims against this study's measurements", "",
             "Each claim of the VarKD abstract with the differences that test it: mean difference ± standard error "
             "(metrics: over training seeds, test split; diagnostics: over sequences). Verdict per row: `holds` / "
             f"`does not hold` when the difference is on / against the claim's side by more than "
             f"{tables.SIGNIFICANCE:g} standard errors, `within noise` otherwise, `not measured` without the runs "
             "(one seed has no spread). A claim holds overall only if every row holds.", ""]
    for claim, text in CLAIMS.items():
        rows = frame[frame["claim"] == claim]
        lines += [f"## {text}: **{overall(frame, claim)}**", ""]
        if rows.empty:
            lines += ["Not measured: the study has none of the runs this claim compares.", ""]
            continue
        shown = rows.assign(shown=[tables.mean_std(d, s, 3) for d, s in zip(rows["difference"], rows["se"])])
        lines += [shown[["backbone", "evidence", "metric", "shown", "verdict"]].rename(
            columns={"shown": "difference ± se"}).to_markdown(index=False), ""]
    return "\n".join(lines)


def write_claims(summaries: Sequence[str], diagnostics: Sequence[str], out_dir: str | Path) -> pd.DataFrame:
    """`varkd claims`: read the summaries and diagnostics files, write claims.csv and claims.md into out_dir."""
    frames = [read_csv(path, "table summary") for path in summaries]
    diag = pd.concat([read_csv(path, "diagnostics file") for path in diagnostics]) if diagnostics else pd.DataFrame(
        columns=["backbone", "method", "context", "position", "quantity", "mean", "se"])
    frame = claims(frames, diag)
    out_dir = Path(out_dir)
    with atomic_path(out_dir / "claims.csv", suffix=".csv") as tmp:
        frame.to_csv(tmp, index=False)
    atomic_write_text(out_dir / "claims.md", markdown(frame) + "\n")
    return frame
