"""Where a KD step's sequences come from (design section 2, the data-source axis).

ground_truth: codes of real images, each sequence one of its image's augmented views drawn uniformly (LlamaGen's
ten-crop; a code set of one view has nothing to draw). teacher / student: sequences sampled by that model (no
gradient, eval mode, the KV-cache sampler or speculative Jacobi decoding, rollout settings of the method); teacher
samples may instead come from a pool drawn once (`rollout.teacher_pool`), read like the ground truth. mixed: GKD's
on-policy fraction lambda. adaptive: DistiLLM's schedule over fresh student samples, a replay buffer of them, and
ground truth.

Every random choice of a step is seeded by (seed, step, term), so a resumed run draws exactly what an
uninterrupted one would; the schedule and the buffer are checkpointed with the run. A step split into parts
(micro-batches, DDP ranks: `varkd.loop.Part`) draws each part's rows from the step's batch indices; the choice of
source (mixed, adaptive) stays the step's, shared by its parts, while each part samples with its own (seed, step,
term, part) stream. A step in one part draws exactly what it did before steps were split.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import torch

from varkd import distributed
from varkd.codes import CodeSet
from varkd.config import MethodConfig
from varkd.loop import WHOLE, BatchOrder, Part
from varkd.models.gpt import GPT
from varkd.sampling import generate
from varkd.schedules import AdaptiveSchedule, OnPolicyMixture, ReplayBuffer
from varkd.sjd import generate_sjd


@dataclass
class Batch:
    codes: torch.Tensor  # [B, T] long
    labels: torch.Tensor  # [B] long, the null class where dropped
    index: Optional[np.ndarray] = None  # rows of a dataset with cached teacher logits (ground truth, teacher pool)
    cache: str = "ground_truth"  # which cache `index` points into: ground_truth | teacher_pool


def drop_labels(labels: torch.Tensor, p: float, null_class: int) -> torch.Tensor:
    """Replace each label by the null class with probability p (classifier-free guidance training)."""
    return torch.where(torch.rand(labels.shape) < p, torch.full_like(labels, null_class), labels)


class StepData:
    """Draws the batch of each loss term at each step."""

    def __init__(self, method: MethodConfig, codes: CodeSet, order: BatchOrder, *, student: GPT,
                 teacher: Optional[GPT], seed: int, total_steps: int, validation: Callable[[], float],
                 device: torch.device, teacher_pool: Optional[CodeSet] = None):
        self.method, self.codes, self.labels, self.order = method, codes, codes.labels, order
        self.teacher_pool = teacher_pool  # aligned with the training rows
        self.student, self.teacher, self.seed, self.device = student, teacher, seed, device
        self.validation = validation
        self.null_class = student.config.num_classes
        self.class_dropout = student.config.class_dropout_prob
        self.mixture = OnPolicyMixture(method.lmbda)
        ad = method.adaptive
        self.schedule = AdaptiveSchedule(ad.init_threshold, ad.loss_eps, ad.increment, ad.replay_ratio,
                                         total_steps=total_steps)
        # each DDP rank keeps its share of the buffer, filled by its parts: it spans as many steps as in one process
        self.buffer = ReplayBuffer(ad.capacity // distributed.world_size())
        self._choice = (-1, -1, "")  # (step, term, choice): the adaptive choice is the step's, not each part's
        if any(t.data == "adaptive" for t in method.terms) and ad.capacity < order.batch_size:
            raise ValueError(f"adaptive.capacity={ad.capacity} is smaller than the batch size {order.batch_size}")
        # cost of the run: training forwards of the student, decoding forward passes of rollouts (sequential steps);
        # one per part of a split step (micro-batches and ranks), summed over ranks in the logs
        self.counts = {"rollouts": 0, "rollout_tokens": 0, "rollout_steps": 0, "replayed": 0, "teacher_forwards": 0,
                       "student_forwards": 0}

    def __call__(self, term_index: int, step: int, part: Part = WHOLE) -> Batch:
        term = self.method.terms[term_index]
        rng = np.random.default_rng([self.seed, step, term_index])  # the step's choices
        part_rng = rng if part == WHOLE else np.random.default_rng([self.seed, step, term_index, part.index])
        generator = torch.Generator(self.device).manual_seed(int(part_rng.integers(2**62)))
        index = part.rows(self.order(step))
        source = term.data
        if source == "mixed":
            source = self.mixture.choose(rng)
        elif source == "adaptive":
            return self._adaptive(step, term_index, index, rng, part_rng, generator)
        if source == "ground_truth":
            return self.ground_truth(index, part_rng)
        if source == "teacher" and self.teacher_pool is not None:
            return Batch(self.teacher_pool.batch(index), self.teacher_pool.labels[index], index, "teacher_pool")
        return self.rollout(self.student if source == "student" else self.teacher, index, part_rng, generator)

    def ground_truth(self, index: np.ndarray, rng: np.random.Generator) -> Batch:
        """The rows' codes, one view per row drawn with `rng` where the code set holds several."""
        views = rng.integers(self.codes.A, size=len(index)) if self.codes.A > 1 else None
        labels = drop_labels(self.labels[index], self.class_dropout, self.null_class)
        return Batch(self.codes.batch(index, views), labels, index)

    def rollout(self, model: GPT, index: np.ndarray, rng: np.random.Generator, generator: torch.Generator) -> Batch:
        """Sample sequences for the classes of the rows `index` (a null_fraction of them unconditional)."""
        r = self.method.rollout
        labels = self.labels[index].clone()
        labels[torch.from_numpy(rng.random(len(labels)) < r.null_fraction)] = self.null_class
        options = dict(cfg_scale=r.cfg_scale, temperature=r.temperature, top_k=r.top_k, top_p=r.top_p,
                       generator=generator)
        if r.sampler == "sjd":
            codes, stats = generate_sjd(model, labels.to(self.device), window=r.window, init=r.init, **options)
            self.counts["rollout_steps"] += stats["iterations"]
        else:
            codes = generate(model, labels.to(self.device), **options)
            self.counts["rollout_steps"] += codes.shape[1]
        self.counts["rollouts"] += 1
        self.counts["rollout_tokens"] += codes.numel()
        return Batch(codes.cpu(), labels.cpu())

    def _adaptive(self, step: int, term_index: int, index: np.ndarray, rng: np.random.Generator,
                  part_rng: np.random.Generator, generator: torch.Generator) -> Batch:
        """DistiLLM: validate every eval_every steps (step 0 sets the reference loss), then choose the data; once
        per step, in its first part (the ranks' buffers fill alike, so they agree on `full`)."""
        if self._choice[:2] != (step, term_index):
            if step % self.method.adaptive.eval_every == 0:
                self.schedule.update(self.validation())
            choice = self.schedule.choose(step + 1, rng, self.buffer.full)  # DistiLLM counts steps from 1
            self._choice = (step, term_index, choice)
        choice = self._choice[2]
        if choice == "fresh":
            batch = self.rollout(self.student, index, part_rng, generator)
            self.buffer.push(batch.codes, batch.labels)
            return batch
        if choice == "replay":
            codes, labels = self.buffer.sample(len(index), part_rng)
            self.counts["replayed"] += 1
            return Batch(codes, labels)
        return self.ground_truth(index, part_rng)

    def state_dict(self) -> dict:
        return {"schedule": self.schedule.state_dict(), "buffer": self.buffer.state_dict(), "counts": dict(self.counts)}

    def load_state_dict(self, state: dict) -> None:
        self.schedule.load_state_dict(state["schedule"])
        self.buffer.load_state_dict(state["buffer"])
        self.counts.update(state["counts"])  # in place: the teacher targets share this dict
