"""GPT training on VQ codes: the teacher (CE) and every student method, driven by the method config.

The method is data: a sum of terms, each a divergence (`varkd.losses`) on sequences from a data source
(`varkd.sources`). Teacher and student always see the same class label, null or not (kd-methods.md section 9):
labels are dropped once, when the batch is drawn, before either model runs.
"""
from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from varkd import losses
from varkd.checkpoints import load_gpt, save_model
from varkd.config import TeacherLogitsJob, TermConfig, TrainJob, to_yaml
from varkd.io import atomic_path, load_npz, provenance
from varkd.loop import BatchOrder, autocast, train
from varkd.models.gpt import GPT, GPTConfig
from varkd.sources import Batch, StepData


def load_codes(path: str | Path) -> tuple[torch.Tensor, torch.Tensor]:
    arrays = load_npz(path, ["codes", "labels"])
    return torch.from_numpy(arrays["codes"].astype(np.int64)), torch.from_numpy(arrays["labels"].astype(np.int64))


def check_codes(codes: torch.Tensor, labels: torch.Tensor, model: GPT, source: str) -> None:
    """Fail before any compute if the codes do not fit the model (vocabulary, grid, classes)."""
    cfg = model.config
    if codes.shape[1] != cfg.block_size:
        raise ValueError(f"{source}: sequences of {codes.shape[1]} tokens, model block_size={cfg.block_size}")
    if int(codes.max()) >= cfg.vocab_size:
        raise ValueError(f"{source}: code {int(codes.max())} >= model vocab_size={cfg.vocab_size} "
                         "(tokenizer codebook and backbone vocabulary differ)")
    if int(labels.max()) >= cfg.num_classes:
        raise ValueError(f"{source}: label {int(labels.max())} >= model num_classes={cfg.num_classes}")


class TeacherTargets:
    """Teacher logits for a batch: from the per-teacher cache for ground-truth rows, else a live forward."""

    def __init__(self, teacher: Optional[GPT], cache: Optional[str], num_items: int, null_class: int,
                 counts: Optional[dict] = None):
        self.teacher, self.cache, self.null_class = teacher, None, null_class
        self.counts = {} if counts is None else counts  # teacher_forwards, checkpointed with the run's counts
        if cache is not None:
            self.cache = np.load(cache, mmap_mode="r")
            if self.cache.ndim != 4 or self.cache.shape[0] != num_items or self.cache.shape[1] != 2:
                raise ValueError(f"teacher logits {cache} have shape {self.cache.shape}, "
                                 f"expected [{num_items}, 2, T, V] (cond, null)")

    def __call__(self, batch: Batch, codes: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if batch.index is not None and self.cache is not None:
            is_null = (batch.labels == self.null_class).numpy().astype(np.int64)
            order = np.argsort(batch.index, kind="stable")  # sorted reads are much faster on a memory map
            rows = self.cache[batch.index[order], is_null[order]]
            logits = np.empty_like(rows)
            logits[order] = rows
            return torch.from_numpy(logits.astype(np.float32)).to(codes.device)
        if self.teacher is None:
            raise ValueError("this batch needs live teacher logits but the job has no teacher checkpoint")
        self.counts["teacher_forwards"] = self.counts.get("teacher_forwards", 0) + 1
        with torch.no_grad(), autocast(codes.device, "bf16"):  # frozen teacher: bf16, like the cache
            return self.teacher(codes[:, :-1], labels).float()


@torch.no_grad()
def validation_nll(model: GPT, codes: torch.Tensor, labels: torch.Tensor, batch_size: int = 256,
                   device: torch.device = torch.device("cpu"), precision: str = "fp32") -> float:
    """Mean negative log-likelihood per code (nats) of held-out sequences, conditional labels."""
    was_training = model.training
    model.eval()
    total = 0.0
    for i in range(0, len(codes), batch_size):
        x, y = codes[i : i + batch_size].to(device), labels[i : i + batch_size].to(device)
        with autocast(device, precision):
            logits = model(x[:, :-1], y)
        total += losses.cross_entropy(logits, x).sum().item()
    model.train(was_training)
    return total / codes.numel()


def term_loss(term: TermConfig, logits: torch.Tensor, codes: torch.Tensor, target: Optional[torch.Tensor],
              temperature: float) -> torch.Tensor:
    """One term's per-position loss: hard-label CE on the sequence, or a divergence to the teacher."""
    if term.divergence == "ce":
        return losses.cross_entropy(logits, codes)
    return losses.divergence(term.divergence, logits, target, temperature=temperature, beta=term.beta,
                             alpha=term.alpha, detach_mixture=term.detach_mixture)


def load_teacher(path: str, student: GPTConfig, device: torch.device) -> GPT:
    teacher = load_gpt(path, "teacher checkpoint").to(device).requires_grad_(False)
    for key in ("vocab_size", "num_classes", "block_size"):
        if getattr(teacher.config, key) != getattr(student, key):
            raise ValueError(f"teacher {path} has {key}={getattr(teacher.config, key)}, the student "
                             f"{getattr(student, key)}")
    return teacher


def train_gpt(job: TrainJob, device: torch.device = torch.device("cpu")) -> Path:
    """Train `job.model` under the method `job.kd` and write `out_dir/checkpoint_name`."""
    torch.manual_seed(job.seed)
    codes, labels = load_codes(job.codes_train)
    val_codes, val_labels = load_codes(job.codes_val)
    model = GPT(job.model).to(device)
    check_codes(codes, labels, model, job.codes_train)
    check_codes(val_codes, val_labels, model, job.codes_val)
    kd = job.kd
    teacher = load_teacher(job.teacher, job.model, device) if job.teacher else None
    if kd.needs_live_teacher and teacher is None:
        raise ValueError(f"method {job.method!r} samples from or scores with the teacher: TrainJob.teacher is unset")
    if kd.uses_cached_logits and job.teacher_logits is None and teacher is None:
        raise ValueError(f"method {job.method!r} distils on ground truth: give teacher_logits or teacher")

    def validation() -> float:
        return validation_nll(model, val_codes, val_labels, device=device)

    data = StepData(kd, codes, labels, BatchOrder(len(codes), job.optim.batch_size, job.seed), student=model,
                    teacher=teacher, seed=job.seed, total_steps=job.optim.steps, validation=validation, device=device)
    targets = TeacherTargets(teacher, job.teacher_logits, len(codes), job.model.num_classes, data.counts)
    names = [f"{t.data}_{t.divergence}" for t in kd.terms]
    names = [f"{n}{i}" if names.count(n) > 1 else n for i, n in enumerate(names)]

    def loss_fn(step: int):
        total, logs = 0.0, {}
        for i, term in enumerate(kd.terms):
            batch = data(i, step)
            x, y = batch.codes.to(device), batch.labels.to(device)
            logits = model(x[:, :-1], y)
            target = targets(batch, x, y) if term.uses_teacher_logits else None
            value = losses.reduce(term_loss(term, logits, x, target, kd.temperature))
            total = total + term.weight * value
            logs[names[i]] = value.item()
        return total, {**logs, **data.counts}

    summary = train(model, loss_fn, job.optim, job.out_dir, config_text=to_yaml(job),
                    eval_fn=lambda: {"val_nll": validation()}, state=data, device=device,
                    desc=f"{job.backbone}/{job.method}/seed{job.seed}")
    summary.update(data.counts)
    out = Path(job.out_dir) / job.checkpoint_name
    save_model(out, model, job.model, train=summary, job=asdict(job), provenance=provenance(device.type))
    (Path(job.out_dir) / "checkpoint.pt").unlink(missing_ok=True)
    return out


@torch.no_grad()
def cache_teacher_logits(job: TeacherLogitsJob, device: torch.device = torch.device("cpu")) -> None:
    """Teacher logits on every training sequence, for its class and for the null class: [N, 2, T, V] float16.

    Ground-truth KD sees the same sequences every epoch, so the teacher runs once per backbone instead of once
    per student step (the dominant cost of FKL at the embedded scale).
    """
    teacher = load_gpt(job.teacher, "teacher checkpoint").to(device)
    codes, labels = load_codes(job.codes_train)
    check_codes(codes, labels, teacher, job.codes_train)
    cfg = teacher.config
    with atomic_path(job.out, suffix=".npy") as tmp:
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float16,
                                        shape=(len(codes), 2, cfg.block_size, cfg.vocab_size))
        for i in range(0, len(codes), job.batch_size):
            x, y = codes[i : i + job.batch_size].to(device), labels[i : i + job.batch_size].to(device)
            for slot, cond in enumerate((y, torch.full_like(y, cfg.num_classes))):
                with autocast(device, "bf16"):
                    logits = teacher(x[:, :-1], cond)
                out[i : i + len(x), slot] = logits.float().cpu().numpy().astype(np.float16)
        out.flush()
        del out
