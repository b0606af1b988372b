"""The decode engine every sampler runs on (AR `generate` here, `sjd.generate_sjd`; evaluation, teacher pools,
training rollouts): a model's decoding state kept across batches, and batched class-conditional AR generation.

Why: decoding is bound by how fast the host issues a step, not by the device, unless a step is static. A
`Decoder` holds an eval-mode copy of the model in the decoding dtype (bf16 copies of an fp32 student, refreshed
in place from its weights before each batch, so they follow every optimizer step; the weights themselves when the
dtype is the model's) and KV caches allocated once and zeroed in place per batch. A step writes the cache with
`index_copy_` / `scatter_`, masks with `arange <= position`, reads positions from device tensors and samples from
uniforms drawn once per batch: no host sync and no allocation that depends on the step, so with `compile=True`
it is one `torch.compile(mode="reduce-overhead", fullgraph=True)` graph per cache-length bucket (attention reads
only the filled prefix, rounded up to `bucket` slots).
"""
from __future__ import annotations

import copy
import math
from typing import Optional

import torch

from varkd.models.gpt import GPT
from varkd.sampling import Sampling, pick


def autocast_dtype(device: torch.device, model_dtype: torch.dtype) -> torch.dtype:
    """The dtype a caller's autocast would compute in (bf16 inside a bf16 autocast region), else the model's."""
    if torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return model_dtype


def decode_step(net: GPT, tokens: torch.Tensor, pos: torch.Tensor, u: torch.Tensor, kv_len: int,
                sampling: Sampling) -> torch.Tensor:
    """One cached AR step: tokens [B, 1] (image token p-1) at position pos [1] -> token p [B], drawn with the
    uniforms u [B]. CFG rows [cond; null] share the token. Pure tensor code: traceable with fullgraph=True."""
    x = torch.cat([tokens, tokens]) if sampling.guided else tokens
    return pick(net(x, None, input_pos=pos, kv_len=kv_len)[:, -1], u, sampling)


class Decoder:
    """A model's decoding copy and KV caches, reused batch after batch (see the module docstring).

    dtype None: the caller's autocast dtype if one is active (training rollouts under bf16 autocast decode in
    bf16), else the model's own. bucket: the cache-length granularity of a step's attention (one compiled graph per
    bucket). compile: run `decode_step` compiled (reduce-overhead, fullgraph); meant for CUDA.
    """

    def __init__(self, model: GPT, dtype: Optional[torch.dtype] = None, *, bucket: int = 64, compile: bool = False):
        if bucket < 1:
            raise ValueError(f"bucket={bucket} must be >= 1")
        weight = model.tok_embeddings.weight
        self.model, self.device, self.bucket = model, weight.device, bucket
        self.dtype = autocast_dtype(weight.device, weight.dtype) if dtype is None else dtype
        self.shared = self.dtype == weight.dtype  # decode with the model's own parameters, nothing to refresh
        # Its own modules (mode, caches) around the model's parameters, or around copies made straight in the
        # decoding dtype (never a full float32 duplicate of a large model on the device).
        params = {id(p): p if self.shared else torch.nn.Parameter(p.detach().to(self.dtype), requires_grad=False)
                  for p in model.parameters()}
        self.net = copy.deepcopy(model, memo=params).eval()
        if not self.shared:
            self.net.to(self.dtype)
        self.net.clear_caches()
        self.rows = self.length = 0
        self.step = torch.compile(decode_step, mode="reduce-overhead", fullgraph=True) if compile else decode_step

    @property
    def config(self):
        return self.model.config

    @torch.no_grad()
    def refresh(self) -> None:
        """Copy the model's current weights into the decoding copy (in place, cast to the decoding dtype)."""
        if not self.shared:
            for dst, src in zip(self.net.parameters(), self.model.parameters()):
                dst.copy_(src)

    @torch.no_grad()
    def prepare(self, rows: int, length: int) -> GPT:
        """The decoding copy, weights refreshed, with zeroed caches of at least `rows` rows and `length` slots
        (allocated only when a batch needs more than any before it)."""
        self.refresh()
        if rows > self.rows or length > self.length or not self.net.has_caches:
            self.rows, self.length = max(rows, self.rows), max(length, self.length)
            self.net.setup_caches(self.rows, self.length, self.dtype)
        else:
            self.net.reset_caches()
        return self.net

    def kv_len(self, last_pos: int) -> int:
        """The cache slots a query at last_pos reads: last_pos + 1 rounded up to the bucket, within the cache."""
        return min(self.length, math.ceil((last_pos + 1) / self.bucket) * self.bucket)

    def context(self):
        """No autocast inside the engine: the copy already holds the decoding dtype."""
        return torch.autocast(self.device.type, enabled=False)


def as_decoder(model: GPT | Decoder) -> Decoder:
    """A Decoder as given, or a fresh one for a model (one call's worth of state)."""
    return model if isinstance(model, Decoder) else Decoder(model)


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
    sampling: Sampling = Sampling(),
    *,
    generator: Optional[torch.Generator] = None,
    use_cache: bool = True,
    prefix: Optional[torch.Tensor] = None,
    prefix_len: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Sample block_size image tokens per label -> LongTensor [B, T] in raster order.

    model: a GPT, or a `varkd.decode.Decoder` of one to reuse its weights copy and caches across calls.
    cond_idx: [B] class ids (num_classes is the null class). sampling: CFG scale, temperature, top-k, top-p; a
    guided one (cfg_scale != 1) runs [cond; null] as one batch of 2B; temperature 0 is greedy decoding. The
    uniforms of the whole batch are drawn once, u [B, T] float64 from `generator`, token n of row b from u[b, n]: a
    row's tokens do not depend on the rows beside it. Decoding runs on the model's decoding copy (eval mode; the
    model's own mode and modules are untouched). use_cache=False recomputes the whole prefix with the model's
    teacher-forced forward at every step, same uniforms (slow; the reference for the engine).

    prefix [B, T] with prefix_len [B] (0..T) forces a start: row b takes prefix[b, n] at n < prefix_len[b] and
    samples the rest given it (a teacher continuing a student's prefix). The positions every row forces,
    n < min(prefix_len), run as one forward.
    """
    decoder = as_decoder(model)
    cfg = decoder.config
    T, n_cls = cfg.block_size, cfg.cls_token_num
    cond_idx, B = decoding_labels(decoder.model, cond_idx, sampling.cfg_scale)
    device = cond_idx.device
    forced = forced_positions(prefix, prefix_len, B, T, device)
    start = 0  # the first step that samples
    if forced is not None:
        prefix, start = prefix.to(device), int(prefix_len.min())
    u = torch.rand(B, T, dtype=torch.float64, device=device, generator=generator)
    seq = torch.empty(B, T, dtype=torch.long, device=device)
    if forced is not None:
        seq[:, :start] = prefix[:, :start]

    def keep(token: torch.Tensor, n: int) -> None:
        seq[:, n] = token if forced is None else torch.where(forced[:, n], prefix[:, n], token)

    if not use_cache:
        net, was_training = decoder.model, decoder.model.training
        net.eval()
        try:
            for n in range(start, T):
                x = seq[:, :n]
                keep(pick(net(torch.cat([x, x]) if sampling.guided else x, cond_idx)[:, -1], u[:, n], sampling), n)
        finally:
            net.train(was_training)
        return seq
    if start == T:
        return seq
    net = decoder.prepare(cond_idx.shape[0], n_cls + T - 1)
    positions = torch.arange(n_cls + T, device=device)
    with decoder.context():
        x = seq[:, :start]
        logits = net(torch.cat([x, x]) if sampling.guided else x, cond_idx, input_pos=positions[: n_cls + start],
                     kv_len=decoder.kv_len(n_cls + start - 1))
        keep(pick(logits[:, -1], u[:, start], sampling), start)
        for n in range(start + 1, T):
            p = n_cls + n - 1  # the position of token n-1, which predicts token n
            keep(decoder.step(net, seq[:, n - 1 : n], positions[p : p + 1], u[:, n], decoder.kv_len(p), sampling), n)
    return seq
