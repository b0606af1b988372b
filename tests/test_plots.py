"""Tables and figures of a hand-made results folder, through `varkd aggregate` and `varkd plot`, and the notebooks
as stored (the end-to-end test in test_workflow.py executes them)."""
import inspect
import json
import os
import tracemalloc
from pathlib import Path

import nbformat
import numpy as np
import pandas as pd
import pytest

from tests.helpers import REPO, assert_summary_matches_metrics_files
from varkd import cli, diagnostics, figures, plots, study, tables
from varkd.io import atomic_save_npz

SWEEP = [{"sweep": "tau", "backbone": "tiny", "method": m, "value": v}
         for m, v in (("varkd", 0.3), ("varkd-tau0.1", 0.1))]


@pytest.fixture
def results(tmp_path) -> Path:
    """results/<study>/ with the real floor, a teacher, a student init and two methods, a sweep run, two seeds; the
    diagnostics of the student init and of each method's first seed."""
    root, rng = tmp_path / "results" / "mini", np.random.default_rng(0)
    runs = [("real", "-", "real", 0), ("tiny/teacher", "tiny", "teacher", 0),
            ("tiny/student_init", "tiny", "student_init", 0)]
    runs += [(f"tiny/{m}/seed{s}", "tiny", m, s) for m in ("ce", "varkd", "varkd-tau0.1") for s in (0, 1)]
    for folder, backbone, method, seed in runs:
        run = root / folder
        run.mkdir(parents=True)
        metrics = {"backbone": backbone, "method": method, "seed": seed, "fid": rng.uniform(1, 20),
                   "isc_mean": rng.uniform(1, 5), "precision": rng.uniform(), "recall": rng.uniform()}
        if method != "real":
            metrics.update(nll=rng.uniform(1, 2), val_nll=rng.uniform(1, 2), train_wall_s=rng.uniform(10, 100),
                           train_teacher_forwards=8)
            atomic_save_npz(run / "samples.npz", arr_0=rng.integers(0, 256, (6, 8, 8, 3), dtype=np.uint8),
                            labels=np.repeat(np.arange(3), 2))
            pd.DataFrame({"step": [4, 8], "loss": [2.0, 1.5], "val_nll": [np.nan, 1.4]}).to_csv(
                run / "train_log.csv", index=False)
        (run / "metrics.json").write_text(json.dumps(metrics))
        if method == "student_init" or seed == 0 and method not in ("real", "teacher"):  # what the study diagnoses
            values = {c: {q: rng.uniform(size=(5, 16)) for q in diagnostics.QUANTITIES} for c in diagnostics.CONTEXTS}
            diagnostics.per_position(values, metrics).to_csv(run / "diagnostics.csv", index=False)
    return root


@pytest.mark.slow
def test_aggregate_writes_every_table_file_and_plots_draw_every_figure(results):
    files = sorted(str(p) for p in results.rglob("metrics.json"))
    assert cli.main(["aggregate", *files, "--out-dir", str(results / "tables"), "--name", "ablations",
                     "--sweeps", json.dumps(SWEEP)]) == 0
    runs = pd.read_csv(results / "tables" / "ablations.csv")
    assert (results / runs["run_dir"]).map(lambda p: (p / "metrics.json").is_file()).all()
    assert_summary_matches_metrics_files(results, "ablations")  # two seeds: a std to check
    summary = pd.read_csv(results / "tables" / "ablations_summary.csv").set_index("method")
    assert summary.loc["varkd", "sweep_tau"] == 0.3 and np.isnan(summary.loc["ce", "sweep_tau"])
    bold = tables.best(pd.read_csv(results / "tables" / "ablations_summary.csv")).to_numpy().sum()
    assert (results / "tables" / "ablations.tex").read_text().count(r"\textbf{") == bold  # the clear bests only
    assert "## Every run" in (results / "tables" / "ablations.md").read_text()
    for figure in plots.FIGURES:
        out = results / "plots" / f"ablations_{figure}"
        assert cli.main(["plot", figure, "--results", str(results), "--table", "ablations", "--out", str(out)]) == 0
        assert out.with_suffix(".png").stat().st_size > 0 and out.with_suffix(".pdf").stat().st_size > 0
    assert cli.main(["plot", "nonsense", "--results", str(results), "--table", "ablations", "--out", "x"]) == 2


def test_samples_figure_reads_only_the_images_it_shows(results, monkeypatch):
    """A paper-scale samples.npz is 9.8 GB (50,000 images of 256px, 1,000 classes); the figure tiled every class of
    every image and died with a MemoryError. Here each of the 9 runs holds 2,000 images of 64px of 1,000 classes
    (25 MB): the figure shows MAX_CLASSES classes, allocating less than half of one file (it loaded all 9)."""
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(1000), 2)
    images = rng.integers(0, 256, (2000, 64, 64, 3), dtype=np.uint8)
    paths = sorted(results.rglob("samples.npz"))
    np.savez(paths[0], arr_0=images, labels=labels)
    for path in paths[1:]:
        path.unlink()
        os.link(paths[0], path)
    assert cli.main(["aggregate", *map(str, results.rglob("metrics.json")), "--out-dir", str(results / "tables"),
                     "--name", "main"]) == 0
    table = tables.Table.load(results, "main")
    tracemalloc.start()
    figure = plots.samples(table)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < images.nbytes / 2, peak
    labels_shown = [t.get_text() for t in figure.axes[0].get_xticklabels()]
    assert len(labels_shown) == plots.MAX_CLASSES and labels_shown[0] == "0" and labels_shown[-1] == "999"


def test_a_relative_results_folder_is_found_from_the_working_directory_up(tmp_path):
    study = tmp_path / "clone" / "results" / "mini"
    (study / "tables").mkdir(parents=True)
    (tmp_path / "clone" / "notebooks").mkdir()
    assert tables.find_results("results/mini", tmp_path / "clone" / "notebooks") == study
    assert tables.find_results(study, tmp_path) == study
    with pytest.raises(FileNotFoundError, match=f"no results folder results/other .* under {tmp_path}"):
        tables.find_results("results/other", tmp_path)


def test_curves_show_the_student_data_share_of_methods_that_choose_their_data(results):
    """Methods logging student_share (GKD, ImitKD, DistiLLM) get a third row of panels; the others have none."""
    from varkd.tables import Table

    files = sorted(str(p) for p in results.rglob("metrics.json"))
    assert cli.main(["aggregate", *files, "--out-dir", str(results / "tables"), "--name", "main"]) == 0
    titles = lambda fig: {ax.get_title() for ax in fig.axes}  # noqa: E731
    assert titles(plots.curves(Table.load(results, "main"))) == {"tiny: loss", "tiny: val_nll"}
    for seed in (0, 1):
        log = results / "tiny" / "varkd" / f"seed{seed}" / "train_log.csv"
        pd.read_csv(log).assign(student_share=[0.25, 0.5]).to_csv(log, index=False)
    fig = plots.curves(Table.load(results, "main"))
    assert titles(fig) == {"tiny: loss", "tiny: val_nll", "tiny: student_share"}
    share = next(ax for ax in fig.axes if ax.get_title() == "tiny: student_share")
    assert [list(line.get_ydata()) for line in share.get_lines() if len(line.get_ydata()) == 2] == [[0.25, 0.5]]


def test_the_study_lists_only_figures_that_exist():
    assert set(study.FIGURES) | {"sweeps"} == set(plots.FIGURES)


def test_every_figure_named_has_its_drawing_function_and_every_drawing_function_a_name():
    """varkd.figures owns the names; plots.py draws each with the function of its name, and draws nothing else."""
    named = {*figures.FIGURES, figures.SWEEPS}
    drawing = {name for name, f in vars(plots).items() if inspect.isfunction(f) and f.__module__ == plots.__name__
               and inspect.signature(f).return_annotation == "plt.Figure"}
    assert len(named) == len(figures.FIGURES) + 1 and drawing == named
    assert {name: f.__name__ for name, f in plots.FIGURES.items()} == {name: name for name in named}
    assert study.FIGURES is figures.FIGURES


@pytest.mark.parametrize("name", ["results", "samples"])
def test_notebooks_are_stored_without_outputs_and_take_results_dir(name):
    notebook = nbformat.read(REPO / "notebooks" / f"{name}.ipynb", as_version=4)
    nbformat.validate(notebook)
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert all(cell.outputs == [] and cell.execution_count is None for cell in code)
    parameters = [cell for cell in code if "parameters" in cell.metadata.get("tags", [])]
    assert len(parameters) == 1 and 'results_dir = "results/embedded"' in parameters[0].source
