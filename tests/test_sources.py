"""Data sources of KD steps: rollouts, GKD's mixture, DistiLLM's adaptive schedule (and its exact resume)."""
import csv

import numpy as np
import pytest
import torch

from varkd import distill, sources
from varkd.checkpoints import load_gpt
from varkd.codes import CodeSet, load_code_set
from varkd.config import AdaptiveConfig, MethodConfig, RolloutConfig, TeacherLogitsJob, TeacherPoolJob, TermConfig
from varkd.loop import BatchOrder, Part
from varkd.models.gpt import GPT, GPTConfig
from varkd.sampling import generate
from varkd.sjd import generate_sjd
from tests.conftest import TINY, job


def step_data(method, student, teacher=None, n=48, batch=8):
    sequences = CodeSet(torch.randint(0, 16, (n, 1, 16)).numpy(), np.arange(n) % 3, "test codes")
    return sources.StepData(method, sequences, BatchOrder(n, batch, seed=0), student=student, teacher=teacher,
                            seed=5, total_steps=100, validation=lambda: 1.0, device=torch.device("cpu"))


def random_gpt(seed):
    torch.manual_seed(seed)
    model = GPT(GPTConfig(**TINY))
    torch.nn.init.normal_(model.output.weight, std=0.5)  # zero-init output would make every model uniform
    return model


def test_student_rollouts_come_from_the_student_and_keep_its_mode():
    student, teacher = random_gpt(0), random_gpt(1)
    method = MethodConfig(terms=[TermConfig(data="student", divergence="fkl")],
                          rollout=RolloutConfig(null_fraction=0.5, temperature=0.7))
    data = step_data(method, student, teacher)
    student.train()
    batch = data(0, step=3)
    assert student.training and batch.index is None
    assert (batch.labels == 3).any() and (batch.labels != 3).any()  # about half the rollouts are unconditional
    # the same draw again reproduces it exactly (seeded by seed, step, term), and it is the student's
    again = data(0, step=3)
    assert torch.equal(again.codes, batch.codes) and torch.equal(again.labels, batch.labels)
    rng = np.random.default_rng([5, 3, 0])
    generator = torch.Generator().manual_seed(int(rng.integers(2**62)))
    rng.random(8)  # the null-label draw
    expected = generate(student, batch.labels, temperature=0.7, generator=generator)
    assert torch.equal(expected, batch.codes)
    assert data.counts["rollouts"] == 2 and data.counts["rollout_tokens"] == 2 * 8 * 16


def test_parts_of_a_step_split_its_rows_and_sample_with_their_own_streams():
    """A step split into parts (micro-batches, DDP ranks): each part rolls out for its rows with its own seeds."""
    student = random_gpt(0)
    method = MethodConfig(terms=[TermConfig(data="student", divergence="fkl")], rollout=RolloutConfig(null_fraction=0.5))
    data = step_data(method, student)
    classes = data.labels[data.order(3)]
    for i in range(2):
        part = data(0, step=3, part=Part(i, 2))
        rng = np.random.default_rng([5, 3, 0, i])
        generator = torch.Generator().manual_seed(int(rng.integers(2**62)))
        labels = torch.where(torch.from_numpy(rng.random(4) < 0.5), 3, classes[4 * i : 4 * i + 4])
        assert torch.equal(part.labels, labels)
        assert torch.equal(part.codes, generate(student, labels, generator=generator))
        again = data(0, step=3, part=Part(i, 2))
        assert torch.equal(again.codes, part.codes)
    # GKD's on-policy choice is the step's: its parts agree
    data = step_data(MethodConfig(terms=[TermConfig(data="mixed", divergence="jsd")], lmbda=0.5), student, random_gpt(1))
    choices = [[data(0, s, Part(i, 2)).index is None for i in range(2)] for s in range(12)]
    assert all(a == b for a, b in choices) and len({a for a, _ in choices}) == 2


def test_teacher_source_samples_the_teacher():
    student, teacher = random_gpt(0), random_gpt(1)
    data = step_data(MethodConfig(terms=[TermConfig(data="teacher", divergence="ce")]), student, teacher)
    batch = data(0, step=0)
    rng = np.random.default_rng([5, 0, 0])
    generator = torch.Generator().manual_seed(int(rng.integers(2**62)))
    assert torch.equal(generate(teacher, batch.labels, generator=generator), batch.codes)


def test_mixed_source_uses_student_samples_with_probability_lambda():
    student = random_gpt(0)
    data = step_data(MethodConfig(terms=[TermConfig(data="mixed", divergence="jsd")], lmbda=0.3), student, random_gpt(1))
    on_policy = sum(data(0, s).index is None for s in range(300))
    assert on_policy == data.counts["rollouts"]
    assert abs(on_policy / 300 - 0.3) < 4 * np.sqrt(0.3 * 0.7 / 300)


def test_adaptive_capacity_must_hold_a_batch():
    method = MethodConfig(terms=[TermConfig(data="adaptive", divergence="skl")], adaptive=AdaptiveConfig(capacity=4))
    with pytest.raises(ValueError, match="capacity=4"):
        step_data(method, random_gpt(0))


def test_adaptive_run_resumes_exactly_with_its_buffer(codes, tmp_path, monkeypatch):
    teacher_path = distill.train_gpt(job(codes, tmp_path / "teacher", steps=5, checkpoint_name="teacher.pt"))
    distill.cache_teacher_logits(TeacherLogitsJob(teacher=str(teacher_path), codes_train=str(codes / "train"),
                                                  out=str(tmp_path / "logits.npy")))
    method = MethodConfig(terms=[TermConfig(data="adaptive", divergence="skl")],
                          adaptive=AdaptiveConfig(init_threshold=0.7, capacity=16, eval_every=3))

    def run(out):
        return distill.train_gpt(job(codes, out, method="distillm", kd=method, teacher=str(teacher_path),
                                     teacher_logits=str(tmp_path / "logits.npy")))

    straight = torch.load(run(tmp_path / "a"), weights_only=True)
    assert straight["train"]["rollouts"] > 0 and straight["train"]["replayed"] > 0  # all three branches taken

    real = sources.StepData.__call__
    calls = {"n": 0}

    def killed(self, *args):
        calls["n"] += 1
        if calls["n"] == 7:
            raise KeyboardInterrupt
        return real(self, *args)

    monkeypatch.setattr(sources.StepData, "__call__", killed)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "b")
    monkeypatch.setattr(sources.StepData, "__call__", real)
    resumed = torch.load(run(tmp_path / "b"), weights_only=True)
    for key in straight["model"]:
        assert torch.equal(straight["model"][key], resumed["model"][key]), key
    for key in ("rollouts", "replayed", "teacher_forwards"):
        assert straight["train"][key] == resumed["train"][key], key


def test_two_term_method_logs_both_terms(codes, tmp_path):
    teacher_path = distill.train_gpt(job(codes, tmp_path / "teacher", steps=3, checkpoint_name="teacher.pt"))
    method = MethodConfig(terms=[TermConfig(data="teacher", divergence="skl"),
                                 TermConfig(data="student", divergence="srkl", detach_mixture=True, weight=0.5)])
    distill.train_gpt(job(codes, tmp_path / "d2", method="distillm2", kd=method, steps=4, teacher=str(teacher_path)))
    row = list(csv.DictReader(open(tmp_path / "d2" / "train_log.csv")))[-1]
    total = float(row["teacher_skl"]) + 0.5 * float(row["student_srkl"])
    assert float(row["loss"]) == pytest.approx(total, rel=1e-5)
    assert int(row["rollouts"]) == 8 and int(row["teacher_forwards"]) == 8  # two rollouts and two targets per step


def test_teacher_pool_is_sampled_once_and_read_like_ground_truth(codes, tmp_path):
    """The pool: teacher samples for the training labels (some null), their logits, and a run that reads both."""
    teacher_path = distill.train_gpt(job(codes, tmp_path / "teacher", steps=3, checkpoint_name="teacher.pt"))
    codes_train = str(codes / "train")
    train_set = load_code_set(codes_train)
    x, y = train_set.batch(np.arange(train_set.N)), train_set.labels
    rollout = RolloutConfig(temperature=0.8, null_fraction=0.3, teacher_pool=True)
    pool_dir = tmp_path / "pool"
    distill.sample_teacher_pool(TeacherPoolJob(teacher=str(teacher_path), codes_train=codes_train, rollout=rollout,
                                               seed=0, out_dir=str(pool_dir), batch_size=7))
    pool = load_code_set(pool_dir)
    pool_codes, pool_labels = pool.batch(np.arange(pool.N)), pool.labels
    logits = np.load(pool_dir / "logits.npy")
    assert pool.A == 1 and pool_codes.shape == x.shape and logits.shape == (len(x), 16, 16)
    null = pool_labels == 3
    assert torch.equal(pool_labels[~null], y[~null]) and 0 < null.sum() < len(y)
    teacher = load_gpt(teacher_path)
    torch.testing.assert_close(torch.from_numpy(logits[:5]).float(),
                               distill.teacher_logits(teacher, pool_codes[:5], pool_labels[:5]), atol=0.02, rtol=0.02)
    # the first batch is the teacher's draw for its labels, with the pool's generator
    expected = generate(teacher, pool_labels[:7], temperature=0.8, generator=torch.Generator().manual_seed(0))
    assert torch.equal(pool_codes[:7], expected)

    method = MethodConfig(terms=[TermConfig(data="teacher", divergence="fkl")], rollout=rollout)
    student = distill.train_gpt(job(codes, tmp_path / "run", method="pooled", kd=method, steps=4,
                                    teacher_pool=str(pool_dir)))
    train = torch.load(student, weights_only=True)["train"]
    assert train["teacher_forwards"] == 0 and train["rollouts"] == 0  # targets and sequences came from the pool
    data = sources.StepData(method, train_set, BatchOrder(len(x), 8, seed=0), student=random_gpt(0), teacher=None,
                            seed=0, total_steps=4, validation=lambda: 1.0, device=torch.device("cpu"),
                            teacher_pool=pool)
    batch = data(0, step=2)
    targets = distill.TeacherTargets(None, {"teacher_pool": str(pool_dir / "logits.npy")}, len(x), null_class=3)
    assert torch.equal(batch.codes, pool_codes[batch.index]) and torch.equal(batch.labels, pool_labels[batch.index])
    assert torch.equal(targets(batch, batch.codes, batch.labels), torch.from_numpy(logits[batch.index]).float())


def test_sjd_rollouts_count_their_sequential_steps(monkeypatch):
    """sampler=sjd draws rollouts with speculative Jacobi decoding and counts its forward passes."""
    calls = []

    def recording_sjd(*args, **kwargs):
        calls.append(kwargs)
        return generate_sjd(*args, **kwargs)

    monkeypatch.setattr(sources, "generate_sjd", recording_sjd)
    for sampler in ("ar", "sjd"):
        method = MethodConfig(terms=[TermConfig(data="student", divergence="fkl")],
                              rollout=RolloutConfig(sampler=sampler, window=8, init="repeat_horizon"))
        data = step_data(method, random_gpt(0))
        batch = data(0, step=1)
        assert batch.codes.shape == (8, 16) and data.counts["rollout_tokens"] == 8 * 16
        if sampler == "ar":
            assert data.counts["rollout_steps"] == 16 and not calls
        else:
            assert len(calls) == 1 and calls[0]["window"] == 8 and calls[0]["init"] == "repeat_horizon"
            assert 2 <= data.counts["rollout_steps"] <= 16
