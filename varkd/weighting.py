"""Selective, reweighted teacher supervision: one weight per position (the token-weighting axis).

Not every teacher prediction deserves the same trust: where the teacher is unsure, or rejects the token the
sequence actually has, its distribution is a poor target (SelecTKD / SpecKD gating, confidence and entropy
selection; docs/distillation.md sections 5 and 8.3). `WeightingConfig` documents the selectors and scores. Weights are
computed from detached logits at temperature 1 and never carry gradient.
"""
from __future__ import annotations

import math

import torch

from varkd.config import WeightingConfig
from varkd.losses import log_probs


def teacher_entropy(logp: torch.Tensor) -> torch.Tensor:
    """H(p) per position in nats; zero-probability entries contribute 0."""
    return -(logp.exp() * logp.masked_fill(logp == -math.inf, 0.0)).sum(-1)


def token_weights(cfg: WeightingConfig, student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                  tokens: torch.Tensor) -> torch.Tensor:
    """Weights [B, T] of the positions of sequences `tokens` [B, T] (logits [B, T, V] predict them)."""
    with torch.no_grad():
        logp = log_probs(teacher_logits.detach())
        gate = torch.ones(tokens.shape, device=logp.device)
        if cfg.selector != "none":
            if cfg.selector == "confidence":
                selected = logp.max(-1).values.exp() >= cfg.threshold
            elif cfg.selector == "entropy":
                selected = teacher_entropy(logp) <= cfg.threshold
            elif cfg.selector == "acceptance":
                logq = log_probs(student_logits.detach())
                log_ratio = (logp - logq).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
                selected = log_ratio.clamp(max=0.0).exp() >= cfg.threshold
            else:  # topk: the token's teacher probability is at least the k-th largest one
                k = min(cfg.top_k, logp.shape[-1])
                kth = logp.topk(k, dim=-1).values[..., -1]
                selected = logp.gather(-1, tokens.unsqueeze(-1)).squeeze(-1) >= kth
            gate = torch.where(selected, 1.0, cfg.low_weight)
        if cfg.reweight == "confidence":
            gate = gate * logp.max(-1).values.exp()
        elif cfg.reweight == "entropy":
            gate = gate * (1.0 - teacher_entropy(logp) / math.log(logp.shape[-1])).clamp(min=0.0)
    return gate


def weighted_mean(per_position: torch.Tensor, weights: torch.Tensor, normalize: str) -> torch.Tensor:
    """sum(w * D) / sum(w) ("weights"; 0 when every weight is 0) or sum(w * D) / number of positions."""
    # masked positions may hold +inf divergences (e.g. FKL where the student gives 0): keep them out of the sum
    total = torch.where(weights > 0, weights * per_position, 0.0).sum()
    if normalize == "weights":
        return total / weights.sum().clamp(min=torch.finfo(weights.dtype).tiny)
    return total / per_position.numel()
