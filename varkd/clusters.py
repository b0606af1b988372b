"""A compressed visual token space: the codebook grouped into k equal-size clusters of nearby codes.

VQ codes that decode to similar patches are interchangeable for the image, yet a token-level divergence
penalises every disagreement between them. Distilling the cluster marginals P(k) = sum_{v in C_k} p(v) instead
removes disagreement inside a cluster (and can only lower a KL: data-processing inequality). The clustering
follows IAR's balanced k-means (Hu et al., CVPR 2025; docs/distillation.md section 6) on the l2-normalised code
vectors, which are what LlamaGen's decoder looks up.
"""
from __future__ import annotations

import numpy as np
import torch

from varkd.checkpoints import load_vq
from varkd.config import ClusterJob
from varkd.io import atomic_path, load_npy


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


def cluster_codebook(job: ClusterJob, device: torch.device = torch.device("cpu")) -> None:
    """Cluster the tokenizer's (l2-normalised) code vectors -> int64 assignment [V] in job.out (.npy)."""
    vq = load_vq(job.tokenizer)
    vectors = vq.codebook_vectors().detach().cpu().double().numpy()
    assign = balanced_kmeans(vectors, job.num_clusters, seed=job.seed)
    with atomic_path(job.out, suffix=".npy") as tmp:
        np.save(tmp, assign)
    print(f"{job.out}: {job.num_clusters} clusters of {len(assign) // job.num_clusters} codes")
