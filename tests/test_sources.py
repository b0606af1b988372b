"""Data sources of KD steps: rollouts, GKD's mixture, DistiLLM's adaptive schedule (and its exact resume)."""
import csv

import numpy as np
import pytest
import torch

from varkd import distill, sources
from varkd.checkpoints import load_gpt
from varkd.codes import CodeSet, load_code_set
from varkd.config import (AdaptiveConfig, MethodConfig, MixtureConfig, PoolJob, RolloutConfig, TeacherLogitsJob,
                          TermConfig)
from varkd.decode import generate
from varkd.loop import BatchOrder, Part
from varkd.models.gpt import GPT, GPTConfig
from varkd.sampling import Sampling
from varkd.sjd import generate_sjd
from varkd.steps.teacher import cache_teacher_logits, sample_pool
from varkd.steps.train import train_gpt
import varkd.steps.train
from tests.helpers import TINY, job, resume_after_kill


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
    expected = generate(student, batch.labels, Sampling(temperature=0.7), generator=generator)
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
    gkd = MethodConfig(terms=[TermConfig(data="mixed", divergence="jsd")], mixture=MixtureConfig(lmbda=0.5))
    data = step_data(gkd, student, random_gpt(1))
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
    gkd = MethodConfig(terms=[TermConfig(data="mixed", divergence="jsd")], mixture=MixtureConfig(lmbda=0.3))
    data = step_data(gkd, student, random_gpt(1))
    on_policy = sum(data(0, s).index is None for s in range(300))
    assert on_policy == data.counts["rollouts"]
    assert abs(on_policy / 300 - 0.3) < 4 * np.sqrt(0.3 * 0.7 / 300)


def test_adaptive_capacity_must_hold_a_batch():
    method = MethodConfig(terms=[TermConfig(data="adaptive", divergence="skl")], adaptive=AdaptiveConfig(capacity=4))
    with pytest.raises(ValueError, match="capacity=4"):
        step_data(method, random_gpt(0))


def test_adaptive_run_resumes_exactly_with_its_buffer(codes, tmp_path, monkeypatch):
    teacher_path = train_gpt(job(codes, tmp_path / "teacher", steps=5, checkpoint_name="teacher.pt"))
    cache_teacher_logits(TeacherLogitsJob(teacher=str(teacher_path), codes_train=str(codes / "train"),
                                          out=str(tmp_path / "logits.npy")))
    method = MethodConfig(terms=[TermConfig(data="adaptive", divergence="skl")],
                          adaptive=AdaptiveConfig(init_threshold=0.7, capacity=16, eval_every=3))

    def run(out):
        return train_gpt(job(codes, out, method="distillm", kd=method, teacher=str(teacher_path),
                             teacher_logits=str(tmp_path / "logits.npy")))

    straight = torch.load(run(tmp_path / "a"), weights_only=True)
    assert straight["train"]["rollouts"] > 0 and straight["train"]["replayed"] > 0  # all three branches taken

    resume_after_kill(run, tmp_path / "b", monkeypatch, 7, straight, ("rollouts", "replayed", "teacher_forwards"))


def test_two_term_method_logs_both_terms(codes, tmp_path):
    teacher_path = train_gpt(job(codes, tmp_path / "teacher", steps=3, checkpoint_name="teacher.pt"))
    method = MethodConfig(terms=[TermConfig(data="teacher", divergence="skl"),
                                 TermConfig(data="student", divergence="srkl", detach_mixture=True, weight=0.5)])
    train_gpt(job(codes, tmp_path / "d2", method="distillm2", kd=method, steps=4, teacher=str(teacher_path)))
    row = list(csv.DictReader(open(tmp_path / "d2" / "train_log.csv")))[-1]
    total = float(row["teacher_skl"]) + 0.5 * float(row["student_srkl"])
    assert float(row["loss"]) == pytest.approx(total, rel=1e-5)
    assert int(row["rollouts"]) == 8 and int(row["teacher_forwards"]) == 8  # two rollouts and two targets per step


def test_teacher_pool_is_sampled_once_and_read_like_ground_truth(codes, tmp_path):
    """The pool: teacher samples for the training labels (some null), their logits, and a run that reads both."""
    teacher_path = train_gpt(job(codes, tmp_path / "teacher", steps=3, checkpoint_name="teacher.pt"))
    codes_train = str(codes / "train")
    train_set = load_code_set(codes_train)
    x, y = train_set.batch(np.arange(train_set.N)), train_set.labels
    rollout = RolloutConfig(temperature=0.8, null_fraction=0.3, teacher_pool=True)
    pool_dir = tmp_path / "pool"
    sample_pool(PoolJob(model=str(teacher_path), codes_train=codes_train, rollout=rollout, seed=0,
                        out_dir=str(pool_dir), batch_size=7))
    pool = load_code_set(pool_dir)
    pool_codes, pool_labels = pool.batch(np.arange(pool.N)), pool.labels
    logits = np.load(pool_dir / "logits.npy")
    assert pool.A == 1 and pool_codes.shape == x.shape and logits.shape == (len(x), 16, 16)
    null = pool_labels == 3
    assert torch.equal(pool_labels[~null], y[~null]) and 0 < null.sum() < len(y)
    teacher = load_gpt(teacher_path)
    torch.testing.assert_close(torch.from_numpy(logits[:5]).float(),
                               distill.teacher_logits(teacher, pool_codes[:5], pool_labels[:5]).float(), atol=0.02,
                               rtol=0.02)
    # the first batch is the teacher's draw for its labels, with the pool's generator
    expected = generate(teacher, pool_labels[:7], Sampling(temperature=0.8), generator=torch.Generator().manual_seed(0))
    assert torch.equal(pool_codes[:7], expected)

    method = MethodConfig(terms=[TermConfig(data="teacher", divergence="fkl")], rollout=rollout)
    student = train_gpt(job(codes, tmp_path / "run", method="pooled", kd=method, steps=4,
                            teacher_pool=str(pool_dir)))
    train = torch.load(student, weights_only=True)["train"]
    assert train["teacher_forwards"] == 0 and train["rollouts"] == 0  # targets and sequences came from the pool
    data = sources.StepData(method, train_set, BatchOrder(len(x), 8, seed=0), student=random_gpt(0), teacher=None,
                            seed=0, total_steps=4, validation=lambda: 1.0, device=torch.device("cpu"),
                            teacher_pool=pool)
    batch = data(0, step=2)
    targets = distill.TeacherTargets(None, {"teacher_pool": str(pool_dir / "logits.npy")}, train_set, null_class=3)
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


IMITKD = MethodConfig(terms=[TermConfig(data="mixed", divergence="fkl")],
                      mixture=MixtureConfig(granularity="sequence", schedule="exponential", exp_base=200.0),
                      rollout=RolloutConfig(top_k=5, null_fraction=0.25))


def expected_mixture(data, step, term=0):
    """The step's per-row choices, drawn here from their documented stream: a child of (seed, step, term)."""
    stream = np.random.default_rng(np.random.SeedSequence([data.seed, step, term]).spawn(1)[0])
    return stream.random(data.order.batch_size) < data.mixture.share(step)


def test_per_sequence_mixture_keeps_ground_truth_rows_and_samples_the_others_from_the_student():
    student = random_gpt(0)
    data = step_data(IMITKD, student, random_gpt(1))
    for step in (0, 1):  # beta = 1: the batch is the ground truth, and its cached teacher logits can serve it
        batch = data(0, step)
        assert batch.index is not None and torch.equal(batch.codes, data.codes.batch(data.order(step)))
    assert data.counts["rollouts"] == 0
    seen = 0
    mixed_steps = [s for s in range(2, 100) if 0 < expected_mixture(data, s).sum() < 8][:3]
    assert len(mixed_steps) == 3
    for step in mixed_steps:
        batch, rows = data(0, step), data.order(step)
        on_policy = expected_mixture(data, step)
        assert batch.index is None  # the live teacher scores every row
        truth = torch.from_numpy(~on_policy)
        assert torch.equal(batch.codes[truth], data.codes.batch(rows[~on_policy]))  # ground-truth rows: the data's
        assert torch.all((batch.labels[truth] == data.labels[rows[~on_policy]]) | (batch.labels[truth] == 3))
        # student rows: the student's samples for their classes, with the part's stream (seed, step, term)
        rng = np.random.default_rng([data.seed, step, 0])
        generator = torch.Generator().manual_seed(int(rng.integers(2**62)))
        classes = data.labels[rows[on_policy]]
        labels = torch.where(torch.from_numpy(rng.random(len(classes)) < 0.25), 3, classes)
        student_rows = torch.from_numpy(on_policy)
        assert torch.equal(batch.labels[student_rows], labels)
        assert torch.equal(batch.codes[student_rows], generate(student, labels, Sampling(top_k=5), generator=generator))
        seen += int(on_policy.sum())
    assert data.counts["rollouts"] == 3 and data.counts["rollout_tokens"] == seen * 16
    assert data.counts["rollout_steps"] == 3 * 16  # one decoding pass per step, whatever its number of rows


def test_per_sequence_student_share_follows_the_schedule_and_is_logged():
    """Over many steps, the share of student rows at each step matches lmbda_t (binomial), the logged lmbda is the
    schedule's and student_share is the running share of student rows, which the rollout counts give too."""
    data = step_data(IMITKD, random_gpt(0), random_gpt(1), n=64, batch=64)
    data.rollout = lambda model, index, rng, generator: sources.Batch(  # rows only: decoding is tested above
        torch.zeros(len(index), 16, dtype=torch.long), data.labels[index])
    student_rows = rows = 0
    expected, variance = 0.0, 0.0
    for step in range(100):
        batch = data(0, step)
        on_policy = expected_mixture(data, step)
        share = data.mixture.share(step)
        student_rows += int(on_policy.sum())
        rows += len(on_policy)
        expected += share * len(on_policy)
        variance += share * (1 - share) * len(on_policy)
        assert (batch.index is None) == bool(on_policy.any())
        logs = data.logs(step)
        assert logs["lmbda"] == share and logs["student_share"] == student_rows / rows
    assert abs(student_rows - expected) <= 5 * np.sqrt(variance)
    assert student_rows > 0.3 * rows  # the schedule reached the student


def test_split_steps_mix_the_same_rows_as_whole_ones():
    """Micro-batches and ranks: the step's row choices are drawn for its whole batch, so parts agree with an
    unsplit step on which rows are ground truth (and those rows are identical); each part samples its own."""
    whole = step_data(IMITKD, random_gpt(0), random_gpt(1))
    split = step_data(IMITKD, random_gpt(0), random_gpt(1))
    kinds = set()
    for step in (5, 10, 20, 30, 50, 80, 99):
        on_policy = expected_mixture(whole, step)
        batch = whole(0, step)
        parts = [split(0, step, Part(i, 4)) for i in range(4)]
        for i, part in enumerate(parts):
            mask = torch.from_numpy(on_policy[2 * i : 2 * i + 2])
            assert torch.equal(part.codes[~mask], batch.codes[2 * i : 2 * i + 2][~mask])
            assert (part.index is None) == bool(mask.any())
            kinds.add(tuple(mask.tolist()))
        assert split.chosen == whole.chosen  # counted once per step, not once per part
    assert split.logs(99) == whole.logs(99)
    assert {(False, False), (True, True)} < kinds  # parts of every kind were drawn, mixed ones too


def test_mixed_batches_are_scored_by_the_live_teacher(codes, tmp_path):
    """The cache holds ground-truth rows only: a batch with student rows is scored live, a ground-truth one is read."""
    teacher_path = train_gpt(job(codes, tmp_path / "teacher", steps=3, checkpoint_name="teacher.pt"))
    cache_teacher_logits(TeacherLogitsJob(teacher=str(teacher_path), codes_train=str(codes / "train"),
                                          out=str(tmp_path / "logits.npy")))
    teacher = load_gpt(teacher_path)
    train_set = load_code_set(codes / "train")
    data = sources.StepData(IMITKD, train_set, BatchOrder(train_set.N, 8, seed=0), student=random_gpt(0),
                            teacher=teacher, seed=0, total_steps=20, validation=lambda: 1.0, device=torch.device("cpu"))
    targets = distill.TeacherTargets(teacher, {"ground_truth": str(tmp_path / "logits.npy")}, train_set,
                                     null_class=3, counts=data.counts)
    truth = data(0, 0)
    cached = targets(truth, truth.codes, truth.labels)
    assert data.counts["teacher_forwards"] == 0
    torch.testing.assert_close(cached.float(), distill.teacher_logits(teacher, truth.codes, truth.labels).float(),
                               atol=0.02, rtol=0.02)
    mixed = data(0, 19)
    assert mixed.index is None and expected_mixture(data, 19).any()
    assert torch.equal(targets(mixed, mixed.codes, mixed.labels),
                       distill.teacher_logits(teacher, mixed.codes, mixed.labels))
    assert data.counts["teacher_forwards"] == 1


def test_imitkd_run_logs_its_schedule_and_resumes_exactly(codes, tmp_path, monkeypatch):
    teacher_path = train_gpt(job(codes, tmp_path / "teacher", steps=3, checkpoint_name="teacher.pt"))
    cache_teacher_logits(TeacherLogitsJob(teacher=str(teacher_path), codes_train=str(codes / "train"),
                                          out=str(tmp_path / "logits.npy")))

    def run(out):
        return train_gpt(job(codes, out, method="imitkd", kd=IMITKD, teacher=str(teacher_path),
                             teacher_logits=str(tmp_path / "logits.npy")))

    straight = torch.load(run(tmp_path / "a"), weights_only=True)
    log = list(csv.DictReader(open(tmp_path / "a" / "train_log.csv")))
    mixture = sources.OnPolicyMixture(0.5, "exponential", total_steps=12, exp_base=200.0)
    for row in log:  # row `step` k logs the state after the step of index k - 1
        step = int(row["step"]) - 1
        assert float(row["lmbda"]) == pytest.approx(mixture.share(step))
        assert float(row["student_share"]) == pytest.approx(int(row["rollout_tokens"]) / (16 * 8 * (step + 1)))
    assert 0 < straight["train"]["rollouts"] < 12 and straight["train"]["teacher_forwards"] > 0

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
    for key in ("rollouts", "rollout_tokens", "teacher_forwards"):
        assert straight["train"][key] == resumed["train"][key], key
    resumed_log = list(csv.DictReader(open(tmp_path / "b" / "train_log.csv")))
    assert [(r["loss"], r["student_share"]) for r in resumed_log] == [(r["loss"], r["student_share"]) for r in log]


def test_gkd_draws_are_unchanged_and_its_share_is_logged():
    """GKD (step granularity, constant lambda) draws exactly as before the per-sequence mixture existed: u, the
    second draw of the step's stream after the generator seed, with TRL's u <= lambda; the share counts steps."""
    student = random_gpt(0)
    gkd = MethodConfig(terms=[TermConfig(data="mixed", divergence="jsd")], mixture=MixtureConfig(lmbda=0.4))
    data = step_data(gkd, student, random_gpt(1))
    on = 0
    for step in range(40):
        rng = np.random.default_rng([5, step, 0])
        generator = torch.Generator().manual_seed(int(rng.integers(2**62)))
        student_step = rng.random() <= 0.4
        batch = data(0, step)
        if student_step:
            labels = torch.where(torch.from_numpy(rng.random(8) < 0.1), 3, data.labels[data.order(step)])
            assert torch.equal(batch.codes, generate(student, labels, generator=generator))
        else:
            assert torch.equal(batch.codes, data.codes.batch(data.order(step)))
        on += student_step
        assert data.logs(step) == {"lmbda": 0.4, "student_share": on / (step + 1)}
    assert 0 < on < 40 and data.counts["rollouts"] == on


def test_distillm_logs_its_threshold_rising_with_the_validation_loss(codes, tmp_path, monkeypatch):
    """A scripted validation NLL: tau_a rises by 0.1 exactly at the evaluations where the loss has risen by
    loss_eps over its reference, and student_share is the share of steps on fresh or replayed student data."""
    teacher_path = train_gpt(job(codes, tmp_path / "teacher", steps=3, checkpoint_name="teacher.pt"))
    cache_teacher_logits(TeacherLogitsJob(teacher=str(teacher_path), codes_train=str(codes / "train"),
                                          out=str(tmp_path / "logits.npy")))
    # evaluations at steps 0, 2, 4, ..., 10 (eval_every 2), then the final one; fires: 2.2 >= 2.0 + 0.1 at step 4,
    # 2.35 >= 2.2 + 0.1 at step 8; 2.25 (step 6) and 2.4 (step 10) do not
    script = iter([2.0, 1.9, 2.2, 2.25, 2.35, 2.4, 1.0])
    monkeypatch.setattr(varkd.steps.train, "heldout_nll", lambda *args, **kwargs: next(script))
    method = MethodConfig(terms=[TermConfig(data="adaptive", divergence="skl")],
                          adaptive=AdaptiveConfig(init_threshold=0.3, loss_eps=0.1, capacity=16, eval_every=2))
    train_gpt(job(codes, tmp_path / "d", method="distillm", kd=method, teacher=str(teacher_path),
                  teacher_logits=str(tmp_path / "logits.npy")))
    log = list(csv.DictReader(open(tmp_path / "d" / "train_log.csv")))
    tau = [float(r["tau_a"]) for r in log]  # row k: after step index k - 1
    assert tau == pytest.approx([0.3] * 4 + [0.4] * 4 + [0.5] * 4)
    for row in log:
        steps = int(row["step"])
        assert float(row["student_share"]) == pytest.approx((int(row["rollouts"]) + int(row["replayed"])) / steps)
    assert int(log[-1]["rollouts"]) + int(log[-1]["replayed"]) > 0


def test_student_pool_is_read_for_student_terms_and_scored_by_the_live_teacher(codes, tmp_path):
    """DistiLLM-2: the student init's samples, drawn once with the method's settings, replace fresh rollouts; the
    teacher pool keeps its cached logits, the student pool has none and the teacher scores it live."""
    teacher_path = train_gpt(job(codes, tmp_path / "teacher", steps=3, checkpoint_name="teacher.pt"))
    init_path = train_gpt(job(codes, tmp_path / "init", steps=3))
    codes_train, rollout = str(codes / "train"), RolloutConfig(temperature=0.8, top_p=0.95, null_fraction=0.3)
    sample_pool(PoolJob(model=str(teacher_path), codes_train=codes_train, rollout=rollout, seed=4,
                        out_dir=str(tmp_path / "tpool"), batch_size=40))
    sample_pool(PoolJob(model=str(init_path), codes_train=codes_train, rollout=rollout, seed=4,
                        out_dir=str(tmp_path / "spool"), logits=False, batch_size=40))
    assert not (tmp_path / "spool" / "logits.npy").exists()
    init, spool, tpool = load_gpt(init_path), load_code_set(tmp_path / "spool"), load_code_set(tmp_path / "tpool")
    # the init's samples with the method's settings, the pool's seeded generator; the same labels as the teacher pool
    assert torch.equal(spool.labels, tpool.labels)
    expected = generate(init, spool.labels[:40], Sampling(temperature=0.8, top_p=0.95),
                        generator=torch.Generator().manual_seed(4))
    assert torch.equal(spool.batch(np.arange(40)), expected)

    method = MethodConfig(terms=[TermConfig(data="teacher", divergence="skl"),
                                 TermConfig(data="student", divergence="srkl", detach_mixture=True)],
                          rollout=RolloutConfig(temperature=0.8, top_p=0.95, null_fraction=0.3, teacher_pool=True,
                                                student_pool=True))
    with pytest.raises(ValueError, match="TrainJob.student_pool is unset"):
        train_gpt(job(codes, tmp_path / "bad", method="distillm2", kd=method, teacher=str(teacher_path),
                      teacher_pool=str(tmp_path / "tpool")))
    run = train_gpt(job(codes, tmp_path / "d2", method="distillm2", kd=method, steps=4,
                        teacher=str(teacher_path), teacher_pool=str(tmp_path / "tpool"),
                        student_pool=str(tmp_path / "spool"), init=str(init_path)))
    train = torch.load(run, weights_only=True)["train"]
    assert train["rollouts"] == 0 and train["teacher_forwards"] == 4  # the student pool's batches, scored live

    train_set = load_code_set(codes_train)
    data = sources.StepData(method, train_set, BatchOrder(train_set.N, 8, seed=0), student=random_gpt(0),
                            teacher=None, seed=0, total_steps=4, validation=lambda: 1.0, device=torch.device("cpu"),
                            teacher_pool=tpool, student_pool=spool)
    batch = data(1, step=2)
    assert batch.cache == "student_pool" and np.array_equal(batch.index, data.order(2))
    assert torch.equal(batch.codes, spool.batch(batch.index)) and torch.equal(batch.labels, spool.labels[batch.index])
    teacher = load_gpt(teacher_path)
    targets = distill.TeacherTargets(teacher, {"teacher_pool": str(tmp_path / "tpool" / "logits.npy")}, train_set,
                                     null_class=3)
    assert torch.equal(targets(batch, batch.codes, batch.labels),
                       distill.teacher_logits(teacher, batch.codes, batch.labels))
    assert targets.counts["teacher_forwards"] == 1
    assert data(0, step=2).cache == "teacher_pool"
