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


def token_weights(cfg: WeightingConfig, student_BTV: torch.Tensor, teacher_BTV: torch.Tensor, tokens_BT: torch.Tensor,
                  clusters: Optional[tuple[torch.Tensor, int]] = None) -> torch.Tensor:
    """Weights [B, T] of the positions of sequences tokens_BT; the two models' logits student_BTV and teacher_BTV
    predict them.

    space=clusters reads both models' cluster marginals (clusters: the codes in cluster order and their number,
    as `varkd.clusters.cluster_logits` takes them) and each token as its cluster.
    """
    with torch.no_grad():
        student_BTV, teacher_BTV = student_BTV.detach(), teacher_BTV.detach()
        if cfg.space not in SPACES:
            raise ValueError(f"weighting.space={cfg.space!r} is not one of {list(SPACES)}")
        if cfg.space == "clusters":
            if clusters is None:
                raise ValueError("weighting.space=clusters needs the method's clusters")
            order, k = clusters  # from here on V is the number of clusters and a token is its cluster
            student_BTV, teacher_BTV = (cluster_logits(x.float(), order, k) for x in (student_BTV, teacher_BTV))
            tokens_BT = torch.argsort(order).to(tokens_BT.device)[tokens_BT] // (len(order) // k)
        logp_BTV = log_probs(teacher_BTV)
        gate_BT = torch.ones(tokens_BT.shape, device=logp_BTV.device)
        if cfg.selector != "none":
            if cfg.selector == "confidence":
                selected_BT = logp_BTV.max(-1).values.exp() >= cfg.threshold
            elif cfg.selector == "entropy":
                selected_BT = teacher_entropy(logp_BTV) <= cfg.threshold
            elif cfg.selector == "acceptance":
                logq_BTV = log_probs(student_BTV)
                log_ratio_BT = (logp_BTV - logq_BTV).gather(-1, tokens_BT.unsqueeze(-1)).squeeze(-1)
                selected_BT = log_ratio_BT.clamp(max=0.0).exp() >= cfg.threshold
            elif cfg.selector == "topk":  # the token's teacher probability is at least the k-th largest one
                k = min(cfg.top_k, logp_BTV.shape[-1])
                kth_BT = logp_BTV.topk(k, dim=-1).values[..., -1]
                selected_BT = logp_BTV.gather(-1, tokens_BT.unsqueeze(-1)).squeeze(-1) >= kth_BT
            else:
                raise ValueError(f"weighting.selector={cfg.selector!r} is not one of {list(SELECTORS)}")
            gate_BT = torch.where(selected_BT, 1.0, cfg.low_weight)
        if cfg.reweight == "confidence":
            gate_BT = gate_BT * logp_BTV.max(-1).values.exp() ** cfg.power
        elif cfg.reweight == "entropy":
            certainty_BT = (1.0 - teacher_entropy(logp_BTV) / math.log(logp_BTV.shape[-1])).clamp(min=0.0)
            gate_BT = gate_BT * certainty_BT**cfg.power
        elif cfg.reweight != "none":
            raise ValueError(f"weighting.reweight={cfg.reweight!r} is not one of {list(REWEIGHTS)}")
    return gate_BT


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
