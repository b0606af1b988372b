"""Selective, reweighted teacher supervision: one weight per position (the token-weighting axis).

Not every teacher prediction deserves the same trust: where the teacher is unsure, or rejects the token the
sequence actually has, its distribution is a poor target (SelecTKD / SpecKD gating, confidence and entropy
selection; docs/distillation.md sections 5 and 8.3). `WeightingConfig` documents the selectors and scores,
varkd.selection names them. Weights are computed from detached logits at temperature 1 and never carry gradient.
A tempered score (power < 1) keeps the order of the positions but narrows the spread of their weights;
space=clusters asks the same questions of the cluster marginals, where codes that decode alike no longer count as
disagreement.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from varkd.clusters import cluster_logits
from varkd.config import WeightingConfig
from varkd.losses import log_probs
from varkd.selection import NORMALIZATIONS, REWEIGHTS, SELECTORS, SPACES


def teacher_entropy(logp: torch.Tensor) -> torch.Tensor:
    """H(p) per position in nats; zero-probability entries contribute 0."""
    return -(logp.exp() * logp.masked_fill(logp == -math.inf, 0.0)).sum(-1)


def token_weights(cfg: WeightingConfig, student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                  tokens: torch.Tensor, clusters: Optional[tuple[torch.Tensor, int]] = None) -> torch.Tensor:
    """Weights [B, T] of the positions of sequences `tokens` [B, T] (logits [B, T, V] predict them).

    space=clusters reads both models' cluster marginals (clusters: the codes in cluster order and their number,
    as `varkd.clusters.cluster_logits` takes them) and each token as its cluster.
    """
    with torch.no_grad():
        student_logits, teacher_logits = student_logits.detach(), teacher_logits.detach()
        if cfg.space not in SPACES:
            raise ValueError(f"weighting.space={cfg.space!r} is not one of {list(SPACES)}")
        if cfg.space == "clusters":
            if clusters is None:
                raise ValueError("weighting.space=clusters needs the method's clusters")
            order, k = clusters
            student_logits, teacher_logits = (cluster_logits(x.float(), order, k) for x in (student_logits,
                                                                                            teacher_logits))
            tokens = torch.argsort(order).to(tokens.device)[tokens] // (len(order) // k)
        logp = log_probs(teacher_logits)
        gate = torch.ones(tokens.shape, device=logp.device)
        if cfg.selector != "none":
            if cfg.selector == "confidence":
                selected = logp.max(-1).values.exp() >= cfg.threshold
            elif cfg.selector == "entropy":
                selected = teacher_entropy(logp) <= cfg.threshold
            elif cfg.selector == "acceptance":
                logq = log_probs(student_logits)
                log_ratio = (logp - logq).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
                selected = log_ratio.clamp(max=0.0).exp() >= cfg.threshold
            elif cfg.selector == "topk":  # the token's teacher probability is at least the k-th largest one
                k = min(cfg.top_k, logp.shape[-1])
                kth = logp.topk(k, dim=-1).values[..., -1]
                selected = logp.gather(-1, tokens.unsqueeze(-1)).squeeze(-1) >= kth
            else:
                raise ValueError(f"weighting.selector={cfg.selector!r} is not one of {list(SELECTORS)}")
            gate = torch.where(selected, 1.0, cfg.low_weight)
        if cfg.reweight == "confidence":
            gate = gate * logp.max(-1).values.exp() ** cfg.power
        elif cfg.reweight == "entropy":
            gate = gate * (1.0 - teacher_entropy(logp) / math.log(logp.shape[-1])).clamp(min=0.0) ** cfg.power
        elif cfg.reweight != "none":
            raise ValueError(f"weighting.reweight={cfg.reweight!r} is not one of {list(REWEIGHTS)}")
    return gate


def weighted_mean(per_position: torch.Tensor, weights: torch.Tensor, normalize: str) -> torch.Tensor:
    """The weighted loss of positions [..., T]: sum(w * D) / sum(w) over the batch ("weights"; 0 when every weight
    is 0), each sequence's sum(w * D) / sum(w) averaged over the sequences that have weight ("sequences"), or
    sum(w * D) / number of positions ("positions")."""
    # masked positions may hold +inf divergences (e.g. FKL where the student gives 0): keep them out of the sum
    weighted = torch.where(weights > 0, weights * per_position, 0.0)
    tiny = torch.finfo(weights.dtype).tiny
    if normalize == "weights":
        return weighted.sum() / weights.sum().clamp(min=tiny)
    if normalize == "sequences":
        mass = weights.sum(-1)
        per_sequence = weighted.sum(-1) / mass.clamp(min=tiny)
        return per_sequence.sum() / (mass > 0).sum().clamp(min=1)
    if normalize == "positions":
        return weighted.sum() / per_position.numel()
    raise ValueError(f"weighting.normalize={normalize!r} is not one of {list(NORMALIZATIONS)}")
