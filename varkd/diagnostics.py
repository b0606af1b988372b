"""Mechanism diagnostics: is the teacher's supervision unreliable where VarKD says it is?

VarKD's premise is that over a long raster decoding horizon, with ambiguous visual tokens, the teacher's next-token
distribution is an unreliable target, most of all on prefixes the student wrote itself. This measures, for one
teacher / student pair, per position n of the raster order, with both models teacher-forced on the same sequence
and the same (conditional) label c:

- teacher_nll: -log p_T(x_n | x_<n, c), the sequence's own token
- teacher_entropy: H(p_T) in nats; teacher_confidence: max_v p_T(v)
- acceptance: min(1, p_T(x_n) / q_S(x_n)), speculative verification of the sequence's own token
- top1_agreement: [argmax p_T == argmax q_S]
- forward_kl: KL(p_T || q_S)

under two contexts: `ground_truth` (held-out sequences) and `student` (the student's samples for the same labels,
so both contexts are class-matched). Each is averaged over the sequences per position, with its standard error.
"""
from __future__ import annotations

from typing import Iterator

import numpy as np
import pandas as pd
import torch

from varkd.codes import CodeSet
from varkd.config import DiagnoseConfig
from varkd.decode import Decoder, generate
from varkd.distill import teacher_logits
from varkd.losses import kl, log_probs
from varkd.models.gpt import GPT
from varkd.weighting import teacher_entropy

QUANTITIES = ("teacher_nll", "teacher_entropy", "teacher_confidence", "acceptance", "top1_agreement", "forward_kl")
CONTEXTS = ("ground_truth", "student")
IDENTITY = ("backbone", "method", "seed")
COLUMNS = [*IDENTITY, "context", "position", "quantity", "mean", "se", "n"]


@torch.no_grad()
def position_statistics(teacher: GPT, student: GPT, codes: torch.Tensor, labels: torch.Tensor,
                        teacher_precision: str = "bf16") -> dict[str, torch.Tensor]:
    """Each quantity of the sequences `codes` [B, T] under `labels` [B]: float64 [B, T] on the CPU.

    Position n holds the prediction of token n from x_<n (the logits' layout, varkd.models.gpt).
    """
    logp = log_probs(teacher_logits(teacher, codes, labels, teacher_precision))
    logq = log_probs(student(codes[:, :-1], labels))
    token = codes.unsqueeze(-1)
    logp_x, logq_x = logp.gather(-1, token).squeeze(-1), logq.gather(-1, token).squeeze(-1)
    values = {
        "teacher_nll": -logp_x,
        "teacher_entropy": teacher_entropy(logp),
        "teacher_confidence": logp.max(-1).values.exp(),
        "acceptance": (logp_x - logq_x).clamp(max=0.0).exp(),
        "top1_agreement": (logp.argmax(-1) == logq.argmax(-1)).float(),
        "forward_kl": kl(logp, logq),
    }
    return {name: values[name].double().cpu() for name in QUANTITIES}


def sequence_rows(num_rows: int, num_sequences: int, seed: int) -> np.ndarray:
    """The held-out rows diagnosed: a seeded subset (sorted) of num_sequences, or every row if there are fewer.
    Every diagnose job of a study has the same seed, so methods are compared on the same sequences."""
    if num_sequences >= num_rows:
        return np.arange(num_rows)
    return np.sort(np.random.default_rng(seed).choice(num_rows, num_sequences, replace=False))


def context_batches(codes: CodeSet, student: GPT, cfg: DiagnoseConfig, seed: int, device: torch.device
                    ) -> Iterator[tuple[torch.Tensor, dict[str, torch.Tensor]]]:
    """Batch by batch: the labels [b] of held-out rows and each context's sequences [b, T] on `device`: the rows'
    codes (view 0) and the student's samples for their labels, from one generator seeded with `seed`."""
    generator, decoder = torch.Generator(device).manual_seed(seed), Decoder(student)
    rows = sequence_rows(codes.N, cfg.num_sequences, seed)
    for i in range(0, len(rows), cfg.batch_size):
        index = rows[i : i + cfg.batch_size]
        labels = codes.labels[index].to(device)
        sampled = generate(decoder, labels, cfg.sampling, generator=generator)
        yield labels, {"ground_truth": codes.batch(index).to(device), "student": sampled}


def per_position(values: dict[str, dict[str, np.ndarray]], identity: dict) -> pd.DataFrame:
    """Per context, quantity and position: the mean over sequences, its standard error sd / sqrt(n) (sd with
    n - 1 degrees of freedom) and n; `values[context][quantity]` is [n, T]."""
    frames = []
    for context, quantities in values.items():
        for quantity, v in quantities.items():
            n, T = v.shape
            se = v.std(axis=0, ddof=1) / np.sqrt(n) if n > 1 else np.full(T, np.nan)
            frames.append(pd.DataFrame({"context": context, "position": np.arange(T), "quantity": quantity,
                                        "mean": v.mean(axis=0), "se": se, "n": n}))
    frame = pd.concat(frames, ignore_index=True)
    for i, key in enumerate(IDENTITY):
        frame.insert(i, key, identity[key])
    return frame[COLUMNS]
