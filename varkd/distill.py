"""Distillation's pieces for GPT training on VQ codes: codes checked against a model, the frozen teacher and its
logits (cached or live), each term's loss and held-out NLL. The training step (`varkd.steps.train`) sums a method's
terms; the other steps and the diagnostics share the checks, the teacher's logits and the NLL.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch
import torch.utils.checkpoint

from varkd import losses
from varkd.checkpoints import load_gpt
from varkd.clusters import cluster_logits
from varkd.codes import CodeSet
from varkd.config import TermConfig
from varkd.io import load_npy
from varkd.loop import autocast
from varkd.models.gpt import GPT, GPTConfig
from varkd.sources import Batch
from varkd.weighting import token_weights, weighted_mean

def check_codes(codes: CodeSet, model: GPT, allow_null: bool = False) -> None:
    """Fail before any compute if the codes do not fit the model (vocabulary, grid, classes)."""
    cfg = model.config
    if codes.T != cfg.block_size:
        raise ValueError(f"{codes.source}: sequences of {codes.T} tokens, model block_size={cfg.block_size}")
    low, high = codes.code_range()
    if low < 0 or high >= cfg.vocab_size:
        raise ValueError(f"{codes.source}: codes span [{low}, {high}], model vocab_size={cfg.vocab_size} "
                         "(tokenizer codebook and backbone vocabulary differ)")
    labels = codes.labels
    if int(labels.min()) < 0 or int(labels.max()) >= cfg.num_classes + int(allow_null):
        raise ValueError(f"{codes.source}: labels span [{int(labels.min())}, {int(labels.max())}], model "
                         f"num_classes={cfg.num_classes}")


class TeacherTargets:
    """Teacher logits for a batch: read from a cache where the batch indexes one, else a live forward.

    Caches: ground_truth [N, A, 2, T, V] (every view of every training image, under its class and the null class),
    teacher_pool [N, T, V]
    (each pool sequence under the label it was sampled with). Student pools, mixed batches and fresh samples have
    none: the teacher scores them live, compiled with the student when `compile` (optim.compile).
    """

    def __init__(self, teacher: Optional[GPT], caches: dict[str, Optional[str]], codes: CodeSet, null_class: int,
                 counts: Optional[dict] = None, compile: bool = False):
        self.teacher, self.null_class = teacher, null_class
        self.scorer = torch.compile(teacher) if compile and teacher is not None else teacher
        self.counts = {} if counts is None else counts  # teacher_forwards, checkpointed with the run's counts
        self.caches = {}
        for name, path in caches.items():
            if path is None:
                continue
            cache = load_npy(path, "teacher logits", mmap_mode="r")
            expected = (codes.N, codes.A, 2) if name == "ground_truth" else (codes.N,)
            if cache.shape[: len(expected)] != expected or cache.ndim != len(expected) + 2:
                raise ValueError(f"teacher logits {path} have shape {cache.shape}, expected "
                                 f"[{', '.join(map(str, expected))}, T, V]")
            self.caches[name] = cache

    def __call__(self, batch: Batch, codes_BT: torch.Tensor, labels_B: torch.Tensor) -> torch.Tensor:
        """The teacher's logits [B, T, V] on the batch's sequences (codes_BT, labels_B: the batch on the device)."""
        cache = self.caches.get(batch.cache) if batch.index is not None else None
        if cache is not None:
            order = np.argsort(batch.index, kind="stable")  # sorted reads are much faster on a memory map
            if batch.cache == "ground_truth":
                is_null = (batch.labels == self.null_class).numpy().astype(np.int64)
                rows = cache[batch.index[order], batch.views[order], is_null[order]]
            else:
                rows = cache[batch.index[order]]
            logits_BTV = np.empty_like(rows)
            logits_BTV[order] = rows
            return torch.from_numpy(logits_BTV).to(codes_BT.device)
        if self.teacher is None:
            raise ValueError("this batch needs live teacher logits but the job has no teacher checkpoint")
        self.counts["teacher_forwards"] = self.counts.get("teacher_forwards", 0) + 1
        return teacher_logits(self.scorer, codes_BT, labels_B)


def teacher_logits(teacher: GPT, codes_BT: torch.Tensor, labels_B: torch.Tensor, precision: str = "bf16"
                   ) -> torch.Tensor:
    """Teacher-forced logits [B, T, V] of the frozen teacher: bfloat16 under bf16 autocast (as training scores live
    batches; the caches store them as float16), float32 with precision="fp32" (for exact comparisons). Not copied to
    float32: every consumer reads them through losses.log_probs or cluster_logits, which upcast, so a live target
    costs half the memory of a float32 one ([128, 256, 16384] logits: 1 GiB instead of 2)."""
    with torch.no_grad(), autocast(codes_BT.device, precision):  # head=False: GPT.forward's head casts to float32
        return teacher.output(teacher(codes_BT[:, :-1], labels_B, head=False))


@torch.no_grad()
def heldout_nll(model: GPT, codes: CodeSet, batch_size: int = 256, device: torch.device = torch.device("cpu"),
                   precision: str = "fp32") -> float:
    """Mean negative log-likelihood per code (nats) of held-out sequences (view 0) under their class labels."""
    was_training = model.training
    model.eval()
    total = 0.0
    for i in range(0, codes.N, batch_size):
        rows = np.arange(i, min(i + batch_size, codes.N))
        x, y = codes.batch(rows).to(device), codes.labels[rows].to(device)
        with autocast(device, precision):
            logits = model(x[:, :-1], y)
        total += losses.cross_entropy(logits, x).sum().item()
    model.train(was_training)
    return total / (codes.N * codes.T)


def term_loss(term: TermConfig, logits_BTV: torch.Tensor, codes_BT: torch.Tensor, target_BTV: Optional[torch.Tensor],
              temperature: float, clusters: Optional[tuple[torch.Tensor, int]] = None) -> torch.Tensor:
    """One term's scalar loss: hard-label CE on the sequence, or a divergence to the teacher over tokens and/or
    cluster marginals (clusters: the codes in cluster order and their number), weighted per position."""
    return reduce_term(term, *term_values(term, logits_BTV, codes_BT, target_BTV, temperature, clusters))


def chunked_term_loss(term: TermConfig, hidden_BTD: torch.Tensor, output: torch.nn.Linear, codes_BT: torch.Tensor,
                      target_BTV: Optional[torch.Tensor], temperature: float,
                      clusters: Optional[tuple[torch.Tensor, int]] = None, chunk: int = 4096) -> torch.Tensor:
    """`term_loss` of the logits output(hidden_BTD), computed about `chunk` positions at a time (whole positions
    along T). Each chunk's logits and divergence are recomputed in the backward (activation checkpointing), so
    neither pass holds more than one chunk's [.., V] float32 tensors: the student's logits of a GPT-B batch of
    256 x 256 positions are 4 GiB in float32. Same positions, same reduction: the value and gradient of
    `term_loss` up to float32 rounding."""
    B, T = codes_BT.shape
    step = max(1, chunk // B)

    def values(h_BSD, x_BS, t_BSV):  # S: the chunk's positions
        logits_BSV = torch.nn.functional.linear(h_BSD, output.weight).float()
        return term_values(term, logits_BSV, x_BS, t_BSV, temperature, clusters)

    parts = [torch.utils.checkpoint.checkpoint(values, hidden_BTD[:, s : s + step], codes_BT[:, s : s + step],
                                               None if target_BTV is None else target_BTV[:, s : s + step],
                                               use_reentrant=False)
             for s in range(0, T, step)]
    per_position_BT = torch.cat([v for v, _ in parts], dim=1)
    weights_BT = None if parts[0][1] is None else torch.cat([w for _, w in parts], dim=1)
    return reduce_term(term, per_position_BT, weights_BT)


def reduce_term(term: TermConfig, per_position_BT: torch.Tensor, weights_BT: Optional[torch.Tensor]) -> torch.Tensor:
    """A term's scalar loss from its values and weights per position (`term_values`)."""
    if weights_BT is None:
        return losses.reduce(per_position_BT)
    return weighted_mean(per_position_BT, weights_BT, term.weighting.normalize)


def term_values(term: TermConfig, logits_BTV: torch.Tensor, codes_BT: torch.Tensor,
                target_BTV: Optional[torch.Tensor], temperature: float,
                clusters: Optional[tuple[torch.Tensor, int]] = None
                ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """A term's value per position [B, T] and its weights [B, T] (None: unweighted), each position on its own."""
    if term.divergence == "ce":
        return losses.cross_entropy(logits_BTV, codes_BT), None
    options = dict(beta=term.beta, alpha=term.alpha, detach_mixture=term.detach_mixture)
    per_position_BT = 0.0
    if term.cluster_weight < 1:
        tokens_BT = losses.divergence(term.divergence, logits_BTV, target_BTV, temperature=temperature, **options)
        per_position_BT = (1 - term.cluster_weight) * tokens_BT
    if term.cluster_weight > 0:
        order, k = clusters
        student_BTK, teacher_BTK = (cluster_logits(x.float() / temperature, order, k) for x in (logits_BTV, target_BTV))
        marginals_BT = temperature**2 * losses.divergence(term.divergence, student_BTK, teacher_BTK, **options)
        per_position_BT = per_position_BT + term.cluster_weight * marginals_BT
    if not term.weighting.active:
        return per_position_BT, None
    return per_position_BT, token_weights(term.weighting, logits_BTV, target_BTV, codes_BT, clusters)


def load_teacher(path: str, student: GPTConfig, device: torch.device, precision: str = "fp32") -> GPT:
    """The frozen teacher (eval mode, no gradients); bf16 weights in bf16 runs, half the memory of fp32 ones, since
    its forwards run under bf16 autocast anyway (`teacher_logits`)."""
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    teacher = load_gpt(path, "teacher checkpoint").to(device, dtype).requires_grad_(False)
    for key in ("vocab_size", "num_classes", "block_size"):
        if getattr(teacher.config, key) != getattr(student, key):
            raise ValueError(f"teacher {path} has {key}={getattr(teacher.config, key)}, the student "
                             f"{getattr(student, key)}")
    return teacher
