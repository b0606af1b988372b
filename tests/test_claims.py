"""The claims table: verdicts from differences and their standard errors, computed from summaries and diagnostics."""
import numpy as np
import pandas as pd
import pytest

from varkd import claims, tables


def runs(**methods) -> pd.DataFrame:
    """One backbone `b`; each method a list of (fid, nll) per seed."""
    rows = [{"backbone": "b", "method": "teacher", "seed": 0, "fid": 5.0, "nll": 1.0}]
    for method, seeds in methods.items():
        rows += [{"backbone": "b", "method": method, "seed": s, "fid": f, "nll": n} for s, (f, n) in enumerate(seeds)]
    return pd.DataFrame(rows)


def test_verdicts_follow_the_side_and_the_noise():
    assert claims.verdict(-3.0, 1.0, -1) == "holds"
    assert claims.verdict(3.0, 1.0, -1) == "does not hold"
    assert claims.verdict(-1.5, 1.0, -1) == "within noise"
    assert claims.verdict(-3.0, np.nan, -1) == "not measured"


def test_metric_claims_from_a_summary():
    summary = tables.summarise(runs(
        ce=[(20.0, 2.0), (22.0, 2.02)],  # fid 21 ± 1, nll 2.01 ± 0.01
        fkl=[(17.0, 1.90), (18.0, 1.92)],  # 17.5 ± 0.5: better than ce beyond the noise on both
        gkd=[(17.0, 1.90), (19.0, 1.96)],  # 18 ± 1 vs fkl: within noise on FID; NLL 1.93 ± 0.03 within
        varkd=[(16.0, 2.10), (16.2, 2.12)],  # FID 16.1 ± 0.1: better than fkl and gkd; NLL worse than both
    ))
    frame = claims.claims([summary], pd.DataFrame(columns=["backbone", "method", "context", "position", "quantity",
                                                           "mean", "se"]))
    row = frame.set_index(["claim", "evidence", "metric"])
    kd = row.loc[("kd_beats_ce", "fkl - ce", "fid")]
    assert kd["difference"] == pytest.approx(-3.5) and kd["se"] == pytest.approx(np.hypot(1.0, 0.5))
    assert kd["verdict"] == "holds" and claims.overall(frame, "kd_beats_ce") == "holds"
    assert row.loc[("llm_methods_do_not_transfer", "gkd - fkl", "fid"), "verdict"] == "within noise"
    assert row.loc[("varkd_beats_baselines", "varkd - fkl", "fid"), "verdict"] == "holds"
    assert row.loc[("varkd_beats_baselines", "varkd - fkl", "nll"), "verdict"] == "does not hold"
    assert claims.overall(frame, "varkd_beats_baselines") == "does not hold"
    assert ("varkd_beats_baselines", "varkd - ce", "fid") not in row.index  # CE is not a distillation baseline
    assert claims.overall(frame, "student_contexts_less_reliable") == "not measured"
    md = claims.markdown(frame)
    assert "**holds**" in md and "-3.500 ± 1.118" in md and "Not measured" in md


def test_each_component_is_judged_by_its_ablation_against_varkd():
    summary = tables.summarise(runs(
        varkd=[(16.0, 2.00), (16.2, 2.02)],  # fid 16.1 ± 0.1, nll 2.01 ± 0.01
        varkd_no_reweight=[(18.0, 2.00), (18.4, 2.04)],  # FID worse beyond the noise: reweighting helps; NLL within
        varkd_gt_data=[(15.0, 1.80), (15.2, 1.82)],  # better on both: distilling on student samples does not help
        varkd_ar_rollouts=[(16.0, 2.0), (16.2, 2.02)],  # the same method at another cost: no claim row
    ))
    frame = claims.claims([summary], pd.DataFrame(columns=["backbone", "method", "context", "position", "quantity",
                                                           "mean", "se"]))
    rows = frame[frame["claim"] == "components_help"].set_index(["evidence", "metric"])
    reweight, gt = "varkd_no_reweight - varkd (without reweighting)", \
        "varkd_gt_data - varkd (without distilling on student samples)"
    assert rows.loc[(reweight, "fid"), "difference"] == pytest.approx(2.1)
    assert rows.loc[(reweight, "fid"), "verdict"] == "holds"
    assert rows.loc[(reweight, "nll"), "verdict"] == "within noise"
    assert rows.loc[(gt, "fid"), "verdict"] == rows.loc[(gt, "nll"), "verdict"] == "does not hold"
    assert len(rows) == 4 and claims.overall(frame, "components_help") == "does not hold"
    assert "## Each component of VarKD helps" in claims.markdown(frame)


def test_one_seed_is_not_measured():
    summary = tables.summarise(runs(ce=[(20.0, 2.0)], fkl=[(10.0, 1.0)]))
    frame = claims.claims([summary], pd.DataFrame(columns=["backbone", "method", "context", "position", "quantity",
                                                           "mean", "se"]))
    assert set(frame.loc[frame["claim"] == "kd_beats_ce", "verdict"]) == {"not measured"}


def test_diagnostic_claims_compare_contexts_and_the_horizon():
    """Teacher NLL: ground truth 1.0 everywhere; student contexts 2 in the first half, 4 in the second (se 0.1)."""
    T = 8
    rows = []
    for position in range(T):
        rows.append({"backbone": "b", "method": "student_init", "context": "ground_truth", "position": position,
                     "quantity": "teacher_nll", "mean": 1.0, "se": 0.1})
        rows.append({"backbone": "b", "method": "student_init", "context": "student", "position": position,
                     "quantity": "teacher_nll", "mean": 2.0 if position < T // 2 else 4.0, "se": 0.1})
    frame = claims.claims([], pd.DataFrame(rows)).set_index("evidence")
    contexts = frame.loc["student_init: student - ground truth"]
    assert contexts["difference"] == pytest.approx(2.0) and contexts["se"] == pytest.approx(np.hypot(0.1, 0.1))
    assert contexts["verdict"] == "holds"
    horizon = frame.loc["student_init: gap in the last minus the first quarter of positions"]
    assert horizon["difference"] == pytest.approx(2.0) and horizon["se"] == pytest.approx(0.2)
    assert horizon["verdict"] == "holds"
