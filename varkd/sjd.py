"""Speculative Jacobi decoding (SJD) for the LlamaGen GPT: parallel, lossless class-conditional sampling.

Why: on-policy KD needs many student rollouts x ~ q(.|c) during training (no_grad, eval mode); SJD produces them
in fewer forward passes than token-by-token decoding. Inference and evaluation stay plain AR (`sampling.generate`).

Source: Teng et al., "Accelerating Auto-regressive Text-to-Image Generation with Training-free Speculative Jacobi
Decoding", ICLR 2025, arXiv 2410.01699. It is lossless: each kept token passes a speculative-sampling test against
the AR sampler's next-token distribution given its (accepted) prefix, so the output has exactly the distribution
of `generate` with the same cfg_scale, temperature, top_k and top_p.

One iteration, for every row r with acc_r accepted tokens and drafts (with their draft distributions q) after them:
1. one batched forward with the KV cache over the positions [min_r acc_r, end), end = min(T, max_r acc_r + window),
   gives the target p_j of every position, after CFG and then temperature / top-k / top-p (docs/distillation.md §7);
2. verify j = acc_r, acc_r + 1, ... in order: keep draft x_j with probability min(1, p_j(x_j) / q_j(x_j)); at the
   first rejection draw x_j from norm(max(p_j - q_j, 0)) and stop. The first position's context is accepted, so
   every unfinished row gains >= 1 token;
3. Jacobi update: the drafts after the rejection are redrawn from this iteration's p (their q is that p); positions
   beyond the previous window end get `init` drafts with one-hot q: "random" (uniform token) or "repeat_horizon"
   (the token one grid row above, random in the first grid row).
Temperature 0 uses p = one-hot(argmax of the guided logits): a draft is kept iff it is the argmax, a rejection
writes the argmax and drafts are argmaxes, so the result is greedy AR decoding exactly.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

from varkd.sampling import cfg_logits, decoding_labels, filter_logits, sample_from_logits

INITS = ("random", "repeat_horizon")


@torch.no_grad()
def generate_sjd(
    model,
    cond_idx: torch.Tensor,
    *,
    cfg_scale: float = 1.0,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    window: int = 16,
    init: str = "random",
    generator: Optional[torch.Generator] = None,
) -> tuple[torch.Tensor, dict]:
    """Sample block_size image tokens per label with SJD -> (LongTensor [B, T] in raster order, stats).

    Same contract as `sampling.generate` (cond_idx [B], num_classes is the null class, cfg_scale != 1 runs
    [cond; null] as one batch of 2B, temperature 0 is greedy, eval mode for the call, caches cleared on exit).
    stats: "iterations" (batched forward passes), "forward_passes_per_image" (mean over rows of the iteration at
    which the row was complete) and "tokens" (B * T).
    """
    if init not in INITS:
        raise ValueError(f"init={init!r}: choose from {INITS}")
    if window < 1:
        raise ValueError(f"window={window} must be >= 1")
    cfg = model.config
    T, V, g = cfg.block_size, cfg.vocab_size, math.isqrt(cfg.block_size)
    cond_idx, B = decoding_labels(model, cond_idx, cfg_scale)
    device, guided = cond_idx.device, cfg_scale != 1.0

    def target(logits: torch.Tensor) -> torch.Tensor:  # logits [B or 2B, L, V] -> p [B, L, V] float32
        if guided:
            logits = cfg_logits(logits[:B], logits[B:], cfg_scale)
        if temperature == 0:
            return F.one_hot(logits.argmax(dim=-1), V).float()
        return filter_logits(logits, temperature, top_k, top_p).softmax(dim=-1)

    def draw(probs: torch.Tensor) -> torch.Tensor:  # [..., V] -> [...]; zero-probability tokens are never drawn
        return sample_from_logits(probs.log(), generator)

    was_training = model.training
    model.eval()
    seq = torch.zeros(B, T, dtype=torch.long, device=device)  # accepted tokens, then drafts up to `drafted`
    acc = torch.zeros(B, dtype=torch.long, device=device)  # accepted prefix length per row
    finished_at = torch.zeros(B, dtype=torch.long, device=device)
    q = torch.zeros(B, 0, V, device=device)  # draft distributions of the positions [q_start, drafted)
    q_start = drafted = iterations = 0
    try:
        model.setup_caches(max_batch_size=cond_idx.shape[0], max_seq_length=cfg.cls_token_num + T - 1)
        while (a := int(acc.min())) < T:
            end = min(T, int(acc.max()) + window)
            # new draft positions [drafted, end)
            seq[:, drafted:end] = torch.randint(V, (B, end - drafted), generator=generator, device=device)
            if init == "repeat_horizon":
                for j in range(max(drafted, g), end):
                    seq[:, j] = seq[:, j - g]
            q = torch.cat([q[:, a - q_start :], F.one_hot(seq[:, drafted:end], V).float()], dim=1)
            q_start, drafted = a, end

            # one forward over positions [a, end); position n holds image token n-1 (the class token at 0)
            x = seq[:, max(a - 1, 0) : end - 1]
            x = torch.cat([x, x]) if guided else x
            pos = torch.arange(a, end, device=device)
            p = target(model(x, cond_idx if a == 0 else None, input_pos=pos))  # p[:, i]: token a+i | seq[:, :a+i]
            iterations += 1

            # verification: k = window index of each row's first rejection (end - a if none)
            draft = seq[:, a:end]  # a view: writes go into seq
            u = torch.rand(draft.shape, generator=generator, device=device)
            ok = u * q.gather(-1, draft[..., None]).squeeze(-1) < p.gather(-1, draft[..., None]).squeeze(-1)
            ok |= pos < acc[:, None]  # accepted in an earlier iteration
            k = ok.long().cumprod(dim=1).sum(dim=1)
            rows = torch.nonzero(k < end - a).squeeze(1)
            p_k, q_k = p[rows, k[rows]], q[rows, k[rows]]
            residual = (p_k - q_k).clamp_(min=0)
            residual = torch.where(residual.sum(dim=-1, keepdim=True) > 0, residual, p_k)
            draft[rows, k[rows]] = draw(residual)

            # Jacobi update of the drafts after the rejection
            redraw = torch.arange(end - a, device=device)[None, :] > k[:, None]
            draft[redraw] = draw(p[redraw])
            q[redraw] = p[redraw]

            acc = (a + k + 1).clamp_(max=end)
            finished_at = torch.where((acc == T) & (finished_at == 0), iterations, finished_at)
    finally:
        model.clear_caches()
        model.train(was_training)
    stats = {"iterations": iterations, "forward_passes_per_image": finished_at.float().mean().item(), "tokens": B * T}
    return seq, stats
