"""The one training loop: every model the workflow trains (tokenizer, metric classifier, teacher, students).

It owns what must be right once: AdamW with warm-up and decay, bf16 autocast, gradient clipping, a NaN guard,
`train_log.csv`, and checkpoints every N steps from which a killed or requeued job resumes *exactly* (model,
optimizer, RNG and data order are all restored; batches are a pure function of the step). At scale a step's batch
is split into parts, grad_accum micro-batches on each of the DDP ranks (`varkd.distributed`), and the student may
be compiled (`training_module`).
"""
from __future__ import annotations

import contextlib
import csv
import hashlib
import math
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from varkd import distributed
from varkd.config import ConfigError, OptimConfig
from varkd.io import atomic_path, atomic_torch_save, load_checkpoint, reading

LossFn = Callable[..., tuple[torch.Tensor, dict[str, float | int]]]  # (step) or, splitting batches, (step, part)
EvalFn = Callable[[], dict[str, float]]


class Interrupted(Exception):
    """Training stopped by SIGTERM (a SLURM time limit, preemption or scancel) after writing its checkpoint."""


@contextlib.contextmanager
def stop_requests():
    """Record SIGTERM instead of dying mid-step, so that the loop checkpoints the step before it exits."""
    received: list[int] = []
    if threading.current_thread() is not threading.main_thread():  # signal handlers live in the main thread
        yield received
        return
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: received.append(signum))
    try:
        yield received
    finally:
        signal.signal(signal.SIGTERM, previous)


class BatchOrder:
    """Indices of the batch at a given step: a fresh permutation per epoch, seeded by (seed, epoch)."""

    def __init__(self, num_items: int, batch_size: int, seed: int):
        if num_items < batch_size:
            raise ValueError(f"batch_size={batch_size} is larger than the {num_items} training items")
        self.num_items, self.batch_size, self.seed = num_items, batch_size, seed
        self.per_epoch = num_items // batch_size  # drop the ragged tail
        self._epoch, self._perm = -1, None

    def __call__(self, step: int) -> np.ndarray:
        epoch, i = divmod(step, self.per_epoch)
        if epoch != self._epoch:
            self._epoch, self._perm = epoch, np.random.default_rng([self.seed, epoch]).permutation(self.num_items)
        return self._perm[i * self.batch_size : (i + 1) * self.batch_size]


@dataclass(frozen=True)
class Part:
    """One of `count` equal, contiguous parts of a step's global batch: what one micro-batch of one rank trains on."""

    index: int
    count: int

    def rows(self, batch: np.ndarray) -> np.ndarray:
        """This part of the step's batch indices (BatchOrder rows)."""
        size = len(batch) // self.count
        return batch[self.index * size : (self.index + 1) * size]


WHOLE = Part(0, 1)


def rank_parts(cfg: OptimConfig, world: int, rank: int) -> list[Part]:
    """Rank `rank`'s micro-batches: the global batch splits into world x grad_accum parts, rank r taking the
    grad_accum parts from r * grad_accum on. A ConfigError before any compute if the batch does not split evenly."""
    count = world * cfg.grad_accum
    if cfg.batch_size % count:
        raise ConfigError(f"optim.batch_size={cfg.batch_size} (the global batch) does not split into optim.grad_accum="
                          f"{cfg.grad_accum} micro-batches x world size {world} = {count} equal parts")
    return [Part(rank * cfg.grad_accum + m, count) for m in range(cfg.grad_accum)]


def training_module(model: torch.nn.Module, cfg: OptimConfig, device: torch.device) -> torch.nn.Module:
    """What the training step runs: `model` in DistributedDataParallel when there are several ranks, compiled
    when cfg.compile. It shares `model`'s parameters; checkpoints hold `model`'s state dict (plain keys)."""
    if distributed.world_size() > 1:
        model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    return torch.compile(model) if cfg.compile else model


def unwrap(module: torch.nn.Module) -> tuple[torch.nn.Module, Optional[DDP]]:
    """The plain model inside a training module, and its DDP wrapper if any."""
    ddp = None
    while True:
        if isinstance(module, DDP):
            ddp, module = module, module.module
        elif hasattr(module, "_orig_mod"):  # torch.compile's wrapper (importing its class costs seconds)
            module = module._orig_mod
        else:
            return module, ddp


def lr_at(step: int, cfg: OptimConfig) -> float:
    """Linear warm-up to cfg.lr, then constant / cosine / linear decay to cfg.lr * min_lr_ratio."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return cfg.lr
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    shape = 0.5 * (1 + math.cos(math.pi * progress)) if cfg.schedule == "cosine" else 1 - progress
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * shape)


def make_optimizer(model: torch.nn.Module, cfg: OptimConfig) -> torch.optim.AdamW:
    """AdamW with weight decay on >= 2-D weights only (matrices and embeddings), as LlamaGen; the fused kernel on
    a GPU (one launch for all parameters; on the CPU the default, whose numbers the embedded study was run with)."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=params[0].is_cuda or None)


def autocast(device: torch.device, precision: str):
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


class CsvLog:
    """train_log.csv, one row per logged step; on resume, rows after the resumed step are dropped. Rewrites (a
    resume, a new column) are atomic: a job killed during one leaves the previous log whole."""

    def __init__(self, path: Path, resume_step: int):
        self.path, self.fields = path, None
        rows = []
        if resume_step > 0 and path.exists():
            with reading(path, "training log"), path.open() as f:
                rows = [r for r in csv.DictReader(f) if int(r["step"]) <= resume_step]
        if rows:
            self._rewrite(list(rows[0]), rows)
        elif path.exists():
            path.unlink()

    def _rewrite(self, fields: list[str], rows: list[dict]) -> None:
        self.fields = fields
        with atomic_path(self.path, suffix=".csv") as tmp, tmp.open("w", newline="") as f:
            writer = csv.DictWriter(f, self.fields)
            writer.writeheader()
            writer.writerows(rows)

    def write(self, row: dict[str, float]) -> None:
        if self.fields is not None and not set(row) <= set(self.fields):  # e.g. the first evaluation
            with self.path.open() as f:
                rows = list(csv.DictReader(f))
            self._rewrite(self.fields + [k for k in row if k not in self.fields], rows)
        new = self.fields is None
        if new:
            self.fields = list(row)
        with self.path.open("a", newline="") as f:
            writer = csv.DictWriter(f, self.fields)
            if new:
                writer.writeheader()
            writer.writerow(row)


def train(module: torch.nn.Module, loss_fn: LossFn, cfg: OptimConfig, out_dir: str | Path, *, config_text: str,
          eval_fn: Optional[EvalFn] = None, state: Optional[Any] = None, device: torch.device = torch.device("cpu"),
          desc: str = "train", split_batches: bool = False) -> dict:
    """Run cfg.steps optimisation steps of `loss_fn`, resuming from `out_dir/checkpoint.pt` if present.

    `module` is a model or its `training_module`. `loss_fn(step)` is the loss of the step's batch; with
    `split_batches`, `loss_fn(step, part)` is that of one `Part` of it, and each rank backpropagates its
    grad_accum parts (DDP synchronising the last), so the gradient is the mean over all parts of their gradients:
    the whole batch's gradient for losses that are means over its positions, a mean of per-part means otherwise
    (a weighted mean normalised by its part's weights). `config_text` identifies the run: a checkpoint written
    under a different config is not resumed. `state` (anything with state_dict / load_state_dict, e.g. a replay
    buffer) is checkpointed with the model, per rank as the random state. Rank 0 alone writes the log and the
    checkpoint, and evaluates. Returns a summary (steps, last logs, final evaluation). Leaves
    `checkpoint.pt` in place; the caller deletes it once the final weights are written.
    """
    rank, world = distributed.rank(), distributed.world_size()
    parts = rank_parts(cfg, world, rank)
    if len(parts) * world > 1 and not split_batches:
        raise ConfigError(f"{desc} trains on whole batches: it needs optim.grad_accum=1 (got {cfg.grad_accum}) "
                          f"and one process (got {world})")
    model, ddp = unwrap(module)
    if world > 1 and ddp is None:
        raise ValueError(f"[{desc}] {world} ranks but the model is not in DistributedDataParallel: train its "
                         "training_module")
    if rank:  # rank 0 draws what a single process would; the others their own dropout and label-dropout streams
        torch.manual_seed(int(np.random.default_rng([torch.initial_seed(), rank]).integers(2**62)))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    ckpt_path, run_id = out_dir / "checkpoint.pt", digest(config_text)
    optimizer = make_optimizer(model, cfg)
    step, elapsed, logs = 0, 0.0, {}  # logs: the last step's, for the summary (a run resumed at its end has no step)
    if ckpt_path.exists():
        saved = load_checkpoint(ckpt_path, "training checkpoint")
        if saved.get("run_id") == run_id:
            if len(saved["ranks"]) != world:
                raise ValueError(f"{ckpt_path} was written by {len(saved['ranks'])} ranks, this run has {world}: "
                                 "resume on as many (varkd train --nproc) or delete it")
            model.load_state_dict(saved["model"])
            optimizer.load_state_dict(saved["optimizer"])
            torch.set_rng_state(saved["ranks"][rank]["rng"])
            if state is not None:
                state.load_state_dict(saved["ranks"][rank]["extra"])
            step, elapsed, logs = saved["step"], saved["elapsed"], saved.get("logs", {})  # older checkpoints have none
            print(f"[{desc}] resuming from {ckpt_path} at step {step}")
        else:
            print(f"[{desc}] ignoring {ckpt_path}: it was written under a different config")
    log = CsvLog(out_dir / "train_log.csv", step) if rank == 0 else None

    def save_checkpoint() -> None:
        ranks = distributed.gather({"rng": torch.get_rng_state(),
                                    "extra": state.state_dict() if state is not None else {}})
        if rank == 0:
            atomic_torch_save(ckpt_path, {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                                          "ranks": ranks, "step": step, "elapsed": elapsed, "logs": logs,
                                          "run_id": run_id})

    module.train()
    start = time.perf_counter() - elapsed
    with stop_requests() as stop, tqdm(total=cfg.steps, initial=step, desc=desc, mininterval=2.0,
                                        dynamic_ncols=True, disable=rank > 0) as bar:
        while step < cfg.steps:
            lr = lr_at(step, cfg)
            for group in optimizer.param_groups:
                group["lr"] = lr
            optimizer.zero_grad(set_to_none=True)
            losses, part_logs = [], []
            for i, part in enumerate(parts):
                last = i == len(parts) - 1
                with ddp.no_sync() if ddp is not None and not last else contextlib.nullcontext():
                    with autocast(device, cfg.precision):
                        loss, logs = loss_fn(step, part) if split_batches else loss_fn(step)
                    (loss / len(parts)).backward()
                losses.append(loss.detach())
                part_logs.append(logs)
            loss = torch.stack(losses).mean()
            logs = {k: v if isinstance(v, int) else sum(p[k] for p in part_logs) / len(parts)  # ints: counts
                    for k, v in part_logs[-1].items()}
            non_finite, stopping = distributed.any_rank([not torch.isfinite(loss).item(), bool(stop)], device)
            # the step's one host sync is above: reading the terms' values now costs no further wait
            logs = {k: v.item() if isinstance(v, torch.Tensor) else v for k, v in logs.items()}
            if non_finite:
                where = f"rank {rank} of {world}: " if world > 1 else ""
                raise FloatingPointError(f"[{desc}] non-finite loss at step {step} ({where}loss {loss.item()}, terms: "
                                         f"{logs}); lower optim.lr or use optim.precision=fp32")
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip or float("inf"))
            optimizer.step()
            step += 1
            elapsed = time.perf_counter() - start
            bar.update(1)
            evaluate_now = eval_fn is not None and cfg.eval_every and step % cfg.eval_every == 0
            if step % cfg.log_every == 0 or step == cfg.steps or evaluate_now:
                combined = distributed.combine({"loss": loss.item(), **logs}, device)
                logs = {k: combined[k] for k in logs}
                if rank == 0:
                    row = {"step": step, "lr": lr, "loss": combined["loss"], "grad_norm": grad_norm.item(), **logs,
                           "elapsed_s": round(elapsed, 2)}
                    if evaluate_now:
                        row.update(eval_fn())
                        model.train()
                    log.write(row)
                    bar.set_postfix(loss=f"{row['loss']:.4f}")
            if step % cfg.checkpoint_every == 0 and step < cfg.steps:
                save_checkpoint()
            if stopping and step < cfg.steps:
                save_checkpoint()
                distributed.barrier()  # no rank exits before the checkpoint exists
                raise Interrupted(f"[{desc}] stopped by SIGTERM at step {step} of {cfg.steps}; {ckpt_path} holds "
                                  "that step and a rerun resumes from it")
    save_checkpoint()  # the caller's final file may fail to write: keep a resumable state until it exists
    final = eval_fn() if eval_fn is not None and rank == 0 else {}
    # no wall time here: it goes into checkpoints, which must be the same bytes on a rerun (train_log.csv has it)
    return {"steps": step, **{f"final_{k}": v for k, v in logs.items()}, **final}
