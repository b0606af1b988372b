"""Steps that make what runs share of a model: the teacher's logits on the ground truth, sample pools (and logits)."""
from __future__ import annotations

from contextlib import ExitStack
from pathlib import Path

import numpy as np
import torch

from varkd.checkpoints import load_gpt
from varkd.codes import code_dtype, code_set_writer, load_code_set
from varkd.config import PoolJob, TeacherLogitsJob
from varkd.decode import Decoder, generate
from varkd.distill import check_codes, teacher_logits
from varkd.io import atomic_memmap, atomic_save_npz
from varkd.models.gpt import GPT


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
    generator, decoder = torch.Generator(device).manual_seed(seed), Decoder(model)
    for i in range(0, len(labels), job.batch_size):
        y = labels[i : i + job.batch_size].to(device)
        yield i, generate(decoder, y, job.rollout.sampling, generator=generator), y
