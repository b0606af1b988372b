"""The compressed token space: balanced k-means of the codebook or of the teacher's co-occurrence, and divergences
over cluster marginals."""
import numpy as np
import pytest
import torch

from varkd.checkpoints import save_model
from varkd.clusters import balanced_kmeans, cluster_logits, load_clusters, spectral_clusters, teacher_cooccurrence
from varkd.codes import load_code_set, save_code_set
from varkd.config import ClusterJob, TermConfig
from varkd.distill import teacher_logits, term_loss
from varkd.losses import divergence, forward_kl
from varkd.models.gpt import GPT, GPTConfig
from varkd.models.vq import VQModel
from varkd.steps.clusters import cluster_codebook
from varkd.study import Study
from tests.helpers import TINY, tiny_config


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


def random_teacher(path, **overrides) -> GPT:
    """A tiny GPT saved at path; output.weight re-initialised (LlamaGen zero-inits it: uniform predictions)."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(**{**TINY, **overrides}))
    torch.nn.init.normal_(model.output.weight, std=1.0)
    save_model(path, model, model.config)
    return model.eval()


def tiny_codes(folder, n=10, vocab=16):
    """A code set of n sequences in two views (only view 0 is read), labels over TINY's 3 classes."""
    rng = np.random.default_rng(1)
    save_code_set(folder, rng.integers(0, vocab, (n, 2, 16)), rng.integers(0, 3, n), vocab_size=vocab)
    return load_code_set(folder)


def test_cooccurrence_is_the_sum_of_outer_products_of_the_teacher_predictions(tmp_path):
    teacher, codes = random_teacher(tmp_path / "teacher.pt"), tiny_codes(tmp_path / "codes")
    cooc = teacher_cooccurrence(teacher, codes, num_sequences=7, device=torch.device("cpu"), batch_size=3)
    brute = np.zeros((16, 16))
    for i in range(7):  # the first 7 sequences, view 0, each under its own label, one position at a time
        x, y = codes.batch(np.array([i])), codes.labels[i : i + 1]
        p = teacher_logits(teacher, x, y, precision="fp32")[0].double().softmax(-1).numpy()
        for j in range(16):
            for u in range(16):
                for v in range(16):
                    brute[u, v] += p[j, u] * p[j, v]
    assert cooc.dtype == torch.float64
    np.testing.assert_allclose(cooc.numpy(), brute, rtol=1e-12)


def test_codes_the_teacher_always_mixes_form_the_clusters():
    rng = np.random.default_rng(0)
    groups = rng.permutation(np.repeat(np.arange(6), 8))  # 48 codes in 6 planted groups, scattered over the ids
    probs = np.zeros((500, 48))
    for row, g in zip(probs, rng.integers(0, 6, 500)):  # each position spreads its mass over one group only
        row[groups == g] = rng.dirichlet(np.ones(8))
    probs = torch.from_numpy(probs)
    assign = spectral_clusters(probs.T @ probs, 6, seed=2)
    assert np.bincount(assign).tolist() == [8] * 6
    assert len(set(zip(assign.tolist(), groups.tolist()))) == 6  # the planted groups, up to their names


def test_teacher_cluster_job_writes_a_valid_assignment(tmp_path):
    random_teacher(tmp_path / "teacher.pt")
    tiny_codes(tmp_path / "codes")
    job = ClusterJob(teacher=str(tmp_path / "teacher.pt"), codes_train=str(tmp_path / "codes"), num_clusters=4,
                     num_sequences=6, out=str(tmp_path / "k4.npy"))
    cluster_codebook(job)
    assert sorted(load_clusters(job.out, 16, 4).tolist()) == list(range(16))
    random_teacher(tmp_path / "small.pt", vocab_size=8)
    with pytest.raises(ValueError, match=r"code set .*codes: codes span .*, teacher .*small.pt has vocab_size=8"):
        cluster_codebook(ClusterJob(teacher=str(tmp_path / "small.pt"), codes_train=job.codes_train,
                                    num_clusters=4, out=str(tmp_path / "bad.npy")))
    assert not (tmp_path / "bad.npy").exists()


def test_study_places_teacher_clusters_beside_the_teacher(study_dict, presets):
    (presets / "methods" / "varkd_teacher_clusters.yaml").write_text("base: varkd\nset: {cluster_source: teacher}\n")
    study = Study.load({**study_dict, "ablations": ["varkd", "varkd_teacher_clusters"], "sweeps": []})
    for backbone in ("tiny", "tiny_shallow"):  # tiny_shallow borrows tiny's teacher, and so its clusters
        run = study.jobs[f"results/embedded/{backbone}/varkd_teacher_clusters/seed0/config.yaml"]
        assert run.clusters == "results/embedded/tiny/teacher/clusters/k16.npy"
        assert study.jobs[f"results/embedded/{backbone}/varkd/seed0/config.yaml"].clusters == \
            "results/embedded/data/clusters/k16.npy"
    job = study.jobs["results/embedded/tiny/teacher/clusters/k16.yaml"]
    assert (job.teacher, job.codes_train, job.tokenizer, job.num_clusters, job.out) == (
        "results/embedded/tiny/teacher/teacher.pt", "results/embedded/data/codes/train", None, 16,
        "results/embedded/tiny/teacher/clusters/k16.npy")
    assert job.inputs()[:2] == [job.teacher, "results/embedded/data/codes/train/codes.npy"]
    codebook = study.jobs["results/embedded/data/clusters/k16.yaml"]
    assert codebook.tokenizer == "results/embedded/data/tokenizer/tokenizer.pt" and codebook.teacher is None
