"""Where a KD step's sequences come from (design section 2, the data-source axis).

ground_truth: codes of real images, each sequence one of its image's augmented views drawn uniformly (LlamaGen's
ten-crop; a code set of one view has nothing to draw). teacher / student: sequences sampled by that model (no
gradient, eval mode, the KV-cache sampler or speculative Jacobi decoding, rollout settings of the method); they
may instead come from a pool drawn once (`rollout.teacher_pool`; `rollout.student_pool`: the student init's
samples), read like the ground truth. repaired: fresh student samples that the teacher verifies token by token and,
from the first token it rejects (`rollout.repair_threshold`), continues itself (speculative KD's repair; `repair`);
scored by the live teacher. mixed: fresh student samples in place of ground truth, for the whole step
(GKD's on-policy fraction lambda) or per sequence (ImitKD's annealed mixture; a batch of both is scored by the live
teacher, the cache holding ground-truth rows only). adaptive: DistiLLM's schedule over fresh student samples, a
replay buffer of them, and ground truth.

Every random choice of a step is seeded by (seed, step, term), so a resumed run draws exactly what an
uninterrupted one would; the schedule and the buffer are checkpointed with the run. A step split into parts
(micro-batches, DDP ranks: `varkd.loop.Part`) draws each part's rows from the step's batch indices; the choice of
source (mixed, adaptive) stays the step's, shared by its parts, while each part samples with its own (seed, step,
term, part) stream. ImitKD's per-sequence choices are drawn for the step's whole batch from a child of the step's
(seed, step, term) seed, so a split step mixes the same rows as an unsplit one. A step in one part draws exactly
what it did before steps were split.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import torch

from varkd import distributed
from varkd.codes import CodeSet
from varkd.config import MethodConfig
from varkd.decode import Decoder, generate
from varkd.loop import WHOLE, BatchOrder, Part, autocast
from varkd.models.gpt import GPT
from varkd.sampling import Sampling
from varkd.schedules import AdaptiveSchedule, OnPolicyMixture, ReplayBuffer
from varkd.sjd import generate_sjd


@dataclass
class Batch:
    codes: torch.Tensor  # [B, T] long
    labels: torch.Tensor  # [B] long, the null class where dropped
    index: Optional[np.ndarray] = None  # rows of a dataset, whose teacher logits may be cached (ground truth, pools)
    cache: str = "ground_truth"  # which dataset `index` points into: ground_truth | teacher_pool | student_pool
    views: Optional[np.ndarray] = None  # ground truth: the view of each row


def drop_labels(labels: torch.Tensor, p: float, null_class: int) -> torch.Tensor:
    """Replace each label by the null class with probability p (classifier-free guidance training)."""
    return torch.where(torch.rand(labels.shape) < p, torch.full_like(labels, null_class), labels)


def token_log_probs(model: GPT, codes: torch.Tensor, labels: torch.Tensor, precision: str) -> torch.Tensor:
    """log p(x_t | x_<t) [B, T] of the tokens codes [B, T] under the model's plain softmax (teacher-forced, eval
    mode, its mode restored; bf16 autocast if precision="bf16")."""
    was_training = model.training
    model.eval()
    try:
        with autocast(codes.device, precision):
            logits = model(codes[:, :-1], labels).float()
    finally:
        model.train(was_training)
    return logits.gather(-1, codes[..., None]).squeeze(-1) - logits.logsumexp(-1)


@torch.no_grad()
def first_rejection(student: GPT, teacher: GPT, codes: torch.Tensor, labels: torch.Tensor, threshold: float,
                    precision: str = "bf16") -> torch.Tensor:
    """The first position [B] where the teacher rejects the student's token, min(1, p_T(x_t) / q_S(x_t)) < threshold
    given x_<t (both plain softmax at temperature 1, teacher-forced, eval mode), block_size where it accepts every
    token. The teacher scores as `distill.teacher_logits` does for training (bf16 autocast unless
    precision="fp32"); the student as it sampled (fp32)."""
    log_ratio = token_log_probs(teacher, codes, labels, precision) - token_log_probs(student, codes, labels, "fp32")
    # min(1, r) < threshold <=> r < threshold, as threshold <= 1; threshold 0 rejects nothing
    rejected = log_ratio < (math.log(threshold) if threshold > 0 else -math.inf)
    return torch.where(rejected.any(dim=1), rejected.int().argmax(dim=1), codes.shape[1])


def repair(student: GPT, teacher: GPT, codes: torch.Tensor, labels: torch.Tensor, threshold: float,
           sampling: Sampling = Sampling(), *, generator: Optional[torch.Generator] = None, precision: str = "bf16",
           decoder: Optional[Decoder] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Speculative KD's repair of the student's samples codes [B, T] (labels [B], on the models' device): each
    sequence keeps the student's tokens before its first rejection (`first_rejection`) and the teacher samples that
    position and the rest itself (`generate` from the forced prefix, with `sampling`), so the student is
    supervised on its own context only as far as the teacher would accept it.

    Returns (repaired codes [B, T], first rejection [B] long, T where none: that row is unchanged). Only the rows
    with a rejection are decoded by the teacher (with `decoder`, the teacher's Decoder, when one is kept)."""
    first = first_rejection(student, teacher, codes, labels, threshold, precision)
    repaired = codes.clone()
    rows = first < codes.shape[1]
    if rows.any():
        repaired[rows] = generate(decoder or teacher, labels[rows], sampling, generator=generator, prefix=codes[rows],
                                  prefix_len=first[rows])
    return repaired, first


class StepData:
    """Draws the batch of each loss term at each step."""

    def __init__(self, method: MethodConfig, codes: CodeSet, order: BatchOrder, *, student: GPT,
                 teacher: Optional[GPT], seed: int, total_steps: int, validation: Callable[[], float],
                 device: torch.device, teacher_pool: Optional[CodeSet] = None, student_pool: Optional[CodeSet] = None):
        self.method, self.codes, self.labels, self.order = method, codes, codes.labels, order
        self.pools = {"teacher": teacher_pool, "student": student_pool}  # aligned with the training rows
        self.student, self.teacher, self.seed, self.device = student, teacher, seed, device
        self.validation = validation
        self.null_class = student.config.num_classes
        self.class_dropout = student.config.class_dropout_prob
        mix = method.mixture
        self.mixture = OnPolicyMixture(mix.lmbda, mix.schedule, total_steps=total_steps, final_beta=mix.final_beta,
                                       exp_base=mix.exp_base)
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
        if any(t.data == "repaired" for t in method.terms):  # sequences the teacher changed, positions it sampled
            self.counts.update(repaired_rows=0, repaired_tokens=0)
        # sequences of the global batches of terms that choose their source (mixed, adaptive), and how many of them
        # were student samples (fresh or replayed): counted once per step and term, the same in every part and rank
        self.chosen = {"rows": 0, "student_rows": 0}
        self._chosen_at: dict[int, int] = {}  # term -> the last step counted
        self._decoders: dict[int, Decoder] = {}

    def __call__(self, term_index: int, step: int, part: Part = WHOLE) -> Batch:
        term = self.method.terms[term_index]
        rng = np.random.default_rng([self.seed, step, term_index])  # the step's choices
        part_rng = rng if part == WHOLE else np.random.default_rng([self.seed, step, term_index, part.index])
        generator = torch.Generator(self.device).manual_seed(int(part_rng.integers(2**62)))
        index = part.rows(self.order(step))
        source = term.data
        if source == "mixed" and self.method.mixture.granularity == "sequence":
            return self._mixed_rows(step, term_index, part, part_rng, generator)
        if source == "mixed":
            source = self.mixture.choose(rng, step)
            self._count_choice(step, term_index, self.order.batch_size * (source == "student"))
        elif source == "adaptive":
            return self._adaptive(step, term_index, index, rng, part_rng, generator)
        if source == "ground_truth":
            return self.ground_truth(index, part_rng)
        if source == "repaired":
            return self.repaired(index, part_rng, generator)
        pool = self.pools.get(term.data)  # a teacher or student term reads its pool (a mixture never does)
        if pool is not None:
            return Batch(pool.batch(index), pool.labels[index], index, f"{source}_pool")
        return self.rollout(self.student if source == "student" else self.teacher, index, part_rng, generator)

    def decoder(self, model: GPT) -> Decoder:
        """The model's Decoder, kept for the run: made at the first rollout, inside the step's autocast, so a bf16
        run decodes with bf16 copies of the weights (refreshed from the model at every rollout)."""
        if id(model) not in self._decoders:
            self._decoders[id(model)] = Decoder(model)
        return self._decoders[id(model)]

    def ground_truth(self, index: np.ndarray, rng: np.random.Generator) -> Batch:
        """The rows' codes, one view per row drawn with `rng` where the code set holds several."""
        views = rng.integers(self.codes.A, size=len(index)) if self.codes.A > 1 else np.zeros(len(index), np.int64)
        labels = drop_labels(self.labels[index], self.class_dropout, self.null_class)
        return Batch(self.codes.batch(index, views), labels, index, views=views)

    def rollout(self, model: GPT, index: np.ndarray, rng: np.random.Generator, generator: torch.Generator) -> Batch:
        """Sample sequences for the classes of the rows `index` (a null_fraction of them unconditional)."""
        r = self.method.rollout
        labels = self.labels[index].clone()
        labels[torch.from_numpy(rng.random(len(labels)) < r.null_fraction)] = self.null_class
        if r.sampler == "sjd":
            codes, stats = generate_sjd(self.decoder(model), labels.to(self.device), r.sampling, window=r.window,
                                        init=r.init, generator=generator)
            self.counts["rollout_steps"] += stats["forwards"]
        else:
            codes = generate(self.decoder(model), labels.to(self.device), r.sampling, generator=generator)
            self.counts["rollout_steps"] += codes.shape[1]
        self.counts["rollouts"] += 1
        self.counts["rollout_tokens"] += codes.numel()
        return Batch(codes.cpu(), labels.cpu())

    def repaired(self, index: np.ndarray, rng: np.random.Generator, generator: torch.Generator) -> Batch:
        """A student rollout for the rows `index`, repaired by the teacher (`repair`, with the rollout's settings and
        the same generator). It carries no index: the teacher scores it live. The verification is a teacher
        forward; the teacher's decoding steps count as rollout steps."""
        if self.teacher is None:
            raise ValueError("data=repaired needs the live teacher: StepData has no teacher")
        batch = self.rollout(self.student, index, rng, generator)
        r, T = self.method.rollout, batch.codes.shape[1]
        codes, first = repair(self.student, self.teacher, batch.codes.to(self.device), batch.labels.to(self.device),
                              r.repair_threshold, r.sampling, generator=generator, decoder=self.decoder(self.teacher))
        self.counts["teacher_forwards"] += 1
        self.counts["rollout_steps"] += T - int(first.min())
        self.counts["repaired_rows"] += int((first < T).sum())
        self.counts["repaired_tokens"] += int((T - first).sum())
        return Batch(codes.cpu(), batch.labels)

    def _mixed_rows(self, step: int, term_index: int, part: Part, part_rng: np.random.Generator,
                    generator: torch.Generator) -> Batch:
        """ImitKD: each row of the step's batch is a fresh student sample with probability lmbda_t, else its ground
        truth. The rows are chosen for the whole batch, so parts and ranks agree; one rollout samples the part's
        student rows. A batch with student rows carries no index: the teacher scores all its rows live."""
        rows = self.order(step)
        stream = np.random.default_rng(np.random.SeedSequence([self.seed, step, term_index]).spawn(1)[0])
        on_policy = self.mixture.choose_rows(stream, len(rows), step)
        self._count_choice(step, term_index, int(on_policy.sum()))
        on_policy = part.rows(on_policy)
        index = part.rows(rows)
        if not on_policy.any():
            return self.ground_truth(index, part_rng)
        codes = torch.empty(len(index), self.codes.T, dtype=torch.long)
        labels = torch.empty(len(index), dtype=torch.long)
        student = torch.from_numpy(on_policy)
        if not on_policy.all():
            truth = self.ground_truth(index[~on_policy], part_rng)
            codes[~student], labels[~student] = truth.codes, truth.labels
        sampled = self.rollout(self.student, index[on_policy], part_rng, generator)
        codes[student], labels[student] = sampled.codes, sampled.labels
        return Batch(codes, labels)

    def _adaptive(self, step: int, term_index: int, index: np.ndarray, rng: np.random.Generator,
                  part_rng: np.random.Generator, generator: torch.Generator) -> Batch:
        """DistiLLM: validate every eval_every steps (step 0 sets the reference loss), then choose the data; once
        per step, in its first part (the ranks' buffers fill alike, so they agree on `full`)."""
        if self._choice[:2] != (step, term_index):
            if step % self.method.adaptive.eval_every == 0:
                self.schedule.update(self.validation())
            choice = self.schedule.choose(step + 1, rng, self.buffer.full)  # DistiLLM counts steps from 1
            self._choice = (step, term_index, choice)
            self._count_choice(step, term_index, self.order.batch_size * (choice != "ground_truth"))
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

    def _count_choice(self, step: int, term_index: int, student_rows: int) -> None:
        """Count a step's chosen sequences once, whichever part draws first."""
        if self._chosen_at.get(term_index) == step:
            return
        self._chosen_at[term_index] = step
        self.chosen["rows"] += self.order.batch_size
        self.chosen["student_rows"] += int(student_rows)

    def logs(self, step: int) -> dict[str, float]:
        """The data schedule's state at `step`, for train_log.csv: DistiLLM's threshold tau_a (adaptive), the
        student share lmbda_t (mixed: GKD's lambda, ImitKD's 1 - beta), and student_share, the share of the
        sequences chosen so far that were student samples, fresh or replayed (mixed and adaptive)."""
        kinds = {t.data for t in self.method.terms}
        logs = {}
        if "adaptive" in kinds:
            logs["tau_a"] = float(self.schedule.threshold)
        if "mixed" in kinds:
            logs["lmbda"] = float(self.mixture.share(step))
        if kinds & {"adaptive", "mixed"}:
            logs["student_share"] = self.chosen["student_rows"] / max(self.chosen["rows"], 1)
        return logs

    def state_dict(self) -> dict:
        return {"schedule": self.schedule.state_dict(), "buffer": self.buffer.state_dict(), "counts": dict(self.counts),
                "chosen": dict(self.chosen)}

    def load_state_dict(self, state: dict) -> None:
        self.schedule.load_state_dict(state["schedule"])
        self.buffer.load_state_dict(state["buffer"])
        self.counts.update(state["counts"])  # in place: the teacher targets share this dict
        self.chosen.update(state["chosen"])
