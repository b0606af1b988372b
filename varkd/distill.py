"""GPT training on VQ codes: the teacher (CE) and every student method, driven by the method config.

The method is data: a sum of terms, each a divergence (`varkd.losses`) on sequences from a data source
(`varkd.sources`). Teacher and student always see the same class label, null or not (docs/distillation.md section 9):
labels are dropped once, when the batch is drawn, before either model runs.
"""
from __future__ import annotations

from contextlib import ExitStack
from dataclasses import asdict
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.utils.checkpoint

from varkd import distributed, losses
from varkd.checkpoints import load_gpt, save_model
from varkd.clusters import cluster_logits, load_clusters
from varkd.codes import CodeSet, code_dtype, code_set_writer, load_code_set
from varkd.config import PoolJob, TeacherLogitsJob, TermConfig, TrainJob, to_yaml
from varkd.decode import Decoder, generate
from varkd.io import atomic_memmap, atomic_save_npz, load_npy, provenance
from varkd.loop import BatchOrder, Part, autocast, rank_parts, train, training_module
from varkd.models.gpt import GPT, GPTConfig
from varkd.sources import Batch, StepData
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

    def __call__(self, batch: Batch, codes: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        cache = self.caches.get(batch.cache) if batch.index is not None else None
        if cache is not None:
            order = np.argsort(batch.index, kind="stable")  # sorted reads are much faster on a memory map
            if batch.cache == "ground_truth":
                is_null = (batch.labels == self.null_class).numpy().astype(np.int64)
                rows = cache[batch.index[order], batch.views[order], is_null[order]]
            else:
                rows = cache[batch.index[order]]
            logits = np.empty_like(rows)
            logits[order] = rows
            return torch.from_numpy(logits).to(codes.device)
        if self.teacher is None:
            raise ValueError("this batch needs live teacher logits but the job has no teacher checkpoint")
        self.counts["teacher_forwards"] = self.counts.get("teacher_forwards", 0) + 1
        return teacher_logits(self.scorer, codes, labels)


def teacher_logits(teacher: GPT, codes: torch.Tensor, labels: torch.Tensor, precision: str = "bf16") -> torch.Tensor:
    """Teacher-forced logits of the frozen teacher: bfloat16 under bf16 autocast (as training scores live batches;
    the caches store them as float16), float32 with precision="fp32" (for exact comparisons). Not copied to float32:
    every consumer reads them through losses.log_probs or cluster_logits, which upcast, so a live target costs half
    the memory of a float32 one ([128, 256, 16384] logits: 1 GiB instead of 2)."""
    with torch.no_grad(), autocast(codes.device, precision):
        return teacher.output(teacher(codes[:, :-1], labels, head=False))  # GPT.forward's head casts to float32


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


def term_loss(term: TermConfig, logits: torch.Tensor, codes: torch.Tensor, target: Optional[torch.Tensor],
              temperature: float, clusters: Optional[tuple[torch.Tensor, int]] = None) -> torch.Tensor:
    """One term's scalar loss: hard-label CE on the sequence, or a divergence to the teacher over tokens and/or
    cluster marginals (clusters: the codes in cluster order and their number), weighted per position."""
    return reduce_term(term, *term_values(term, logits, codes, target, temperature, clusters))


def chunked_term_loss(term: TermConfig, hidden: torch.Tensor, output: torch.nn.Linear, codes: torch.Tensor,
                      target: Optional[torch.Tensor], temperature: float,
                      clusters: Optional[tuple[torch.Tensor, int]] = None, chunk: int = 4096) -> torch.Tensor:
    """`term_loss` of the logits output(hidden) ([B, T, dim] -> [B, T, V]), computed about `chunk` positions at a
    time (whole positions along T). Each chunk's logits and divergence are recomputed in the backward
    (activation checkpointing), so neither pass holds more than one chunk's [.., V] float32 tensors: the student's
    logits of a GPT-B batch of 256 x 256 positions are 4 GiB in float32. Same positions, same reduction: the
    value and gradient of `term_loss` up to float32 rounding."""
    B, T = codes.shape
    step = max(1, chunk // B)

    def values(h, x, t):
        return term_values(term, torch.nn.functional.linear(h, output.weight).float(), x, t, temperature, clusters)

    parts = [torch.utils.checkpoint.checkpoint(values, hidden[:, s : s + step], codes[:, s : s + step],
                                               None if target is None else target[:, s : s + step],
                                               use_reentrant=False)
             for s in range(0, T, step)]
    per_position = torch.cat([v for v, _ in parts], dim=1)
    weights = None if parts[0][1] is None else torch.cat([w for _, w in parts], dim=1)
    return reduce_term(term, per_position, weights)


def reduce_term(term: TermConfig, per_position: torch.Tensor, weights: Optional[torch.Tensor]) -> torch.Tensor:
    """A term's scalar loss from its values and weights per position [B, T] (`term_values`)."""
    if weights is None:
        return losses.reduce(per_position)
    return weighted_mean(per_position, weights, term.weighting.normalize)


def term_values(term: TermConfig, logits: torch.Tensor, codes: torch.Tensor, target: Optional[torch.Tensor],
                temperature: float, clusters: Optional[tuple[torch.Tensor, int]] = None
                ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """A term's value per position [B, T] and its weights (None: unweighted), each position on its own."""
    if term.divergence == "ce":
        return losses.cross_entropy(logits, codes), None
    options = dict(beta=term.beta, alpha=term.alpha, detach_mixture=term.detach_mixture)
    per_position = 0.0
    if term.cluster_weight < 1:
        tokens = losses.divergence(term.divergence, logits, target, temperature=temperature, **options)
        per_position = (1 - term.cluster_weight) * tokens
    if term.cluster_weight > 0:
        order, k = clusters
        student, teacher = (cluster_logits(x.float() / temperature, order, k) for x in (logits, target))
        marginals = temperature**2 * losses.divergence(term.divergence, student, teacher, **options)
        per_position = per_position + term.cluster_weight * marginals
    if not term.weighting.active:
        return per_position, None
    return per_position, token_weights(term.weighting, logits, target, codes, clusters)


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
            x, y = batch.codes.to(device), batch.labels.to(device)
            target = targets(batch, x, y) if term.uses_teacher_logits else None
            if job.optim.loss_chunk:
                value = chunked_term_loss(term, student(x[:, :-1], y, head=False), model.output, x, target,
                                          kd.temperature, clusters, job.optim.loss_chunk)
            else:
                value = term_loss(term, student(x[:, :-1], y), x, target, kd.temperature, clusters)
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


@torch.no_grad()
def cache_teacher_logits(job: TeacherLogitsJob, device: torch.device = torch.device("cpu")) -> None:
    """Teacher logits on every view of every training sequence, for its class and for the null class:
    [N, A, 2, T, V] float16.

    Ground-truth KD sees the same sequences every epoch, so the teacher runs once per backbone instead of once
    per student step (the dominant cost of FKL at the embedded scale).
    """
    codes = load_code_set(job.codes_train)
    teacher = load_gpt(job.teacher, "teacher checkpoint").to(device)
    check_codes(codes, teacher)
    cfg = teacher.config
    with atomic_memmap(job.out, (codes.N, codes.A, 2, cfg.block_size, cfg.vocab_size), np.float16) as out:
        for i in range(0, codes.N, job.batch_size):
            rows = np.arange(i, min(i + job.batch_size, codes.N))
            y = codes.labels[rows].to(device)
            for view in range(codes.A):
                x = codes.batch(rows, np.full(len(rows), view)).to(device)
                for slot, cond in enumerate((y, torch.full_like(y, cfg.num_classes))):
                    logits = teacher_logits(teacher, x, cond).half().cpu().numpy()
                    out[i : i + len(rows), view, slot] = logits


@torch.no_grad()
def sample_pool(job: PoolJob, device: torch.device = torch.device("cpu")) -> None:
    """One sample of `job.model` per training label (null with probability null_fraction): a code set [N, 1, T],
    and with `job.logits` the model's logits on it, logits.npy [N, T, V] float16 (a teacher pool's KD targets).

    Shared by every run whose method trains on that model's samples with these rollout settings: a teacher pool
    across students and seeds, a student-init pool across seeds. logits.npy is written before the code set, so a
    complete-looking pool always has its logits. With num_shards > 1 (ImageNet: 1.28M samples) this job draws
    shard `job.shard` of the labels into out_dir/shards/shard<i>.npz, which gather-codes joins into the code set.
    """
    model = load_gpt(job.model, "pool model checkpoint").to(device)
    cfg, r = model.config, job.rollout
    train_set = load_code_set(job.codes_train)
    check_codes(train_set, model)
    rng = np.random.default_rng(job.seed)
    labels = train_set.labels.clone()
    labels[torch.from_numpy(rng.random(len(labels)) < r.null_fraction)] = cfg.num_classes
    out_dir = Path(job.out_dir)
    if job.num_shards > 1:  # one contiguous slice of the labels (np.array_split), with its own seeded stream
        labels = torch.from_numpy(np.array_split(labels.numpy(), job.num_shards)[job.shard])
        seed = int(np.random.SeedSequence([job.seed, job.shard]).generate_state(1, np.uint64)[0])
        codes = np.empty((len(labels), 1, cfg.block_size), dtype=code_dtype(cfg.vocab_size))
        for i, x, _ in _pool_samples(model, labels, job, seed, device):
            codes[i : i + len(x), 0] = x.cpu().numpy()
        atomic_save_npz(out_dir / "shards" / f"shard{job.shard}.npz", codes=codes, labels=labels.numpy())
        return
    with ExitStack() as files:  # closed in reverse: logits.npy lands before the code set
        codes = files.enter_context(code_set_writer(out_dir, labels.numpy(), 1, cfg.block_size,
                                                    code_dtype(cfg.vocab_size)))
        shape = (len(labels), cfg.block_size, cfg.vocab_size)
        logits = files.enter_context(atomic_memmap(out_dir / "logits.npy", shape, np.float16)) if job.logits else None
        for i, x, y in _pool_samples(model, labels, job, job.seed, device):
            codes[i : i + len(x), 0] = x.cpu().numpy()
            if logits is not None:
                logits[i : i + len(x)] = teacher_logits(model, x, y).half().cpu().numpy()


def _pool_samples(model: GPT, labels: torch.Tensor, job: PoolJob, seed: int, device: torch.device):
    """The model's samples for `labels`, batch by batch: (offset, codes [b, T], labels [b]) on `device`."""
    r, generator, decoder = job.rollout, torch.Generator(device).manual_seed(seed), Decoder(model)
    for i in range(0, len(labels), job.batch_size):
        y = labels[i : i + job.batch_size].to(device)
        yield i, generate(decoder, y, cfg_scale=r.cfg_scale, temperature=r.temperature, top_k=r.top_k,
                          top_p=r.top_p, generator=generator), y
