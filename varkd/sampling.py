"""How a sampler turns next-token logits into a token, following LlamaGen's generate.py.

Order of operations (as LlamaGen): classifier-free guidance on the raw logits, then temperature, top-k, top-p,
softmax and a categorical draw. With CFG the conditional and null-class halves run as one batch of 2B
(conditional first) and the sampled token is shared by both halves. The decoders (`varkd.decode`, `varkd.sjd`)
call these functions on the device, with uniforms they drew in advance.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch


def cfg_logits(cond_logits: torch.Tensor, uncond_logits: torch.Tensor, scale: float) -> torch.Tensor:
    """uncond + scale * (cond - uncond); scale 1 returns cond_logits itself."""
    if scale == 1.0:
        return cond_logits
    return uncond_logits + scale * (cond_logits - uncond_logits)


def filter_logits(logits: torch.Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Temperature, then top-k, then nucleus (top-p) filtering over the last dim; removed entries are -inf.

    - temperature: logits / max(temperature, 1e-5) (LlamaGen's guard, so 0 gives a near-one-hot softmax).
    - top_k: keep exactly the k largest (0 = off; k >= vocab keeps all).
    - top_p: keep the shortest prefix of tokens sorted by decreasing probability whose mass reaches top_p, i.e.
      HF-style, including the first token that crosses the threshold (1.0 = off). At least one token is kept.
    """
    logits = logits / max(temperature, 1e-5)
    if top_k > 0 and top_k < logits.shape[-1]:
        vals, idx = torch.topk(logits, top_k, dim=-1)
        logits = torch.full_like(logits, float("-inf")).scatter_(-1, idx, vals)
    if top_p < 1.0:
        sorted_logits, sorted_idx = torch.sort(logits, dim=-1, descending=True)
        cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        # keep token i iff the mass strictly before it is < top_p (the token that crosses top_p stays)
        remove_sorted = (cum - sorted_logits.softmax(dim=-1)) >= top_p
        remove_sorted[..., 0] = False
        remove = torch.zeros_like(remove_sorted).scatter_(-1, sorted_idx, remove_sorted)
        logits = logits.masked_fill(remove, float("-inf"))
    return logits


@dataclass(frozen=True)
class Sampling:
    """How a sampler turns logits into a token: CFG scale, then temperature (0 = greedy), top-k, top-p."""

    cfg_scale: float = 1.0
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self):
        if self.cfg_scale < 1 or self.temperature < 0 or self.top_k < 0 or not 0 < self.top_p <= 1:
            # worded to follow the name of what is checked: "rollout needs ...", "sample needs ..."
            raise ValueError(f"needs cfg_scale >= 1, temperature >= 0 (0: greedy), top_k >= 0 and 0 < top_p <= 1, "
                             f"got {self}")

    @property
    def guided(self) -> bool:
        return self.cfg_scale != 1.0


def draw(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF draw of one token per row of probs [..., V] (any scale) with the uniforms u [...] -> [...].

    Float64 cumulative sums; the same distribution as torch.multinomial, without its host sync (and on the CPU ~1 ms
    per call for [64, 256]). A token with zero probability is never drawn: u * total can round up to the total
    (probability ~2^-53) and land on a zero-probability tail, which takes the mode instead.
    """
    cdf = probs.double().cumsum(dim=-1)
    index = torch.searchsorted(cdf, u[..., None].double() * cdf[..., -1:], right=True).clamp_(max=probs.shape[-1] - 1)
    return torch.where(probs.gather(-1, index) > 0, index, probs.argmax(dim=-1, keepdim=True)).squeeze(-1)


def pick(logits: torch.Tensor, u: torch.Tensor, sampling: Sampling) -> torch.Tensor:
    """The token [B] of logits [B or 2B, V] ([cond; null] rows when guided) drawn with the uniforms u [B]."""
    if sampling.guided:
        B = u.shape[0]
        logits = cfg_logits(logits[:B], logits[B:], sampling.cfg_scale)
    if sampling.temperature == 0:
        return logits.argmax(dim=-1)
    return draw(filter_logits(logits, sampling.temperature, sampling.top_k, sampling.top_p).softmax(dim=-1), u)


def sample_from_logits(
    logits: torch.Tensor, generator: Optional[torch.Generator] = None, greedy: bool = False
) -> torch.Tensor:
    """One token per row of logits [B, V] -> LongTensor [B]: a softmax draw (`draw`, one uniform per row from
    `generator`), or argmax if greedy."""
    if greedy:
        return logits.argmax(dim=-1)
    u = torch.rand(logits.shape[:-1], dtype=torch.float64, device=logits.device, generator=generator)
    return draw(torch.softmax(logits.float(), dim=-1), u)


def sample(
    logits: torch.Tensor,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    generator: Optional[torch.Generator] = None,
) -> torch.Tensor:
    """filter_logits + sample_from_logits; temperature == 0 means greedy (argmax, top-k/top-p irrelevant)."""
    if temperature == 0:
        return sample_from_logits(logits, greedy=True)
    return sample_from_logits(filter_logits(logits, temperature, top_k, top_p), generator)
