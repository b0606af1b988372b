"""Batched class-conditional generation for the LlamaGen GPT, following LlamaGen's generate.py.

Order of operations per step (as LlamaGen): classifier-free guidance on the raw logits, then temperature, top-k,
top-p, softmax and a categorical draw. With CFG the conditional and null-class halves run as one batch of 2B
(conditional first) and the sampled token is shared by both halves.
"""
from __future__ import annotations

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


def sample_from_logits(
    logits: torch.Tensor, generator: Optional[torch.Generator] = None, greedy: bool = False
) -> torch.Tensor:
    """One token per row of logits [B, V] -> LongTensor [B]: a softmax draw, or argmax if greedy.

    The draw inverts the CDF with one uniform per row (float64 cumulative sums): the same distribution as
    torch.multinomial, which on the CPU costs ~1 ms per call for [64, 256] and dominated small-model rollouts.
    A token with zero probability is never drawn.
    """
    if greedy:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.float(), dim=-1)
    cdf = probs.double().cumsum(dim=-1)
    u = torch.rand(cdf.shape[:-1] + (1,), dtype=torch.float64, device=cdf.device, generator=generator)
    index = torch.searchsorted(cdf, u * cdf[..., -1:], right=True).clamp_(max=probs.shape[-1] - 1)
    # u * total can round up to the total (probability ~2^-53) and land on a zero-probability tail: take the mode
    return torch.where(probs.gather(-1, index) > 0, index, probs.argmax(dim=-1, keepdim=True)).squeeze(-1)


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


def decoding_labels(model, cond_idx: torch.Tensor, cfg_scale: float) -> tuple[torch.Tensor, int]:
    """The labels of one decoding batch on the model's device, and B: [cond; null] (2B rows) if cfg_scale != 1."""
    cfg = model.config
    cond_idx = torch.as_tensor(cond_idx, dtype=torch.long, device=model.tok_embeddings.weight.device).reshape(-1)
    B = cond_idx.shape[0]
    if cfg_scale == 1.0:
        return cond_idx, B
    if model.cls_embedding.embedding_table.num_embeddings <= cfg.num_classes:
        raise ValueError("cfg_scale != 1 needs the null-class row (class_dropout_prob > 0)")
    return torch.cat([cond_idx, torch.full_like(cond_idx, cfg.num_classes)]), B


def forced_positions(prefix: Optional[torch.Tensor], prefix_len: Optional[torch.Tensor], B: int, T: int,
                     device: torch.device) -> Optional[torch.Tensor]:
    """The mask [B, T] of the positions whose token `generate` takes from `prefix` (None without a prefix)."""
    if (prefix is None) != (prefix_len is None):
        raise ValueError("prefix and prefix_len go together")
    if prefix is None:
        return None
    if prefix.shape != (B, T) or prefix_len.shape != (B,):
        raise ValueError(f"prefix {tuple(prefix.shape)} and prefix_len {tuple(prefix_len.shape)}: expected "
                         f"({B}, {T}) and ({B},)")
    if int(prefix_len.min()) < 0 or int(prefix_len.max()) > T:
        raise ValueError(f"prefix_len must be in [0, {T}]")
    return torch.arange(T, device=device)[None, :] < prefix_len.to(device)[:, None]


@torch.no_grad()
def generate(
    model,
    cond_idx: torch.Tensor,
    *,
    cfg_scale: float = 1.0,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    generator: Optional[torch.Generator] = None,
    use_cache: bool = True,
    prefix: Optional[torch.Tensor] = None,
    prefix_len: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Sample block_size image tokens per label -> LongTensor [B, T] in raster order.

    cond_idx: [B] class ids (num_classes is the null class). cfg_scale != 1 runs [cond; null] as one batch of 2B.
    temperature == 0 is greedy decoding. use_cache=False recomputes the whole prefix with the teacher-forced
    forward at every step (slow; the reference for the KV cache). The model is in eval mode for the call and its
    previous mode is restored afterwards; KV caches are sized to this batch and cleared on exit.

    prefix [B, T] with prefix_len [B] (0..T) forces a start: row b takes prefix[b, n] at n < prefix_len[b] and
    samples the rest given it (a teacher continuing a student's prefix). The positions every row forces,
    n < min(prefix_len), run as one forward and draw no random numbers; the other steps draw for all rows.
    """
    cfg = model.config
    T = cfg.block_size
    cond_idx, B = decoding_labels(model, cond_idx, cfg_scale)
    device, guided = cond_idx.device, cfg_scale != 1.0
    forced = forced_positions(prefix, prefix_len, B, T, device)
    start = 0  # the first step that samples
    if forced is not None:
        prefix, start = prefix.to(device), int(prefix_len.min())

    def next_token(logits: torch.Tensor, n: int) -> torch.Tensor:  # logits [B or 2B, V] -> token n [B]
        if guided:
            logits = cfg_logits(logits[:B], logits[B:], cfg_scale)
        token = sample(logits, temperature, top_k, top_p, generator)
        return token if forced is None else torch.where(forced[:, n], prefix[:, n], token)

    was_training = model.training
    model.eval()
    seq = torch.empty(B, T, dtype=torch.long, device=device)
    if forced is not None:
        seq[:, :start] = prefix[:, :start]
    try:
        if not use_cache:
            for n in range(start, T):
                x = seq[:, :n]
                x = torch.cat([x, x]) if guided else x
                seq[:, n] = next_token(model(x, cond_idx)[:, -1], n)
        elif start < T:
            n_cls = cfg.cls_token_num
            model.setup_caches(max_batch_size=cond_idx.shape[0], max_seq_length=n_cls + T - 1)
            x = seq[:, :start]
            x = torch.cat([x, x]) if guided else x
            logits = model(x, cond_idx, input_pos=torch.arange(n_cls + start, device=device))
            seq[:, start] = next_token(logits[:, -1], start)
            for n in range(start + 1, T):
                x = seq[:, n - 1 : n]
                x = torch.cat([x, x]) if guided else x
                logits = model(x, None, input_pos=torch.tensor([n_cls + n - 1], device=device))
                seq[:, n] = next_token(logits[:, -1], n)
    finally:
        if use_cache:
            model.clear_caches()
        model.train(was_training)
    return seq
