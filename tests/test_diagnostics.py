"""Mechanism diagnostics (varkd.diagnostics): per-position statistics against a brute-force float64 reference on a
tiny random teacher / student pair, the output file, reruns, and bad input."""
import dataclasses
import math

import numpy as np
import pandas as pd
import pytest
import torch
from omegaconf import OmegaConf

from tests.helpers import TINY
from varkd import cli, tables
from varkd.checkpoints import load_gpt, save_model
from varkd.codes import load_code_set, save_code_set
from varkd.config import ConfigError, DiagnoseConfig, DiagnoseJob, load_job, to_yaml
from varkd.diagnostics import COLUMNS, CONTEXTS, QUANTITIES, context_batches, per_position, sequence_rows
from varkd.models.gpt import GPT, GPTConfig
from varkd.steps.diagnose import diagnose
from varkd.study import Study

SEED = 5


def random_gpt(path, seed: int, **overrides) -> str:
    """A GPT with random weights large enough for distinct, far from uniform distributions (the LlamaGen init
    zeroes the output layer: every token would tie)."""
    torch.manual_seed(seed)
    config = GPTConfig(**{**TINY, **overrides})
    model = GPT(config)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.3)
    save_model(path, model, config)
    return str(path)


@pytest.fixture
def pair(tmp_path):
    return (random_gpt(tmp_path / "teacher.pt", 0, dim=32), random_gpt(tmp_path / "student.pt", 1, dim=16, n_layer=1))


def make_job(codes, pair, out, **diagnose) -> DiagnoseJob:
    cfg = DiagnoseConfig(**{"num_sequences": 10, "batch_size": 4, "teacher_precision": "fp32", **diagnose})
    return DiagnoseJob(diagnose=cfg, teacher=pair[0], student=pair[1], codes_val=str(codes / "val"), seed=SEED,
                       identity={"backbone": "tiny", "method": "fkl", "seed": 2}, out=str(out))


def brute_force(teacher: GPT, student: GPT, sequences: torch.Tensor, labels: torch.Tensor) -> dict:
    """quantity -> per sequence, per position value, from each prefix's own forward pass and loops over the
    vocabulary in float64 (math on Python floats)."""
    values = {q: [] for q in QUANTITIES}
    for x, y in zip(sequences.tolist(), labels.tolist()):
        rows = {q: [] for q in QUANTITIES}
        for n in range(len(x)):
            prefix = torch.tensor([x[:n]], dtype=torch.long)
            with torch.no_grad():
                lt = teacher(prefix, torch.tensor([y]))[0, -1].tolist()
                ls = student(prefix, torch.tensor([y]))[0, -1].tolist()
            zt = math.log(sum(math.exp(v - max(lt)) for v in lt)) + max(lt)
            zs = math.log(sum(math.exp(v - max(ls)) for v in ls)) + max(ls)
            p = [math.exp(v - zt) for v in lt]
            q = [math.exp(v - zs) for v in ls]
            token = x[n]
            rows["teacher_nll"].append(-(lt[token] - zt))
            rows["teacher_entropy"].append(-sum(p[v] * (lt[v] - zt) for v in range(len(p))))
            rows["teacher_confidence"].append(max(p))
            rows["acceptance"].append(min(1.0, p[token] / q[token]))
            rows["top1_agreement"].append(float(p.index(max(p)) == q.index(max(q))))
            rows["forward_kl"].append(sum(p[v] * ((lt[v] - zt) - (ls[v] - zs)) for v in range(len(p))))
        for quantity, row in rows.items():
            values[quantity].append(row)
    return values


def mean_and_se(per_sequence: list[list[float]], position: int) -> tuple[float, float]:
    column = [row[position] for row in per_sequence]
    n = len(column)
    mean = sum(column) / n
    sd = math.sqrt(sum((v - mean) ** 2 for v in column) / (n - 1))
    return mean, sd / math.sqrt(n)


def test_statistics_equal_a_brute_force_float64_computation_in_both_contexts(codes, pair, tmp_path):
    job = make_job(codes, pair, tmp_path / "diagnostics.csv")
    frame = diagnose(job)
    teacher, student = load_gpt(pair[0]), load_gpt(pair[1])
    val = load_code_set(job.codes_val)
    batches = list(context_batches(val, student, job.diagnose, job.seed, torch.device("cpu")))
    assert [len(y) for y, _ in batches] == [4, 4, 2]  # batch_size bounds each forward
    labels = torch.cat([y for y, _ in batches])
    rows = sequence_rows(val.N, 10, SEED)
    assert len(set(rows)) == 10 and torch.equal(labels, val.labels[rows])  # held-out rows and their own labels
    ground_truth = torch.cat([contexts["ground_truth"] for _, contexts in batches])
    assert torch.equal(ground_truth, val.batch(rows))
    for context in CONTEXTS:
        sequences = torch.cat([contexts[context] for _, contexts in batches])
        if context == "student":  # the student's samples for the same labels, not the held-out rows
            assert (sequences != ground_truth).any(1).all()
        reference = brute_force(teacher, student, sequences, labels)
        shown = frame[frame["context"] == context].set_index(["quantity", "position"])
        for quantity in QUANTITIES:
            for position in range(16):
                mean, se = mean_and_se(reference[quantity], position)
                row = shown.loc[(quantity, position)]
                assert row["n"] == 10
                assert row["mean"] == pytest.approx(mean, abs=2e-5, rel=1e-5), (context, quantity, position)
                assert row["se"] == pytest.approx(se, abs=2e-5, rel=1e-4), (context, quantity, position)
    # the quantities are not degenerate on this pair: the check above compares numbers that vary
    spread = frame.groupby("quantity")["mean"].std()
    assert (spread[["teacher_nll", "teacher_entropy", "forward_kl", "acceptance"]] > 0.01).all()


def test_bf16_teacher_is_the_training_forward_and_close_to_fp32(codes, pair, tmp_path):
    fp32 = diagnose(make_job(codes, pair, tmp_path / "fp32.csv"))
    bf16 = diagnose(make_job(codes, pair, tmp_path / "bf16.csv", teacher_precision="bf16"))
    assert (fp32["quantity"] == bf16["quantity"]).all() and (fp32["position"] == bf16["position"]).all()
    continuous = ~fp32["quantity"].isin(["top1_agreement"])
    assert np.allclose(bf16.loc[continuous, "mean"], fp32.loc[continuous, "mean"], atol=0.05, rtol=0.05)
    assert not np.array_equal(bf16["mean"], fp32["mean"])  # the precision setting reaches the teacher's forward


def test_output_file_has_the_promised_shape_and_reruns_bit_identically(codes, pair, tmp_path):
    job = make_job(codes, pair, tmp_path / "a" / "diagnostics.csv", num_sequences=500)  # more than the 24 rows
    (tmp_path / "job.yaml").write_text(to_yaml(job))
    assert cli.main(["diagnose", str(tmp_path / "job.yaml")]) == 0
    frame = pd.read_csv(job.out)
    assert list(frame.columns) == COLUMNS
    assert len(frame) == len(CONTEXTS) * len(QUANTITIES) * 16
    assert (frame[["backbone", "method", "seed"]] == ["tiny", "fkl", 2]).all().all()
    assert (frame["n"] == 24).all()  # every held-out row when there are fewer than num_sequences
    assert frame.groupby(["context", "quantity"])["position"].apply(list).map(lambda p: p == list(range(16))).all()
    assert frame[["mean", "se"]].notna().all().all() and (frame["se"] >= 0).all()
    bounded = frame[frame["quantity"].isin(["teacher_confidence", "acceptance", "top1_agreement"])]["mean"]
    assert bounded.between(0, 1).all()
    assert (frame.loc[frame["quantity"] == "forward_kl", "mean"] >= 0).all()
    assert not list((tmp_path / "a").glob(".*tmp*"))  # written atomically: no temporary file left

    again = make_job(codes, pair, tmp_path / "b" / "diagnostics.csv", num_sequences=500)
    diagnose(again)
    assert (tmp_path / "a" / "diagnostics.csv").read_bytes() == (tmp_path / "b" / "diagnostics.csv").read_bytes()
    other = diagnose(dataclasses.replace(again, seed=SEED + 1, out=str(tmp_path / "c.csv")))
    student = other["context"] == "student"
    assert not np.array_equal(other.loc[student, "mean"], frame.loc[student, "mean"])  # the seed draws the samples


def test_bad_input_fails_before_compute_naming_the_file(codes, pair, tmp_path, capsys):
    wide = random_gpt(tmp_path / "wide_vocab.pt", 2, vocab_size=32)
    job = make_job(codes, (wide, pair[1]), tmp_path / "out.csv")
    with pytest.raises(ValueError, match="wide_vocab.pt has vocab_size=32.*student.pt"):
        diagnose(job)
    (tmp_path / "job.yaml").write_text(to_yaml(job))
    assert cli.main(["diagnose", str(tmp_path / "job.yaml")]) == 2
    assert "wide_vocab.pt" in capsys.readouterr().err

    rng = np.random.default_rng(0)  # codes of a 32-entry codebook against 16-token models
    save_code_set(tmp_path / "big", rng.integers(0, 32, (8, 1, 16)), rng.integers(0, 3, 8), vocab_size=32)
    job = make_job(codes, pair, tmp_path / "out.csv")
    job.codes_val = str(tmp_path / "big")
    with pytest.raises(ValueError, match=f"code set {tmp_path / 'big'}: codes span .* vocab_size=16"):
        diagnose(job)
    assert not (tmp_path / "out.csv").exists()

    with pytest.raises(ConfigError, match="identity lacks"):
        DiagnoseJob(identity={"backbone": "tiny"})
    (tmp_path / "bad.yaml").write_text(to_yaml(make_job(codes, pair, tmp_path / "out.csv")).replace(
        "num_sequences", "num_sequence"))
    with pytest.raises(ConfigError, match="num_sequence"):
        load_job(DiagnoseJob, tmp_path / "bad.yaml")


def test_the_study_diagnoses_each_student_init_and_each_methods_first_seed(study_dict, presets, tmp_path):
    study_dict.update(seeds=[3, 1], diagnose={"num_sequences": 64, "batch_size": 32})
    study = Study.load(study_dict)
    jobs = {path: job for path, job in study.jobs.items() if isinstance(job, DiagnoseJob)}
    root = "results/embedded"
    expected = {f"{root}/{b}/student_init/diagnose.yaml" for b in study_dict["backbones"]}
    expected |= {f"{study.run_dir(r)}/diagnose.yaml" for r in study.runs() if r.seed == 3}
    assert set(jobs) == expected
    init, run = jobs[f"{root}/tiny_shallow/student_init/diagnose.yaml"], jobs[f"{root}/tiny_shallow/fkl/seed3/diagnose.yaml"]
    assert init.teacher == run.teacher == f"{root}/tiny/teacher/teacher.pt"  # tiny_shallow borrows tiny's teacher
    assert (init.student, init.out) == (f"{root}/tiny_shallow/student_init/student.pt",
                                        f"{root}/tiny_shallow/student_init/diagnostics.csv")
    assert init.identity == {"backbone": "tiny_shallow", "method": "student_init", "seed": 0}
    assert run.identity == {"backbone": "tiny_shallow", "method": "fkl", "seed": 3}
    assert {job.seed for job in jobs.values()} == {3}  # every student on the same rows and random stream
    assert run.diagnose.num_sequences == 64 and run.codes_val == f"{root}/data/codes/val"
    assert study.job_inputs(f"{root}/tiny_shallow/fkl/seed3/diagnose.yaml") == [
        run.teacher, run.student, f"{root}/data/codes/val/codes.npy", f"{root}/data/codes/val/labels.npy"]
    (tmp_path / "job.yaml").write_text(study.job_text(f"{root}/tiny_shallow/fkl/seed3/diagnose.yaml"))
    assert load_job(DiagnoseJob, tmp_path / "job.yaml") == run
    files = study.diagnostics_files(study_dict["methods"])
    assert files == [f"{root}/{b}/student_init/diagnostics.csv" for b in study_dict["backbones"]] + [
        f"{root}/{b}/{m}/seed3/diagnostics.csv" for b in study_dict["backbones"] for m in study_dict["methods"]]
    assert all(f.replace("diagnostics.csv", "diagnose.yaml") in jobs for f in study.diagnostics_files())

    study_dict["diagnose"]["top_p"] = 0.0
    with pytest.raises(ConfigError, match="diagnose needs"):
        Study.load(study_dict)


def test_the_paper_study_diagnoses_on_a_few_hundred_sequences(presets):
    data = OmegaConf.merge(OmegaConf.load(presets / "config.yaml"), OmegaConf.load(presets / "imagenet.yaml"),
                           {"presets": str(presets)})
    study = Study.load(data, "paper study")
    job = study.jobs["results/imagenet/llamagen_L_B/varkd/seed0/diagnose.yaml"]
    assert 100 <= job.diagnose.num_sequences <= 1000 and job.diagnose.teacher_precision == "bf16"
    assert job.teacher == "results/imagenet/llamagen_L_B/teacher/teacher.pt"
    assert study.resources("diagnose").gpu == 1


def test_horizon_means_every_position_and_the_first_and_last_quarter():
    T = 16
    values = {c: {"teacher_nll": np.tile(np.arange(T, dtype=float) * (1 + i), (3, 1))}
              for i, c in enumerate(CONTEXTS)}
    frame = per_position(values, {"backbone": "tiny", "method": "fkl", "seed": 0})
    shown = tables.horizon(frame).set_index("context")
    assert shown.loc["ground_truth", ["all", "first_quarter", "last_quarter"]].tolist() == [7.5, 1.5, 13.5]
    assert shown.loc["student", ["all", "first_quarter", "last_quarter"]].tolist() == [15.0, 3.0, 27.0]
    assert (frame["se"] == 0).all() and (frame["n"] == 3).all()
