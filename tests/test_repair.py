"""data=repaired: generation from a forced prefix, the teacher's verification of student samples (against float64
brute force) and its continuation from the first rejection (against full recomputation), StepData and a run."""
import copy
import csv

import numpy as np
import pytest
import torch

from varkd import sources
from varkd.config import MethodConfig, RolloutConfig, TermConfig
from varkd.decode import generate
from varkd.sampling import Sampling, cfg_logits
from varkd.sjd import generate_sjd
from varkd.steps.train import train_gpt
from tests.helpers import job, random_gpt, resume_after_kill, step_data

T, NULL = 16, 3  # TINY's block_size and null class


def prefixed(seed=0, rows=6):
    """A prefix per row and lengths spanning 0..T, with a common forced part of 2 positions."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(16, (rows, T), generator=g), torch.tensor([2, 5, 16, 9, 2, 13][:rows])


# --- generate from a forced prefix -------------------------------------------------------------------------------
@pytest.mark.parametrize("use_cache", [True, False])
def test_full_prefix_is_returned_and_an_empty_one_changes_nothing(use_cache):
    model, y = random_gpt(0), torch.tensor([0, 1, 2, 3])
    prefix, _ = prefixed(rows=4)
    full = generate(model, y, prefix=prefix, prefix_len=torch.full((4,), T), use_cache=use_cache)
    assert torch.equal(full, prefix)
    sampling = Sampling(cfg_scale=2.0, top_k=8)
    empty = generate(model, y, sampling, prefix=prefix, prefix_len=torch.zeros(4, dtype=torch.long),
                     generator=torch.Generator().manual_seed(4), use_cache=use_cache)
    assert torch.equal(empty, generate(model, y, sampling, generator=torch.Generator().manual_seed(4),
                                       use_cache=use_cache))


@pytest.mark.parametrize("cfg_scale", [1.0, 2.5])
def test_prefilled_prefix_decodes_as_full_recomputation(cfg_scale):
    """The KV-cache path prefills the common forced part in one forward; the uncached reference recomputes every
    step: the same tokens, greedy and sampled with one generator seed; forced positions hold the prefix."""
    model, y = random_gpt(0), torch.tensor([0, 1, 2, 3, 0, 1])
    prefix, length = prefixed()
    forced = torch.arange(T)[None, :] < length[:, None]
    for sampling in (Sampling(cfg_scale, temperature=0.0), Sampling(cfg_scale, temperature=1.3, top_p=0.9)):
        fast, slow = (generate(model, y, sampling, prefix=prefix, prefix_len=length, use_cache=cache,
                               generator=torch.Generator().manual_seed(1)) for cache in (True, False))
        assert torch.equal(fast, slow)
        assert torch.equal(fast[forced], prefix[forced]) and not torch.equal(fast, prefix)


def test_greedy_continuation_is_the_argmax_path_after_the_prefix():
    model, y, s = random_gpt(0).eval(), torch.tensor([0, 1, 2, 3, 0, 1]), 2.0
    prefix, length = prefixed()
    seq = generate(model, y, Sampling(cfg_scale=s, temperature=0.0), prefix=prefix, prefix_len=length)
    with torch.no_grad():
        guided = cfg_logits(model(seq[:, :-1], y), model(seq[:, :-1], torch.full_like(y, NULL)), s).argmax(-1)
    sampled = torch.arange(T)[None, :] >= length[:, None]
    assert torch.equal(seq[sampled], guided[sampled])


def test_prefix_must_fit_the_batch():
    model, y = random_gpt(0), torch.tensor([0, 1])
    with pytest.raises(ValueError, match="go together"):
        generate(model, y, prefix=torch.zeros(2, T, dtype=torch.long))
    with pytest.raises(ValueError, match="expected"):
        generate(model, y, prefix=torch.zeros(2, T - 1, dtype=torch.long), prefix_len=torch.tensor([1, 2]))
    with pytest.raises(ValueError, match=r"\[0, 16\]"):
        generate(model, y, prefix=torch.zeros(2, T, dtype=torch.long), prefix_len=torch.tensor([1, 17]))


# --- the teacher's verification and repair -----------------------------------------------------------------------
def model_pair(noise=0.2):
    """A random student and a teacher near it (its output layer perturbed): at threshold 0.3 a few of 32 samples
    are accepted whole and the others rejected at positions 0..12 (two unrelated random models reject at 0)."""
    student = random_gpt(0)
    teacher = copy.deepcopy(student)
    with torch.no_grad():
        teacher.output.weight.add_(noise * torch.randn(teacher.output.weight.shape,
                                                       generator=torch.Generator().manual_seed(1)))
    return student, teacher


def student_samples(student, rows=32, seed=0):
    y = torch.arange(rows) % 4  # class 3 is the null class: some rows are unconditional
    return generate(student, y, generator=torch.Generator().manual_seed(seed)), y


def brute_force_acceptance(student, teacher, codes, labels):
    """a_t = min(1, p_T(x_t | x_<t) / q_S(x_t | x_<t)) [B, T] in float64, one position at a time."""
    with torch.no_grad():
        p = teacher.eval()(codes[:, :-1], labels).double().softmax(-1)
        q = student.eval()(codes[:, :-1], labels).double().softmax(-1)
    a = torch.empty(codes.shape, dtype=torch.float64)
    for b in range(codes.shape[0]):
        for t in range(T):
            x = codes[b, t]
            a[b, t] = min(1.0, float(p[b, t, x] / q[b, t, x]))
    return a


def brute_force_first(accepted):
    """The first position of each row whose acceptance test fails, T where none does."""
    return torch.tensor([next((t for t in range(T) if not row[t]), T) for row in accepted.tolist()])


def test_first_rejection_is_the_first_position_below_the_threshold():
    student, teacher = model_pair()
    codes, y = student_samples(student.train())
    a = brute_force_acceptance(student, teacher, codes, y)
    student.train(), teacher.train()
    for threshold in (0.1, 0.3, 0.6):
        first = sources.first_rejection(student, teacher, codes, y, threshold, precision="fp32")
        assert student.training and teacher.training and first.dtype == torch.long
        assert torch.equal(first, brute_force_first(a >= threshold)), threshold
    first = sources.first_rejection(student, teacher, codes, y, 0.3, precision="fp32")
    assert (first < T).any() and (first == T).any() and len(set(first.tolist())) > 3  # the rule is exercised


@pytest.mark.parametrize("cfg_scale", [1.0, 2.0])
def test_greedy_repair_keeps_the_student_prefix_then_follows_the_teacher(cfg_scale):
    """Temperature 0: the suffix from the first rejection is the teacher's greedy continuation, computed here by
    full teacher forwards without KV cache, one position at a time."""
    student, teacher = model_pair()
    codes, y = student_samples(student)
    repaired, first = sources.repair(student, teacher, codes, y, 0.3, Sampling(cfg_scale=cfg_scale, temperature=0.0),
                                     precision="fp32")
    assert torch.equal(first, sources.first_rejection(student, teacher, codes, y, 0.3, precision="fp32"))
    teacher.eval()
    for b in range(len(codes)):
        n = int(first[b])
        seq = codes[b : b + 1, :n].clone()
        with torch.no_grad():
            while seq.shape[1] < T:
                logits = teacher(seq, y[b : b + 1])[:, -1]
                if cfg_scale != 1.0:
                    logits = cfg_logits(logits, teacher(seq, torch.tensor([NULL]))[:, -1], cfg_scale)
                seq = torch.cat([seq, logits.argmax(-1, keepdim=True)], dim=1)
        assert torch.equal(repaired[b], seq[0]), b
    assert (first < T).any() and (first == T).any()
    assert not torch.equal(repaired[first < T], codes[first < T])


def test_threshold_zero_keeps_every_sequence_and_one_repairs_where_the_teacher_is_less_likely():
    student, teacher = model_pair()
    codes, y = student_samples(student)
    generator = torch.Generator().manual_seed(0)
    kept, first = sources.repair(student, teacher, codes, y, 0.0, generator=generator, precision="fp32")
    assert torch.equal(kept, codes) and (first == T).all()
    a = brute_force_acceptance(student, teacher, codes, y)
    repaired, first = sources.repair(student, teacher, codes, y, 1.0, generator=generator, precision="fp32")
    assert torch.equal(first, brute_force_first(a >= 1.0))  # p_T(x) >= q_S(x) at every position before n*
    assert (first < T).all()
    before = torch.arange(T)[None, :] < first[:, None]
    assert torch.equal(repaired[before], codes[before])


# --- StepData and a training run ---------------------------------------------------------------------------------
@pytest.mark.parametrize("sampler", ["ar", "sjd"])
def test_repaired_batches_are_reproducible_student_rollouts_repaired_by_the_teacher(sampler):
    student, teacher = model_pair()
    rollout = RolloutConfig(sampler=sampler, temperature=0.9, top_k=12, null_fraction=0.5, repair_threshold=0.15)
    method = MethodConfig(terms=[TermConfig(data="repaired", divergence="fkl")], rollout=rollout)
    data = step_data(method, student, teacher)
    batch = data(0, step=3)
    assert batch.index is None and data.counts["rollouts"] == 1
    # the student's rollout with the step's stream (as data=student), then the repair with the same generator
    rng = np.random.default_rng([5, 3, 0])
    sampling, generator = Sampling(temperature=0.9, top_k=12), torch.Generator().manual_seed(int(rng.integers(2**62)))
    labels = torch.where(torch.from_numpy(rng.random(8) < 0.5), NULL, data.labels[data.order(3)])
    if sampler == "ar":
        codes = generate(student, labels, sampling, generator=generator)
    else:
        codes = generate_sjd(student, labels, sampling, generator=generator)[0]
    expected, first = sources.repair(student, teacher, codes, labels, 0.15, sampling, generator=generator)
    assert torch.equal(batch.labels, labels) and torch.equal(batch.codes, expected)
    before = torch.arange(T)[None, :] < first[:, None]
    assert torch.equal(batch.codes[before], codes[before])
    assert torch.equal(data(0, step=3).codes, batch.codes)  # the same batch again
    rows, tokens = int((first < T).sum()), int((T - first).sum())
    assert 0 < rows < 8
    assert data.counts["repaired_rows"] == 2 * rows and data.counts["repaired_tokens"] == 2 * tokens
    assert data.counts["teacher_forwards"] == 2


def test_repaired_data_needs_the_teacher():
    method = MethodConfig(terms=[TermConfig(data="repaired", divergence="fkl")])
    with pytest.raises(ValueError, match="live teacher"):
        step_data(method, random_gpt(0))(0, step=0)


def test_repaired_run_logs_its_repairs_and_resumes_exactly(codes, tmp_path, monkeypatch):
    teacher_path = train_gpt(job(codes, tmp_path / "teacher", steps=3, checkpoint_name="teacher.pt"))
    # the teacher and the student start from the same weights (seed 3) and stay close: threshold 1 rejects the
    # first token the teacher finds less likely than the student does
    method = MethodConfig(terms=[TermConfig(data="repaired", divergence="fkl")],
                          rollout=RolloutConfig(repair_threshold=1.0))

    def run(out):
        return train_gpt(job(codes, out, method="repaired", kd=method, steps=8, teacher=str(teacher_path)))

    straight = torch.load(run(tmp_path / "a"), weights_only=True)
    log = list(csv.DictReader(open(tmp_path / "a" / "train_log.csv")))
    rows, tokens = int(log[-1]["repaired_rows"]), int(log[-1]["repaired_tokens"])
    assert 0 < rows <= 8 * 8 and rows <= tokens <= 16 * rows
    assert straight["train"]["repaired_rows"] == rows and straight["train"]["teacher_forwards"] == 2 * 8

    resume_after_kill(run, tmp_path / "b", monkeypatch, 6, straight,  # killed after the checkpoint at step 4
                      ("repaired_rows", "repaired_tokens", "rollout_steps", "teacher_forwards"))
