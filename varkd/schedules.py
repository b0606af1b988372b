"""Which data a KD step trains on: GKD's on-policy fraction, ImitKD's annealed per-sequence mixture, and DistiLLM's
adaptive student-generated outputs.

References: GKD, Algorithm 1, and TRL `GKDTrainer.training_step`; ImitKD, asappresearch/imitkd@8b9fadded0e9
generation/distillation.py `Seq2SeqDistillTrainer` (L404-419, L449-470); DistiLLM, jongwooko/distillm@d47e77ff9d27
finetune.py L265-323 / L411-419 and distillm/buffer.py.

Randomness is never owned here. Every draw comes from an `rng` the trainer passes in, so that it can seed one
per step (e.g. `numpy.random.default_rng([seed, step])`, as `varkd.loop.BatchOrder` does) and a resumed run
makes the same decisions. `choose` calls `rng.random()` exactly once, so either a `numpy.random.Generator`
(recommended) or a `random.Random` works; `ReplayBuffer.sample` accepts those two types as well;
`OnPolicyMixture.choose_rows` draws n uniforms from a `numpy.random.Generator`.
The only mutable state (the adaptive threshold, the reference loss and the buffer contents) is exposed through
`state_dict()` / `load_state_dict()` and holds only tensors, ints, floats, strings, None and lists / dicts of
them, so it can go into a checkpoint read with `torch.load(weights_only=True)`.
"""
from __future__ import annotations

import math
import random
from collections import deque
from typing import Any, Literal, Protocol, Union

import numpy as np
import torch

Rng = Union[np.random.Generator, random.Random]
REPLAY_RATIOS = ("decreasing", "constant", "increasing")
MIXTURE_SCHEDULES = ("constant", "linear", "exponential")


class _Uniform(Protocol):
    def random(self) -> float: ...


def _uniform(rng: _Uniform) -> float:
    """One draw r ~ U[0, 1) (both numpy Generators and random.Random provide `.random()`)."""
    return float(rng.random())


def _check_empty_state(name: str, state: dict) -> None:
    if state:
        raise ValueError(f"{name} is stateless; unexpected state keys {sorted(state)}")


class OnPolicyMixture:
    """The share lmbda_t of fresh student samples in a step's data: GKD's fraction lambda, ImitKD's annealed beta.

    GKD (Agarwal et al. 2024, Algorithm 1; TRL's `training_step`) draws u ~ U(0, 1) once per step and trains the
    whole batch on student samples if u <= lambda (`choose`). ImitKD (Lin et al. 2020; asappresearch/imitkd@
    8b9fadded0e9 generation/distillation.py `Seq2SeqDistillTrainer`) replaces each sequence independently by a
    student sample with probability 1 - beta (`choose_rows`), beta annealed from 1 over the N steps of the run:
    linear f(t) = 1 - (1 - final_beta) t / N, exponential f(t) = exp_base ** (-t / N). Its trainer sets
    beta = f(t) after optimiser iteration t and draws the next batch with it, so step s uses f(s - 1) (and step 0
    beta = 1). schedule "constant" keeps lmbda_t = lmbda at every step.
    """

    def __init__(self, lmbda: float, schedule: str = "constant", *, total_steps: int = 1, final_beta: float = 0.0,
                 exp_base: float = 200.0):
        if not 0.0 <= lmbda <= 1.0:  # TRL GKDConfig.__post_init__ requires 0 <= lmbda <= 1
            raise ValueError(f"lmbda must be in [0, 1], got {lmbda}")
        if schedule not in MIXTURE_SCHEDULES:
            raise ValueError(f"schedule must be one of {MIXTURE_SCHEDULES}, got {schedule!r}")
        if int(total_steps) != total_steps or total_steps < 1:
            raise ValueError(f"total_steps must be a positive integer, got {total_steps}")
        if not 0.0 <= final_beta <= 1.0 or not exp_base > 1.0:
            raise ValueError(f"need 0 <= final_beta <= 1 and exp_base > 1, got {final_beta}, {exp_base}")
        self.lmbda, self.schedule, self.total_steps = float(lmbda), schedule, int(total_steps)
        self.final_beta, self.exp_base = float(final_beta), float(exp_base)

    def beta(self, step: int) -> float:
        """ImitKD's ground-truth share at 0-based `step` of an annealed schedule: f(step - 1), 1 at step 0."""
        t = max(step - 1, 0) / self.total_steps
        if self.schedule == "linear":
            return 1.0 - (1.0 - self.final_beta) * t
        if self.schedule == "exponential":
            return self.exp_base ** (-t)
        raise ValueError("beta is the ground-truth share of an annealed schedule (linear or exponential)")

    def share(self, step: int = 0) -> float:
        """lmbda_t: the probability that the step (or, per sequence, a row) trains on student samples."""
        return self.lmbda if self.schedule == "constant" else 1.0 - self.beta(step)

    def choose(self, rng: Rng, step: int = 0) -> Literal["student", "ground_truth"]:
        """The whole step's source: 'student' when u <= lmbda_t (TRL's exact comparison), else 'ground_truth';
        draws u exactly once.

        lmbda_t = 0 means "never on-policy" (pure supervised KD), so it returns 'ground_truth' even for the
        measure-zero draw u == 0.0 that `u <= 0` would accept.
        """
        u = _uniform(rng)
        share = self.share(step)
        return "student" if share > 0.0 and u <= share else "ground_truth"

    def choose_rows(self, rng: np.random.Generator, n: int, step: int) -> np.ndarray:
        """Per sequence (ImitKD): a bool mask of n rows, each True (a student sample) with probability lmbda_t;
        n draws u_i ~ U[0, 1), True where u_i < lmbda_t (so lmbda_t = 0 is never)."""
        return rng.random(n) < self.share(step)

    def state_dict(self) -> dict[str, Any]:
        """Empty: lmbda_t is a function of the step (present so the trainer can treat all schedules alike)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        _check_empty_state("OnPolicyMixture", state)


class AdaptiveSchedule:
    """DistiLLM's adaptive off-policy schedule of student-generated outputs (SGO), spec section 3.

    tau_a (`threshold`) is the probability of training on student outputs at all; it starts at `init_threshold`
    and grows by `increment` (capped at 1) whenever the validation loss has risen by `loss_eps` since the last
    rise. Within tau_a, a share tau_s is freshly generated and the rest replayed from the buffer:
    tau_s = tau_a * (1 - step/T) ("decreasing", DistiLLM's default), tau_a / 2 ("constant") or
    tau_a * step/T ("increasing").

    `step` is used as given. DistiLLM's `global_step` starts at 1 (finetune.py), so a trainer with 0-based steps
    reproduces it exactly by passing `step + 1`; `0 <= step <= total_steps` is required.
    """

    def __init__(self, init_threshold: float = 0.0, loss_eps: float = 0.1, increment: float = 0.1,
                 replay_ratio: str = "decreasing", *, total_steps: int):
        if not 0.0 <= init_threshold <= 1.0:
            raise ValueError(f"init_threshold must be in [0, 1], got {init_threshold}")
        if not (loss_eps >= 0.0 and math.isfinite(loss_eps)):
            raise ValueError(f"loss_eps must be finite and >= 0, got {loss_eps}")
        if not 0.0 < increment <= 1.0:
            raise ValueError(f"increment must be in (0, 1], got {increment}")
        if replay_ratio not in REPLAY_RATIOS:
            raise ValueError(f"replay_ratio must be one of {REPLAY_RATIOS}, got {replay_ratio!r}")
        if int(total_steps) != total_steps or total_steps < 1:
            raise ValueError(f"total_steps must be a positive integer, got {total_steps}")
        self.init_threshold, self.loss_eps, self.increment = float(init_threshold), float(loss_eps), float(increment)
        self.replay_ratio, self.total_steps = replay_ratio, int(total_steps)
        self.threshold = self.init_threshold  # tau_a, DistiLLM's `adaptive_threshold`
        self.prev_loss: float | None = None  # DistiLLM's `prev_avg_loss`; set by the first `update` (step 0)

    def thresholds(self, step: int) -> tuple[float, float]:
        """(tau_s, tau_a) at `step`; same arithmetic, in the same order, as DistiLLM's finetune.py."""
        if not 0 <= step <= self.total_steps:
            raise ValueError(f"step must be in [0, total_steps={self.total_steps}], got {step}")
        tau_a = self.threshold
        if self.replay_ratio == "constant":
            tau_s = tau_a * 0.5
        elif self.replay_ratio == "increasing":
            tau_s = tau_a * step / self.total_steps
        else:
            tau_s = tau_a * (1 - step / self.total_steps)
        return tau_s, tau_a

    def choose(self, step: int, rng: Rng, buffer_full: bool) -> Literal["fresh", "replay", "ground_truth"]:
        """Data source of this step; draws r ~ U[0, 1) exactly once (even when tau_a = 0).

        'fresh' if r < tau_s, or r < tau_a while the buffer is not yet full (the trainer generates, trains on
        and pushes the samples); 'replay' elif r < tau_a (train on a uniform buffer draw); else 'ground_truth'.
        So replay only ever happens from a full buffer.
        """
        tau_s, tau_a = self.thresholds(step)
        r = _uniform(rng)
        if r < tau_s or (r < tau_a and not buffer_full):
            return "fresh"
        if r < tau_a:
            return "replay"
        return "ground_truth"

    def update(self, val_loss: float) -> bool:
        """Apply the validation rule after an evaluation; returns True when the rule fired.

        The first call records the step-0 evaluation as prev_loss and changes nothing else. Afterwards, if
        val_loss >= prev_loss + loss_eps: tau_a <- min(tau_a + increment, 1) and prev_loss <- val_loss;
        otherwise nothing changes (prev_loss is *not* refreshed when the loss falls). As in DistiLLM's code,
        prev_loss is refreshed whenever the rule fires, including when tau_a is already at the cap of 1 (then
        True is returned although tau_a did not move).
        """
        val_loss = float(val_loss)
        if not math.isfinite(val_loss):
            raise ValueError(f"validation loss must be finite, got {val_loss}")
        if self.prev_loss is None:
            self.prev_loss = val_loss
            return False
        if val_loss >= self.prev_loss + self.loss_eps:
            self.threshold = min(self.threshold + self.increment, 1.0)
            self.prev_loss = val_loss
            return True
        return False

    def state_dict(self) -> dict[str, Any]:
        return {"threshold": self.threshold, "prev_loss": self.prev_loss}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if set(state) != {"threshold", "prev_loss"}:
            raise ValueError(f"AdaptiveSchedule state needs keys ['prev_loss', 'threshold'], got {sorted(state)}")
        threshold, prev = float(state["threshold"]), state["prev_loss"]
        if not 0.0 <= threshold <= 1.0:
            raise ValueError(f"threshold in state must be in [0, 1], got {threshold}")
        self.threshold, self.prev_loss = threshold, None if prev is None else float(prev)


class ReplayBuffer:
    """FIFO of per-example student generations, sampled uniformly without replacement (distillm/buffer.py).

    An item is a tuple of CPU tensors, one per field (e.g. codes [T] long, class label [] long). `push` takes
    *batched* tensors (e.g. codes [B, T], labels [B]) and stores B items; once `capacity` items are held the
    oldest are evicted first. Every item must have the same number of fields, shapes and dtypes as the first
    one, since samples are stacked. Items are private CPU copies (later in-place edits of the pushed batch do
    not reach the buffer); `sample` returns CPU tensors for the trainer to move to its device.

    Fewer items than batch_size: `sample` raises. DistiLLM's `random.sample` does the same, and its schedule
    (`AdaptiveSchedule.choose`) only replays from a full buffer, so the trainer must ensure capacity >= batch_size.
    """

    def __init__(self, capacity: int = 1000):
        if int(capacity) != capacity or capacity < 1:
            raise ValueError(f"capacity must be a positive integer, got {capacity}")
        self.capacity = int(capacity)
        self._items: deque[tuple[torch.Tensor, ...]] = deque(maxlen=self.capacity)

    def __len__(self) -> int:
        return len(self._items)

    @property
    def full(self) -> bool:
        return len(self._items) >= self.capacity

    def _check_item_schema(self, fields: tuple[torch.Tensor, ...]) -> None:
        if not self._items:
            return
        ref = self._items[0]
        want = [(tuple(t.shape), t.dtype) for t in ref]
        got = [(tuple(t.shape), t.dtype) for t in fields]
        if want != got:
            raise ValueError(f"replay items must all have the same fields (shape, dtype): buffer holds {want}, "
                             f"pushed {got}")

    def push(self, *batch: torch.Tensor) -> None:
        """Store each row of the batched tensors `batch` (one per field, sharing dim 0) as one item."""
        if not batch:
            raise ValueError("push needs at least one batched tensor")
        if any(t.dim() == 0 for t in batch) or len({t.shape[0] for t in batch}) != 1:
            raise ValueError(f"push needs batched tensors sharing dim 0, got shapes {[tuple(t.shape) for t in batch]}")
        rows = [t.detach().to("cpu", copy=True).unbind(0) for t in batch]
        items = list(zip(*rows))
        if items:
            self._check_item_schema(items[0])
        self._items.extend(items)

    def sample(self, batch_size: int, rng: Rng) -> tuple[torch.Tensor, ...]:
        """batch_size distinct items chosen uniformly at random, stacked per field (CPU tensors)."""
        n = len(self._items)
        if not 1 <= batch_size <= n:
            raise ValueError(f"cannot sample {batch_size} items without replacement from a buffer of {n} "
                             f"(capacity {self.capacity})")
        if isinstance(rng, np.random.Generator):
            idx = rng.choice(n, size=batch_size, replace=False).tolist()
        elif isinstance(rng, random.Random):
            idx = rng.sample(range(n), batch_size)  # DistiLLM: random.sample(replay_memory, k=bs)
        else:
            raise TypeError(f"rng must be a numpy.random.Generator or random.Random, got {type(rng).__name__}")
        picked = [self._items[i] for i in idx]
        return tuple(torch.stack(field) for field in zip(*picked))

    def state_dict(self) -> dict[str, Any]:
        """{'capacity': int, 'fields': [one stacked tensor per field, oldest item first]} ([] when empty)."""
        fields = [torch.stack(f) for f in zip(*self._items)] if self._items else []
        return {"capacity": self.capacity, "fields": fields}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if set(state) != {"capacity", "fields"}:
            raise ValueError(f"ReplayBuffer state needs keys ['capacity', 'fields'], got {sorted(state)}")
        if state["capacity"] != self.capacity:
            raise ValueError(f"ReplayBuffer state has capacity {state['capacity']}, this buffer {self.capacity}")
        fields = list(state["fields"])
        if fields and (len({f.shape[0] for f in fields}) != 1 or fields[0].shape[0] > self.capacity):
            raise ValueError(f"ReplayBuffer state has inconsistent fields {[tuple(f.shape) for f in fields]}")
        self._items.clear()
        if fields:
            self.push(*fields)
