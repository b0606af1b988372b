"""Config errors fail at once and name the key; job configs round-trip through YAML."""
import pytest
import yaml

from varkd.cli import main as cli
from varkd.config import ConfigError, TrainJob, load_job, to_yaml
from varkd.study import Study


def test_embedded_study_resolves(study_dict):
    study = Study.load(study_dict)
    assert study.name == "embedded"
    per_method = len(study_dict["backbones"]) * len(study_dict["seeds"])
    assert len(study.runs(study_dict["methods"])) == per_method * len(study_dict["methods"])
    assert len(study.runs()) == per_method * len(set(study_dict["methods"] + study_dict["baselines"]))
    job = study.jobs["results/embedded/tiny/fkl/seed0/config.yaml"]
    assert job.kd.terms[0].divergence == "fkl" and job.teacher_logits.endswith("tiny/teacher/logits_train.npy")
    ce = study.jobs["results/embedded/tiny/ce/seed0/config.yaml"]
    assert ce.teacher is None and ce.teacher_logits is None  # CE needs no teacher, so it need not wait for one


def test_job_yaml_round_trip(study_dict, tmp_path):
    study = Study.load(study_dict)
    path = "results/embedded/tiny/fkl/seed1/config.yaml"
    (tmp_path / "job.yaml").write_text(study.job_text(path))
    assert load_job(TrainJob, tmp_path / "job.yaml") == study.jobs[path]


@pytest.mark.parametrize("edit, message", [
    (lambda d: d["student_optim"].update(lrr=1.0), "student_optim.lrr"),
    (lambda d: d["tokenizer"]["model"].update(ch="wide"), "tokenizer.model.ch"),
    (lambda d: d["student_optim"].update(schedule="cosine_restarts"), "schedule='cosine_restarts'"),
    (lambda d: d.update(methods=["ce", "fkll"]), "unknown method 'fkll'"),
    (lambda d: d.update(backbones=["huge"]), "unknown backbone 'huge'"),
    (lambda d: d["tokenizer"]["model"].update(codebook_size=512), "vocab_size=256 != tokenizer.model.codebook_size=512"),
    (lambda d: d["data"].update(image_size=64), "block_size=64 != 16x16"),
    (lambda d: d["sample"].update(num_samples=1001), "num_samples=1001"),
    (lambda d: d.update(seeds=[0, 0]), "seeds has duplicates"),
])
def test_bad_study_config_names_the_key(study_dict, edit, message):
    edit(study_dict)
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace("[", r"\[")):
        Study.load(study_dict)


def test_bad_method_preset_names_file_and_key(study_dict, presets):
    (presets / "methods" / "fkl.yaml").write_text("terms: [{divergence: fkl}]\ntemprature: 2.0\n")
    with pytest.raises(ConfigError, match=r"fkl.yaml.*temprature"):
        Study.load(study_dict)
    (presets / "methods" / "fkl.yaml").write_text("terms: [{divergence: kl}]\n")
    with pytest.raises(ConfigError, match=r"fkl.yaml.*divergence='kl'"):
        Study.load(study_dict)
    (presets / "methods" / "fkl.yaml").write_text("terms: [{divergence: jsd, beta: 1.5}]\n")
    with pytest.raises(ConfigError, match=r"fkl.yaml.*beta must be in \[0, 1\]"):
        Study.load(study_dict)


def test_mismatched_backbone_pair_is_rejected(study_dict, presets):
    path = presets / "backbones" / "tiny.yaml"
    data = yaml.safe_load(path.read_text())
    data["student"]["vocab_size"] = 128
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError, match="teacher.vocab_size=256 != student.vocab_size=128"):
        Study.load(study_dict)


def test_cli_reports_bad_job_file_cleanly(tmp_path, capsys):
    bad = tmp_path / "config.yaml"
    bad.write_text("study: x\nmodell: {}\n")
    assert cli(["train", str(bad)]) == 2
    assert "modell" in capsys.readouterr().err
    assert cli(["train", str(tmp_path / "missing.yaml")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_to_yaml_is_stable(study_dict):
    a, b = Study.load(study_dict), Study.load(study_dict)
    assert all(to_yaml(a.jobs[k]) == to_yaml(b.jobs[k]) for k in a.jobs)


def test_stale_job_configs_are_found_by_content(study_dict, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    study = Study.load(study_dict)
    path = "results/embedded/tiny/fkl/seed0/config.yaml"
    (tmp_path / path).parent.mkdir(parents=True)
    (tmp_path / path).write_text(study.job_text(path))
    assert study.stale_job_configs() == []
    (tmp_path / path).write_text(study.job_text(path).replace("method: fkl", "method: rkl"))
    assert study.stale_job_configs() == [path]


def test_every_method_preset_is_a_valid_point_and_gets_the_teacher_it_needs(study_dict, presets):
    """Adding a method is adding a YAML file: each preset resolves, with exactly the teacher inputs it uses."""
    names = sorted(p.stem for p in (presets / "methods").glob("*.yaml"))
    study = Study.load({**study_dict, "methods": names})
    expect = {  # name: (live teacher checkpoint, cached ground-truth logits)
        "ce": (False, False), "fkl": (False, True), "rkl": (False, True), "seqkd": (True, False),
        "imitkd": (True, False), "gkd": (True, True), "onpolicy_rkl": (True, False), "distillm": (True, True),
        "distillm2": (True, False),
    }
    for name in names:
        job = study.jobs[f"results/embedded/tiny/{name}/seed0/config.yaml"]
        got = (job.teacher is not None, job.teacher_logits is not None)
        assert got == expect.get(name, got), name


def test_backbones_can_share_a_teacher(study_dict, presets):
    (presets / "backbones" / "wide.yaml").write_text(
        "teacher_from: tiny\nstudent: {dim: 128, n_layer: 2, n_head: 4, vocab_size: 256, num_classes: 10, "
        "block_size: 64}\n")
    study = Study.load({**study_dict, "backbones": ["tiny", "wide"]})
    assert study.teacher_owners == ["tiny"]
    job = study.jobs["results/embedded/wide/fkl/seed0/config.yaml"]
    assert job.teacher_logits == "results/embedded/tiny/teacher/logits_train.npy"
    assert "results/embedded/wide/teacher/config.yaml" not in study.jobs
    (presets / "backbones" / "wide.yaml").write_text("teacher_from: nowhere\nstudent: {vocab_size: 256}\n")
    with pytest.raises(ConfigError, match="teacher_from='nowhere'"):
        Study.load({**study_dict, "backbones": ["tiny", "wide"]})
