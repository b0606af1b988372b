"""The training loop and the GPT trainer: schedule, data order, exact resume, teacher logits, NaN guard."""
import csv
import os
import signal

import numpy as np
import pytest
import torch

from varkd import distill, sources
from varkd.codes import load_code_set
from varkd.checkpoints import load_gpt, save_model
from varkd.config import ConfigError, OptimConfig, TeacherLogitsJob
from varkd.loop import BatchOrder, Interrupted, lr_at, train
from varkd.models.gpt import GPT, GPTConfig
from varkd.steps.teacher import cache_teacher_logits
from varkd.steps.train import train_gpt
import varkd.steps.train

from tests.helpers import DETERMINISTIC, TINY, job


def test_lr_schedule_warms_up_then_decays():
    cfg = OptimConfig(steps=100, lr=1.0, warmup_steps=10, schedule="cosine", min_lr_ratio=0.1)
    lrs = [lr_at(s, cfg) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    assert lrs[-1] == pytest.approx(0.1, abs=1e-3)
    assert lr_at(50, OptimConfig(steps=100, lr=2.0, warmup_steps=0, schedule="constant")) == 2.0


def test_batch_order_is_a_permutation_per_epoch_and_deterministic():
    order = BatchOrder(20, 5, seed=7)
    epoch = np.concatenate([order(s) for s in range(4)])
    assert sorted(epoch) == list(range(20))
    assert not np.array_equal(order(0), order(4))  # next epoch reshuffles
    assert np.array_equal(BatchOrder(20, 5, seed=7)(5), order(5))


def test_resume_after_interruption_equals_uninterrupted_run(codes, tmp_path, monkeypatch):
    straight = train_gpt(job(codes, tmp_path / "a"))

    real_drop, calls = sources.drop_labels, {"n": 0}

    def killed_at_step_6(*args):
        calls["n"] += 1
        if calls["n"] == 7:  # after the checkpoint at step 4, in the middle of the next interval
            raise KeyboardInterrupt
        return real_drop(*args)

    monkeypatch.setattr(sources, "drop_labels", killed_at_step_6)
    with pytest.raises(KeyboardInterrupt):
        train_gpt(job(codes, tmp_path / "b"))
    assert (tmp_path / "b" / "checkpoint.pt").exists() and not (tmp_path / "b" / "student.pt").exists()
    monkeypatch.setattr(sources, "drop_labels", real_drop)
    resumed = train_gpt(job(codes, tmp_path / "b"))

    a, b = torch.load(straight, weights_only=True), torch.load(resumed, weights_only=True)
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    rows = [list(csv.DictReader(open(d / "train_log.csv"))) for d in (tmp_path / "a", tmp_path / "b")]
    assert [r["step"] for r in rows[1]] == [str(s) for s in range(1, 13)]
    assert [r["loss"] for r in rows[0]] == [r["loss"] for r in rows[1]]
    assert not (tmp_path / "b" / "checkpoint.pt").exists()  # removed once the final weights exist


def test_sigterm_checkpoints_the_finished_step_and_a_rerun_resumes_exactly(codes, tmp_path, monkeypatch):
    """What a SLURM time limit or preemption does to a training job: SIGTERM, then a requeued rerun."""
    straight = train_gpt(job(codes, tmp_path / "a"))
    handler = signal.getsignal(signal.SIGTERM)
    real_drop, calls = sources.drop_labels, {"n": 0}

    def sigterm_in_step_6(*args):
        calls["n"] += 1
        if calls["n"] == 6:
            os.kill(os.getpid(), signal.SIGTERM)
        return real_drop(*args)

    monkeypatch.setattr(sources, "drop_labels", sigterm_in_step_6)
    with pytest.raises(Interrupted, match="step 6 of 12"):
        train_gpt(job(codes, tmp_path / "b"))
    assert signal.getsignal(signal.SIGTERM) is handler  # restored
    assert torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=True)["step"] == 6  # not 4: no step lost
    monkeypatch.setattr(sources, "drop_labels", real_drop)
    resumed = train_gpt(job(codes, tmp_path / "b"))
    a, b = torch.load(straight, weights_only=True), torch.load(resumed, weights_only=True)
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key


def test_a_run_killed_before_writing_its_weights_resumes_to_the_same_file(codes, tmp_path, monkeypatch):
    """Killed after the last step's checkpoint, before the final weights are written: the rerun resumes at the end
    and writes the same weights and training summary (its last-step losses come from the checkpoint)."""
    straight = torch.load(train_gpt(job(codes, tmp_path / "a")), weights_only=True)
    real_save = varkd.steps.train.save_model

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(varkd.steps.train, "save_model", killed)
    with pytest.raises(KeyboardInterrupt):
        train_gpt(job(codes, tmp_path / "b"))
    monkeypatch.setattr(varkd.steps.train, "save_model", real_save)
    resumed = torch.load(train_gpt(job(codes, tmp_path / "b")), weights_only=True)
    assert resumed["train"] == straight["train"] and "final_ground_truth_ce" in resumed["train"]
    for key in straight["model"]:
        assert torch.equal(straight["model"][key], resumed["model"][key]), key


def test_checkpoint_of_another_config_is_not_resumed(codes, tmp_path, capsys):
    train_gpt(job(codes, tmp_path / "run", steps=4))
    (tmp_path / "run" / "student.pt").unlink()
    torch.save({"run_id": "other", "step": 3}, tmp_path / "run" / "checkpoint.pt")
    train_gpt(job(codes, tmp_path / "run", steps=4))
    assert "ignoring" in capsys.readouterr().out


def test_log_gains_columns_when_evaluation_starts(tmp_path):
    model = torch.nn.Linear(2, 1)
    train(model, lambda step: (model.weight.sum() ** 2, {}), OptimConfig(steps=6, warmup_steps=0, log_every=1,
          eval_every=3), tmp_path, config_text="x", eval_fn=lambda: {"val_nll": 1.5})
    rows = list(csv.DictReader(open(tmp_path / "train_log.csv")))
    assert [r["val_nll"] for r in rows] == ["", "", "1.5", "", "", "1.5"]


def test_non_finite_loss_stops_with_the_step(tmp_path):
    model = torch.nn.Linear(2, 1)

    def loss_fn(step):
        value = model.weight.sum() * (float("nan") if step == 3 else 1.0)
        return value, {"kd": value.item()}

    with pytest.raises(FloatingPointError, match="at step 3"):
        train(model, loss_fn, OptimConfig(steps=10, warmup_steps=0), tmp_path, config_text="x")


def test_fkl_student_learns_from_cached_teacher_logits(codes, tmp_path):
    teacher_job = job(codes, tmp_path / "teacher", steps=30, checkpoint_name="teacher.pt")
    teacher_path = train_gpt(teacher_job)
    cache_teacher_logits(TeacherLogitsJob(teacher=str(teacher_path), codes_train=teacher_job.codes_train,
                                          out=str(tmp_path / "logits.npy")))
    cache = np.load(tmp_path / "logits.npy")
    teacher = load_gpt(teacher_path)
    train_set = load_code_set(teacher_job.codes_train)
    x, y = train_set.batch(np.arange(train_set.N)), train_set.labels
    with torch.no_grad():
        live = teacher(x[:5, :-1], y[:5])
        live_null = teacher(x[:5, :-1], torch.full_like(y[:5], 3))
    # the cache is made under bf16 autocast and stored in float16
    torch.testing.assert_close(torch.from_numpy(cache[:5, 0, 0]).float(), live, atol=0.1, rtol=0.05)
    torch.testing.assert_close(torch.from_numpy(cache[:5, 0, 1]).float(), live_null, atol=0.1, rtol=0.05)

    # the gather keeps the batch order and picks the null slot for null labels
    targets = distill.TeacherTargets(None, {"ground_truth": str(tmp_path / "logits.npy")}, train_set, null_class=3)
    index, labels = np.array([7, 2, 5]), torch.tensor([0, 3, 1])
    got = targets(sources.Batch(x[index], labels, index, views=np.zeros(3, np.int64)), x[index], labels)
    assert torch.equal(got[1], torch.from_numpy(cache[2, 0, 1]))
    assert torch.equal(got[0], torch.from_numpy(cache[7, 0, 0]))

    student = train_gpt(job(codes, tmp_path / "fkl", method="fkl", steps=30,
                            teacher_logits=str(tmp_path / "logits.npy")))
    log = list(csv.DictReader(open(tmp_path / "fkl" / "train_log.csv")))
    assert float(log[-1]["ground_truth_fkl"]) < 0.7 * float(log[0]["ground_truth_fkl"])
    assert log[-1]["teacher_forwards"] == "0"  # every target came from the cache
    assert torch.load(student, weights_only=True)["train"]["val_nll"] < np.log(16)


def test_mismatched_vocabulary_fails_before_training(codes, tmp_path):
    bad = job(codes, tmp_path / "x")
    bad.model = GPTConfig(**{**TINY, "vocab_size": 8})
    with pytest.raises(ValueError, match="vocab_size=8"):
        train_gpt(bad)
    assert not (tmp_path / "x" / "train_log.csv").exists()


def test_heldout_nll_of_a_uniform_model_is_log_vocab(codes):
    model = GPT(GPTConfig(**TINY))  # output.weight is zero-initialised: uniform predictions
    assert distill.heldout_nll(model, load_code_set(codes / "val")) == pytest.approx(np.log(16), rel=1e-5)


def test_drop_labels_rate():
    torch.manual_seed(0)
    dropped = sources.drop_labels(torch.zeros(20000, dtype=torch.long), 0.1, null_class=9)
    assert set(dropped.unique().tolist()) == {0, 9}
    assert (dropped == 9).float().mean().item() == pytest.approx(0.1, abs=0.01)


def test_corrupt_checkpoint_is_named(tmp_path):
    bad = tmp_path / "student.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="student.pt is corrupt"):
        load_gpt(bad)
    model = GPT(GPTConfig(**TINY))
    save_model(tmp_path / "ok.pt", model, model.config)
    state = torch.load(tmp_path / "ok.pt", weights_only=True)
    state["model"]["norm.weights"] = state["model"].pop("norm.weight")
    torch.save(state, tmp_path / "renamed.pt")
    with pytest.raises(ValueError, match=r"missing keys \['norm.weight'\].*unexpected keys \['norm.weights'\]"):
        load_gpt(tmp_path / "renamed.pt")


def test_run_starts_from_the_init_checkpoint(codes, tmp_path):
    init = train_gpt(job(codes, tmp_path / "init", steps=4))
    tuned = train_gpt(job(codes, tmp_path / "tuned", steps=1, init=str(init),
                          optim=OptimConfig(steps=1, batch_size=8, lr=1e-9, warmup_steps=0,
                                            precision="fp32")))
    start, end = load_gpt(init).state_dict(), load_gpt(tuned).state_dict()
    for key in start:  # one step at lr 1e-9: the run began at the init's weights
        torch.testing.assert_close(end[key], start[key], atol=1e-6, rtol=0), key
    wide = train_gpt(job(codes, tmp_path / "wide", steps=1, model=GPTConfig(**{**TINY, "dim": 64})))
    with pytest.raises(ValueError, match="student init .*wide.* has config"):
        train_gpt(job(codes, tmp_path / "bad", steps=1, init=str(wide)))


def test_bf16_runs_freeze_the_teacher_in_bf16_with_bf16_logits(codes, tmp_path):
    path = train_gpt(job(codes, tmp_path / "teacher", steps=4, checkpoint_name="teacher.pt"))
    fp32 = distill.load_teacher(str(path), GPTConfig(**TINY), torch.device("cpu"), "fp32")
    bf16 = distill.load_teacher(str(path), GPTConfig(**TINY), torch.device("cpu"), "bf16")
    assert {p.dtype for p in fp32.parameters()} == {torch.float32}
    assert {p.dtype for p in bf16.parameters()} == {torch.bfloat16}
    assert not bf16.training and not any(p.requires_grad for p in bf16.parameters())
    train_set = load_code_set(codes / "train")
    x, y = train_set.batch(np.arange(6)), train_set.labels
    logits = distill.teacher_logits(bf16, x[:6], y[:6])
    assert logits.dtype == torch.bfloat16 and not logits.requires_grad  # not copied to float32: losses upcast
    torch.testing.assert_close(logits.float(), distill.teacher_logits(fp32, x[:6], y[:6], "fp32"), atol=0.05, rtol=0.05)


def test_whole_batch_trainers_refuse_grad_accumulation(tmp_path):
    model = torch.nn.Linear(2, 1)
    with pytest.raises(ConfigError, match="optim.grad_accum=1"):
        train(model, lambda step: (model.weight.sum(), {}), OptimConfig(steps=2, batch_size=4, grad_accum=2),
              tmp_path, config_text="x")


@pytest.mark.slow
def test_compiled_student_trains_like_the_plain_one_and_checkpoints_plain_keys(codes, tmp_path):
    """torch.compile of the training forward (inductor on the CPU: ~40 s to compile the tiny GPT here)."""
    model = GPTConfig(**DETERMINISTIC)  # inductor draws dropout masks its own way
    plain = train_gpt(job(codes, tmp_path / "plain", steps=3, model=model))
    compiled = train_gpt(job(codes, tmp_path / "compiled", steps=3, model=model,
                             optim=OptimConfig(steps=3, batch_size=8, lr=3e-3, warmup_steps=2,
                                               checkpoint_every=2, log_every=1, precision="fp32",
                                               compile=True)))
    a, b = torch.load(plain, weights_only=True)["model"], torch.load(compiled, weights_only=True)["model"]
    assert list(b) == list(a)  # no _orig_mod. prefix
    for key in a:
        torch.testing.assert_close(b[key], a[key], atol=1e-5, rtol=1e-4, msg=lambda m: f"{key}: {m}")
