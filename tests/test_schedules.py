"""Data-source schedules against closed forms and hand-worked cases: GKD, ImitKD and DistiLLM."""
import random
from collections import Counter

import numpy as np
import pytest
import torch

from varkd.schedules import AdaptiveSchedule, OnPolicyMixture, ReplayBuffer


class ScriptedRng:
    """Returns the given r values from `.random()`, in order; fails if asked for more."""

    def __init__(self, values):
        self.values = list(values)

    def random(self):
        return self.values.pop(0)


# ----------------------------------------------------------------------------------------------- OnPolicyMixture
def test_mixture_boundary_is_u_less_or_equal_lambda():
    mix = OnPolicyMixture(0.5)
    got = [mix.choose(ScriptedRng([u])) for u in (0.0, 0.4999, 0.5, np.nextafter(0.5, 1.0), 0.9)]
    assert got == ["student", "student", "student", "ground_truth", "ground_truth"]


def test_mixture_lambda_zero_never_and_one_always():
    never, always = OnPolicyMixture(0.0), OnPolicyMixture(1.0)
    edge = [0.0, 1e-300, 0.5, np.nextafter(1.0, 0.0)]
    assert [never.choose(ScriptedRng([u])) for u in edge] == ["ground_truth"] * 4
    assert [always.choose(ScriptedRng([u])) for u in edge] == ["student"] * 4
    rng = np.random.default_rng(0)
    assert {never.choose(rng) for _ in range(2000)} == {"ground_truth"}
    assert {always.choose(rng) for _ in range(2000)} == {"student"}


@pytest.mark.parametrize("make_rng", [lambda: np.random.default_rng(1), lambda: random.Random(1)])
def test_mixture_frequency_matches_lambda(make_rng):
    mix, rng, n = OnPolicyMixture(0.3), make_rng(), 40_000
    frac = sum(mix.choose(rng) == "student" for _ in range(n)) / n
    assert abs(frac - 0.3) < 0.012  # 5 sigma = 5 * sqrt(0.21 / n) = 0.0115


@pytest.mark.parametrize("bad", [-0.01, 1.01, float("nan")])
def test_mixture_rejects_lambda_outside_unit_interval(bad):
    with pytest.raises(ValueError):
        OnPolicyMixture(bad)


def test_mixture_state_is_empty():
    mix = OnPolicyMixture(0.5)
    assert mix.state_dict() == {}
    mix.load_state_dict({})
    with pytest.raises(ValueError):
        mix.load_state_dict({"lmbda": 0.5})


# ------------------------------------------------------------------------------------------ ImitKD's annealing
def imitkd_beta(kind, t, n, final_beta=0.0, exp_base=200.0, warmup=0.0):
    """ImitKD's get_beta (generation/distillation.py L404-419) as written there, evaluated in float64."""
    if kind == "linear":
        return 1.0 - (1.0 - final_beta) * t / n
    return exp_base ** (-(t / n - warmup)) if t / n > warmup else 1.0


@pytest.mark.parametrize("kind, options", [("linear", {"final_beta": 0.0}), ("linear", {"final_beta": 0.3}),
                                           ("exponential", {"exp_base": 200.0}), ("exponential", {"exp_base": 10.0})])
def test_imitkd_schedule_equals_the_closed_form(kind, options):
    """Step s draws with the beta ImitKD's trainer set after iteration s - 1 (beta = 1 before the first update)."""
    n = 400
    mix = OnPolicyMixture(0.5, kind, total_steps=n, **options)
    for step in (0, 1, 2, 57, 200, 399, 400):
        beta = imitkd_beta(kind, max(step - 1, 0), n, **options)
        assert mix.beta(step) == pytest.approx(beta, rel=1e-12, abs=1e-15), step
        assert mix.share(step) == pytest.approx(1.0 - beta, abs=1e-12), step
    assert mix.share(0) == mix.share(1) == 0.0  # the first two steps train on ground truth only
    if kind == "exponential":  # ImitKD's IWSLT schedule: beta ends at 1 / exp_base
        assert mix.beta(n + 1) == pytest.approx(1.0 / options["exp_base"])
    else:
        assert mix.beta(n + 1) == pytest.approx(options["final_beta"])
    betas = [mix.beta(s) for s in range(n + 1)]
    assert all(a >= b for a, b in zip(betas, betas[1:]))  # annealed: the student share only grows


def test_constant_schedule_is_gkds_lambda_at_every_step():
    mix = OnPolicyMixture(0.3, total_steps=100)
    assert {mix.share(s) for s in range(101)} == {0.3}
    with pytest.raises(ValueError, match="annealed"):
        mix.beta(3)


@pytest.mark.parametrize("step", [1, 30, 120, 250])
def test_per_sequence_choices_follow_the_schedule(step):
    """Each row is a student sample with probability lmbda_t, independently: the share over many draws is binomial."""
    mix = OnPolicyMixture(0.5, "exponential", total_steps=250, exp_base=200.0)
    share, rng, n = mix.share(step), np.random.default_rng(11), 200_000
    rows = np.concatenate([mix.choose_rows(rng, 64, step) for _ in range(n // 64)])
    assert rows.dtype == bool and len(rows) == n // 64 * 64
    assert abs(rows.mean() - share) <= 5 * np.sqrt(max(share * (1 - share), 1e-12) / len(rows)) + 1e-12, share
    # one uniform per row, True below lmbda_t: the same draws a scripted comparison gives
    u = np.random.default_rng(3).random(64)
    assert np.array_equal(mix.choose_rows(np.random.default_rng(3), 64, step), u < share)


@pytest.mark.parametrize("bad", [dict(schedule="cosine"), dict(exp_base=1.0), dict(final_beta=1.5),
                                 dict(total_steps=0)])
def test_mixture_rejects_bad_schedules(bad):
    with pytest.raises(ValueError):
        OnPolicyMixture(0.5, **{"schedule": "linear", "total_steps": 10, **bad})


# --------------------------------------------------------------------------------------------- AdaptiveSchedule
def test_adaptive_update_follows_validation_rule_step_by_step():
    sched = AdaptiveSchedule(init_threshold=0.0, loss_eps=0.1, total_steps=100)
    # (val_loss, fired, threshold, prev_loss) worked by hand: fire iff val >= prev + 0.1; prev moves only on fire
    script = [
        (2.0, False, 0.0, 2.0),   # step-0 evaluation: sets prev_loss only
        (1.9, False, 0.0, 2.0),   # loss fell: prev_loss stays 2.0 (not refreshed to 1.9)
        (2.05, False, 0.0, 2.0),  # 2.05 < 2.0 + 0.1 (a refreshed prev of 1.9 would have fired here)
        (2.2, True, 0.1, 2.2),    # 2.2 >= 2.1: tau_a + 0.1, prev <- 2.2
        (2.1, False, 0.1, 2.2),   # fell
        (2.35, True, 0.2, 2.35),  # 2.35 >= 2.3
        (2.4, False, 0.2, 2.35),  # 2.4 < 2.45
        (2.5, True, 0.3, 2.5),    # 2.5 >= 2.45
        (1.0, False, 0.3, 2.5),
        (2.59, False, 0.3, 2.5),  # 2.59 < 2.6
        (3.0, True, 0.4, 3.0),
    ]
    for val, fired, threshold, prev in script:
        assert sched.update(val) is fired, val
        assert sched.threshold == pytest.approx(threshold, abs=1e-12), val
        assert sched.prev_loss == prev, val


def test_adaptive_update_fires_at_equality_and_caps_at_one():
    sched = AdaptiveSchedule(init_threshold=0.85, loss_eps=0.25, total_steps=10)  # 0.25: exact in binary
    assert sched.update(1.0) is False
    assert sched.update(1.25) is True  # val == prev + eps fires (>=)
    assert sched.threshold == pytest.approx(0.95) and sched.prev_loss == 1.25
    assert sched.update(1.5) is True
    assert sched.threshold == 1.0 and sched.prev_loss == 1.5  # min(0.95 + 0.1, 1) = 1
    # at the cap the rule still fires and refreshes prev_loss (DistiLLM's branch), tau_a stays 1
    assert sched.update(2.0) is True
    assert sched.threshold == 1.0 and sched.prev_loss == 2.0
    assert sched.update(2.2) is False and sched.prev_loss == 2.0


def test_adaptive_update_custom_increment_and_nonfinite_loss():
    sched = AdaptiveSchedule(init_threshold=0.2, loss_eps=0.0, increment=0.3, total_steps=10)
    sched.update(5.0)
    assert sched.update(5.0) is True and sched.threshold == pytest.approx(0.5)  # eps 0: any non-decrease fires
    with pytest.raises(ValueError):
        sched.update(float("nan"))


def test_adaptive_thresholds_per_replay_ratio():
    want = {"decreasing": [0.4, 0.3, 0.0], "constant": [0.2, 0.2, 0.2], "increasing": [0.0, 0.1, 0.4]}
    for mode, tau_s in want.items():
        sched = AdaptiveSchedule(init_threshold=0.4, replay_ratio=mode, total_steps=8)
        got = [sched.thresholds(step) for step in (0, 2, 8)]
        assert [t[0] for t in got] == pytest.approx(tau_s), mode
        assert [t[1] for t in got] == [0.4, 0.4, 0.4]
    with pytest.raises(ValueError):
        sched.thresholds(9)


# (replay_ratio, step) -> tau_s for tau_a = 0.6, T = 10; step 2, not 5, where all three modes would coincide
CHOOSE_CASES = {
    ("decreasing", 2): 0.48,  # 0.6 * (1 - 0.2)
    ("constant", 2): 0.3,     # 0.6 / 2
    ("increasing", 2): 0.12,  # 0.6 * 0.2
}


@pytest.mark.parametrize("mode,step", list(CHOOSE_CASES))
def test_adaptive_choose_with_scripted_draws(mode, step):
    tau_s, tau_a = CHOOSE_CASES[(mode, step)], 0.6
    sched = AdaptiveSchedule(init_threshold=tau_a, replay_ratio=mode, total_steps=10)
    assert sched.thresholds(step)[0] == pytest.approx(tau_s)
    below_s, between, above_a = tau_s - 0.01, (tau_s + tau_a) / 2, 0.9
    # buffer full: fresh below tau_s, replay in [tau_s, tau_a), ground truth from tau_a on
    draws = [0.0, below_s, between, np.nextafter(tau_a, 0.0), tau_a, above_a]
    got = [sched.choose(step, ScriptedRng([r]), buffer_full=True) for r in draws]
    assert got == ["fresh", "fresh", "replay", "replay", "ground_truth", "ground_truth"]
    # buffer not full: everything below tau_a is generated fresh (no replay from a partial buffer)
    got = [sched.choose(step, ScriptedRng([r]), buffer_full=False) for r in draws]
    assert got == ["fresh", "fresh", "fresh", "fresh", "ground_truth", "ground_truth"]


def test_adaptive_choose_strict_boundary_at_tau_s():
    sched = AdaptiveSchedule(init_threshold=0.5, replay_ratio="constant", total_steps=10)  # tau_s = 0.25 exactly
    assert sched.choose(3, ScriptedRng([0.25]), buffer_full=True) == "replay"  # r < tau_s is strict
    assert sched.choose(3, ScriptedRng([np.nextafter(0.25, 0.0)]), buffer_full=True) == "fresh"


def test_adaptive_choose_zero_threshold_is_all_ground_truth_and_draws_once():
    sched = AdaptiveSchedule(total_steps=10)
    rng = ScriptedRng([0.0, 0.3])
    assert sched.choose(0, rng, buffer_full=False) == "ground_truth"
    assert rng.values == [0.3]  # exactly one draw per call, whatever the outcome


@pytest.mark.parametrize("mode", ["decreasing", "constant", "increasing"])
def test_adaptive_choose_frequencies_match_taus(mode):
    sched = AdaptiveSchedule(init_threshold=0.7, replay_ratio=mode, total_steps=100)
    step, n = 30, 40_000
    tau_s, tau_a = sched.thresholds(step)
    rng = np.random.default_rng(7)
    counts = Counter(sched.choose(step, rng, buffer_full=True) for _ in range(n))
    for key, p in (("fresh", tau_s), ("replay", tau_a - tau_s), ("ground_truth", 1 - tau_a)):
        assert abs(counts[key] / n - p) < 0.012, (mode, key, counts)  # 5 sigma <= 0.0125
    counts = Counter(sched.choose(step, rng, buffer_full=False) for _ in range(n))
    assert counts["replay"] == 0 and abs(counts["fresh"] / n - tau_a) < 0.012


def test_adaptive_state_round_trip(tmp_path):
    sched = AdaptiveSchedule(init_threshold=0.1, loss_eps=0.1, total_steps=50)
    for val in (2.0, 2.3, 2.0):
        sched.update(val)
    assert sched.threshold == pytest.approx(0.2) and sched.prev_loss == 2.3
    torch.save({"schedule": sched.state_dict()}, tmp_path / "ckpt.pt")
    state = torch.load(tmp_path / "ckpt.pt", weights_only=True)["schedule"]
    fresh = AdaptiveSchedule(init_threshold=0.1, loss_eps=0.1, total_steps=50)
    assert fresh.prev_loss is None
    fresh.load_state_dict(state)
    assert (fresh.threshold, fresh.prev_loss) == (sched.threshold, sched.prev_loss)
    for val in (2.35, 2.45, 2.4):  # identical behaviour afterwards
        assert fresh.update(val) == sched.update(val)
        assert (fresh.threshold, fresh.prev_loss) == (sched.threshold, sched.prev_loss)
    # the unset prev_loss (no step-0 evaluation yet) round-trips as None
    empty = AdaptiveSchedule(total_steps=50)
    torch.save(empty.state_dict(), tmp_path / "empty.pt")
    fresh.load_state_dict(torch.load(tmp_path / "empty.pt", weights_only=True))
    assert fresh.prev_loss is None and fresh.threshold == 0.0
    with pytest.raises(ValueError):
        fresh.load_state_dict({"threshold": 0.1})


@pytest.mark.parametrize("kwargs", [dict(init_threshold=1.5), dict(replay_ratio="linear"), dict(total_steps=0),
                                    dict(increment=0.0), dict(loss_eps=-0.1)])
def test_adaptive_rejects_bad_config(kwargs):
    with pytest.raises(ValueError):
        AdaptiveSchedule(**{"total_steps": 10, **kwargs})


# ------------------------------------------------------------------------------------------------- ReplayBuffer
def make_batch(start, n, length=4):
    """n items whose codes row i is all (start + i) and whose label is start + i."""
    ids = torch.arange(start, start + n)
    return ids[:, None].repeat(1, length), ids


def ids_in(buf):
    return buf.state_dict()["fields"][1].tolist() if len(buf) else []


def test_buffer_fifo_eviction_at_capacity():
    buf = ReplayBuffer(capacity=5)
    buf.push(*make_batch(0, 3))
    assert len(buf) == 3 and not buf.full and ids_in(buf) == [0, 1, 2]
    buf.push(*make_batch(3, 1))
    assert len(buf) == 4 and not buf.full  # full means len == capacity
    buf.push(*make_batch(4, 1))
    assert len(buf) == 5 and buf.full and ids_in(buf) == [0, 1, 2, 3, 4]
    buf.push(*make_batch(5, 3))  # the three oldest go
    assert len(buf) == 5 and buf.full and ids_in(buf) == [3, 4, 5, 6, 7]
    buf.push(*make_batch(100, 7))  # a batch larger than capacity keeps its last 5 rows
    assert ids_in(buf) == [102, 103, 104, 105, 106]


def test_buffer_items_are_private_cpu_copies():
    buf = ReplayBuffer(capacity=4)
    codes, labels = make_batch(0, 4)
    buf.push(codes, labels)
    codes.fill_(-1)
    labels.fill_(-1)
    got_codes, got_labels = buf.sample(4, np.random.default_rng(0))
    assert sorted(got_labels.tolist()) == [0, 1, 2, 3]
    assert (got_codes == got_labels[:, None]).all()  # fields of one item stay together
    assert got_codes.shape == (4, 4) and got_codes.dtype == torch.long and got_labels.shape == (4,)


def test_buffer_rejects_mismatched_items_and_short_samples():
    buf = ReplayBuffer(capacity=8)
    buf.push(*make_batch(0, 3))
    with pytest.raises(ValueError):
        buf.push(*make_batch(3, 2, length=5))  # different code length
    with pytest.raises(ValueError):
        buf.push(torch.zeros(2, 4, dtype=torch.long), torch.zeros(3, dtype=torch.long))  # ragged batch
    with pytest.raises(ValueError):
        buf.sample(4, np.random.default_rng(0))  # only 3 items: no sampling with replacement or short batch
    with pytest.raises(TypeError):
        buf.sample(2, torch.Generator())


@pytest.mark.parametrize("make_rng", [lambda: np.random.default_rng(3), lambda: random.Random(3)])
def test_buffer_samples_without_replacement_and_uniformly(make_rng):
    buf, rng = ReplayBuffer(capacity=20), make_rng()
    buf.push(*make_batch(0, 20))
    counts, draws = Counter(), 4000
    for _ in range(draws):
        codes, labels = buf.sample(5, rng)
        ids = labels.tolist()
        assert len(set(ids)) == 5  # no duplicates within one batch
        assert (codes == labels[:, None]).all()
        counts.update(ids)
    assert set(counts) == set(range(20))
    # each item is in a batch with probability 5/20: mean 1000, sd sqrt(4000 * 0.25 * 0.75) = 27.4
    assert all(abs(c - 1000) < 140 for c in counts.values()), counts


def test_buffer_state_round_trip_gives_identical_samples(tmp_path):
    buf = ReplayBuffer(capacity=6)
    buf.push(*make_batch(0, 4))
    buf.push(*make_batch(4, 5))  # wrapped: holds items 3..8
    torch.save({"buffer": buf.state_dict()}, tmp_path / "ckpt.pt")
    state = torch.load(tmp_path / "ckpt.pt", weights_only=True)["buffer"]
    restored = ReplayBuffer(capacity=6)
    restored.load_state_dict(state)
    assert len(restored) == 6 and restored.full and ids_in(restored) == [3, 4, 5, 6, 7, 8]
    rng_a, rng_b = np.random.default_rng(11), np.random.default_rng(11)
    for _ in range(5):
        for a, b in zip(buf.sample(3, rng_a), restored.sample(3, rng_b)):
            assert torch.equal(a, b)
    # and the FIFO order survives: the next push evicts the same items
    buf.push(*make_batch(9, 2))
    restored.push(*make_batch(9, 2))
    assert ids_in(restored) == ids_in(buf) == [5, 6, 7, 8, 9, 10]
    # an empty buffer round-trips too; a capacity mismatch is refused
    torch.save(ReplayBuffer(capacity=6).state_dict(), tmp_path / "empty.pt")
    restored.load_state_dict(torch.load(tmp_path / "empty.pt", weights_only=True))
    assert len(restored) == 0
    with pytest.raises(ValueError):
        ReplayBuffer(capacity=7).load_state_dict(state)
