"""Results tables on hand-made runs: summary over seeds, a clear best per column, mean ± SE, LaTeX, differences."""
import numpy as np
import pandas as pd
import pytest

from varkd import tables


def run(backbone, method, seed, fid, isc, nll=1.0, **kw):
    return {"backbone": backbone, "method": method, "seed": seed, "fid": fid, "isc_mean": isc, "precision": 0.5,
            "recall": 0.5, "nll": nll, "val_nll": nll + 0.1, "train_wall_s": 10.0, **kw}


@pytest.fixture
def runs() -> pd.DataFrame:
    """Reference rows better than every method (they must never be marked best); on `big`, fkl has the lower FID
    (beyond the noise: 18.5 ± 0.5 vs 21 ± 1) and ce the higher IS (within it: 4.2 ± 0.2 vs 3.1 ± 0.1, a gap of
    4.9 standard errors, so also beyond); on `small`, one seed each: nothing can be judged. Rows out of the summary's
    order: the init before the teacher, small's init before big's methods."""
    return pd.DataFrame([
        run("-", "real", 0, 0.5, 9.0, nll=np.nan, train_wall_s=np.nan),
        run("big", "student_init", 0, 30.0, 2.0),
        run("big", "teacher", 0, 5.0, 8.0),
        run("small", "student_init", 0, 40.0, 1.0),
        run("big", "fkl", 0, 18.0, 3.0), run("big", "fkl", 1, 19.0, 3.2),
        run("big", "ce", 0, 20.0, 4.0), run("big", "ce", 1, 22.0, 4.4),
        run("small", "ce", 0, 25.001, 2.0), run("small", "fkl", 0, 24.999, 2.5),
    ])


def test_summary_is_mean_std_se_n_per_backbone_and_method_references_first(runs):
    summary = tables.summarise(runs)
    assert list(zip(summary["backbone"], summary["method"])) == [
        ("-", "real"), ("big", "teacher"), ("big", "student_init"), ("big", "fkl"), ("big", "ce"),
        ("small", "student_init"), ("small", "ce"), ("small", "fkl")]
    ce = summary.set_index(["backbone", "method"]).loc[("big", "ce")]
    assert ce["n"] == 2 and ce["fid_mean"] == 21.0 and ce["fid_std"] == pytest.approx(np.std([20, 22], ddof=1))
    assert ce["fid_se"] == pytest.approx(np.std([20, 22], ddof=1) / np.sqrt(2))
    assert ce["val_nll_mean"] == pytest.approx(1.1) and ce["train_wall_s_mean"] == 10.0
    small = summary.set_index(["backbone", "method"]).loc[("small", "fkl")]
    assert small["n"] == 1 and np.isnan(small["fid_std"]) and np.isnan(small["fid_se"])
    assert np.isnan(summary.loc[summary["method"] == "real", "nll_mean"]).all()


def test_sweep_points_become_one_column_per_sweep(runs):
    points = [{"sweep": "tau", "backbone": "big", "method": "ce", "value": 0.3},
              {"sweep": "tau", "backbone": "big", "method": "fkl", "value": 0.1},
              {"sweep": "k", "backbone": "big", "method": "ce", "value": 16}]
    summary = tables.summarise(runs, points).set_index(["backbone", "method"])
    assert [c for c in summary if c.startswith("sweep_")] == ["sweep_tau", "sweep_k"]
    assert summary.loc[("big", "fkl"), "sweep_tau"] == 0.1 and np.isnan(summary.loc[("big", "fkl"), "sweep_k"])
    assert np.isnan(summary.loc[("small", "ce"), "sweep_tau"])  # the sweep ran on `big` only


def test_best_is_marked_only_outside_the_noise(runs):
    summary = tables.summarise(runs)
    marks = tables.best(summary).set_index([summary["backbone"], summary["method"]])
    assert marks.loc[("big", "fkl"), "fid"] and not marks.loc[("big", "ce"), "fid"]  # FID: lower, 2.5 ± 1.1 apart
    assert marks.loc[("big", "ce"), "isc_mean"] and not marks.loc[("big", "fkl"), "isc_mean"]  # IS: higher
    assert not marks.loc[("small",)].any().any()  # one seed: no spread, nothing is judged
    assert not marks.loc[[("-", "real"), ("big", "teacher"), ("big", "student_init")]].any().any()
    assert not marks["precision"].any()  # all equal: no winner
    close = runs.copy()
    close.loc[(close["method"] == "fkl") & (close["seed"] == 1), "fid"] = 21.5  # fkl 19.75 ± 1.75 vs ce 21 ± 1
    marks = tables.best(tables.summarise(close))
    assert not marks["fid"].any()


def test_outside_noise_needs_a_known_standard_error():
    assert tables.outside_noise(2.1, 1.0) and not tables.outside_noise(1.9, 1.0) and tables.outside_noise(-2.1, 1.0)
    assert not tables.outside_noise(5.0, np.nan)


def test_mean_std_formatting():
    assert tables.mean_std(21.0, 1.41421, 2) == "21.00 ± 1.41"
    assert tables.mean_std(0.5, np.nan, 3) == "0.500"  # one seed: no spread to show
    assert tables.mean_std(np.nan, np.nan, 3) == ""
    assert tables.mean_std(2.0, 0.25, 1, pm=r" $\pm$ ") == r"2.0 $\pm$ 0.2"


def test_latex_is_booktabs_with_the_best_cell_bold_and_references_in_italics(runs):
    tex = tables.latex(tables.summarise(runs.replace({"method": {"fkl": "fkl_x"}})))
    lines = tex.splitlines()
    assert lines[0].startswith(r"\begin{tabular}{ll") and lines[-1] == r"\end{tabular}"
    assert [line for line in lines if line.endswith("rule")] == [r"\toprule", r"\midrule", r"\midrule", r"\midrule",
                                                                 r"\bottomrule"]  # header, real, big, small
    rows = [line for line in lines if line.endswith(r"\\")]
    columns = lines[0].removeprefix(r"\begin{tabular}{").removesuffix("}")
    assert {row.count("&") for row in rows} == {len(columns) - 1}  # every row has every column
    assert r"big & \textit{teacher} & " in tex and r"small & \textit{student\_init} & " in tex  # a block each
    fkl = next(row for row in rows if r"fkl\_x" in row).split(" & ")  # big's (the first block)
    assert fkl[3] == r"\textbf{18.50 $\pm$ 0.50}"  # FID of big/fkl_x: the best, mean ± standard error
    ce = next(row for row in rows if row.startswith(" & ce ")).split(" & ")
    assert ce[3] == r"21.00 $\pm$ 1.00" and ce[4] == r"\textbf{4.20 $\pm$ 0.20}"
    assert r" & \textit{student\_init} & " in tex and r"\textit{teacher} & 1 & 5.00 & " in tex
    assert "FID $\\downarrow$" in lines[2] and "IS $\\uparrow$" in lines[2]


def test_markdown_marks_the_same_cells(runs):
    md = tables.markdown(tables.summarise(runs))
    assert "**18.50 ± 0.50**" in md and "**4.20 ± 0.20**" in md and "*teacher*" in md
    assert md.count("**") == 2 * 2  # FID and IS on big; nothing else is outside the noise


def test_differences_are_mean_differences_with_their_standard_error(runs):
    diff = tables.differences(tables.summarise(runs), "ce").set_index(["backbone", "method", "metric"])
    fid = diff.loc[("big", "fkl", "fid")]
    assert fid["difference"] == pytest.approx(18.5 - 21.0)
    assert fid["se"] == pytest.approx(np.sqrt(np.var([18, 19], ddof=1) / 2 + np.var([20, 22], ddof=1) / 2))
    assert fid["outside_noise"]  # 2.5 > 2 x 1.118
    assert not diff.loc[("big", "fkl", "precision"), "outside_noise"]  # 0 ± 0
    assert np.isnan(diff.loc[("small", "fkl", "fid"), "se"]) and not diff.loc[("small", "fkl", "fid"), "outside_noise"]
    assert "teacher" not in diff.index.get_level_values("method")
    md = tables.differences_markdown(tables.summarise(runs), "ce")
    assert "**-2.50 ± 1.12**" in md and "| small" in md
