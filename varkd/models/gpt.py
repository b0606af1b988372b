"""LlamaGen class-conditional GPT (c2i), re-implemented so official checkpoints load key for key.

Architecture [LlamaGen autoregressive/models/gpt.py]: a Llama-style decoder (pre-norm RMSNorm, SwiGLU, no biases)
over the raster-ordered VQ token grid, prefixed by one class-embedding token. Positions use 2-D RoPE with the
LlamaGen quirk that the class token's rotary row is all zero, which zeroes its queries and keys.

Sequence layout (T = block_size image tokens x_0..x_{T-1}):

    position   0      1     2    ...   T-1
    input     cls    x_0   x_1   ...  x_{T-2}
    predicts  x_0    x_1   x_2   ...  x_{T-1}

Position p >= 1 holds image token p-1 and uses grid cell p-1 of the RoPE table.

Differences from LlamaGen that do not touch the weights: no label dropout inside the model (the trainer passes
the null id explicitly, so a teacher and a student always see the same label), no attention dropout / drop-path /
GQA / t2i, `forward` returns only logits, and the KV cache holds non-persistent buffers (never in state_dict).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class GPTConfig:
    """Model hyper-parameters; the defaults are LlamaGen GPT-B c2i at 256px (16x16 tokens)."""

    dim: int = 768
    n_layer: int = 12
    n_head: int = 12
    vocab_size: int = 16384
    num_classes: int = 1000
    block_size: int = 256  # number of image tokens; a square grid
    cls_token_num: int = 1
    class_dropout_prob: float = 0.1  # > 0 only means "the null-class row exists"; the model never drops labels
    dropout_p: float = 0.1  # residual (after wo) and FFN dropout
    token_dropout_p: float = 0.1  # on the [cls; tokens] embedding sequence
    multiple_of: int = 256
    ffn_dim_multiplier: Optional[float] = None
    norm_eps: float = 1e-5
    rope_base: float = 10000.0
    initializer_range: float = 0.02

    def __post_init__(self):
        def bad(field: str, why: str):
            raise ValueError(f"GPTConfig.{field}={getattr(self, field)!r}: {why}")

        for f in ("dim", "n_layer", "n_head", "vocab_size", "num_classes", "block_size", "multiple_of"):
            if int(getattr(self, f)) <= 0:
                bad(f, "must be a positive integer")
        if self.dim % self.n_head:
            bad("dim", f"must be divisible by n_head={self.n_head}")
        if (self.dim // self.n_head) % 4:
            bad("n_head", f"head_dim = dim/n_head = {self.dim // self.n_head} must be a multiple of 4 for 2-D RoPE")
        if math.isqrt(self.block_size) ** 2 != self.block_size:
            bad("block_size", "must be a perfect square (the token grid is g x g)")
        if self.cls_token_num != 1:
            bad("cls_token_num", "class-conditional LlamaGen uses exactly one class token")
        for f in ("class_dropout_prob", "dropout_p", "token_dropout_p"):
            if not 0.0 <= getattr(self, f) < 1.0:
                bad(f, "must be in [0, 1)")
        if self.ffn_dim_multiplier is not None and self.ffn_dim_multiplier <= 0:
            bad("ffn_dim_multiplier", "must be None or > 0")
        for f in ("norm_eps", "rope_base"):
            if getattr(self, f) <= 0:
                bad(f, "must be > 0")
        if self.initializer_range < 0:
            bad("initializer_range", "must be >= 0")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_head

    @property
    def null_class(self) -> int:
        """Label id of the unconditional (CFG) embedding row."""
        return self.num_classes

    @property
    def ffn_hidden(self) -> int:
        """LlamaGen's SwiGLU width: int(2*4*dim/3), times the multiplier, rounded up to multiple_of."""
        hidden = int(2 * (4 * self.dim) / 3)
        if self.ffn_dim_multiplier is not None:
            hidden = int(self.ffn_dim_multiplier * hidden)
        return -(-hidden // self.multiple_of) * self.multiple_of


# Registry: overrides of GPTConfig. Exact parameter counts are for c2i, vocab 16384, 1000 classes (+1 null row).
GPT_models: dict[str, dict[str, int]] = {
    "GPT-B": dict(n_layer=12, n_head=12, dim=768),  # 110,888,448 (FFN 2048)
    "GPT-L": dict(n_layer=24, n_head=16, dim=1024),  # 342,910,976 (FFN 2816)
    "GPT-XL": dict(n_layer=36, n_head=20, dim=1280),  # 774,699,520 (FFN 3584)
    "GPT-XXL": dict(n_layer=48, n_head=24, dim=1536),  # 1,410,972,672 (FFN 4096)
    "GPT-3B": dict(n_layer=24, n_head=32, dim=3200),  # 3,096,659,200 (FFN 8704, head_dim 100)
}


def gpt_config(name: str, **overrides) -> GPTConfig:
    """GPTConfig for a registry size, e.g. gpt_config("GPT-B", block_size=576)."""
    if name not in GPT_models:
        raise KeyError(f"unknown GPT size {name!r}; choose from {sorted(GPT_models)}")
    return GPTConfig(**{**GPT_models[name], **overrides})


# ----------------------------------------------------------------------------------------------------------------
# 2-D rotary position embedding (LlamaGen precompute_freqs_cis_2d / apply_rotary_emb)
# ----------------------------------------------------------------------------------------------------------------
def precompute_freqs_cis_2d(grid_size: int, head_dim: int, base: float = 10000.0, cls_token_num: int = 1) -> torch.Tensor:
    """(cos, sin) table of shape [cls_token_num + grid_size**2, head_dim // 2, 2], float32, on CPU.

    Cell (r, c) gets angles [r * freqs || c * freqs] with head_dim/4 frequencies 1/base^(2i / (head_dim/2)).
    The first cls_token_num rows are all zero (cos = sin = 0), as in LlamaGen: this zeroes the class token's q/k.
    """
    half = head_dim // 2
    freqs = 1.0 / (base ** (torch.arange(0, half, 2, device="cpu")[: half // 2].float() / half))
    t = torch.arange(grid_size, device="cpu", dtype=torch.float32)
    freqs = torch.outer(t, freqs)  # [g, head_dim/4]
    grid = torch.cat(
        [freqs[:, None, :].expand(-1, grid_size, -1), freqs[None, :, :].expand(grid_size, -1, -1)], dim=-1
    )  # [g(row), g(col), head_dim/2]: row angles first, then column angles
    cache = torch.stack([torch.cos(grid), torch.sin(grid)], dim=-1).flatten(0, 1)  # raster order
    return torch.cat([torch.zeros(cls_token_num, half, 2, device="cpu"), cache])


def apply_rotary_emb(x: torch.Tensor, freqs_cis: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs (x[2k], x[2k+1]) in fp32. x: [B, L, H, head_dim]; freqs_cis: [L, head_dim/2, 2], or
    [B, L, head_dim/2, 2] when each row sits at its own positions."""
    xs = x.float().reshape(*x.shape[:-1], -1, 2)
    fc = freqs_cis.reshape(-1, xs.size(1), 1, xs.size(3), 2)
    out = torch.stack(
        [
            xs[..., 0] * fc[..., 0] - xs[..., 1] * fc[..., 1],
            xs[..., 1] * fc[..., 0] + xs[..., 0] * fc[..., 1],
        ],
        dim=-1,
    )
    return out.flatten(3).type_as(x)


# ----------------------------------------------------------------------------------------------------------------
# Modules
# ----------------------------------------------------------------------------------------------------------------
class RMSNorm(nn.Module):
    """RMSNorm normalised in fp32 and cast back before the (learnable) scale, as LlamaGen."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x), then dropout."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        hidden = config.ffn_hidden
        self.w1 = nn.Linear(config.dim, hidden, bias=False)
        self.w3 = nn.Linear(config.dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, config.dim, bias=False)
        self.ffn_dropout = nn.Dropout(config.dropout_p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ffn_dropout(self.w2(F.silu(self.w1(x)) * self.w3(x)))


class KVCache(nn.Module):
    """Per-layer key/value store [max_batch, n_head, max_seq, head_dim]; non-persistent, so never in state_dict.

    Allocated once and written in place (no reallocation, no host sync), so a decoding step can be captured as a
    CUDA graph. Slots a query may not see are masked by the caller, so stale slots from an earlier batch are
    harmless as long as they are finite (`varkd.decode.Decoder` zeroes the cache between batches, `reset`)."""

    def __init__(self, max_batch_size: int, max_seq_length: int, n_head: int, head_dim: int, dtype, device=None):
        super().__init__()
        shape = (max_batch_size, n_head, max_seq_length, head_dim)
        self.register_buffer("k_cache", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v_cache", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def reset(self) -> None:
        """Zero both stores in place: the same memory, so a graph captured over them stays valid."""
        self.k_cache.zero_()
        self.v_cache.zero_()

    def update(self, input_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_len: int):
        """Write k, v [B, H, L, D] at input_pos ([L], or [B, L] per row); return this batch's first kv_len slots."""
        b = k.shape[0]
        if b > self.k_cache.shape[0]:
            raise RuntimeError(f"batch {b} exceeds the KV cache batch {self.k_cache.shape[0]}; call setup_caches")
        k_cache, v_cache = self.k_cache[:b], self.v_cache[:b]
        if input_pos.dim() == 1:
            k_cache.index_copy_(2, input_pos, k.to(k_cache.dtype))
            v_cache.index_copy_(2, input_pos, v.to(v_cache.dtype))
        else:
            slots = input_pos[:, None, :, None].expand(k.shape)
            k_cache.scatter_(2, slots, k.to(k_cache.dtype))
            v_cache.scatter_(2, slots, v.to(v_cache.dtype))
        return k_cache[:, :, :kv_len].to(k.dtype), v_cache[:, :, :kv_len].to(v.dtype)


class Attention(nn.Module):
    """Multi-head attention with a fused wqkv; one code path with or without a KV cache."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.dim, self.n_head, self.head_dim = config.dim, config.n_head, config.head_dim
        self.wqkv = nn.Linear(config.dim, 3 * config.dim, bias=False)  # rows: q | k | v
        self.wo = nn.Linear(config.dim, config.dim, bias=False)
        self.resid_dropout = nn.Dropout(config.dropout_p)
        self.kv_cache: Optional[KVCache] = None

    def forward(self, x, freqs_cis, input_pos=None, mask=None):
        """input_pos None: causal self-attention over x. Otherwise x sits at input_pos, its k/v go into the cache
        and the queries attend to the first mask.size(-1) cached slots under the boolean mask ([L, kv_len], or
        [B, 1, L, kv_len] with per-row positions)."""
        B, L, _ = x.shape
        q, k, v = self.wqkv(x).split(self.dim, dim=-1)
        q = apply_rotary_emb(q.view(B, L, self.n_head, self.head_dim), freqs_cis)
        k = apply_rotary_emb(k.view(B, L, self.n_head, self.head_dim), freqs_cis)
        v = v.view(B, L, self.n_head, self.head_dim)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [B, H, L, D]
        if input_pos is not None:
            k, v = self.kv_cache.update(input_pos, k, v, mask.size(-1))
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None)
        return self.resid_dropout(self.wo(y.transpose(1, 2).reshape(B, L, self.dim)))


class TransformerBlock(nn.Module):
    """Pre-norm block: h = x + attn(norm(x)); out = h + ffn(norm(h))."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.attention = Attention(config)
        self.feed_forward = FeedForward(config)
        self.attention_norm = RMSNorm(config.dim, eps=config.norm_eps)
        self.ffn_norm = RMSNorm(config.dim, eps=config.norm_eps)

    def forward(self, x, freqs_cis, input_pos=None, mask=None):
        h = x + self.attention(self.attention_norm(x), freqs_cis, input_pos, mask)
        return h + self.feed_forward(self.ffn_norm(h))


class LabelEmbedder(nn.Module):
    """Class embedding table; row num_classes is the null class (present when class_dropout_prob > 0).

    Unlike LlamaGen this never replaces labels by the null id itself: callers pass null labels explicitly.
    """

    def __init__(self, num_classes: int, dim: int, class_dropout_prob: float):
        super().__init__()
        self.embedding_table = nn.Embedding(num_classes + int(class_dropout_prob > 0), dim)

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        return self.embedding_table(labels).unsqueeze(1)  # [B, 1, dim]


class GPT(nn.Module):
    """LlamaGen c2i Transformer. State-dict keys match LlamaGen's `Transformer` exactly."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.cls_embedding = LabelEmbedder(config.num_classes, config.dim, config.class_dropout_prob)
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.dim)
        self.tok_dropout = nn.Dropout(config.token_dropout_p)
        self.layers = nn.ModuleList(TransformerBlock(config) for _ in range(config.n_layer))
        self.norm = RMSNorm(config.dim, eps=config.norm_eps)
        self.output = nn.Linear(config.dim, config.vocab_size, bias=False)
        # Plain fp32 attribute (not a buffer): stays out of state_dict and is not cast by model.half()/bfloat16().
        self.freqs_cis = precompute_freqs_cis_2d(
            math.isqrt(config.block_size), config.head_dim, config.rope_base, config.cls_token_num
        )
        self.initialize_weights()

    # -- init / bookkeeping ----------------------------------------------------------------------------------
    def initialize_weights(self):
        """N(0, initializer_range) for every Linear and Embedding, then output.weight = 0 (as LlamaGen)."""
        std = self.config.initializer_range
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, mean=0.0, std=std)
        nn.init.zeros_(self.output.weight)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    @property
    def max_seq_length(self) -> int:
        """Longest sequence a forward can see: [cls, x_0..x_{T-1}] (the RoPE table's length)."""
        return self.freqs_cis.shape[0]

    def setup_caches(self, max_batch_size: int, max_seq_length: Optional[int] = None, dtype=None):
        """Allocate per-layer KV caches (default length cls + T - 1, enough to generate T tokens).

        Unlike LlamaGen the length is not padded to a multiple of 8; the caches are non-persistent buffers. A longer
        cache is allowed: slots past the last grid position are scratch space (`varkd.sjd` parks finished rows'
        windows there), their rotary angles those of the last position.
        """
        if max_seq_length is None:
            max_seq_length = self.config.cls_token_num + self.config.block_size - 1
        if max_seq_length <= 0:
            raise ValueError(f"max_seq_length={max_seq_length} must be >= 1")
        w = self.tok_embeddings.weight
        dtype = w.dtype if dtype is None else dtype
        for layer in self.layers:
            layer.attention.kv_cache = KVCache(
                max_batch_size, max_seq_length, self.config.n_head, self.config.head_dim, dtype, w.device
            )

    def clear_caches(self):
        for layer in self.layers:
            layer.attention.kv_cache = None

    def reset_caches(self) -> None:
        """Zero every layer's KV cache in place (setup_caches done)."""
        for layer in self.layers:
            layer.attention.kv_cache.reset()

    @property
    def has_caches(self) -> bool:
        return self.layers[0].attention.kv_cache is not None

    def _rope(self, device) -> torch.Tensor:
        if self.freqs_cis.device != torch.device(device):
            self.freqs_cis = self.freqs_cis.to(device)
        return self.freqs_cis

    # -- forward ---------------------------------------------------------------------------------------------
    def forward(
        self,
        idx: Optional[torch.Tensor],
        cond_idx: Optional[torch.Tensor],
        input_pos: Optional[torch.Tensor] = None,
        kv_len: Optional[int] = None,
        head: bool = True,
    ) -> torch.Tensor:
        """Float32 logits [B, L, vocab] for the input sequence [cls(cond_idx)?; tok(idx)?] of length L; with
        head=False the final-norm hidden states [B, L, dim] instead (a loss then applies `output` chunk by chunk,
        `varkd.distill.chunked_term_loss`, and never holds the whole [B, L, vocab] logits).

        Teacher-forced (input_pos None, no cache use): cond_idx [B] is required and starts the sequence at
        position 0; idx [B, n] (n <= T-1; None or n = 0 allowed) are x_0..x_{n-1}. logits[:, m] predicts x_m.
        Cached decoding (input_pos [L] or per row [B, L] LongTensor, setup_caches done): the sequence sits at
        positions input_pos (increasing) and attends to every cached slot at or before its position among the first
        kv_len slots (default: the whole cache; the caller keeps input_pos < kv_len, unchecked so that a step never
        waits for the device). Prefill: forward(None, cond, tensor([0])) (optionally with a token prefix idx and
        input_pos = arange(1 + n)); step: forward(x[B, 1], None, tensor([p])), where x is image token p-1.
        """
        parts = []
        if cond_idx is not None:
            parts.append(self.cls_embedding(cond_idx))
        if idx is not None and idx.shape[1] > 0:
            parts.append(self.tok_embeddings(idx))
        if not parts:
            raise ValueError("forward needs cond_idx and/or a non-empty idx")
        h = self.tok_dropout(torch.cat(parts, dim=1) if len(parts) > 1 else parts[0])
        L = h.shape[1]
        rope = self._rope(h.device)

        if input_pos is None:
            if cond_idx is None:
                raise ValueError("teacher-forced forward (input_pos=None) needs cond_idx: position 0 is the class token")
            if L > rope.shape[0]:
                raise ValueError(f"sequence length {L} exceeds cls_token_num + block_size = {rope.shape[0]}")
            freqs_cis, mask = rope[:L], None
        else:
            if not self.has_caches:
                raise RuntimeError("input_pos given but no KV caches: call setup_caches() first")
            if input_pos.shape[-1] != L or input_pos.dim() not in (1, 2):
                raise ValueError(f"input_pos has shape {tuple(input_pos.shape)}, expected ({L},) or (B, {L})")
            if kv_len is None:
                kv_len = self.layers[0].attention.kv_cache.k_cache.shape[2]
            freqs_cis = rope[input_pos.clamp(max=rope.shape[0] - 1)]  # past the grid: scratch slots only
            mask = input_pos[..., :, None] >= torch.arange(kv_len, device=h.device)  # [(B,) L, kv_len]
            if input_pos.dim() == 2:
                mask = mask[:, None]  # [B, 1, L, kv_len]: broadcast over heads

        for layer in self.layers:
            h = layer(h, freqs_cis, input_pos, mask)
        h = self.norm(h)
        return self.output(h).float() if head else h
