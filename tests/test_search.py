"""The search over readings: its config, its runs in the study, and the ranking of a stage on validation metrics."""
import json

import numpy as np
import pytest

from varkd.config import ConfigError, SearchConfig, structured
from varkd.search import candidate_of, kept, rank_stage, report, write_stage
from varkd.study import Study


def metrics_file(path, candidate, seed, val_fid, val_nll, stage=0, **extra):
    path.mkdir(parents=True, exist_ok=True)
    row = {"backbone": "tiny", "method": f"search-{candidate}-r{stage}", "seed": seed, "val_fid": val_fid,
           "val_nll": val_nll, "fid": 0.0, "nll": 0.0, **extra}  # test metrics are never read
    (path / "metrics.json").write_text(json.dumps(row))
    return str(path / "metrics.json")


def test_stage_ranks_by_the_mean_of_validation_ranks_and_keeps_the_best(tmp_path):
    # a: best FID, worst NLL; b: second on both; c: worst FID, best NLL; d: worse than b on both
    values = {"a": [(10.0, 2.0), (11.0, 2.2)], "b": [(12.0, 1.8), (12.4, 1.8)], "c": [(20.0, 1.5), (20.0, 1.5)],
              "d": [(13.0, 1.9), (13.0, 1.9)]}
    files = [metrics_file(tmp_path / f"{c}{s}", c, s, fid, nll) for c, runs in values.items()
             for s, (fid, nll) in enumerate(runs)]
    stage = rank_stage(files, keep=2)
    # mean ranks: a (1 + 4) / 2 = 2.5, b (2 + 2) / 2 = 2, c (4 + 1) / 2 = 2.5, d (3 + 3) / 2 = 3; a beats c on FID
    assert stage["candidate"].tolist() == ["b", "a", "c", "d"]
    assert stage["score"].tolist() == [2.0, 2.5, 2.5, 3.0]
    assert stage["kept"].tolist() == [True, True, False, False]
    b = stage.iloc[0]
    assert b["n"] == 2 and b["val_fid_mean"] == pytest.approx(12.2)
    assert b["val_fid_se"] == pytest.approx(np.std([12.0, 12.4], ddof=1) / np.sqrt(2))
    gap_se = np.hypot(stage.loc[1, "val_fid_se"], b["val_fid_se"])  # a's FID gap to b: -1.7 against its noise
    assert stage.loc[1, "val_fid_gap"] == pytest.approx(-1.7)
    assert stage.loc[1, "val_fid_beyond_noise"] == (1.7 > 2 * gap_se)
    out = tmp_path / "stage0.csv"
    write_stage(files, 2, out)
    assert kept(out) == ["b", "a"]


def test_stage_refuses_runs_without_validation_metrics(tmp_path):
    files = [metrics_file(tmp_path / f"x{s}", "x", s, float("nan"), 1.0) for s in range(2)]
    with pytest.raises(ValueError, match="val_fid"):
        rank_stage(files, keep=0)


def test_report_writes_every_stage_and_names_the_winner(tmp_path):
    stages = []
    for i, names in enumerate([["a", "b", "c"], ["b", "a"]]):
        files = [metrics_file(tmp_path / f"s{i}{c}{s}", c, s, 10.0 + j + s, 2.0 - 0.1 * j, stage=i)
                 for j, c in enumerate(names) for s in range(2)]
        stages.append(str(tmp_path / f"stage{i}.csv"))
        write_stage(files, 2 if i == 0 else 0, stages[-1])
    every = report(stages, {"a": "reading A", "b": "reading B"}, [200, 500], tmp_path, tmp_path / "search")
    assert len(every) == 5 and set(every["steps"]) == {200, 500}
    text = (tmp_path / "search.md").read_text()
    assert "Winner: **b** (reading B)" in text and "Stage 1: 500 steps, 2 candidates" in text
    assert (tmp_path / "search.png").stat().st_size > 0 and (tmp_path / "search.pdf").stat().st_size > 0
    assert candidate_of("search-mixed_soft-r1") == "mixed_soft"


def test_search_config_checks_its_stages():
    candidates = [{"name": "a"}, {"name": "b"}, {"name": "c"}]
    with pytest.raises(ConfigError, match="keeps between 1 and 2"):
        structured(SearchConfig, dict(base="v", backbone="t", candidates=candidates, stages=[{"keep": 3}, {}]), "s")
    with pytest.raises(ConfigError, match="the last keeps 0"):
        structured(SearchConfig, dict(base="v", backbone="t", candidates=candidates, stages=[{"keep": 1}]), "s")
    with pytest.raises(ConfigError, match="distinct names"):
        structured(SearchConfig, dict(base="v", backbone="t", candidates=[{"name": "a"}] * 2, stages=[{}]), "s")


def test_study_trains_each_candidate_per_stage_on_the_search_budget(study_dict):
    study = Study.load(study_dict)
    search = study.cfg.search
    assert search is not None and len(search.candidates) >= 10
    names = [c.name for c in search.candidates]
    assert not [r for r in study.runs() if r.method.startswith("search-")]  # not in the tables' runs
    for stage in range(len(search.stages)):
        runs = study.search_runs(stage)
        assert len(runs) == len(names) * len(search.seeds)
        for run in runs:
            job = study.jobs[f"{study.run_dir(run)}/config.yaml"]
            assert job.optim == study.search_optim(stage)
            assert job.kd.rollout.sampler == "ar"  # search.common
            assert not study.diagnosed(run)
    assert study.search_optim(0).steps == study.cfg.student_optim.steps
    assert study.search_optim(1).steps == 500
    # a candidate is the base preset with its keys set, and nothing else changed
    base = study.methods["search-summary-r0"]
    repaired = study.methods["search-repaired-r0"]
    assert repaired.terms[0].data == "repaired" and repaired.terms[0].weighting.selector == "none"
    assert repaired.terms[0].cluster_weight == base.terms[0].cluster_weight and repaired.clusters == base.clusters
    files = study.search_files(1, ["mixed"])
    metrics = [f for f in files if f.endswith("metrics.json")]
    assert metrics == [f"results/embedded/tiny/search-mixed-r1/seed{s}/metrics.json" for s in search.seeds]
    assert "results/embedded/tiny/student_init/student.pt" in files


@pytest.mark.slow
def test_search_mistakes_name_the_key(study_dict):
    bad = {**study_dict, "search": {**study_dict["search"], "backbone": "huge"}}
    with pytest.raises(ConfigError, match="search.backbone='huge'"):
        Study.load(bad)
    bad = {**study_dict, "search": {**study_dict["search"], "stages": [{"optim": {"stepz": 5}, "keep": 2}, {}]}}
    with pytest.raises(ConfigError, match="stepz"):
        Study.load(bad)
    bad = {**study_dict, "search": {**study_dict["search"],
                                    "candidates": [{"name": "x", "set": {"terms.0.weighting.powr": 1}}, {"name": "y"}],
                                    "stages": [{"keep": 1}, {}]}}
    with pytest.raises(ConfigError, match="powr"):
        Study.load(bad)
