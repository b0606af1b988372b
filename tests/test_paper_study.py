"""The paper-scale study (config/imagenet.yaml): its DAG builds without any of its files, and a run without them
stops before any job with one message naming every missing file."""
from collections import Counter
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from tests.helpers import random_state, save, snakemake, vq16_shapes
from varkd.config import ConfigError, GatherSamplesJob, ImportGPTJob, ImportTokenizerJob, SampleJob, TrainJob
from varkd.study import Study


def paper_study(presets: Path, *overlays: str, **keys) -> Study:
    files = [presets / "config.yaml", *(presets / name for name in overlays)]
    data = OmegaConf.merge(*(OmegaConf.load(f) for f in files), {"presets": str(presets), **keys})
    return Study.load(data, "paper study")


@pytest.fixture(autouse=True)
def no_paper_data(monkeypatch, tmp_path):
    monkeypatch.setenv("VARKD_PAPER_DATA", str(tmp_path / "paper-data"))


def test_imagenet_study_imports_the_released_models(presets, tmp_path):
    study = paper_study(presets, "imagenet.yaml")
    kinds = Counter(type(job).__name__ for job in study.jobs.values())
    # + 3 pools: seqkd's and distillm2's of the teacher, distillm2's of the student init
    assert kinds["CodeShardJob"] == study.cfg.codes.num_shards + 2 * study.cfg.codes.heldout_shards
    assert kinds["GatherCodesJob"] == 3 + 3  # train, val, test
    search = sum(len(study.search_runs(i)) for i in range(len(study.cfg.search.stages)))
    runs = 17 + search  # 15 runs + teacher + student init, and the search's candidates at each stage
    assert kinds["SampleJob"] == 8 * runs and kinds["GatherSamplesJob"] == runs
    # the embedded study's search candidates, unchanged but for the GPU's rollouts and the budget
    first = study.jobs[f"{study.run_dir(study.search_runs(0)[0])}/config.yaml"]
    assert (first.kd.rollout.sampler, first.kd.rollout.window, first.optim.steps) == ("sjd", 16, 2000)
    assert study.search_optim(1).steps == study.cfg.student_optim.steps
    assert "PrepareDataJob" not in kinds and "ClassifierJob" not in kinds and "TeacherLogitsJob" not in kinds
    root, data = "results/imagenet/llamagen_L_B", tmp_path / "paper-data"
    teacher, init = study.jobs[f"{root}/teacher/config.yaml"], study.jobs[f"{root}/student_init/config.yaml"]
    assert teacher == ImportGPTJob(size="GPT-L", image_size=256, path=f"{data}/llamagen/c2i_L_256.pt",
                                   out=f"{root}/teacher/teacher.pt")
    assert (init.size, init.path) == ("GPT-B", f"{data}/llamagen/c2i_B_256.pt")
    assert study.jobs["results/imagenet/data/tokenizer/config.yaml"] == ImportTokenizerJob(
        name="VQ-16", path=f"{data}/llamagen/vq_ds16_c2i.pt", out="results/imagenet/data/tokenizer/tokenizer.pt")
    shard = study.jobs["results/imagenet/data/codes/train/shards/shard3.yaml"]
    assert (shard.augment, shard.shard, shard.num_shards, shard.image_size) == ("tencrop", 3, 64, 256)
    assert study.jobs["results/imagenet/data/codes/val/shards/shard0.yaml"].augment == "none"

    # ground-truth KD and teacher pools run the teacher live: no cache of 1.28M x 256 x 16,384 logits
    for method in ("fkl", "seqkd", "varkd"):
        run: TrainJob = study.jobs[f"{root}/{method}/seed0/config.yaml"]
        assert run.teacher == f"{root}/teacher/teacher.pt" and run.teacher_logits is None, method
        assert run.init == f"{root}/student_init/student.pt" and run.model.dim == 768 and run.model.block_size == 256
        assert run.optim.compile and run.optim.grad_accum == 2
    assert not study.jobs[f"{root}/seqkd/seed0/config.yaml"].pool_logits
    pool = study.jobs[f"{root}/seqkd/seed0/config.yaml"].teacher_pool
    gather = study.jobs[f"{pool}/config.yaml"]  # 32 shard jobs draw the 1.28M-sample pool, one gathers it
    assert gather.out_dir == pool and len(gather.shards) == 32
    assert study.jobs[gather.shards[31].replace(".npz", ".yaml")].shard == 31
    # seqkd's pool is drawn as the teacher is evaluated: the backbone's teacher CFG scale, else sample.cfg_scale
    bb = study.backbones["llamagen_L_B"]
    cfg_scale = study.cfg.sample.cfg_scale if bb.teacher_cfg_scale is None else bb.teacher_cfg_scale
    assert study.jobs[gather.shards[0].replace(".npz", ".yaml")].rollout.cfg_scale == cfg_scale
    student_pool = study.jobs[f"{root}/distillm2/seed0/config.yaml"].student_pool
    shard = study.jobs[study.jobs[f"{student_pool}/config.yaml"].shards[0].replace(".npz", ".yaml")]
    assert student_pool.startswith(f"{root}/student_init/pool_") and shard.model == f"{root}/student_init/student.pt"
    assert not shard.logits
    # the study's method override reaches VarKD and the ablations derived from it
    assert study.methods["varkd"].rollout.window == 16 and study.methods["varkd_no_clusters"].rollout.window == 16
    assert study.methods["varkd_ar_rollouts"].rollout.sampler == "ar"

    sample: SampleJob = study.jobs[f"{root}/teacher/samples/shard7.yaml"]
    assert (sample.shard, sample.sample.num_samples, sample.sample.cfg_scale) == (7, 50000, 2.0)
    gather: GatherSamplesJob = study.jobs[f"{root}/varkd/seed0/samples/gather.yaml"]
    assert gather.shards == [f"{root}/varkd/seed0/samples/shard{i}.npz" for i in range(8)]
    evaluate = study.jobs[f"{root}/varkd/seed0/evaluate.yaml"]
    assert evaluate.classifier is None
    assert evaluate.evaluate.reference_batch == f"{data}/VIRTUAL_imagenet256_labeled.npz"
    # the reference batch's features, extracted once, stand for both splits
    reference = "results/imagenet/data/real_features/reference.npz"
    assert evaluate.real_features == {"test": reference, "val": reference}
    features = study.jobs[reference.replace(".npz", ".yaml")]
    assert features.images is None and features.evaluate.reference_batch == evaluate.evaluate.reference_batch
    assert [p for p in study.jobs if "real_features" in p] == [reference.replace(".npz", ".yaml")]
    assert "results/imagenet/real/metrics.json" not in study.metrics_files()  # no in-memory held-out split
    # files the workflow does not make are not job inputs (a dry run works without them)
    assert all(p not in job.inputs() or p in study.external for job in study.jobs.values() for p in study.external)
    assert f"{data}/llamagen/c2i_L_256.pt" not in study.job_inputs(f"{root}/teacher/config.yaml")


def test_missing_files_are_listed_together_and_found_when_present(presets, tmp_path):
    study = paper_study(presets, "imagenet.yaml")
    missing = study.missing_files()
    data = tmp_path / "paper-data"
    expected = ["llamagen/c2i_L_256.pt", "llamagen/c2i_B_256.pt", "llamagen/vq_ds16_c2i.pt",
                "weights-inception-2015-12-05-6726825d.pth", "VIRTUAL_imagenet256_labeled.npz", "imagenet/train",
                "imagenet/val"]
    assert [line.split(": ")[0] for line in missing] == [f"{data}/{name}" for name in expected]
    assert "huggingface.co/FoundationVision/LlamaGen/resolve/main/c2i_L_256.pt" in missing[0]
    assert "torch-fidelity" in missing[3] and "guided-diffusion" in missing[4] and "ILSVRC2012" in missing[5]
    for name in expected:
        path = data / name
        if "." in path.name:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.touch()
        else:
            path.mkdir(parents=True)
    assert study.missing_files() == []


@pytest.mark.slow
def test_384px_pairs_and_unreleased_sizes(presets):
    study = paper_study(presets, "imagenet.yaml", "imagenet-384.yaml")
    xl = study.jobs["results/imagenet-384/llamagen_XL_B/teacher/config.yaml"]
    assert (xl.size, Path(xl.path).name, xl.image_size) == ("GPT-XL", "c2i_XL_384.pt", 384)
    run = study.jobs["results/imagenet-384/llamagen_XL_B/varkd/seed0/config.yaml"]
    assert run.model.block_size == 576 and run.optim.grad_accum == 4
    teacher_sample = study.jobs["results/imagenet-384/llamagen_XL_B/teacher/samples/shard0.yaml"]
    assert teacher_sample.sample.cfg_scale == 1.75 and teacher_sample.sample.resize_to == 256
    with pytest.raises(ConfigError, match=r"teacher_pretrained=GPT-XL has no released c2i file for data.image_size=256"):
        paper_study(presets, "imagenet.yaml", backbones=["llamagen_XL_B"])


@pytest.mark.parametrize("keys, message", [
    ({"evaluate": {"reference_batch": None}}, "evaluate.reference_batch"),
    ({"tokenizer": {"pretrained": None}}, "tokenizer.pretrained"),
    ({"checkpoints": None}, "set checkpoints"),
    ({"evaluate": {"weights": None}}, "set evaluate.weights"),
    ({"method_overrides": {"varkdd": {"rollout.window": 8}}}, "method_overrides names no preset"),
    ({"method_overrides": {"varkd": {"rollout.windw": 8}}}, "rollout.windw"),
    ({"cache_teacher_logits": True}, "a sharded pool stores no logits"),
])
def test_paper_scale_misconfigurations_name_the_key(presets, keys, message):
    with pytest.raises(ConfigError, match=message):
        paper_study(presets, "imagenet.yaml", **keys)


@pytest.mark.slow
def test_workflow_dry_run_builds_the_paper_dag_and_a_run_stops_before_any_job(presets):
    workdir = presets.parent
    out = snakemake(workdir, "-n", "all_ablations", "--configfile", str(presets / "imagenet.yaml")).stdout
    stats = dict(line.split() for line in out.split("Job stats:")[1].split("\n\n")[0].splitlines()[3:])
    for rule, count in {"import_tokenizer": 1, "import_teacher": 1, "import_student": 1, "index_images": 3,
                        "extract_code_shard": 64 + 2 * 2, "gather_codes": 3, "train_student": 15,
                        "sample_shard": 136, "gather_samples": 17, "evaluate": 17, "noise_floor": 1,
                        "diagnose": 16, "aggregate": 3, "pool_shard": 96, "gather_pool": 3}.items():
        assert int(stats[rule]) == count, rule
    for rule in ("train_teacher", "pretrain_student", "prepare_data", "train_classifier", "evaluate_real"):
        assert rule not in stats, rule

    result = snakemake(workdir, "all_ablations", "--configfile", str(presets / "imagenet.yaml"), check=False)
    assert result.returncode != 0
    message = result.stdout + result.stderr
    assert "7 local file(s) missing, nothing was run" in message
    for name in ("c2i_L_256.pt", "c2i_B_256.pt", "vq_ds16_c2i.pt", "weights-inception-2015-12-05-6726825d.pth",
                 "VIRTUAL_imagenet256_labeled.npz", "imagenet/train", "imagenet/val"):
        assert name in message, name
    assert not (workdir / "results" / "imagenet").exists()


@pytest.mark.slow
def test_workflow_extracts_imagenet_codes_in_shards(presets, tmp_path, monkeypatch):
    """The paper-scale data rules for real: the released tokenizer imported (VQ-16 layout, random weights), a tiny
    ImageFolder tree indexed (val/ split into val and test), ten-crop codes extracted by 2 shard jobs per split and
    gathered into code sets."""
    import numpy as np
    from PIL import Image

    from varkd.codes import load_code_set

    data = tmp_path / "paper-data"
    rng = np.random.default_rng(0)
    for split, per_class in (("train", 1), ("val", 2)):  # one train image per shard job: 10 crops of 256 px
        for name in ("n01", "n02"):
            folder = data / "imagenet" / split / name
            folder.mkdir(parents=True)
            for i in range(per_class):
                pixels = rng.integers(0, 256, (260 + 10 * i, 300, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.JPEG")
    (data / "llamagen").mkdir()
    save(data / "llamagen" / "vq_ds16_c2i.pt", random_state(vq16_shapes()))
    for name in ("llamagen/c2i_L_256.pt", "llamagen/c2i_B_256.pt", "weights-inception-2015-12-05-6726825d.pth",
                 "VIRTUAL_imagenet256_labeled.npz"):
        (data / name).touch()  # present (the check is for presence); these targets do not read them
    (presets / "small.yaml").write_text("codes: {num_shards: 2, heldout_shards: 2, batch_size: 10}\n"
                                        "data: {val_per_class: 1, test_per_class: 1}\n")
    targets = [f"results/imagenet/data/codes/{split}/codes.npy" for split in ("train", "val", "test")]
    snakemake(presets.parent, *targets, "--configfile", str(presets / "imagenet.yaml"), str(presets / "small.yaml"))
    train = load_code_set(presets.parent / "results/imagenet/data/codes/train")
    val, test = (load_code_set(presets.parent / f"results/imagenet/data/codes/{s}") for s in ("val", "test"))
    assert (train.N, train.A, train.T) == (2, 10, 256) and (val.N, val.A, val.T) == (test.N, test.A, test.T) == (2, 1, 256)
    assert train.labels.tolist() == [0, 1] and val.labels.tolist() == test.labels.tolist() == [0, 1]
    assert not np.array_equal(val.codes, test.codes)  # each class's first image, then its second
    assert len(list((presets.parent / "results/imagenet/data/codes/train/shards").glob("shard*.npz"))) == 2
