"""The Snakemake workflow: a dry run of the shipped study, and one real run of a miniature study.

The miniature uses the same rules, CLI and code as the embedded study with tiny models and step counts, so it
checks the wiring (every output appears, the table is filled), the rerun rules, the tables, figures, report and
notebooks on its results, not the numbers.
"""
import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import nbformat
import pandas as pd
import pytest
import yaml
from nbclient import NotebookClient

from tests.helpers import REPO, assert_summary_matches_metrics_files, merge, snakemake
from varkd.figures import FIGURES

def jobs_to_run(workdir: Path) -> dict[str, int]:
    """Rule -> count of the jobs a dry run of `all` would execute."""
    out = snakemake(workdir, "-n", "all").stdout
    if "Nothing to be done" in out:
        return {}
    table = out.split("Job stats:")[1].split("\n\n")[0].splitlines()[3:]  # after the header and the rule line
    counts = dict(line.split() for line in table)
    return {rule: int(n) for rule, n in counts.items() if rule not in ("all", "total")}


def execute_notebook(path: Path, cwd: Path, **parameters) -> None:
    """Run a notebook (nbclient) in `cwd` with a cell after its parameters cell that sets `parameters`, as papermill
    does."""
    notebook = nbformat.read(path, as_version=4)
    at = next(i for i, cell in enumerate(notebook.cells) if "parameters" in cell.metadata.get("tags", []))
    notebook.cells.insert(at + 1, nbformat.v4.new_code_cell("\n".join(f"{k} = {v!r}" for k, v in parameters.items())))
    NotebookClient(notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(cwd)}}).execute()


@pytest.mark.slow
def test_dry_run_of_the_embedded_study(presets):
    out = snakemake(presets.parent, "-n", "all").stdout
    for rule in ("train_teacher", "cache_teacher_logits", "train_student", "sample", "evaluate", "aggregate"):
        assert f"\nrule {rule}:" in out or f"\nlocalrule {rule}:" in out, rule
    assert "results/embedded/tiny_shallow/fkl/seed0/metrics.json" in out
    assert out.count("\nrule train_teacher:") == 1  # tiny_shallow borrows tiny's teacher
    out = snakemake(presets.parent, "-n", "all_baselines").stdout
    for method in ("rkl", "seqkd", "imitkd", "gkd", "onpolicy_rkl", "distillm", "distillm2"):
        assert f"results/embedded/tiny_shallow/{method}/seed0/metrics.json" in out, method
    assert "results/embedded/tables/baselines.csv" in out
    out = snakemake(presets.parent, "-n", "all_ablations").stdout
    for method in ("varkd", "varkd_no_clusters", "varkd_ar_rollouts"):
        assert f"results/embedded/tiny_shallow/{method}/seed0/metrics.json" in out, method
    assert "results/embedded/tiny/varkd-k64/seed0/metrics.json" in out
    assert "results/embedded/tables/ablations.csv" in out and "rule cluster_codebook:" in out


def effective_settings(*argv: str):
    """Snakemake's settings for `snakemake <argv>` typed in the repository root, its profiles applied."""
    from snakemake.cli import parse_args
    return parse_args([*argv, "all"])[1]


def test_profiles_layer_as_their_files_say(monkeypatch):
    """Snakemake applies the workflow profile (workflow/profiles/default) on every run, overriding a --profile key by
    key: it had `keep-going: false` and `cores: 2`, so a SLURM study stopped at its first failed job with two
    cores' worth of jobs queued. Each profile's keys hold in effect, and the workflow profile shares none with a
    --profile."""
    monkeypatch.chdir(REPO)
    profiles = {name: yaml.safe_load((REPO / "workflow" / "profiles" / name / "config.yaml").read_text())
                for name in ("default", "slurm")}
    assert not set(profiles["default"]) & set(profiles["slurm"])
    local, slurm = effective_settings("--cores", "2"), effective_settings("--profile", "slurm")
    for settings, keys in ((local, profiles["default"]), (slurm, profiles["default"] | profiles["slurm"])):
        for key, value in keys.items():
            assert getattr(settings, key.replace("-", "_")) == value, key
    assert (local.cores, local.keep_going, local.executor) == (2, False, None)
    assert (slurm.cores, slurm.jobs, slurm.keep_going, slurm.executor) == (None, 100, True, "submitit")


@pytest.mark.slow
def test_lint_reports_only_the_findings_the_workflow_readme_justifies():
    result = subprocess.run([sys.executable, "-m", "snakemake", "--lint"], cwd=REPO, capture_output=True, text=True,
                            timeout=300)
    findings, where = set(), None
    for line in (result.stdout + result.stderr).splitlines():
        if line.startswith("Lints for "):
            where = line.split()[3] if line.startswith("Lints for rule ") else line
        elif line.startswith("    * "):
            findings.add((where, line[6:].rstrip(".:")))
    conda = "Specify a conda environment or container for each rule"
    rules = {where for where, title in findings if title == conda}
    assert findings == {(rule, conda) for rule in rules} | {("resolve_config", "No log directive defined")}
    assert len(rules) > 20
    justified = (REPO / "workflow" / "README.md").read_text()
    assert all(f"**{title}**" in justified for _, title in findings)


@pytest.mark.parametrize("scale", ["embedded", "paper"])
def test_report_captions_describe_the_studys_scale(scale):
    """At paper scale the real side is ADM's reference batch, scored in Inception's feature space: no `real` row and
    no study classifier (the captions said both)."""
    from docutils.core import publish_parts
    from jinja2 import Environment

    config = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    if scale == "paper":
        config = merge(config, yaml.safe_load((REPO / "config" / "imagenet.yaml").read_text()))
    text = ""
    for caption in sorted((REPO / "workflow" / "report").glob("*.rst")):
        snakemake = SimpleNamespace(config=config, wildcards=SimpleNamespace(table="main", figure="metrics"))
        rst = Environment().from_string(caption.read_text()).render(snakemake=snakemake)
        assert "System Message" not in publish_parts(rst, writer="html")["body"], caption
        text += rst
    paper = scale == "paper"
    assert ("``real``" in text, "real images" in text, "classifier" in text) == (not paper,) * 3
    assert ("reference batch" in text) == paper


@pytest.mark.slow
def test_bad_config_fails_before_any_job(presets):
    (presets / "methods" / "fkl.yaml").write_text("terms: [{divergence: fkl}]\ntemprature: 2\n")
    result = snakemake(presets.parent, "-n", "all", check=False)
    assert result.returncode != 0
    assert "temprature" in result.stdout + result.stderr


@pytest.mark.slow
def test_miniature_study_end_to_end(miniature_study):
    workdir, presets = miniature_study, miniature_study / "config"
    study = yaml.safe_load((presets / "config.yaml").read_text())

    snakemake(workdir, "all")  # the fixture ran it: nothing to do
    root = workdir / "results" / "embedded"
    table = pd.read_csv(root / "tables" / "main.csv")
    assert list(table["method"]) == ["real", "teacher", "student_init"] + study["methods"]
    assert {"backbone", "method", "seed", "fid", "isc_mean", "precision", "recall", "nll", "val_fid",
            "val_nll"} <= set(table.columns)
    assert table[["fid", "isc_mean", "precision", "recall", "val_fid"]].notna().all().all()
    for run in ("tiny/teacher", "tiny/student_init", "tiny/ce/seed0", "tiny/fkl/seed0"):
        for name in ("config.yaml", "train_log.csv", "samples.npz", "samples_val.npz", "grid.png", "metrics.json"):
            assert (root / run / name).is_file(), f"{run}/{name}"
        metrics = json.loads((root / run / "metrics.json").read_text())
        assert metrics["num_samples"] == 20 and metrics["feature_extractor"] == "varkd-classifier"
        assert metrics["provenance"]["torch"]
    assert not list(root.rglob("checkpoint.pt"))  # removed once each final model exists
    noise = json.loads((root / "tiny" / "student_init" / "noise.json").read_text())
    assert len(noise["sets"]) == 2 and "Noise floor" in (root / "tables" / "main.md").read_text()
    assert sorted(p.name for p in (root / "plots").iterdir()) == sorted(
        f"main_{figure}.{ext}" for figure in FIGURES for ext in ("png", "pdf"))
    assert "diagnostics" in FIGURES
    for run in ("tiny/student_init", "tiny/ce/seed0", "tiny/fkl/seed0", "tiny/varkd/seed0"):
        diagnostics = pd.read_csv(root / run / "diagnostics.csv")
        assert set(diagnostics["context"]) == {"ground_truth", "student"} and diagnostics["mean"].notna().all(), run
        assert (diagnostics["n"] == 50).all()  # the 50 validation sequences (fewer than diagnose.num_sequences)
    assert not (root / "tiny" / "teacher" / "diagnostics.csv").exists()

    assert jobs_to_run(workdir) == {}  # a second run does nothing

    (root / "tiny" / "ce" / "seed0" / "metrics.json").unlink()
    assert jobs_to_run(workdir) == {"evaluate": 1, "aggregate": 1, "plot": len(FIGURES)}
    snakemake(workdir, "all")

    fkl = presets / "methods" / "fkl.yaml"
    fkl.write_text(fkl.read_text().replace("temperature: 1.0", "temperature: 2.0"))
    assert jobs_to_run(workdir) == {"resolve_config": 1, "train_student": 1, "sample": 1, "evaluate": 1,
                                    "diagnose": 1, "aggregate": 1, "plot": len(FIGURES)}
    fkl.write_text(fkl.read_text().replace("temperature: 2.0", "temperature: 1.0"))

    # every baseline, VarKD ablation and sweep runs through the same rules (one teacher pool per rollout
    # setting, one codebook clustering per k, on-policy methods sample with the student, ...)
    snakemake(workdir, "all_ablations")
    table = pd.read_csv(root / "tables" / "baselines.csv")
    assert list(table["method"]) == ["real", "teacher", "student_init"] + study["baselines"]
    assert table["fid"].notna().all() and table["nll"][1:].notna().all()  # real images have no NLL
    runs = table.set_index("method")
    assert (runs.loc[["imitkd", "onpolicy_rkl"], "train_rollouts"] > 0).all()
    assert runs.loc["fkl", "train_teacher_forwards"] == 0  # cached logits only
    assert runs.loc["seqkd", "train_teacher_forwards"] == 0 and runs.loc["seqkd", "train_rollouts"] == 0  # pool
    # distillm2: both pools drawn once, the student's from the init, scored by the live teacher at every step
    assert runs.loc["distillm2", "train_rollouts"] == 0 and runs.loc["distillm2", "train_teacher_forwards"] == 6
    assert len(list((root / "tiny" / "student_init").glob("pool_*/codes.npy"))) == 1
    assert len(list((root / "tiny" / "teacher").glob("pool_*/codes.npy"))) == 2  # seqkd's and distillm2's settings
    ablations = pd.read_csv(root / "tables" / "ablations.csv").set_index("method")
    sweeps = [f"varkd-{s['name']}{v}" for s in study["sweeps"] for v in s["values"]]
    assert list(ablations.index) == ["real", "teacher", "student_init"] + study["ablations"] + sweeps
    assert ablations["fid"].notna().all()
    # SJD and AR rollouts decode the same number of tokens; SJD needs fewer sequential steps per rollout
    sjd, ar = ablations.loc["varkd"], ablations.loc["varkd_ar_rollouts"]
    assert sjd["train_rollout_tokens"] == ar["train_rollout_tokens"]
    assert sjd["train_rollout_steps"] < ar["train_rollout_steps"]
    assert sorted(p.name for p in (root / "data" / "clusters").glob("*.npy")) == ["k16.npy", "k4.npy", "k64.npy"]
    diagnosed = {p.parent.relative_to(root).as_posix() for p in root.rglob("diagnostics.csv")}
    assert diagnosed == {"tiny/student_init"} | {f"tiny/{m}/seed0" for m in ablations.index[3:]} | {
        f"tiny/{m}/seed0" for m in table["method"][3:]}

    # the claims table is computed from the metrics files and the student inits' diagnostics
    claims = pd.read_csv(root / "tables" / "claims.csv")
    fid = {m: json.loads((root / "tiny" / m / "seed0" / "metrics.json").read_text())["fid"] for m in ("ce", "fkl")}
    kd = claims[(claims["evidence"] == "fkl - ce") & (claims["metric"] == "fid")].iloc[0]
    assert kd["difference"] == pytest.approx(fid["fkl"] - fid["ce"]) and kd["verdict"] == "not measured"  # one seed
    assert "student_init: student - ground truth" in set(claims["evidence"])
    assert "## Standard distillation" in (root / "tables" / "claims.md").read_text()

    # what researchers read: tables, figures, the report, the notebooks
    for name in ("main", "baselines", "ablations"):
        assert_summary_matches_metrics_files(root, name)
        tex = (root / "tables" / f"{name}.tex").read_text()
        runs = pd.read_csv(root / "tables" / f"{name}.csv")
        assert all(method.replace("_", r"\_") in tex for method in runs["method"]) and "standard error" in tex
        assert (root / "tables" / f"{name}.md").is_file()
    summary = pd.read_csv(root / "tables" / "ablations_summary.csv").set_index("method")
    assert summary.loc["varkd", ["sweep_tau", "sweep_k", "sweep_window"]].tolist() == [0.3, 16, 4]
    assert summary.loc["varkd-k64", "sweep_k"] == 64 and pd.isna(summary.loc["varkd-k64", "sweep_tau"])
    figures = {f"{table}_{figure}.{ext}" for table in ("main", "baselines", "ablations") for figure in FIGURES
               for ext in ("png", "pdf")}
    assert sorted(p.name for p in (root / "plots").iterdir()) == sorted(figures | {"ablations_sweeps.png",
                                                                                   "ablations_sweeps.pdf"})
    snakemake(workdir, "--report", str(root / "report.html"), "all_ablations")
    report = (root / "report.html").read_text()
    assert "ablations_sweeps.png" in report and "main_summary.csv" in report
    clone = workdir / "notebooks"  # as in another clone, whose results the notebooks find from their own folder
    clone.mkdir()
    for notebook in ("results", "samples"):
        execute_notebook(REPO / "notebooks" / f"{notebook}.ipynb", clone, results_dir="results/embedded")


@pytest.mark.slow
def test_search_halves_its_candidates_on_validation_metrics(miniature_study):
    """varkd_search on the miniature: every candidate at stage 0, only the kept one at stage 1 (the checkpoint's
    table decides), the report names the winner, and a second run has nothing to do."""
    workdir = miniature_study
    search = {"search": {"seeds": [0], "candidates": [
        {"name": "summary", "reads": "first"}, {"name": "mixed", "reads": "half", "set": {"terms.0.data": "mixed"}},
        {"name": "skew", "reads": "skew", "set": {"terms.0.divergence": "skl"}}],
        "stages": [{"optim": {}, "keep": 1}, {"optim": {"steps": 3}}]}}
    (workdir / "search.yaml").write_text(yaml.safe_dump(search))
    configs = [str(workdir / "config" / "config.yaml"), str(workdir / "search.yaml")]  # from the test's directory
    snakemake(workdir, "varkd_search", "--configfile", *configs)
    root = workdir / "results" / "embedded"
    stage0, stage1 = (pd.read_csv(root / "search" / f"stage{i}.csv") for i in range(2))
    assert sorted(stage0["candidate"]) == ["mixed", "skew", "summary"] and stage0["kept"].sum() == 1
    winner = stage0.loc[stage0["kept"], "candidate"].item()
    assert stage1["candidate"].tolist() == [winner]
    trained = sorted(p.parent.parent.name for p in (root / "tiny").glob("search-*-r1/seed0/student.pt"))
    assert trained == [f"search-{winner}-r1"]
    log = pd.read_csv(root / "tiny" / f"search-{winner}-r1" / "seed0" / "train_log.csv")
    assert log["step"].max() == 3  # the stage's budget
    assert f"Winner: **{winner}**" in (root / "search" / "search.md").read_text()
    assert (root / "plots" / "search.png").is_file()
    out = snakemake(workdir, "-n", "varkd_search", "--configfile", *configs).stdout
    assert "Nothing to be done" in out
