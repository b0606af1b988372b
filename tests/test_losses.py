"""Per-position losses against float64 brute force, closed-form gradients and -inf safety."""
import itertools
import math

import pytest
import torch

from varkd import losses


def brute_kl(p_logits, q_logits, tau=1.0):
    """KL(softmax(p/tau) || softmax(q/tau)) per position, float64, by an explicit loop."""
    out = torch.zeros(p_logits.shape[:-1], dtype=torch.float64)
    for idx in itertools.product(*[range(s) for s in p_logits.shape[:-1]]):
        p = torch.softmax(p_logits[idx].double() / tau, -1)
        q = torch.softmax(q_logits[idx].double() / tau, -1)
        out[idx] = sum(float(p[v]) * (math.log(p[v]) - math.log(q[v])) for v in range(len(p)) if p[v] > 0)
    return out


@pytest.mark.parametrize("tau", [1.0, 2.0])
def test_forward_kl_matches_float64_brute_force(tau):
    g = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(2, 3, 7, generator=g) * 3, torch.randn(2, 3, 7, generator=g) * 3
    got = losses.forward_kl(student, teacher, tau)
    want = tau**2 * brute_kl(teacher, student, tau)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)


def test_forward_kl_gradient_is_tau_times_q_minus_p():
    """d/dz_S of tau^2 KL(p^tau || q^tau) = tau (q^tau - p^tau) (Hinton et al.)."""
    tau = 2.0
    g = torch.Generator().manual_seed(1)
    teacher = torch.randn(4, 9, generator=g, dtype=torch.float64)
    student = torch.randn(4, 9, generator=g, dtype=torch.float64, requires_grad=True)
    # losses work in float32; compare the float32 gradient with the float64 closed form
    loss = losses.forward_kl(student.float(), teacher.float(), tau).sum()
    (grad,) = torch.autograd.grad(loss, student)
    want = tau * (torch.softmax(student.detach() / tau, -1) - torch.softmax(teacher / tau, -1))
    torch.testing.assert_close(grad, want, rtol=1e-4, atol=1e-6)


def test_kl_is_zero_for_equal_and_positive_otherwise():
    logits = torch.randn(5, 11)
    assert losses.forward_kl(logits, logits).abs().max() < 1e-6
    assert (losses.forward_kl(logits, torch.randn(5, 11)) > 0).all()


def test_no_nan_with_top_k_filtered_teacher():
    teacher = torch.randn(3, 10)
    teacher[:, 5:] = float("-inf")  # zero teacher probability: those terms must contribute 0, not NaN
    student = torch.randn(3, 10, requires_grad=True)
    loss = losses.forward_kl(student, teacher)
    loss.sum().backward()
    assert torch.isfinite(loss).all() and torch.isfinite(student.grad).all()
    torch.testing.assert_close(loss.double(), brute_kl(teacher, student.detach()), rtol=1e-5, atol=1e-6)


def test_cross_entropy_is_minus_log_prob_of_target():
    logits, targets = torch.randn(2, 4, 6), torch.randint(0, 6, (2, 4))
    want = torch.nn.functional.cross_entropy(logits.reshape(-1, 6), targets.reshape(-1), reduction="none")
    torch.testing.assert_close(losses.cross_entropy(logits, targets), want.reshape(2, 4))


# --- divergences: float64 brute force in probability space, independent of the log-space implementation ---

CASES = [  # (name, options): each weight at an asymmetric value too, so a swapped weight shows
    ("fkl", {}),
    ("rkl", {}),
    ("jsd", {"beta": 0.1}),
    ("jsd", {"beta": 0.5}),
    ("jsd", {"beta": 0.9}),
    ("skl", {"alpha": 0.1}),
    ("skl", {"alpha": 0.6}),
    ("srkl", {"alpha": 0.1}),
    ("srkl", {"alpha": 0.6}),
    ("srkl", {"alpha": 0.1, "detach_mixture": True}),
    ("srkl", {"alpha": 0.6, "detach_mixture": True}),
    ("tvd", {}),
]
CASE_IDS = [name + "".join(f"-{k}={v}" for k, v in opts.items()) for name, opts in CASES]


def kl64(a, b):
    """KL(a || b) in float64 via xlogy: 0 log 0 = 0, and a > 0 = b gives +inf."""
    return (torch.xlogy(a, a) - torch.xlogy(a, b)).sum(-1)


def brute(name, student, teacher, tau=1.0, beta=0.5, alpha=0.1, detach_mixture=False):
    """tau^2 D(p, q) from the explicit formulas, with p = softmax(teacher / tau), q = softmax(student / tau)."""
    p, q = torch.softmax(teacher.double() / tau, -1), torch.softmax(student.double() / tau, -1)
    if name == "fkl":
        d = kl64(p, q)
    elif name == "rkl":
        d = kl64(q, p)
    elif name == "jsd":
        m = beta * p + (1 - beta) * q
        d = beta * kl64(p, m) + (1 - beta) * kl64(q, m)
    elif name == "skl":
        d = kl64(p, alpha * p + (1 - alpha) * q)
    elif name == "srkl":
        d = kl64(q, (1 - alpha) * p + alpha * (q.detach() if detach_mixture else q))
    else:
        d = 0.5 * (p - q).abs().sum(-1)
    return tau**2 * d


def value_and_grad(name, opts, student, teacher, tau=1.0):
    """Implementation value and d(sum_n w_n D_n)/d student for random w (so per-position mix-ups show)."""
    student = student.detach().float().requires_grad_()
    value = losses.DIVERGENCES[name](student, teacher.float(), temperature=tau, **opts)
    w = torch.rand(value.shape, generator=torch.Generator().manual_seed(9))
    (grad,) = torch.autograd.grad((torch.where(value.isinf(), 0.0, value) * w).sum(), student)
    return value, grad, w


@pytest.mark.parametrize("shape", [(2, 3, 7), (3, 16), (1, 2, 2)])
@pytest.mark.parametrize("tau", [1.0, 2.0])
@pytest.mark.parametrize("name,opts", CASES, ids=CASE_IDS)
def test_divergence_and_gradient_match_float64_brute_force(name, opts, tau, shape):
    g = torch.Generator().manual_seed(hash((name, tau, shape)) % 2**31)
    student = (torch.randn(shape, generator=g, dtype=torch.float64) * 3).requires_grad_()
    teacher = torch.randn(shape, generator=g, dtype=torch.float64) * 3
    value, grad, w = value_and_grad(name, opts, student, teacher, tau)
    want = brute(name, student, teacher, tau, **opts)
    (want_grad,) = torch.autograd.grad((want * w.double()).sum(), student)
    assert value.shape == shape[:-1] and value.dtype == torch.float32
    torch.testing.assert_close(value.double(), want.detach(), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(grad.double(), want_grad, rtol=1e-4, atol=1e-6)


def random_pair(*shape, seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g) * scale, torch.randn(shape, generator=g) * scale


def test_jsd_limits_and_exact_endpoints_are_fkl_and_rkl():
    """The limits need beta * max(p/q) << 1: unit-scale logits (p/q ~ 1e5 at scale 3 leaves 17% at beta = 1e-4)."""
    student, teacher = random_pair(4, 5, 12, scale=1.0)
    fkl, rkl = losses.forward_kl(student, teacher), losses.reverse_kl(student, teacher)
    assert ((fkl - rkl).abs() / fkl).max() > 0.2  # a swapped limit would fail the 1% checks below
    eps = 1e-4
    torch.testing.assert_close(losses.jsd(student, teacher, eps) / eps, fkl, rtol=1e-2, atol=0)
    torch.testing.assert_close(losses.jsd(student, teacher, 1 - eps) / eps, rkl, rtol=1e-2, atol=0)
    assert torch.equal(losses.jsd(student, teacher, 0.0), fkl)
    assert torch.equal(losses.jsd(student, teacher, 1.0), rkl)
    for beta in (-0.1, 1.5):
        with pytest.raises(ValueError, match="beta"):
            losses.jsd(student, teacher, beta)


def test_distillm_js_distance_lam_0_9_is_gkd_jsd_beta_0_1():
    """docs/distillation.md section 2: DistiLLM's js_distance(lam) mixes M = (1 - lam) p + lam q, weighting KL(q||M) by lam."""
    student, teacher = random_pair(3, 4, 10, seed=1)
    p, q, lam = torch.softmax(teacher.double(), -1), torch.softmax(student.double(), -1), 0.9
    mixed = (1 - lam) * p + lam * q
    distillm = lam * kl64(q, mixed) + (1 - lam) * kl64(p, mixed)
    torch.testing.assert_close(losses.jsd(student, teacher, 0.1).double(), distillm, rtol=1e-5, atol=1e-7)
    assert (losses.jsd(student, teacher, 0.9).double() - distillm).abs().max() > 1e-3


@pytest.mark.parametrize("alpha", [0.05, 0.1, 0.5, 0.9])
def test_skew_divergences_are_bounded_by_unskewed_and_equal_at_alpha_0(alpha):
    student, teacher = random_pair(4, 6, 9, seed=2)
    fkl, rkl = losses.forward_kl(student, teacher), losses.reverse_kl(student, teacher)
    skl, srkl = losses.skew_kl(student, teacher, alpha), losses.skew_reverse_kl(student, teacher, alpha)
    assert (skl < fkl).all() and (srkl < rkl).all() and (skl > 0).all() and (srkl > 0).all()
    assert torch.equal(losses.skew_kl(student, teacher, 0.0), fkl)
    assert torch.equal(losses.skew_reverse_kl(student, teacher, 0.0), rkl)
    assert losses.skew_kl(student, teacher, 1.0).abs().max() < 1e-6  # KL(p || p)
    assert losses.skew_reverse_kl(student, teacher, 1.0).abs().max() < 1e-6  # KL(q || q)
    with pytest.raises(ValueError, match="alpha"):
        losses.skew_kl(student, teacher, 1.1)


def test_distillm_skewed_forward_kl_cross_entropy_minus_skl_is_teacher_entropy():
    """docs/distillation.md section 3: DistiLLM's code computes -sum p log(alpha p + (1 - alpha) q), SKL plus H(p)."""
    student, teacher = random_pair(3, 5, 11, seed=3)
    p, q, alpha = torch.softmax(teacher.double(), -1), torch.softmax(student.double(), -1), 0.1
    distillm = -(p * torch.log(alpha * p + (1 - alpha) * q)).sum(-1)
    entropy = -(p * p.log()).sum(-1)
    skl = losses.skew_kl(student, teacher, alpha).double()
    torch.testing.assert_close(distillm - skl, entropy, rtol=1e-5, atol=1e-6)


def test_total_variation_is_bounded_symmetric_and_zero_on_equal_inputs():
    student, teacher = random_pair(5, 4, 13, seed=4)
    tvd = losses.total_variation(student, teacher)
    assert (tvd > 0).all() and (tvd < 1).all()
    assert torch.equal(tvd, losses.total_variation(teacher, student))
    assert losses.total_variation(student, student).abs().max() < 1e-6
    teacher[..., :6], student[..., 6:] = float("-inf"), float("-inf")  # disjoint supports: the maximum, 1
    torch.testing.assert_close(losses.total_variation(student, teacher), torch.ones(5, 4))


def test_detach_mixture_changes_the_gradient_but_not_the_value():
    student, teacher = random_pair(3, 4, 8, seed=5)
    student.requires_grad_()
    values, grads = [], []
    for detach in (False, True):
        value = losses.skew_reverse_kl(student, teacher, 0.3, detach_mixture=detach)
        values.append(value)
        grads.append(torch.autograd.grad(value.sum(), student)[0])
    assert torch.equal(values[0], values[1])
    assert (grads[0] - grads[1]).abs().max() > 1e-3


# --- -inf (top-k filtered) logits ---

def top_k(logits, k):
    """Keep each row's k largest logits, the rest -inf (LlamaGen-style top-k filtering)."""
    kth = logits.topk(k, -1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def filtered(scenario, seed):
    student, teacher = random_pair(3, 4, 8, seed=seed)
    if scenario in ("teacher", "both"):
        teacher = top_k(teacher, 3)
    if scenario in ("student", "both"):
        student = top_k(student, 4)
    if scenario == "disjoint":
        teacher[..., 4:], student[..., :4] = float("-inf"), float("-inf")
    return student, teacher


@pytest.mark.parametrize("scenario", ["teacher", "student", "both", "disjoint"])
@pytest.mark.parametrize("name,opts", CASES, ids=CASE_IDS)
def test_filtered_logits_give_exact_values_and_no_nan(name, opts, scenario):
    """Values equal the float64 maths, +inf included (FKL: q = 0 < p; RKL: p = 0 < q); gradients finite."""
    student, teacher = filtered(scenario, seed=6)
    value, grad, _ = value_and_grad(name, opts, student, teacher)
    want = brute(name, student, teacher, **opts)
    assert not value.isnan().any() and grad.isfinite().all()
    torch.testing.assert_close(value.double(), want, rtol=1e-4, atol=1e-6)  # infs must match exactly
    if name not in ("fkl", "rkl"):  # mixtures and TVD are finite on any supports
        assert value.isfinite().all()


@pytest.mark.parametrize("name,opts", [c for c in CASES if c[0] != "rkl"], ids=[i for i in CASE_IDS if i != "rkl"])
def test_filtered_teacher_is_finite_with_exact_gradient(name, opts):
    """The common top-k case. (RKL is excluded: with a filtered teacher it is +inf, see the next test.)"""
    student, teacher = filtered("teacher", seed=7)
    student = student.double().requires_grad_()
    value, grad, w = value_and_grad(name, opts, student, teacher)
    (want_grad,) = torch.autograd.grad((brute(name, student, teacher, **opts) * w.double()).sum(), student)
    assert value.isfinite().all()
    torch.testing.assert_close(grad.double(), want_grad, rtol=1e-4, atol=1e-6)


def test_infinite_positions_are_inf_with_zero_gradient_and_leave_the_rest_exact():
    """FKL with a student -inf where p > 0, and RKL with a teacher -inf where q > 0, are +inf; those positions
    get zero gradient, the other positions keep their exact gradient."""
    student, teacher = random_pair(2, 5, 8, seed=8)
    for fn, filtered_side in ((losses.forward_kl, "student"), (losses.reverse_kl, "teacher")):
        s, t = student.clone().requires_grad_(), teacher.clone()
        (s if filtered_side == "student" else t).data[0, 1:3, 2] = float("-inf")
        value = fn(s, t)
        (grad,) = torch.autograd.grad(torch.where(value.isinf(), 0.0, value).sum() + value[0, 1:3].sum(), s)
        assert value[0, 1:3].isinf().all() and (value[0, 1:3] > 0).all()
        assert value[:, 3:].isfinite().all() and value[1].isfinite().all()
        assert torch.equal(grad[0, 1:3], torch.zeros_like(grad[0, 1:3]))
        s0 = student.clone().requires_grad_()
        (want,) = torch.autograd.grad(fn(s0, teacher).sum() - fn(s0, teacher)[0, 1:3].sum(), s0)
        torch.testing.assert_close(grad, want)


# --- registry / dispatcher ---

def test_registry_names_the_config_divergences():
    assert losses.DIVERGENCES == {
        "fkl": losses.forward_kl, "rkl": losses.reverse_kl, "jsd": losses.jsd,
        "skl": losses.skew_kl, "srkl": losses.skew_reverse_kl, "tvd": losses.total_variation,
    }


@pytest.mark.parametrize("name", ["kl", "ce", "FKL"])
def test_divergence_rejects_unknown_names_listing_the_valid_ones(name):
    student, teacher = random_pair(1, 2, 5)
    with pytest.raises(ValueError, match=rf"unknown divergence '{name}'.*fkl, rkl, jsd, skl, srkl, tvd"):
        losses.divergence(name, student, teacher)


def test_divergence_routes_each_parameter_to_the_functions_that_take_it():
    student, teacher = random_pair(2, 3, 9, seed=10)
    student.requires_grad_()
    opts = dict(temperature=2.0, beta=0.3, alpha=0.25, detach_mixture=True)
    direct = {
        "fkl": losses.forward_kl(student, teacher, 2.0),
        "rkl": losses.reverse_kl(student, teacher, 2.0),
        "jsd": losses.jsd(student, teacher, 0.3, 2.0),
        "skl": losses.skew_kl(student, teacher, 0.25, 2.0),
        "srkl": losses.skew_reverse_kl(student, teacher, 0.25, 2.0, detach_mixture=True),
        "tvd": losses.total_variation(student, teacher, 2.0),
    }
    for name, want in direct.items():
        got = losses.divergence(name, student, teacher, **opts)
        assert torch.equal(got, want), name
        assert not torch.equal(got, losses.divergence(name, student, teacher)), name  # the options mattered
    grad = lambda v: torch.autograd.grad(v.sum(), student)[0]  # noqa: E731  detach_mixture shows in the gradient
    torch.testing.assert_close(grad(losses.divergence("srkl", student, teacher, alpha=0.25, detach_mixture=True)),
                               grad(losses.skew_reverse_kl(student, teacher, 0.25, detach_mixture=True)))
    assert not torch.equal(grad(losses.divergence("srkl", student, teacher, alpha=0.25, detach_mixture=True)),
                           grad(losses.divergence("srkl", student, teacher, alpha=0.25)))
    defaults = losses.divergence("jsd", student, teacher), losses.divergence("skl", student, teacher)
    assert torch.equal(defaults[0], losses.jsd(student, teacher, 0.5))
    assert torch.equal(defaults[1], losses.skew_kl(student, teacher, 0.1))
