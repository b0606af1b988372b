"""The evaluate and noise-floor jobs: reported metrics on the test split, val_* metrics on the val split, the spread
of a metric over sampling seeds; each equals the metric computed directly."""
import json

import numpy as np
import pytest
import torch

from varkd.checkpoints import load_gpt, load_vq, save_model
from varkd.classifier import Classifier, ClassifierConfig
from varkd.codes import load_code_set, save_code_set
from varkd.config import EvaluateConfig, EvaluateJob, NoiseFloorJob, RealFeaturesJob, SampleConfig
from varkd.data import Split, save_splits
from varkd.decode import Decoder, generate
from varkd.distill import heldout_nll
from varkd.features import load_features
from varkd.steps.evaluate import evaluate, noise_floor, real_features
from varkd.steps.sample import NOISE_STREAM, draw_images, sample_seed
from varkd.metrics import compute_metrics
from varkd.models.vq import VQModel

from tests.helpers import tiny_config, tiny_model

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """A tiny GPT over 8x8 codes (2 classes), its tokenizer, a (random) metric classifier, images.npz with three
    splits of random images, and val / test code sets."""
    root = tmp_path_factory.mktemp("study")
    gpt = tiny_model(vocab_size=64, block_size=64, num_classes=2)
    save_model(root / "gpt.pt", gpt, gpt.config)
    torch.manual_seed(1)
    vq = VQModel(tiny_config())
    save_model(root / "vq.pt", vq, vq.config)
    classifier = Classifier(ClassifierConfig(channels=4, feature_dim=16, num_classes=2))
    save_model(root / "classifier.pt", classifier, classifier.config)
    rng = np.random.default_rng(0)
    splits = {name: Split(rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8), np.arange(n) % 2)
              for name, n in (("train", 40), ("val", 24), ("test", 30))}
    save_splits(root / "images.npz", splits)
    for name in ("val", "test"):
        save_code_set(root / "codes" / name, rng.integers(0, 64, (12, 1, 64)), np.arange(12) % 2, vocab_size=64)
        real_features(RealFeaturesJob(images=str(root / "images.npz"), split=name,
                                      classifier=str(root / "classifier.pt"), out=str(root / f"real_{name}.npz")), CPU)
    return root, splits


def real_sides(root) -> dict[str, str]:
    return {name: str(root / f"real_{name}.npz") for name in ("test", "val")}


def metrics_of(generated, real, classifier, seed=0):
    return compute_metrics(generated, real, weights_path=classifier, isc_splits=2, seed=seed)


def test_evaluate_reports_test_metrics_and_validation_metrics(study, tmp_path):
    root, splits = study
    rng = np.random.default_rng(1)
    samples = rng.integers(0, 256, (20, 32, 32, 3), dtype=np.uint8)
    val_samples = rng.integers(0, 256, (16, 32, 32, 3), dtype=np.uint8)
    np.savez(tmp_path / "samples.npz", arr_0=samples, labels=np.arange(20) % 2)
    np.savez(tmp_path / "samples_val.npz", arr_0=val_samples, labels=np.arange(16) % 2)
    (tmp_path / "train_log.csv").write_text("step,loss,elapsed_s\n5,2.0,1.5\n10,1.0,3.25\n")
    save_model(tmp_path / "student.pt", load_gpt(root / "gpt.pt"), load_gpt(root / "gpt.pt").config,
               train={"steps": 10, "rollouts": 4})
    job = EvaluateJob(evaluate=EvaluateConfig(isc_splits=2), samples=str(tmp_path / "samples.npz"),
                      val_samples=str(tmp_path / "samples_val.npz"), real_features=real_sides(root),
                      classifier=str(root / "classifier.pt"), checkpoint=str(tmp_path / "student.pt"),
                      codes_val=str(root / "codes" / "val"), codes_test=str(root / "codes" / "test"),
                      identity={"backbone": "b", "method": "m", "seed": 0}, out=str(tmp_path / "metrics.json"))
    evaluate(job, CPU)
    result = json.loads((tmp_path / "metrics.json").read_text())
    test = metrics_of(samples, splits["test"].images, root / "classifier.pt")
    val = metrics_of(val_samples, splits["val"].images, root / "classifier.pt")
    assert {k: result[k] for k in ("fid", "isc_mean", "precision", "recall")} == {
        k: test[k] for k in ("fid", "isc_mean", "precision", "recall")}
    assert {k: result[f"val_{k}"] for k in ("fid", "isc_mean", "precision", "recall", "num_samples")} == {
        k: val[k] for k in ("fid", "isc_mean", "precision", "recall", "num_samples")}
    assert result["num_real"] == 30 and result["val_num_samples"] == 16
    model = load_gpt(root / "gpt.pt")
    assert result["nll"] == heldout_nll(model, load_code_set(root / "codes" / "test"))
    assert result["val_nll"] == heldout_nll(model, load_code_set(root / "codes" / "val"))
    assert result["train_wall_s"] == 3.25 and result["train_rollouts"] == 4 and result["train_steps"] == 10


def test_real_row_scores_train_images_against_both_splits(study, tmp_path):
    root, splits = study
    job = EvaluateJob(evaluate=EvaluateConfig(isc_splits=2), samples=str(root / "images.npz"),
                      val_samples=str(root / "images.npz"), real_key="train_images", num_samples=20,
                      real_features=real_sides(root), classifier=str(root / "classifier.pt"),
                      identity={"backbone": "-", "method": "real", "seed": 0}, out=str(tmp_path / "real.json"))
    evaluate(job, CPU)
    result = json.loads((tmp_path / "real.json").read_text())
    assert result["num_samples"] == result["val_num_samples"] == 20 and result["num_real"] == 30
    assert "nll" not in result and result["fid"] != result["val_fid"]


def test_noise_floor_is_the_spread_of_independently_sampled_sets(study, tmp_path):
    root, splits = study
    sample = SampleConfig(num_samples=10, batch_size=10, cfg_scale=1.0)
    job = NoiseFloorJob(sample=sample, evaluate=EvaluateConfig(isc_splits=2, noise_seeds=3),
                        checkpoint=str(root / "gpt.pt"), tokenizer=str(root / "vq.pt"),
                        real_features=real_sides(root)["test"], classifier=str(root / "classifier.pt"),
                        identity={"backbone": "b", "method": "student_init", "seed": 0}, seed=4,
                        out=str(tmp_path / "noise.json"))
    noise_floor(job, CPU)
    noise = json.loads((tmp_path / "noise.json").read_text())
    assert noise["noise_seeds"] == 3 and noise["num_samples"] == 10 and noise["method"] == "student_init"
    model, vq = load_gpt(root / "gpt.pt"), load_vq(root / "vq.pt")
    labels = np.array([0] * 5 + [1] * 5)
    expected = [metrics_of(draw_images(model, vq, labels, sample, sample_seed(4, sample, NOISE_STREAM, k), CPU),
                           splits["test"].images, root / "classifier.pt")["fid"] for k in range(3)]
    assert [s["fid"] for s in noise["sets"]] == expected and len(set(expected)) == 3
    assert noise["sd"]["fid"] == pytest.approx(np.std(expected, ddof=1), rel=1e-12)
    assert noise["mean"]["fid"] == pytest.approx(np.mean(expected), rel=1e-12)


def test_bf16_sampling_decodes_with_a_bf16_copy_of_the_model(study):
    """sample.precision=bf16 (paper scale, as LlamaGen samples): the images of the bf16 decoding copy's codes, with
    the sampling stream the fp32 default uses."""
    root, _ = study
    model, vq = load_gpt(root / "gpt.pt"), load_vq(root / "vq.pt")
    labels = np.array([0, 1, 1, 0])
    sample = SampleConfig(num_samples=4, batch_size=4, cfg_scale=1.0, precision="bf16")
    images = draw_images(model, vq, labels, sample, seed=3, device=CPU)
    codes = generate(Decoder(model, torch.bfloat16), torch.from_numpy(labels), generator=torch.Generator().manual_seed(3))
    assert images.dtype == np.uint8 and np.array_equal(images, vq.decode_to_uint8(codes).numpy())
    assert model.tok_embeddings.weight.dtype == torch.float32  # the model itself is not cast


def test_real_features_hold_the_split_and_a_mismatch_names_what_differs(study, tmp_path):
    root, splits = study
    features, info = load_features(root / "real_test.npz")
    assert info["image_shape"] == (30, 32, 32, 3) and info["source"].endswith("images.npz[test_images]")
    assert features["features"].shape == (30, 16) and info["feature_extractor"] == "varkd-classifier"
    np.savez(tmp_path / "small.npz", arr_0=np.zeros((20, 16, 16, 3), np.uint8))
    job = dict(evaluate=EvaluateConfig(isc_splits=2), samples=str(tmp_path / "small.npz"),
               real_features=real_sides(root), out=str(tmp_path / "m.json"))
    with pytest.raises(ValueError, match=r"real images of .*real_test\.npz are \(32, 32\).*resize_to"):
        evaluate(EvaluateJob(classifier=str(root / "classifier.pt"), **job), CPU)
    other = Classifier(ClassifierConfig(channels=4, feature_dim=16, num_classes=2))
    save_model(tmp_path / "other.pt", other, other.config)
    with pytest.raises(ValueError, match=r"real_test\.npz were made with weights .*classifier\.pt but this "
                                         r"evaluation uses .*other\.pt: rerun its real-features job"):
        evaluate(EvaluateJob(classifier=str(tmp_path / "other.pt"), **job), CPU)
    assert not (tmp_path / "m.json").exists()
