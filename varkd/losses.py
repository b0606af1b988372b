"""Per-position losses over next-token logits, in float32 log space (docs: kd-methods.md sections 1, 9).

Every function returns one value per position ([B, T]); `reduce` turns them into the scalar loss, so token
weighting and masking stay in one place. Logits may be top-k filtered (-inf entries): terms with zero
probability contribute exactly 0, never NaN.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def log_probs(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    return F.log_softmax(logits.float() / temperature, dim=-1)


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Hard-label CE per position: -log q(x_n)."""
    return -log_probs(logits).gather(-1, targets.unsqueeze(-1)).squeeze(-1)


def kl(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """KL(p || q) = sum_v p (log p - log q) per position; 0 * anything = 0 where p = 0."""
    p = logp.exp()
    return torch.where(p > 0, p * (logp - logq), torch.zeros_like(p)).sum(-1)


def forward_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """tau^2 KL(p_T^tau || q_S^tau): word-level KD, mode-covering (Hinton's tau^2 keeps gradients O(1))."""
    return temperature**2 * kl(log_probs(teacher_logits, temperature), log_probs(student_logits, temperature))


def reduce(per_position: torch.Tensor) -> torch.Tensor:
    """Token mean over the batch (all sequences have the same length, so it equals the sequence mean)."""
    return per_position.mean()
