"""GPT training on VQ codes: the teacher (CE) and every student method, driven by the method config.

The method is data: `MethodConfig.divergence` picks the per-position loss, `data_source` the sequences it is
computed on. Teacher and student always see the same class label, null or not (kd-methods.md section 9): the
label dropout that CFG needs happens here, once, before either model runs.
"""
from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from varkd import losses
from varkd.checkpoints import load_gpt, save_model
from varkd.config import TeacherLogitsJob, TrainJob, to_yaml
from varkd.io import atomic_path, load_npz, provenance
from varkd.loop import BatchOrder, autocast, train
from varkd.models.gpt import GPT


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


def drop_labels(labels: torch.Tensor, p: float, null_class: int) -> torch.Tensor:
    """Replace each label by the null class with probability p (classifier-free guidance training)."""
    return torch.where(torch.rand(labels.shape) < p, torch.full_like(labels, null_class), labels)


class TeacherLogits:
    """Teacher logits for ground-truth batches: read from the per-backbone cache, or computed live."""

    def __init__(self, teacher: Optional[GPT], cache: Optional[str], num_items: int):
        self.teacher, self.cache = teacher, None
        if cache is not None:
            self.cache = np.load(cache, mmap_mode="r")
            if self.cache.ndim != 4 or self.cache.shape[0] != num_items or self.cache.shape[1] != 2:
                raise ValueError(f"teacher logits {cache} have shape {self.cache.shape}, "
                                 f"expected [{num_items}, 2, T, V] (cond, null)")
        if teacher is None and cache is None:
            raise ValueError("the method needs a teacher: give TrainJob.teacher or TrainJob.teacher_logits")

    def __call__(self, index: np.ndarray, codes: torch.Tensor, labels: torch.Tensor, null_class: int) -> torch.Tensor:
        if self.cache is not None:
            is_null = (labels == null_class).numpy().astype(np.int64)
            order = np.argsort(index, kind="stable")  # sorted reads are much faster on a memory map
            rows = self.cache[index[order], is_null[order]]
            logits = np.empty_like(rows)
            logits[order] = rows
            return torch.from_numpy(logits.astype(np.float32))
        with torch.no_grad():
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


def train_gpt(job: TrainJob, device: torch.device = torch.device("cpu")) -> Path:
    """Train `job.model` under `job.kd` and write `out_dir/checkpoint_name`."""
    torch.manual_seed(job.seed)
    codes, labels = load_codes(job.codes_train)
    val_codes, val_labels = load_codes(job.codes_val)
    model = GPT(job.model).to(device)
    check_codes(codes, labels, model, job.codes_train)
    check_codes(val_codes, val_labels, model, job.codes_val)
    teacher_logits = None
    if job.kd.needs_teacher:
        teacher = None
        if job.teacher_logits is None:
            teacher = load_gpt(job.teacher, "teacher checkpoint").to(device)
            teacher.requires_grad_(False)
            if (teacher.config.vocab_size, teacher.config.num_classes) != (job.model.vocab_size, job.model.num_classes):
                raise ValueError(f"teacher {job.teacher} vocab/classes {teacher.config.vocab_size}/"
                                 f"{teacher.config.num_classes} differ from the student's")
        teacher_logits = TeacherLogits(teacher, job.teacher_logits, len(codes))

    order = BatchOrder(len(codes), job.optim.batch_size, job.seed)
    null_class, kd = job.model.num_classes, job.kd

    def loss_fn(step: int):
        index = order(step)
        x, y = codes[index], drop_labels(labels[index], job.model.class_dropout_prob, null_class)
        logits = model(x[:, :-1].to(device), y.to(device))
        terms = {}
        if kd.divergence == "ce":
            terms["ce"] = losses.reduce(losses.cross_entropy(logits, x.to(device)))
        else:
            target = teacher_logits(index, x, y, null_class).to(device)
            terms["kd"] = losses.reduce(losses.forward_kl(logits, target, kd.temperature))
            if kd.ce_weight:
                terms["ce"] = kd.ce_weight * losses.reduce(losses.cross_entropy(logits, x.to(device)))
        loss = sum(terms.values())
        return loss, {k: v.item() for k, v in terms.items()}

    def eval_fn():
        return {"val_nll": validation_nll(model, val_codes, val_labels, device=device)}

    summary = train(model, loss_fn, job.optim, job.out_dir, config_text=to_yaml(job), eval_fn=eval_fn,
                    device=device, desc=f"{job.backbone}/{job.method}/seed{job.seed}")
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
