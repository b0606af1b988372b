"""The compressed token space: balanced k-means of the codebook and divergences over cluster marginals."""
import numpy as np
import pytest
import torch

from varkd.checkpoints import save_model
from varkd.clusters import balanced_kmeans, cluster_codebook, cluster_logits, load_clusters
from varkd.config import ClusterJob, TermConfig
from varkd.distill import term_loss
from varkd.losses import divergence, forward_kl
from varkd.models.vq import VQModel
from tests.test_vq import tiny_config


def test_balanced_kmeans_gives_equal_sizes_and_finds_separated_groups():
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(4, 8)) * 10
    truth = np.repeat(np.arange(4), 16)
    x = centres[truth] + rng.normal(size=(64, 8)) * 0.1
    assign = balanced_kmeans(x, 4, seed=1)
    assert np.bincount(assign).tolist() == [16] * 4
    # the same partition as the truth, up to the cluster names
    assert len({(a, t) for a, t in zip(assign, truth)}) == 4
    # equal sizes hold even when the natural groups are unequal
    uneven = np.concatenate([rng.normal(size=(40, 2)), rng.normal(size=(24, 2)) + 20])
    assert np.bincount(balanced_kmeans(uneven, 8)).tolist() == [8] * 8
    with pytest.raises(ValueError, match="equal sizes"):
        balanced_kmeans(uneven, 5)


def test_cluster_marginals_are_sums_of_member_probabilities():
    logits = torch.randn(2, 3, 12, dtype=torch.float64)
    assign = np.array([2, 0, 1, 2, 0, 1, 1, 2, 0, 0, 1, 2])
    order = torch.from_numpy(np.argsort(assign, kind="stable"))
    marginals = cluster_logits(logits, order, 3).softmax(-1)
    p = logits.softmax(-1)
    brute = torch.stack([p[..., torch.from_numpy(assign == c)].sum(-1) for c in range(3)], -1)
    torch.testing.assert_close(marginals, brute)
    torch.testing.assert_close(marginals.sum(-1), torch.ones(2, 3, dtype=torch.float64))


def test_cluster_kl_is_below_token_kl_and_mixes_linearly():
    torch.manual_seed(0)
    student, teacher = torch.randn(4, 5, 16), torch.randn(4, 5, 16) * 2
    order, k = torch.randperm(16), 4
    cluster_kl = forward_kl(cluster_logits(student, order, k), cluster_logits(teacher, order, k))
    assert (cluster_kl <= forward_kl(student, teacher) + 1e-6).all()  # data-processing inequality
    codes = torch.randint(0, 16, (4, 5))
    for w in (0.0, 0.3, 1.0):
        term = TermConfig(divergence="jsd", beta=0.3, cluster_weight=w)
        tau = 2.0
        tokens = divergence("jsd", student, teacher, temperature=tau, beta=0.3)
        clusters = tau**2 * divergence("jsd", cluster_logits(student / tau, order, k),
                                       cluster_logits(teacher / tau, order, k), beta=0.3)
        expected = ((1 - w) * tokens + w * clusters).mean()
        torch.testing.assert_close(term_loss(term, student, codes, teacher, tau, (order, k)), expected)


def test_cluster_file_is_checked(tmp_path):
    np.save(tmp_path / "ok.npy", np.repeat(np.arange(4), 4))
    assert sorted(load_clusters(str(tmp_path / "ok.npy"), 16, 4).tolist()) == list(range(16))
    with pytest.raises(ValueError, match="vocab_size=32"):
        load_clusters(str(tmp_path / "ok.npy"), 32, 4)
    with pytest.raises(ValueError, match="asks for 8"):
        load_clusters(str(tmp_path / "ok.npy"), 16, 8)
    np.save(tmp_path / "uneven.npy", np.array([0] * 10 + [1] * 6))
    with pytest.raises(ValueError, match="unequal sizes"):
        load_clusters(str(tmp_path / "uneven.npy"), 16, 2)
    (tmp_path / "corrupt.npy").write_bytes(b"not numpy")
    with pytest.raises(ValueError, match="corrupt.npy is corrupt"):
        load_clusters(str(tmp_path / "corrupt.npy"), 16, 2)


def test_cluster_codebook_job_clusters_the_normalised_codes(tmp_path):
    cfg = tiny_config()
    vq = VQModel(cfg)
    save_model(tmp_path / "tokenizer.pt", vq, cfg)
    cluster_codebook(ClusterJob(tokenizer=str(tmp_path / "tokenizer.pt"), num_clusters=8,
                                out=str(tmp_path / "k8.npy")))
    assign = np.load(tmp_path / "k8.npy")
    assert assign.shape == (cfg.codebook_size,) and np.bincount(assign).tolist() == [8] * 8
    vectors = vq.codebook_vectors().double().numpy()
    assert np.array_equal(assign, balanced_kmeans(vectors, 8))
