"""Config errors fail at once and name the key; job configs round-trip through YAML."""
import dataclasses
import subprocess
import sys

import pytest
import yaml
from omegaconf import OmegaConf

from varkd import cli, config, losses, schedules, selection, sjd
from varkd.config import (AdaptiveConfig, ConfigError, DiagnoseConfig, MethodConfig, RolloutConfig, SampleConfig,
                          SampleJob, TermConfig, TrainJob, WeightingConfig, load_job, structured, to_yaml)
from varkd.sampling import Sampling
from varkd.study import Study
from tests.helpers import REPO


def test_embedded_study_resolves(study_dict):
    study = Study.load(study_dict)
    assert study.name == "embedded"
    per_method = len(study_dict["backbones"]) * len(study_dict["seeds"])
    assert len(study.runs(study_dict["methods"])) == per_method * len(study_dict["methods"])
    presets = set(study_dict["methods"] + study_dict["baselines"] + study_dict["ablations"])
    sweeps = sum(len(s["values"]) * len(s.get("backbones") or study_dict["backbones"]) for s in study_dict["sweeps"])
    assert len(study.runs()) == per_method * len(presets) + sweeps * len(study_dict["seeds"])
    job = study.jobs["results/embedded/tiny/fkl/seed0/config.yaml"]
    assert job.kd.terms[0].divergence == "fkl" and job.teacher_logits.endswith("tiny/teacher/logits_train.npy")
    ce = study.jobs["results/embedded/tiny/ce/seed0/config.yaml"]
    assert ce.teacher is None and ce.teacher_logits is None  # CE needs no teacher, so it need not wait for one


def test_job_yaml_round_trip(study_dict, tmp_path):
    study = Study.load(study_dict)
    path = "results/embedded/tiny/fkl/seed0/config.yaml"
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
    (lambda d: d.update(resources={"train_student": {"gpus": 1}}), "resources.train_student.gpus"),
    (lambda d: d.update(resources={"train_student": {"runtime": 0}}), "runtime must be > 0"),
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
    assert cli.main(["train", str(bad)]) == 2
    assert "modell" in capsys.readouterr().err
    assert cli.main(["train", str(tmp_path / "missing.yaml")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_cli_help_imports_no_torch_and_every_command_resolves():
    """`varkd --help` took ~6 s importing torch; the commands' modules load only when one runs."""
    code = ("import sys\nfrom varkd import cli\ntry:\n    cli.main(['--help'])\nexcept SystemExit:\n    pass\n"
            "assert 'torch' not in sys.modules, 'torch imported'")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 0 and "check-config" in result.stdout, result.stderr
    for name in cli.COMMANDS:
        schema, run = cli.command(name)
        assert dataclasses.is_dataclass(schema) and callable(run), name


@pytest.mark.slow
def test_to_yaml_is_stable(study_dict):
    a, b = Study.load(study_dict), Study.load(study_dict)
    assert all(to_yaml(a.jobs[k]) == to_yaml(b.jobs[k]) for k in a.jobs)


def test_targets_list_every_file_their_tables_rest_on(study_dict):
    """A target names each run's whole chain (model, samples, configs, teacher, codes, data), so Snakemake remakes
    any of them that is missing, and nothing a table does not rest on (another method's pool or clusters)."""
    study = Study.load(study_dict)
    files = set(study.run_files(["fkl"]))
    run, teacher = "results/embedded/tiny/fkl/seed0", "results/embedded/tiny/teacher"
    assert {f"{run}/{name}" for name in ("config.yaml", "student.pt", "sample.yaml", "samples.npz",
                                          "samples_val.npz", "grid.png", "evaluate.yaml", "metrics.json",
                                          "diagnose.yaml", "diagnostics.csv")} <= files
    assert {f"{teacher}/teacher.pt", f"{teacher}/config.yaml", f"{teacher}/logits_train.npy",
            "results/embedded/tiny/student_init/student.pt", "results/embedded/tiny/student_init/noise.json",
            "results/embedded/data/tokenizer/tokenizer.pt", "results/embedded/data/codes/train/codes.npy",
            "results/embedded/data/classifier/classifier.pt", "results/embedded/data/images.npz"} <= files
    assert not [f for f in files if "/pool_" in f or "/clusters/" in f or "/varkd/" in f or "/ce/" in f]
    # every listed file is a job's config, or made by exactly one job
    made = [out for job in study.jobs.values() for out in job.outputs()]
    assert len(made) == len(set(made))
    assert files <= set(made) | set(study.jobs)
    with_clusters = set(study.run_files(["varkd"]))
    assert "results/embedded/data/clusters/k16.npy" in with_clusters and "results/embedded/data/clusters/k16.yaml" \
        in with_clusters


def test_every_method_preset_is_a_valid_point_and_gets_the_teacher_it_needs(study_dict, presets):
    """Adding a method is adding a YAML file: each preset resolves, with exactly the teacher inputs it uses."""
    names = sorted(p.stem for p in (presets / "methods").glob("*.yaml"))
    study = Study.load({**study_dict, "methods": names})
    expect = {  # name: (live teacher checkpoint, cached ground-truth logits, teacher-sample pool, student pool)
        "ce": (False, False, False, False), "fkl": (False, True, False, False), "rkl": (False, True, False, False),
        "seqkd": (False, False, True, False), "imitkd": (True, True, False, False), "gkd": (True, True, False, False),
        "onpolicy_rkl": (True, False, False, False), "distillm": (True, True, False, False),
        "distillm2": (True, False, True, True),
    }
    for name in names:
        job = study.jobs[f"results/embedded/tiny/{name}/seed0/config.yaml"]
        got = (job.teacher is not None, job.teacher_logits is not None, job.teacher_pool is not None,
               job.student_pool is not None)
        assert got == expect.get(name, got), name
        for pool in (job.teacher_pool, job.student_pool):
            if pool:  # the workflow has a job that makes the pool the run reads
                assert f"{pool}/config.yaml" in study.jobs and f"{pool}/codes.npy" in job.inputs()


@pytest.mark.slow
def test_teacher_pools_are_shared_by_rollout_settings(study_dict, presets):
    """One pool per teacher and rollout settings: shared across seeds and backbones, separate per settings."""
    (presets / "methods" / "seqkd_cold.yaml").write_text(
        "terms: [{data: teacher, divergence: ce}]\nrollout: {temperature: 0.5, teacher_pool: true}\n")
    (presets / "backbones" / "wide.yaml").write_text(
        "teacher_from: tiny\nstudent: {dim: 128, n_layer: 2, n_head: 4, vocab_size: 256, num_classes: 10, "
        "block_size: 64}\n")
    study = Study.load({**study_dict, "methods": ["seqkd", "seqkd_cold"], "backbones": ["tiny", "wide"],
                        "seeds": [0, 1]})
    pools = {(r.backbone, r.method, r.seed): study.jobs[f"{study.run_dir(r)}/config.yaml"].teacher_pool
             for r in study.runs()}
    assert len({pools[k] for k in pools if k[1] == "seqkd"}) == 1
    assert pools[("tiny", "seqkd", 0)] != pools[("tiny", "seqkd_cold", 0)]
    assert pools[("tiny", "seqkd", 0)].startswith("results/embedded/tiny/teacher/pool_")
    pool_job = study.jobs[f"{pools[('tiny', 'seqkd_cold', 0)]}/config.yaml"]
    assert pool_job.rollout.temperature == 0.5 and pool_job.model == "results/embedded/tiny/teacher/teacher.pt"
    (presets / "methods" / "seqkd_sjd.yaml").write_text(  # the student's sampler does not change the pool
        "base: seqkd\nset: {rollout.sampler: sjd, rollout.window: 2}\n")
    study = Study.load({**study_dict, "methods": ["seqkd", "seqkd_sjd"]})
    assert (study.jobs["results/embedded/tiny/seqkd/seed0/config.yaml"].teacher_pool
            == study.jobs["results/embedded/tiny/seqkd_sjd/seed0/config.yaml"].teacher_pool)


@pytest.mark.slow
def test_seqkd_pool_follows_the_studys_evaluation_sampling_of_its_teacher(study_dict, presets):
    """rollout.eval_sampling: the teacher pool is drawn as the teacher is evaluated (the study's sample section and
    the teacher's backbone CFG scale), so changing those changes the pool; the preset's own settings do not."""
    def seqkd_pool(data):
        study = Study.load(data)
        path = study.jobs["results/embedded/tiny/seqkd/seed0/config.yaml"].teacher_pool
        return path, study.jobs[f"{path}/config.yaml"].rollout

    sample = {"num_samples": 1000, "val_num_samples": 1000, "batch_size": 1000, "cfg_scale": 1.5, "temperature": 1.0,
              "top_k": 0, "top_p": 1.0}
    path, rollout = seqkd_pool({**study_dict, "sample": sample})
    assert study_dict["sample"] == sample and Study.load(study_dict).methods["seqkd"].rollout.eval_sampling
    assert (rollout.cfg_scale, rollout.temperature, rollout.top_k, rollout.top_p) == (1.5, 1.0, 0, 1.0)
    assert rollout.null_fraction == 0.1  # still the method's
    changed = {}
    for key, value in (("cfg_scale", 2.5), ("temperature", 0.7), ("top_k", 20), ("top_p", 0.9)):
        other_path, other = seqkd_pool({**study_dict, "sample": {**sample, key: value}})
        assert getattr(other, key) == value and other_path != path, key
        changed[key] = other_path
    assert len(set(changed.values())) == 4
    # the preset's own sampling settings are unused with eval_sampling, and it needs a teacher pool
    (presets / "methods" / "seqkd_hot.yaml").write_text("base: seqkd\nset: {rollout.temperature: 2.0}\n")
    study = Study.load({**study_dict, "sample": sample, "methods": ["seqkd", "seqkd_hot"]})
    assert study.jobs["results/embedded/tiny/seqkd_hot/seed0/config.yaml"].teacher_pool == path
    # the teacher's backbone publishes its own CFG scale: it wins over sample.cfg_scale, for every student of it
    (presets / "backbones" / "tiny.yaml").write_text((presets / "backbones" / "tiny.yaml").read_text()
                                                     + "teacher_cfg_scale: 3.0\n")
    study = Study.load(study_dict)
    pools = {study.jobs[f"results/embedded/{b}/seqkd/seed0/config.yaml"].teacher_pool for b in ("tiny", "tiny_shallow")}
    assert len(pools) == 1 and study.jobs[f"{pools.pop()}/config.yaml"].rollout.cfg_scale == 3.0
    (presets / "methods" / "seqkd_live.yaml").write_text("base: seqkd\nset: {rollout.teacher_pool: false}\n")
    with pytest.raises(ConfigError, match="seqkd_live.yaml.*rollout.eval_sampling.*teacher_pool"):
        Study.load({**study_dict, "methods": ["seqkd_live"]})
    with pytest.raises(ConfigError, match="teacher pool of backbone 'tiny'.*temperature > 0"):
        Study.load({**study_dict, "sample": {**sample, "temperature": 0.0}})


@pytest.mark.slow
def test_student_pool_is_drawn_once_from_each_backbones_init_and_shared_by_seeds(study_dict):
    """DistiLLM-2's offline student responses: one pool job per backbone, from its student init, with the method's
    rollout settings and no logits, read by every seed; the teacher scores it live."""
    study = Study.load({**study_dict, "methods": ["distillm2"], "seeds": [0, 1, 2]})
    method = study.methods["distillm2"]
    assert method.uses_student_pool and method.uses_teacher_pool
    for backbone in ("tiny", "tiny_shallow"):
        runs = [study.jobs[f"results/embedded/{backbone}/distillm2/seed{s}/config.yaml"] for s in (0, 1, 2)]
        pools = {run.student_pool for run in runs}
        assert len(pools) == 1
        pool = pools.pop()
        assert pool.startswith(f"results/embedded/{backbone}/student_init/pool_")
        job = study.jobs[f"{pool}/config.yaml"]
        assert job.model == f"results/embedded/{backbone}/student_init/student.pt" == runs[0].init
        assert not job.logits and job.seed == study.backbones[backbone].teacher_seed
        r = method.rollout
        assert ((job.rollout.cfg_scale, job.rollout.temperature, job.rollout.top_k, job.rollout.top_p,
                 job.rollout.null_fraction) == (r.cfg_scale, r.temperature, r.top_k, r.top_p, r.null_fraction))
        assert all(run.teacher == "results/embedded/tiny/teacher/teacher.pt" for run in runs)  # live scoring
        assert all(f"{pool}/codes.npy" in run.inputs() and f"{pool}/logits.npy" not in run.inputs() for run in runs)
    pool_jobs = [p for p in study.jobs if "/student_init/pool_" in p]
    assert len(pool_jobs) == 2  # one per backbone, whatever the number of seeds
    with pytest.raises(ConfigError, match="rollout.student_pool.*backbone 'tiny' has none"):
        Study.load({**study_dict, "methods": ["distillm2"], "student_pretrain": None})


def test_imitkd_and_gkd_presets_are_points_of_the_mixture_axis(study_dict):
    study = Study.load({**study_dict, "methods": ["imitkd", "gkd"]})
    imitkd, gkd = study.methods["imitkd"], study.methods["gkd"]
    assert [(t.data, t.divergence) for t in imitkd.terms] == [("mixed", "fkl")]
    m = imitkd.mixture
    assert (m.granularity, m.schedule, m.exp_base) == ("sequence", "exponential", 200.0)
    r = imitkd.rollout
    assert (r.top_k, r.temperature, r.cfg_scale, r.null_fraction) == (5, 1.0, 1.0, 0.1)
    assert (gkd.mixture.granularity, gkd.mixture.schedule, gkd.mixture.lmbda) == ("step", "constant", 0.5)
    with pytest.raises(ConfigError, match="mixture.granularity='row'"):
        structured(MethodConfig, {"mixture": {"granularity": "row"}}, "m")
    with pytest.raises(ConfigError, match="mixture.exp_base must be > 1"):
        structured(MethodConfig, {"mixture": {"exp_base": 1.0}}, "m")
    with pytest.raises(ConfigError, match="init_threshold"):
        structured(MethodConfig, {"adaptive": {"init_threshold": 1.5}}, "m")


@pytest.mark.slow
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


ABLATIONS = ["varkd", "varkd_summary", "varkd_no_selective", "varkd_no_reweight", "varkd_no_clusters", "varkd_gt_data",
             "varkd_ar_rollouts"]


def test_ablation_presets_change_one_component_of_varkd(study_dict):
    study = Study.load({**study_dict, "ablations": ABLATIONS})
    varkd = study.methods["varkd"]
    term = varkd.terms[0]
    assert term.data == "mixed" and term.weighting.selector != "none" and term.weighting.reweight != "none"
    assert (varkd.mixture.granularity, varkd.mixture.schedule) == ("sequence", "linear")  # the search's winner
    assert term.cluster_weight > 0 and varkd.clusters > 0 and varkd.rollout.sampler == "sjd"
    changed = {
        "varkd_no_selective": lambda m: m.terms[0].weighting.selector == "none",
        "varkd_no_reweight": lambda m: m.terms[0].weighting.reweight == "none",
        "varkd_no_clusters": lambda m: m.terms[0].cluster_weight == 0 and m.clusters == 0,
        "varkd_summary": lambda m: m.terms[0].data == "student",  # the first reading: student contexts only
        "varkd_gt_data": lambda m: m.terms[0].data == "ground_truth",
        "varkd_ar_rollouts": lambda m: m.rollout.sampler == "ar",
    }
    for name, check in changed.items():
        method = study.methods[name]
        assert check(method) and not check(varkd), name
        diff = [k for k in ("terms", "clusters", "rollout") if getattr(method, k) != getattr(varkd, k)]
        assert len(diff) == 1 or name == "varkd_no_clusters", (name, diff)  # no_clusters also drops k
    job = study.jobs["results/embedded/tiny/varkd/seed0/config.yaml"]
    assert job.clusters == "results/embedded/data/clusters/k16.npy" and job.teacher is not None
    assert study.jobs["results/embedded/data/clusters/k16.yaml"].num_clusters == 16
    gt = study.jobs["results/embedded/tiny/varkd_gt_data/seed0/config.yaml"]
    assert gt.teacher is None and gt.teacher_logits is not None  # ground truth: cached logits only


def test_derived_presets_fail_on_unknown_keys_and_cycles(study_dict, presets):
    methods = presets / "methods"
    (methods / "bad.yaml").write_text("base: varkd\nset: {terms.0.weighting.treshold: 0.2}\n")
    with pytest.raises(ConfigError, match="bad.yaml: key 'terms.0.weighting.treshold' does not exist"):
        Study.load({**study_dict, "ablations": ["bad"]})
    (methods / "bad.yaml").write_text("base: bad2\n")
    (methods / "bad2.yaml").write_text("base: bad\n")
    with pytest.raises(ConfigError, match="derives from itself"):
        Study.load({**study_dict, "ablations": ["bad"]})
    (methods / "bad.yaml").write_text("base: varkd\nset: {terms.0.weighting.selector: always}\n")
    with pytest.raises(ConfigError, match="bad.yaml.*selector='always'"):
        Study.load({**study_dict, "ablations": ["bad"]})
    (methods / "bad.yaml").write_text("base: varkd\nset: {terms.0.cluster_weight: 0.5, clusters: 0}\n")
    with pytest.raises(ConfigError, match="clusters must be > 0"):
        Study.load({**study_dict, "ablations": ["bad"]})


@pytest.mark.slow
def test_sweeps_make_named_runs_on_their_backbones(study_dict):
    sweeps = [{"method": "varkd", "key": "clusters", "name": "k", "values": [4, 64], "backbones": ["tiny"]},
              {"method": "varkd", "key": "rollout.window", "name": "window", "values": [2]}]
    study = Study.load({**study_dict, "ablations": ["varkd"], "sweeps": sweeps})
    assert study.table_methods("ablations") == ["varkd", "varkd-k4", "varkd-k64", "varkd-window2"]
    runs = {(r.backbone, r.method) for r in study.runs(study.table_methods("ablations"))}
    assert ("tiny", "varkd-k4") in runs and ("tiny_shallow", "varkd-k4") not in runs
    assert ("tiny_shallow", "varkd-window2") in runs
    assert study.methods["varkd-k64"].clusters == 64 and study.methods["varkd-window2"].rollout.window == 2
    assert study.jobs["results/embedded/tiny/varkd-k64/seed0/config.yaml"].clusters.endswith("clusters/k64.npy")
    bad = [{**sweeps[1], "values": [4]}]
    with pytest.raises(ConfigError, match="rollout.window=4 is the preset's own value"):
        Study.load({**study_dict, "sweeps": bad})
    with pytest.raises(ConfigError, match="key 'rollout.windw' does not exist"):
        Study.load({**study_dict, "sweeps": [{**sweeps[1], "key": "rollout.windw"}]})
    with pytest.raises(ConfigError, match="backbones \\['huge'\\]"):
        Study.load({**study_dict, "sweeps": [{**sweeps[0], "backbones": ["huge"]}]})


def test_hard_label_terms_take_no_weighting():
    with pytest.raises(ConfigError, match="divergence=ce uses hard labels"):
        TermConfig(divergence="ce", cluster_weight=0.5)
    with pytest.raises(ConfigError, match="weighting.selector='sometimes'"):
        TermConfig(weighting=WeightingConfig(selector="sometimes"))


def test_sampling_sections_check_their_four_fields_in_one_place_and_hand_them_on_whole(tmp_path):
    """sample, rollout and diagnose carry cfg_scale / temperature / top_k / top_p at their own keys; `sampling`
    gives them to the decoders as one Sampling, whose check names the section. Greedy decoding (temperature 0) is
    a valid evaluation or diagnosis sampler, but not a rollout: it would draw one sequence per class."""
    for section, schema in (("sample", SampleConfig), ("rollout", RolloutConfig), ("diagnose", DiagnoseConfig)):
        assert schema(cfg_scale=2.0, temperature=0.5, top_k=3, top_p=0.9).sampling == Sampling(2.0, 0.5, 3, 0.9)
        for bad in (dict(cfg_scale=0.5), dict(temperature=-1.0), dict(top_k=-1), dict(top_p=0.0), dict(top_p=1.5)):
            with pytest.raises(ConfigError, match=f"^{section} needs cfg_scale >= 1, temperature >= 0"):
                schema(**bad)
    assert SampleConfig(temperature=0.0).sampling.temperature == DiagnoseConfig(temperature=0.0).temperature == 0
    with pytest.raises(ConfigError, match="rollout needs temperature > 0: greedy"):
        RolloutConfig(temperature=0.0)
    with pytest.raises(ValueError, match="needs cfg_scale >= 1.*got Sampling\\(cfg_scale=0.5"):
        Sampling(cfg_scale=0.5)
    # a job read back from its YAML file hands its section's settings on the same way
    (tmp_path / "job.yaml").write_text(to_yaml(SampleJob(sample=SampleConfig(cfg_scale=1.5, top_k=7), checkpoint="c",
                                                         tokenizer="t", out_dir="o")))
    assert load_job(SampleJob, tmp_path / "job.yaml").sample.sampling == Sampling(cfg_scale=1.5, top_k=7)


def test_full_embedded_study_overrides_only_the_budget(capsys):
    """config/embedded-full.yaml: the default methods on one backbone with 3 seeds and a larger budget."""
    default_path, full_path = REPO / "config" / "config.yaml", REPO / "config" / "embedded-full.yaml"
    assert cli.main(["check-config", str(default_path), str(full_path)]) == 0
    assert "study 'embedded-full': 48 runs" in capsys.readouterr().out  # 9 baselines + 7 VarKD presets, x 3 seeds
    default, full = yaml.safe_load(default_path.read_text()), yaml.safe_load(full_path.read_text())
    assert set(full) == {"study", "backbones", "sweeps", "seeds", "student_optim"} and len(full["seeds"]) == 3
    assert full["student_optim"]["steps"] > default["student_optim"]["steps"]


def test_distillm_tuning_study_sweeps_both_thresholds_around_the_preset(capsys):
    """config/tune-distillm.yaml: DistiLLM alone on one backbone, init_threshold and loss_eps each swept around the
    preset's values, 2 seeds; every run logs val_nll often enough to plot beside tau_a."""
    default_path, tune_path = REPO / "config" / "config.yaml", REPO / "config" / "tune-distillm.yaml"
    assert cli.main(["check-config", str(default_path), str(tune_path)]) == 0
    assert "study 'tune-distillm': 12 runs" in capsys.readouterr().out  # (1 preset + 5 swept values) x 2 seeds
    study = Study.load(OmegaConf.merge(OmegaConf.load(default_path), OmegaConf.load(tune_path)))  # as Snakemake
    assert (study.name, study.cfg.backbones, study.cfg.methods, study.cfg.baselines, study.cfg.ablations) == (
        "tune-distillm", ["tiny"], ["distillm"], ["distillm"], [])
    preset = study.methods["distillm"].adaptive
    points = study.sweep_points(study.table_methods("ablations"))
    for key, name in (("init_threshold", "init"), ("loss_eps", "eps")):
        values = sorted(p["value"] for p in points if p["sweep"] == name)
        own = getattr(preset, key)
        assert own in values and min(values) <= own <= max(values) and len(values) >= 3, key
        for p in points:
            if p["sweep"] == name:
                assert getattr(study.methods[p["method"]].adaptive, key) == p["value"]
    preset_text = (REPO / "config/methods/distillm.yaml").read_text()
    assert study.cfg.student_optim.eval_every > 0 and "TUNED on the validation split" in preset_text


@pytest.mark.slow
def test_every_run_starts_from_its_backbones_pretrained_student(study_dict):
    study = Study.load(study_dict)
    for backbone in study_dict["backbones"]:
        init = study.jobs[f"results/embedded/{backbone}/student_init/config.yaml"]
        assert init.kd.terms[0].divergence == "ce" and init.model == study.backbones[backbone].student
        run = study.jobs[f"results/embedded/{backbone}/fkl/seed0/config.yaml"]
        assert run.init == f"results/embedded/{backbone}/student_init/student.pt" and run.init in run.inputs()
    assert "results/embedded/tiny/student_init/metrics.json" in study.metrics_files(["ce"])  # a reference row
    from_init = [m for m in study_dict["baselines"] if m != "distillm2"]  # its student pool is drawn from the init
    scratch = Study.load({**study_dict, "student_pretrain": None, "baselines": from_init})
    assert scratch.jobs["results/embedded/tiny/fkl/seed0/config.yaml"].init is None
    assert not any("student_init" in path for path in scratch.jobs)


def test_resources_of_an_unknown_rule_fail(study_dict):
    study_dict["resources"] = {"train_studnet": {"gpu": 1}, "sample": {"gpu": 1, "runtime": 30}}
    study = Study.load(study_dict)
    assert study.resources("sample").gpu == 1 and study.resources("evaluate").gpu == 0  # defaults elsewhere
    with pytest.raises(ConfigError, match="train_studnet"):
        study.check_resource_rules(["train_student", "sample", "evaluate"])


@pytest.mark.slow
def test_sweep_points_place_each_run_and_the_preset_on_the_axis(study_dict):
    sweeps = [{"method": "varkd", "key": "clusters", "name": "k", "values": [4, 64], "backbones": ["tiny"]}]
    study = Study.load({**study_dict, "ablations": ["varkd"], "sweeps": sweeps})
    assert study.sweep_points(study.table_methods("ablations")) == [
        {"sweep": "k", "backbone": "tiny", "method": m, "value": v} for m, v in (("varkd", 16), ("varkd-k4", 4),
                                                                                  ("varkd-k64", 64))]
    assert study.sweep_points(study.table_methods("main")) == []
    assert "results/embedded/plots/ablations_sweeps.pdf" in study.figures("ablations")
    assert "results/embedded/plots/main_metrics.png" in study.figures("main")
    assert not [f for f in study.figures("main") if "sweeps" in f]
    with pytest.raises(ConfigError, match="sweep names \\['k', 'k'\\] repeat"):
        Study.load({**study_dict, "sweeps": sweeps + [{**sweeps[0], "key": "rollout.window", "values": [8]}]})


def test_config_checks_names_against_the_lists_their_modules_own():
    """The divergences, SJD inits and replay ratios a config accepts are the implementing module's own lists."""
    assert config.DIVERGENCES == ("ce", *losses.DIVERGENCES)
    for init in sjd.INITS:
        assert RolloutConfig(init=init).init == init
    for ratio in schedules.REPLAY_RATIOS:
        assert AdaptiveConfig(replay_ratio=ratio).replay_ratio == ratio
    with pytest.raises(ConfigError, match="rollout.init"):
        RolloutConfig(init="zeros")


def test_config_checks_selectors_and_scores_against_the_list_weighting_computes():
    """The selectors and scores a config accepts are varkd.selection's, the names varkd.weighting computes."""
    assert config.SELECTORS is selection.SELECTORS and config.REWEIGHTS is selection.REWEIGHTS
    assert config.SPACES is selection.SPACES and config.NORMALIZATIONS is selection.NORMALIZATIONS
    names = {"space": selection.SPACES, "normalize": selection.NORMALIZATIONS, "selector": selection.SELECTORS,
             "reweight": selection.REWEIGHTS}
    for field, values in names.items():
        for value in values:
            assert getattr(WeightingConfig(**{field: value}), field) == value
    for field in ("selector", "reweight"):
        with pytest.raises(ConfigError, match=f"weighting.{field}"):
            WeightingConfig(**{field: "margin"})
