"""The cluster-codebook step: the codebook in equal-size clusters (varkd.clusters) of the teacher or the tokenizer."""
from __future__ import annotations

import numpy as np
import torch

from varkd.checkpoints import load_gpt, load_vq
from varkd.clusters import balanced_kmeans, spectral_clusters, teacher_cooccurrence
from varkd.codes import load_code_set
from varkd.config import ClusterJob
from varkd.io import atomic_path


def cluster_codebook(job: ClusterJob, device: torch.device = torch.device("cpu")) -> None:
    """The codes in job.num_clusters equal-size clusters -> int64 assignment [V] in job.out (.npy): of the teacher's
    co-occurrence (job.teacher) or of the tokenizer's l2-normalised code vectors (job.tokenizer)."""
    if job.teacher:
        codes = load_code_set(job.codes_train)
        teacher = load_gpt(job.teacher, "teacher checkpoint").to(device)
        cfg, used = teacher.config, np.asarray(codes.codes[: job.num_sequences, 0])
        if used.min() < 0 or used.max() >= cfg.vocab_size:
            raise ValueError(f"{codes.source}: codes span [{used.min()}, {used.max()}], teacher {job.teacher} has "
                             f"vocab_size={cfg.vocab_size} (tokenizer codebook and backbone vocabulary differ)")
        if codes.T != cfg.block_size:
            raise ValueError(f"{codes.source}: sequences of {codes.T} tokens, teacher {job.teacher} has "
                             f"block_size={cfg.block_size}")
        cooc = teacher_cooccurrence(teacher, codes, job.num_sequences, device)
        assign = spectral_clusters(cooc, job.num_clusters, seed=job.seed)
    else:
        vectors = load_vq(job.tokenizer).codebook_vectors().detach().cpu().double().numpy()
        assign = balanced_kmeans(vectors, job.num_clusters, seed=job.seed)
    with atomic_path(job.out, suffix=".npy") as tmp:
        np.save(tmp, assign)
    print(f"{job.out}: {job.num_clusters} clusters of {len(assign) // job.num_clusters} codes")
