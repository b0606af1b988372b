"""Speculative Jacobi decoding (SJD) for the LlamaGen GPT: parallel, lossless class-conditional sampling.

Why: on-policy KD needs many student rollouts x ~ q(.|c) during training (no_grad, eval mode); SJD produces them
in fewer forward passes than token-by-token decoding. Inference and evaluation stay plain AR (`decode.generate`).

Source: Teng et al., "Accelerating Auto-regressive Text-to-Image Generation with Training-free Speculative Jacobi
Decoding", ICLR 2025, arXiv 2410.01699. It is lossless: each kept token passes a speculative-sampling test against
the AR sampler's next-token distribution given its (accepted) prefix, so the output has exactly the distribution
of `generate` with the same `Sampling` (cfg_scale, temperature, top_k, top_p).

Every row keeps its own window of W draft positions [acc_r, acc_r + W) after its acc_r accepted tokens, so the
step has one fixed shape [rows, W] whatever the rows' progress. One iteration:
1. one batched forward with the KV cache at each row's window positions (per-row positions; the first iteration
   is the prefill [cls, drafts] at positions [0, W)) gives the target p_j of every window position, after CFG and
   then temperature / top-k / top-p (docs/distillation.md section 7);
2. verify j = acc_r, acc_r + 1, ... in order: keep draft x_j with probability min(1, p_j(x_j) / q_j(x_j)); at the
   first rejection draw x_j from norm(max(p_j - q_j, 0)) and stop. The first position's context is accepted, so
   every unfinished row gains >= 1 token (at most W: there is no bonus token past the window);
3. Jacobi update: the window moves past the accepted tokens; its positions computed in this iteration get
   drafts redrawn from this iteration's p (their q is that p), the positions new to it get `init` drafts with
   one-hot q: "random" (uniform token) or "repeat_horizon" (the token one grid row above, random in the first
   grid row).
A finished row's window sits in scratch cache slots past the grid and changes nothing. The loop reads the "all
done" flag one iteration late (copied to the host while the device runs the next iteration), so it never waits
for the device; that costs at most one extra forward.
Temperature 0 uses p = one-hot(argmax of the guided logits): a draft is kept iff it is the argmax, a rejection
writes the argmax and drafts are argmaxes, so the result is greedy AR decoding exactly.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

from varkd.decode import as_decoder, decoding_labels
from varkd.sampling import Sampling, cfg_logits, draw, filter_logits

INITS = ("random", "repeat_horizon")


class LateFlag:
    """A device boolean read on the host one iteration after it was set, so reading it never stalls the device."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.pending: list[tuple[torch.Tensor, Optional[torch.cuda.Event]]] = []

    def push(self, flag: torch.Tensor) -> bool:
        """Queue this iteration's flag; return the previous iteration's (False on the first)."""
        host = torch.empty((), dtype=torch.bool, pin_memory=self.cuda)
        host.copy_(flag, non_blocking=True)
        event = torch.cuda.Event() if self.cuda else None
        if event is not None:
            event.record()
        self.pending.append((host, event))
        if len(self.pending) < 2:
            return False
        host, event = self.pending.pop(0)
        if event is not None:
            event.synchronize()
        return bool(host)


@torch.no_grad()
def generate_sjd(
    model,
    cond_idx: torch.Tensor,
    sampling: Sampling = Sampling(),
    *,
    window: int = 16,
    init: str = "random",
    generator: Optional[torch.Generator] = None,
) -> tuple[torch.Tensor, dict]:
    """Sample block_size image tokens per label with SJD -> (LongTensor [B, T] in raster order, stats).

    Same contract as `decode.generate` (model a GPT or its `Decoder`, cond_idx [B], num_classes is the null class,
    a guided sampling runs [cond; null] as one batch of 2B, temperature 0 is greedy, the model's mode untouched).
    stats: "iterations" (batched forward passes until every row was complete), "forwards" (those run, with the
    late flag's extra one), "forward_passes_per_image" (mean over rows of the iteration at which the row was
    complete) and "tokens" (B * T).
    """
    if init not in INITS:
        raise ValueError(f"init={init!r}: choose from {INITS}")
    if window < 1:
        raise ValueError(f"window={window} must be >= 1")
    decoder = as_decoder(model)
    cfg = decoder.config
    T, V, g = cfg.block_size, cfg.vocab_size, math.isqrt(cfg.block_size)
    W = min(window, T)
    cond_idx, B = decoding_labels(decoder.model, cond_idx, sampling.cfg_scale)
    device = cond_idx.device
    offsets = torch.arange(W, device=device)

    def target(logits: torch.Tensor) -> torch.Tensor:  # logits [B or 2B, W, V] -> p [B, W, V] float32
        if sampling.guided:
            logits = cfg_logits(logits[:B], logits[B:], sampling.cfg_scale)
        if sampling.temperature == 0:
            return F.one_hot(logits.argmax(dim=-1), V).float()
        return filter_logits(logits, sampling.temperature, sampling.top_k, sampling.top_p).softmax(dim=-1)

    def start_window(seq, pos, kept, kept_tokens, u):  # the drafts of the window at pos [B, W] -> is_new [B, W]
        """Write the window's drafts into seq: kept_tokens where kept, else `init` drafts (random from u)."""
        tokens = torch.where(kept, kept_tokens, (u * V).long().clamp_(max=V - 1))
        seq.scatter_(1, pos, tokens)
        if init == "repeat_horizon":  # new drafts copy the row above; within one window that chains W // g deep
            above = (pos >= g) & ~kept
            for _ in range(-(-W // g)):
                seq.scatter_(1, pos, torch.where(above, seq.gather(1, (pos - g).clamp(min=0)), seq.gather(1, pos)))
        return ~kept

    # seq: accepted tokens, then each row's window; slots [T, T + W) are scratch for finished rows' windows
    seq = torch.zeros(B, T + W, dtype=torch.long, device=device)
    acc = torch.zeros(B, dtype=torch.long, device=device)
    finished_at = torch.zeros(B, dtype=torch.long, device=device)
    pos = offsets.expand(B, W)
    u = torch.rand(B, W, dtype=torch.float64, generator=generator, device=device)
    is_new = start_window(seq, pos, torch.zeros_like(pos, dtype=torch.bool), seq[:, :W], u)
    q = F.one_hot(seq.gather(1, pos), V).float()  # draft distributions of the window
    net = decoder.prepare(cond_idx.shape[0], cfg.cls_token_num + T - 1 + W)
    done, forwards = LateFlag(device), 0
    with decoder.context():
        for iteration in range(1, T + 2):  # each iteration completes >= 1 token of every unfinished row
            # positions pos hold tokens pos - 1 (the class token at 0) and predict the tokens at pos
            kv_len = decoder.kv_len(min(T - 1, iteration * W - 1))  # acc <= (iteration - 1) * W
            if iteration == 1:
                x = seq[:, : W - 1]
                logits = net(torch.cat([x, x]) if sampling.guided else x, cond_idx, input_pos=offsets, kv_len=kv_len)
            else:
                x, at = seq.gather(1, pos - 1), pos
                x, at = (torch.cat([x, x]), torch.cat([at, at])) if sampling.guided else (x, at)
                logits = net(x, None, input_pos=at, kv_len=kv_len)
            p = target(logits)  # p[:, i]: token pos[:, i] given seq before it
            forwards += 1

            # verification: k = window index of each row's first rejection (W if none; past the grid accepts)
            u = torch.rand(B, 3 * W + 1, dtype=torch.float64, generator=generator, device=device)
            draft = seq.gather(1, pos)
            ok = u[:, :W].float() * q.gather(-1, draft[..., None]).squeeze(-1) < p.gather(-1, draft[..., None]).squeeze(-1)
            k = (ok | (pos >= T)).long().cumprod(dim=1).sum(dim=1)
            at_k = k.clamp(max=W - 1)[:, None, None].expand(B, 1, V)
            p_k, q_k = p.gather(1, at_k).squeeze(1), q.gather(1, at_k).squeeze(1)
            residual = (p_k - q_k).clamp_(min=0)
            residual = torch.where(residual.sum(dim=-1, keepdim=True) > 0, residual, p_k)
            fixed = torch.where(k < W, draw(residual, u[:, W]), draft.gather(1, k.clamp(max=W - 1)[:, None])[:, 0])
            seq.scatter_(1, (acc + k.clamp(max=W - 1))[:, None], fixed[:, None])

            # Jacobi update: the window moves by the gained tokens; its old positions take drafts redrawn from p
            gained = (k + 1).clamp_(max=W)
            acc = (acc + gained).clamp_(max=T)
            old = gained[:, None] + offsets  # index in the old window of each new window position
            kept = old < W
            redrawn = draw(p, u[:, W + 1 : 2 * W + 1])
            pos = acc[:, None] + offsets
            is_new = start_window(seq, pos, kept, redrawn.gather(1, old.clamp(max=W - 1)), u[:, 2 * W + 1 :])
            p_old = p.gather(1, old.clamp(max=W - 1)[..., None].expand(B, W, V))
            q = torch.where(is_new[..., None], F.one_hot(seq.gather(1, pos), V).float(), p_old)

            finished_at = torch.where((acc == T) & (finished_at == 0), iteration, finished_at)
            if done.push((acc == T).all()):
                break
    stats = {"iterations": int(finished_at.max()), "forwards": forwards,
             "forward_passes_per_image": finished_at.float().mean().item(), "tokens": B * T}
    return seq[:, :T].clone(), stats
