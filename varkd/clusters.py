"""A compressed visual token space: the codebook grouped into k equal-size clusters of interchangeable codes.

VQ codes that decode to similar patches are interchangeable for the image, yet a token-level divergence
penalises every disagreement between them. Distilling the cluster marginals P(k) = sum_{v in C_k} p(v) instead
removes disagreement inside a cluster (and can only lower a KL: data-processing inequality). Two sources of clusters
(MethodConfig.cluster_source, docs/distillation.md section 6):

- codebook: IAR's balanced k-means (Hu et al., CVPR 2025) on the l2-normalised code vectors, which are what
  LlamaGen's decoder looks up: codes that look alike.
- teacher: balanced k-means of a spectral embedding of the codes' co-occurrence in the teacher's predictions,
  C = sum_j p_j p_j^T over the positions j of training sequences: codes the teacher spreads its mass over at the same
  positions, i.e. treats as interchangeable. These can differ from codes that look alike (GSD and DCPE report that
  embedding distance is a poor guide), and they are the ambiguity a student cannot resolve either. That the paper's
  "compressed visual token space" may be built this way is an assumption of this project, not the paper's text.
"""
from __future__ import annotations

import numpy as np
import torch

from varkd.codes import CodeSet
from varkd.io import load_npy
from varkd.models.gpt import GPT


def balanced_kmeans(x: np.ndarray, k: int, iters: int = 100, seed: int = 0) -> np.ndarray:
    """Assign the rows of x [n, d] to k clusters of exactly n / k rows each -> int64 [n].

    IAR's greedy capacity-constrained step: points in order of the distance to their nearest centre each take
    the nearest centre that still has room; centres are the members' means; stop when the assignment is stable.
    Centres start from k-means++ seeding (each next centre drawn with probability ~ squared distance).
    """
    n = len(x)
    if k <= 0 or n % k:
        raise ValueError(f"{k} clusters cannot split {n} codes into equal sizes")
    size = n // k
    rng = np.random.default_rng(seed)
    centres = [x[rng.integers(n)]]
    for _ in range(1, k):
        d2 = ((x[:, None, :] - np.stack(centres)[None]) ** 2).sum(-1).min(1)
        centres.append(x[rng.choice(n, p=d2 / d2.sum())])
    centres = np.stack(centres)
    assign = np.full(n, -1)
    for _ in range(iters):
        dist = ((x[:, None, :] - centres[None, :, :]) ** 2).sum(-1)  # [n, k]
        room = np.full(k, size)
        new = np.empty(n, dtype=np.int64)
        for i in np.argsort(dist.min(1), kind="stable"):
            for c in np.argsort(dist[i], kind="stable"):
                if room[c]:
                    new[i], room[c] = c, room[c] - 1
                    break
        if np.array_equal(new, assign):
            break
        assign = new
        centres = np.stack([x[assign == c].mean(0) for c in range(k)])
    return assign


def cluster_logits(logits: torch.Tensor, order: torch.Tensor, num_clusters: int) -> torch.Tensor:
    """Per-cluster logsumexp of logits [..., V] -> [..., k]; its softmax is the cluster marginal P(k).

    order: the V codes sorted by cluster (argsort of the assignment), so cluster c is the c-th block of V / k.
    Exact logsumexp per block, so gradients stay finite even for clusters of negligible mass.
    """
    grouped = logits.index_select(-1, order).unflatten(-1, (num_clusters, -1))
    return grouped.logsumexp(-1)


def load_clusters(path: str, vocab_size: int, num_clusters: int) -> torch.Tensor:
    """The cluster assignment file -> the codes in cluster order, checked against the vocabulary and k."""
    assign = load_npy(path, "cluster assignment (its cluster_codebook rule makes it)")
    if assign.shape != (vocab_size,):
        raise ValueError(f"cluster assignment {path} covers {assign.shape} codes, the model's vocab_size={vocab_size}")
    sizes = np.bincount(assign)
    if len(sizes) != num_clusters:
        raise ValueError(f"cluster assignment {path} has {len(sizes)} clusters, the method asks for {num_clusters}")
    if len(set(sizes.tolist())) != 1:
        raise ValueError(f"cluster assignment {path} has clusters of unequal sizes {sorted(set(sizes.tolist()))}")
    return torch.from_numpy(np.argsort(assign, kind="stable"))


@torch.no_grad()
def teacher_cooccurrence(teacher: GPT, codes: CodeSet, num_sequences: int, device: torch.device,
                         batch_size: int = 64) -> torch.Tensor:
    """C = sum_j p_j p_j^T, float64 [V, V], over every position j of the first num_sequences sequences (view 0, each
    under its class label); p_j is the teacher's teacher-forced fp32 prediction, as varkd.distill.teacher_logits(...,
    precision="fp32") gives it (a forward of its own here: varkd.distill imports this module).

    Summed a batch at a time as P^T P: memory is one batch of probabilities [B * T, V] and C, never [N, T, V].
    """
    vocab = teacher.config.vocab_size
    cooc = torch.zeros(vocab, vocab, dtype=torch.float64, device=device)
    n = min(num_sequences, codes.N)
    for i in range(0, n, batch_size):
        rows = np.arange(i, min(i + batch_size, n))
        x, y = codes.batch(rows).to(device), codes.labels[rows].to(device)
        p = teacher(x[:, :-1], y).double().softmax(-1).flatten(0, 1)
        cooc += p.T @ p
    return cooc


def spectral_clusters(cooc: torch.Tensor, k: int, seed: int = 0) -> np.ndarray:
    """Balanced k-means of the codes' spectral embedding under a co-occurrence matrix [V, V] -> int64 [V].

    Similarity S_uv = C_uv / sqrt(C_uu C_vv) (a cosine: how alike two codes' mass profiles over positions are, not
    how often each is predicted). Each code is embedded by its row of the top-k eigenvectors of S, l2-normalised (Ng,
    Jordan & Weiss, NIPS 2001): k groups of codes the teacher mixes among make S nearly block-diagonal with k
    blocks, whose indicator vectors these eigenvectors span, so each group collapses to one point. More eigenvectors
    than clusters would add directions of the near-null space, noise that spreads the groups apart.
    """
    scale = cooc.diagonal().sqrt()
    scale[scale == 0] = 1  # a code never predicted co-occurs with nothing: its row of S stays zero
    _, vectors = torch.linalg.eigh(cooc / scale[:, None] / scale[None, :])  # eigenvalues ascending
    embedding = vectors[:, -k:].cpu().numpy()
    embedding /= np.maximum(np.linalg.norm(embedding, axis=1, keepdims=True), 1e-12)
    return balanced_kmeans(embedding, k, seed=seed)
