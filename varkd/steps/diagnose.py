"""The diagnose step: diagnostics.csv, how reliable the teacher is for one student per position (varkd.diagnostics)."""
from __future__ import annotations

import time

import numpy as np
import pandas as pd
import torch

from varkd.checkpoints import load_gpt
from varkd.codes import load_code_set
from varkd.config import DiagnoseJob
from varkd.diagnostics import CONTEXTS, QUANTITIES, context_batches, per_position, position_statistics
from varkd.distill import check_codes, load_teacher
from varkd.io import atomic_path


def diagnose(job: DiagnoseJob, device: torch.device = torch.device("cpu")) -> pd.DataFrame:
    """Write job.out (diagnostics.csv, long form: COLUMNS) and return it. Inputs are checked before any compute;
    memory holds one batch of logits and [n, T] values per quantity, never [n, T, V]."""
    cfg = job.diagnose
    student = load_gpt(job.student, "student checkpoint").to(device)
    try:
        teacher = load_teacher(job.teacher, student.config, device, cfg.teacher_precision)
    except ValueError as err:
        raise ValueError(f"{err} (student checkpoint {job.student})") from None
    codes = load_code_set(job.codes_val)
    check_codes(codes, student)
    start = time.perf_counter()
    batches = {context: {q: [] for q in QUANTITIES} for context in CONTEXTS}
    for labels, contexts in context_batches(codes, student, cfg, job.seed, device):
        for context, sequences in contexts.items():
            stats = position_statistics(teacher, student, sequences, labels, cfg.teacher_precision)
            for quantity, v in stats.items():
                batches[context][quantity].append(v.numpy())
    values = {c: {q: np.concatenate(v) for q, v in quantities.items()} for c, quantities in batches.items()}
    frame = per_position(values, job.identity)
    with atomic_path(job.out, suffix=".csv") as tmp:
        frame.to_csv(tmp, index=False)
    n = len(values["ground_truth"]["teacher_nll"])
    print(f"{job.out}: {n} sequences x {len(CONTEXTS)} contexts in {time.perf_counter() - start:.1f} s")
    means = frame.groupby(["context", "quantity"], sort=False)["mean"].mean().unstack("quantity")
    print(means.to_string(float_format=lambda v: f"{v:.4f}"))
    return frame
