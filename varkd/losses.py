"""Per-position losses over next-token logits, in float32 log space (docs: docs/distillation.md sections 1-3, 9).

Every function returns one value per position ([B, T]); `reduce` turns them into the scalar loss, so token
weighting and masking stay in one place. p is the teacher, q the student. Every divergence takes the softmax of
both logits at the same temperature tau and is multiplied by tau^2 (Hinton), so gradients keep their scale
across tau and the terms can be mixed with a tau = 1 CE.

Logits may be top-k filtered (-inf entries). A term with zero probability contributes exactly 0, and mixtures
are built in log space, so they are never -inf where a weighted part is positive: no NaN in values or
gradients. A position whose divergence is infinite in exact maths (FKL where q = 0 < p, RKL where p = 0 < q:
a filtered teacher makes RKL infinite unless the student is filtered too) is +inf, not hidden, and gets zero
gradient so it cannot spread NaN into the rest of the batch. The mixture divergences (JSD, SKL, SRKL with
0 < weight) and TVD are finite on any supports.
"""
from __future__ import annotations

import inspect
import math
from typing import Callable

import torch
import torch.nn.functional as F


def log_probs(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    return F.log_softmax(logits.float() / temperature, dim=-1)


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Hard-label CE per position: -log q(x_n)."""
    return -log_probs(logits).gather(-1, targets.unsqueeze(-1)).squeeze(-1)


def kl(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """KL(p || q) = sum_v p (log p - log q) per position.

    Differences are masked before the product, so no 0 * inf (NaN) appears in the value or its gradient:
    terms with p = 0 are 0, and a term with p > 0 = q makes the position +inf with zero gradient.
    """
    support = logp > -math.inf
    finite = support & (logq > -math.inf)
    terms = logp.exp() * torch.where(finite, logp - logq, 0.0)
    return terms.sum(-1).masked_fill((support & ~finite).any(-1), math.inf)


def log_mixture(logp: torch.Tensor, logq: torch.Tensor, weight_p: float, weight_q: float) -> torch.Tensor:
    """log(weight_p p + weight_q q) by logsumexp (a zero weight drops its part exactly).

    Entries where both weighted parts are 0 stay -inf but are kept out of logsumexp, whose gradient there
    would be exp(-inf + inf) = NaN even when multiplied by 0.
    """
    log_wp, log_wq = torch.tensor([weight_p, weight_q], dtype=torch.float64).log().tolist()
    parts = torch.stack([logp + log_wp, logq + log_wq])
    empty = (parts == -math.inf).all(0)
    return torch.logsumexp(parts.masked_fill(empty, 0.0), 0).masked_fill(empty, -math.inf)


def _check_weight(name: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {value}")


def forward_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """tau^2 KL(p_T^tau || q_S^tau): word-level KD, mode-covering (Hinton's tau^2 keeps gradients O(1))."""
    return temperature**2 * kl(log_probs(teacher_logits, temperature), log_probs(student_logits, temperature))


def reverse_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """tau^2 KL(q_S^tau || p_T^tau): mode-seeking (MiniLLM, GKD's RKL)."""
    return temperature**2 * kl(log_probs(student_logits, temperature), log_probs(teacher_logits, temperature))


def jsd(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, beta: float, temperature: float = 1.0
) -> torch.Tensor:
    """GKD's generalized JSD in TRL's current form: beta KL(p || M) + (1 - beta) KL(q || M), M = beta p + (1 - beta) q.

    beta is the teacher's weight: JSD/beta -> FKL as beta -> 0 and JSD/(1 - beta) -> RKL as beta -> 1; like TRL,
    beta = 0 and beta = 1 return exactly FKL and RKL. The gradient flows through q inside M (no detach, as TRL).
    """
    _check_weight("beta", beta)
    if beta == 0.0:
        return forward_kl(student_logits, teacher_logits, temperature)
    if beta == 1.0:
        return reverse_kl(student_logits, teacher_logits, temperature)
    logp, logq = log_probs(teacher_logits, temperature), log_probs(student_logits, temperature)
    logm = log_mixture(logp, logq, beta, 1.0 - beta)
    return temperature**2 * (beta * kl(logp, logm) + (1.0 - beta) * kl(logq, logm))


def skew_kl(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, alpha: float, temperature: float = 1.0
) -> torch.Tensor:
    """DistiLLM's skew KL: KL(p || alpha p + (1 - alpha) q), the teacher mixed into the student side.

    Bounded by FKL (equal at alpha = 0) and finite for alpha > 0 even where q = 0; gradient through q in the mixture.
    """
    _check_weight("alpha", alpha)
    logp, logq = log_probs(teacher_logits, temperature), log_probs(student_logits, temperature)
    return temperature**2 * kl(logp, log_mixture(logp, logq, alpha, 1.0 - alpha))


def skew_reverse_kl(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    alpha: float,
    temperature: float = 1.0,
    detach_mixture: bool = False,
) -> torch.Tensor:
    """DistiLLM's skew reverse KL: KL(q || (1 - alpha) p + alpha q), the student mixed into the teacher side.

    Bounded by RKL (equal at alpha = 0) and finite for alpha > 0 even where p = 0. detach_mixture=False keeps the
    gradient through q inside the mixture (DistiLLM v1); True stop-gradients it there (DistiLLM-2). The value is
    the same either way.
    """
    _check_weight("alpha", alpha)
    logp, logq = log_probs(teacher_logits, temperature), log_probs(student_logits, temperature)
    logm = log_mixture(logp, logq.detach() if detach_mixture else logq, 1.0 - alpha, alpha)
    return temperature**2 * kl(logq, logm)


def total_variation(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """tau^2 * 0.5 sum_v |p - q|: bounded and symmetric (DistiLLM's tv_distance), in [0, tau^2]."""
    p, q = log_probs(teacher_logits, temperature).exp(), log_probs(student_logits, temperature).exp()
    return temperature**2 * 0.5 * (p - q).abs().sum(-1)


DIVERGENCES: dict[str, Callable[..., torch.Tensor]] = {
    "fkl": forward_kl,
    "rkl": reverse_kl,
    "jsd": jsd,
    "skl": skew_kl,
    "srkl": skew_reverse_kl,
    "tvd": total_variation,
}


def divergence(
    name: str,
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    temperature: float = 1.0,
    beta: float = 0.5,
    alpha: float = 0.1,
    detach_mixture: bool = False,
) -> torch.Tensor:
    """The config's divergence by name, given only the options it takes (so configs can carry all of them)."""
    if name not in DIVERGENCES:
        raise ValueError(f"unknown divergence {name!r}; valid: {', '.join(DIVERGENCES)}")
    fn = DIVERGENCES[name]
    options = dict(temperature=temperature, beta=beta, alpha=alpha, detach_mixture=detach_mixture)
    taken = inspect.signature(fn).parameters
    return fn(student_logits, teacher_logits, **{k: v for k, v in options.items() if k in taken})


def reduce(per_position: torch.Tensor) -> torch.Tensor:
    """Token mean over the batch (all sequences have the same length, so it equals the sequence mean)."""
    return per_position.mean()
