"""The train step: a GPT checkpoint, the teacher (CE) or a student of any method, driven by the method config.

The method is data: a sum of terms, each a divergence (`varkd.losses`) on sequences from a data source
(`varkd.sources`). Teacher and student always see the same class label, null or not (docs/distillation.md section 9):
labels are dropped once, when the batch is drawn, before either model runs.
"""
from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Optional

import torch

from varkd import distributed
from varkd.checkpoints import load_gpt, save_model
from varkd.clusters import load_clusters
from varkd.codes import CodeSet, load_code_set
from varkd.config import TrainJob, to_yaml
from varkd.distill import TeacherTargets, check_codes, chunked_term_loss, heldout_nll, load_teacher, term_loss
from varkd.io import provenance
from varkd.loop import BatchOrder, Part, rank_parts, train, training_module
from varkd.models.gpt import GPT
from varkd.sources import StepData


def train_gpt(job: TrainJob, device: torch.device = torch.device("cpu")) -> Path:
    """Train `job.model` under the method `job.kd` and write `out_dir/checkpoint_name` (rank 0 of a DDP run)."""
    rank_parts(job.optim, distributed.world_size(), distributed.rank())  # fail before loading anything
    torch.manual_seed(job.seed)
    codes, val_codes = load_code_set(job.codes_train), load_code_set(job.codes_val)
    model = GPT(job.model).to(device)
    if job.init:  # a resumed run then loads its own checkpoint over these weights
        init = load_gpt(job.init, "student init checkpoint")
        if init.config != model.config:
            raise ValueError(f"student init {job.init} has config {init.config}, the run's model {model.config}")
        model.load_state_dict(init.state_dict())
    check_codes(codes, model)
    check_codes(val_codes, model)
    kd = job.kd
    teacher = load_teacher(job.teacher, job.model, device, job.optim.precision) if job.teacher else None
    if kd.needs_live_teacher and teacher is None:
        raise ValueError(f"method {job.method!r} samples from or scores with the teacher: TrainJob.teacher is unset")
    if kd.uses_cached_logits and job.teacher_logits is None and teacher is None:
        raise ValueError(f"method {job.method!r} distils on ground truth: give teacher_logits or teacher")

    def validation() -> float:
        return heldout_nll(model, val_codes, device=device)

    def load_pool(path: Optional[str], role: str) -> CodeSet:
        if path is None:
            raise ValueError(f"method {job.method!r} sets rollout.{role}_pool: TrainJob.{role}_pool is unset")
        pool = load_code_set(path)
        if pool.N != codes.N:
            raise ValueError(f"{pool.source} has {pool.N} sequences, the training set {codes.N}")
        check_codes(pool, model, allow_null=True)
        return pool

    pool = load_pool(job.teacher_pool, "teacher") if kd.uses_teacher_pool else None
    if pool is not None:
        scored = any(t.data == "teacher" and t.uses_teacher_logits for t in kd.terms)
        if scored and not job.pool_logits and teacher is None:
            raise ValueError(f"method {job.method!r} distils on the teacher pool {job.teacher_pool} without its "
                             "logits (pool_logits: false), so the teacher scores it live: TrainJob.teacher is unset")
    student_pool = load_pool(job.student_pool, "student") if kd.uses_student_pool else None

    data = StepData(kd, codes, BatchOrder(codes.N, job.optim.batch_size, job.seed), student=model, teacher=teacher,
                    seed=job.seed, total_steps=job.optim.steps, validation=validation, device=device,
                    teacher_pool=pool, student_pool=student_pool)
    pool_logits = f"{job.teacher_pool}/logits.npy" if pool is not None and job.pool_logits else None
    caches = {"ground_truth": job.teacher_logits, "teacher_pool": pool_logits}
    targets = TeacherTargets(teacher, caches, codes, job.model.num_classes, data.counts, job.optim.compile)
    clusters = None
    if kd.uses_clusters:
        if job.clusters is None:
            raise ValueError(f"method {job.method!r} distils in cluster space: TrainJob.clusters is unset")
        clusters = (load_clusters(job.clusters, job.model.vocab_size, kd.clusters).to(device), kd.clusters)
    names = [f"{t.data}_{t.divergence}" for t in kd.terms]
    names = [f"{n}{i}" if names.count(n) > 1 else n for i, n in enumerate(names)]

    student = training_module(model, job.optim, device)  # rollouts and validation use the plain model

    def loss_fn(step: int, part: Part):
        total, logs = 0.0, {}
        for i, term in enumerate(kd.terms):
            batch = data(i, step, part)
            codes_BT, labels_B = batch.codes.to(device), batch.labels.to(device)
            target_BTV = targets(batch, codes_BT, labels_B) if term.uses_teacher_logits else None
            if job.optim.loss_chunk:
                hidden_BTD = student(codes_BT[:, :-1], labels_B, head=False)
                value = chunked_term_loss(term, hidden_BTD, model.output, codes_BT, target_BTV, kd.temperature,
                                          clusters, job.optim.loss_chunk)
            else:
                logits_BTV = student(codes_BT[:, :-1], labels_B)
                value = term_loss(term, logits_BTV, codes_BT, target_BTV, kd.temperature, clusters)
            data.counts["student_forwards"] += 1
            total = total + term.weight * value
            logs[names[i]] = value.detach()  # read by the loop once per step, not here (a host sync per term)
        return total, {**logs, **data.counts, **data.logs(step)}

    summary = train(student, loss_fn, job.optim, job.out_dir, config_text=to_yaml(job),
                    eval_fn=lambda: {"val_nll": validation()}, state=data, device=device,
                    desc=f"{job.backbone}/{job.method}/seed{job.seed}", split_batches=True)
    summary.update(distributed.combine(dict(data.counts), device))
    out = Path(job.out_dir) / job.checkpoint_name
    if distributed.rank() == 0:
        save_model(out, model, job.model, train=summary, job=asdict(job), provenance=provenance(device.type))
        (Path(job.out_dir) / "checkpoint.pt").unlink(missing_ok=True)
    return out
