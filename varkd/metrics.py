"""FID / IS / precision / recall (and optionally KID) through torch-fidelity 0.4.0.

Every metric comes from one named feature extractor: `"varkd-classifier"` (the embedded study's small classifier,
registered here) or a built-in such as `"inception-v3-compat"` with a local `weights_path` at paper scale. Naming the
extractor matters: without it torch-fidelity would compute precision / recall on VGG16, a second network. Weights
are never downloaded: a missing file is an error that says where to get it.

Two real sides: images (`compute_metrics`, one `calculate_metrics` call), or ADM's reference batch
(`reference_batch_metrics`: its stored FID statistics and its images, scored the way ADM's evaluator does).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch_fidelity
from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3
from torch_fidelity.helpers import vassert
from torch_fidelity.metric_fid import fid_features_to_statistics, fid_statistics_to_metric
from torch_fidelity.metric_isc import isc_featuresdict_to_metric
from torch_fidelity.metric_prc import prc_features_to_metric
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY
from torch_fidelity.utils import create_feature_extractor, extract_featuresdict_from_input_id

from varkd.checkpoints import load_classifier
from varkd.config import CLASSIFIER_EXTRACTOR as EXTRACTOR_NAME
from varkd.images import to_model_input
from varkd.io import load_checkpoint, load_npz
from varkd.npz import npz_headers


class ClassifierFeatureExtractor(torch_fidelity.FeatureExtractorBase):
    """torch-fidelity view of a `varkd.classifier.Classifier` checkpoint.

    Follows the built-ins' contract (uint8 Bx3xHxW in, float32 [N, D] out) so datasets and extractors swap freely.
    Features: `"features"` (penultimate, for fid / kid / prc) and `"logits_unbiased"` (for isc; the head is bias-free).
    """

    def __init__(self, name, features_list, feature_extractor_weights_path=None, **kwargs):
        # torch-fidelity passes every calculate_metrics kwarg (input1, input2, ...), hence **kwargs.
        super().__init__(name, features_list)
        if feature_extractor_weights_path is None:
            raise ValueError(
                f'feature extractor "{name}" needs feature_extractor_weights_path (a varkd classifier checkpoint); '
                "it has no downloadable default"
            )
        self.classifier = load_classifier(feature_extractor_weights_path)
        config = self.classifier.config
        if config.in_channels != 3:
            raise ValueError(
                f"classifier {feature_extractor_weights_path} takes {config.in_channels} channels; "
                "torch-fidelity feeds RGB (3)"
            )
        self.image_size = config.image_size

    @staticmethod
    def get_provided_features_list():
        return "features", "logits_unbiased"

    @staticmethod
    def get_default_feature_layer_for_metric(metric):
        return "logits_unbiased" if metric == "isc" else "features"

    @staticmethod
    def can_be_compiled():
        return False  # nothing to gain on a network this small

    @staticmethod
    def get_dummy_input_for_compile():
        return (torch.rand([1, 3, 32, 32]) * 255).to(torch.uint8)

    def forward(self, x):
        vassert(torch.is_tensor(x) and x.dtype == torch.uint8, "Expecting image as torch.Tensor with dtype=torch.uint8")
        vassert(x.dim() == 4 and x.shape[1] == 3, f"Input is not Bx3xHxW: {tuple(x.shape)}")
        vassert(
            x.shape[2] == x.shape[3] == self.image_size,
            f"classifier was trained on {self.image_size}x{self.image_size} images, got {x.shape[2]}x{x.shape[3]}",
        )
        features = self.classifier.features(to_model_input(x.permute(0, 2, 3, 1)))
        out = {"features": features, "logits_unbiased": self.classifier.head(features)}
        # float32 on both inputs: FID asserts that the two sides' statistics have the same dtype.
        return tuple(out[name].float() for name in self.features_list)


def register_feature_extractor(name: str = EXTRACTOR_NAME, cls=ClassifierFeatureExtractor) -> None:
    """Registers the classifier extractor; idempotent, since torch-fidelity 0.4.0 raises on a second registration."""
    existing = FEATURE_EXTRACTORS_REGISTRY.get(name)
    if existing is cls:
        return
    if existing is None:
        torch_fidelity.register_feature_extractor(name, cls)
    elif (existing.__module__, existing.__qualname__) == (cls.__module__, cls.__qualname__):
        FEATURE_EXTRACTORS_REGISTRY[name] = cls  # the same class from a reloaded module (notebook autoreload)
    else:
        raise ValueError(f'feature extractor name "{name}" is already taken by {existing.__module__}.{existing.__qualname__}')


register_feature_extractor()


class UInt8Images(torch.utils.data.Dataset):
    """uint8 NHWC array -> uint8 CHW tensors, the input torch-fidelity's extractors expect."""

    def __init__(self, images):
        self.images = images.cpu().numpy() if torch.is_tensor(images) else np.asarray(images)

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        # A copy: arrays loaded from .npz are read-only, which torch.from_numpy warns about.
        return torch.from_numpy(np.ascontiguousarray(self.images[i].transpose(2, 0, 1)))


def _check_images(name, images):
    images = images.cpu().numpy() if torch.is_tensor(images) else images
    if not isinstance(images, np.ndarray):
        raise TypeError(f"{name} must be a numpy array or torch tensor, got {type(images).__name__}")
    if images.dtype != np.uint8:
        raise TypeError(f"{name} must be uint8 NHWC in 0..255, got dtype {images.dtype}")
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"{name} must be uint8 NHWC with 3 channels, got shape {images.shape}")
    return images


def compute_metrics(
    generated_uint8_NHWC,
    real_uint8_NHWC,
    *,
    feature_extractor: str = EXTRACTOR_NAME,
    weights_path=None,
    device: str = "cpu",
    kid: bool = False,
    prc_neighborhood: int = 3,
    isc_splits: int = 10,
    seed: int = 0,
    batch_size: int = 64,
) -> dict:
    """FID, IS, precision, recall (+ KID) of generated vs real images, all in one extractor's feature space.

    Precision is the fraction of generated samples inside the real manifold, recall the reverse (torch-fidelity's
    input1 = generated, input2 = real). Nothing is cached: a cache keyed by name would return stale numbers for
    regenerated samples.
    """
    generated = _check_images("generated images", generated_uint8_NHWC)
    real = _check_images("real images", real_uint8_NHWC)
    if generated.shape[1:3] != real.shape[1:3]:
        raise ValueError(f"generated images are {generated.shape[1:3]} but real images are {real.shape[1:3]} (H, W)")
    n_gen, n_real = len(generated), len(real)
    if prc_neighborhood < 1 or isc_splits < 1:
        raise ValueError(f"prc_neighborhood and isc_splits must be >= 1, got {prc_neighborhood} and {isc_splits}")
    if min(n_gen, n_real) <= max(prc_neighborhood, 1):
        raise ValueError(
            f"precision/recall with prc_neighborhood={prc_neighborhood} (and FID) need more than "
            f"{max(prc_neighborhood, 1)} images per side, got {n_gen} generated and {n_real} real"
        )
    if n_gen < isc_splits:
        raise ValueError(f"isc_splits={isc_splits} needs at least that many generated images, got {n_gen}")
    weights_path = local_weights(feature_extractor, weights_path)

    kwargs = {}
    if kid:
        # torch-fidelity refuses subsets larger than an input; subsets that take all of both inputs are all the same
        # (permutations), so one is enough (100 took ~8 s at 1,000 vs 1,000 here).
        kwargs["kid_subset_size"] = size = min(1000, n_gen, n_real)
        kwargs["kid_subsets"] = 1 if n_gen == n_real == size else 100
    cuda = device != "cpu"
    with _device_scope(device):
        out = torch_fidelity.calculate_metrics(
            input1=UInt8Images(generated),
            input2=UInt8Images(real),
            feature_extractor=feature_extractor,
            feature_extractor_weights_path=str(weights_path),
            isc=True,
            fid=True,
            kid=kid,
            prc=True,
            prc_neighborhood=prc_neighborhood,
            isc_splits=isc_splits,
            batch_size=batch_size,
            rng_seed=seed,
            cuda=cuda,
            save_cpu_ram=True,
            cache=False,
            verbose=False,
            **kwargs,
        )
    return _result(out, n_gen, n_real, feature_extractor)


# metrics.json key -> torch-fidelity's result key (KID only where computed)
METRIC_KEYS = {"fid": torch_fidelity.KEY_METRIC_FID, "isc_mean": torch_fidelity.KEY_METRIC_ISC_MEAN,
               "isc_std": torch_fidelity.KEY_METRIC_ISC_STD, "precision": torch_fidelity.KEY_METRIC_PRECISION,
               "recall": torch_fidelity.KEY_METRIC_RECALL, "kid_mean": torch_fidelity.KEY_METRIC_KID_MEAN,
               "kid_std": torch_fidelity.KEY_METRIC_KID_STD}


def _result(out: dict, n_gen: int, n_real: int, feature_extractor: str) -> dict:
    """torch-fidelity's results under metrics.json's keys, with what they were computed on."""
    metrics = {ours: out[theirs] for ours, theirs in METRIC_KEYS.items() if theirs in out}
    metrics.update(num_samples=n_gen, num_real=n_real, feature_extractor=feature_extractor)
    return {k: float(v) if isinstance(v, (float, np.floating)) else v for k, v in metrics.items()}


def _device_scope(device: str):
    """torch-fidelity moves to the current CUDA device (`.cuda()`): make "cuda:i" current for the call."""
    return torch.cuda.device(device) if device.startswith("cuda") and ":" in device else contextlib.nullcontext()


def local_weights(feature_extractor: str, weights_path) -> Path:
    """The extractor's weights file, which must exist here: given None, torch-fidelity would download them."""
    where = ""
    if feature_extractor == "inception-v3-compat":
        where = f"; get torch-fidelity's release file {URL_INCEPTION_V3.rsplit('/', 1)[1]} from {URL_INCEPTION_V3}"
    if weights_path is None:
        raise FileNotFoundError(f'feature extractor "{feature_extractor}" needs a local weights file '
                                "(evaluate.weights, passed as feature_extractor_weights_path); nothing is "
                                f"downloaded{where}")
    if not Path(weights_path).is_file():
        raise FileNotFoundError(f'weights of feature extractor "{feature_extractor}": {weights_path} does not exist'
                                f"{where}")
    if feature_extractor != EXTRACTOR_NAME:  # read here, weights only, so that a bad file is named before any compute
        load_checkpoint(weights_path, f'weights of feature extractor "{feature_extractor}"')
    return Path(weights_path)


# --- ADM's reference batch ----------------------------------------------------------------------------------------

ADM_ISC_SPLIT = 5000  # ADM's evaluator scores IS on consecutive, unshuffled splits of 5,000 samples


@dataclass
class ReferenceBatch:
    """A validated ADM reference batch (e.g. VIRTUAL_imagenet256_labeled.npz): the FID statistics of the real set
    (float64; published numbers use these, not statistics recomputed from arr_0) and its images for precision /
    recall, read only when scored."""

    path: Path
    mu: np.ndarray  # float64 [D]
    sigma: np.ndarray  # float64 [D, D]
    image_shape: tuple[int, ...]  # arr_0: uint8 [N, H, W, 3]

    def images(self) -> np.ndarray:
        return load_npz(self.path, ["arr_0"])["arr_0"]


def read_reference_batch(path) -> ReferenceBatch:
    """Checks keys, shapes and dtypes (arr_0 from its header alone) so a bad file fails before any compute."""
    path = Path(path)
    headers = npz_headers(path, ["mu", "sigma", "arr_0"])
    (mu_shape, mu_dtype), (sigma_shape, sigma_dtype), (shape, dtype) = (headers[k] for k in ("mu", "sigma", "arr_0"))
    if len(mu_shape) != 1 or mu_shape[0] < 1 or mu_dtype.kind != "f":
        raise ValueError(f"{path}[mu] must be a float vector [D], got {mu_dtype} {mu_shape}")
    D = mu_shape[0]
    if sigma_shape != (D, D) or sigma_dtype.kind != "f":
        raise ValueError(f"{path}[sigma] must be a float matrix [D, D] = [{D}, {D}] (D from mu), "
                         f"got {sigma_dtype} {sigma_shape}")
    if dtype != np.uint8 or len(shape) != 4 or shape[-1] != 3 or shape[0] < 1:
        raise ValueError(f"{path}[arr_0] must be uint8 NHWC images with 3 channels, got {dtype} {shape}")
    stats = load_npz(path, ["mu", "sigma"])
    for key, value in stats.items():
        if not np.isfinite(value).all():
            raise ValueError(f"{path}[{key}] holds non-finite values")
    return ReferenceBatch(path, stats["mu"].astype(np.float64), stats["sigma"].astype(np.float64), shape)


def reference_batch_metrics(
    generated_uint8_NHWC,
    reference: ReferenceBatch,
    *,
    feature_extractor: str = "inception-v3-compat",
    weights_path=None,
    device: str = "cpu",
    prc_neighborhood: int = 3,
    batch_size: int = 64,
) -> dict:
    """FID / IS / precision / recall against ADM's reference batch, as ADM's evaluator computes them.

    One pass of the generated images through the extractor gives its FID/PRC and IS layers together. FID: against
    the batch's stored mu / sigma (both sides float64: torch-fidelity's own statistics are float32 / float64 and
    it asserts equal dtypes). IS: consecutive unshuffled splits of 5,000 (at least one). Precision / recall
    (k = prc_neighborhood): against the features of the batch's arr_0 images. Same keys as compute_metrics.
    """
    generated = _check_images("generated images", generated_uint8_NHWC)
    n_gen, n_real = len(generated), reference.image_shape[0]
    if generated.shape[1:3] != reference.image_shape[1:3]:
        raise ValueError(f"generated images are {generated.shape[1:3]} but {reference.path}[arr_0] images are "
                         f"{reference.image_shape[1:3]} (H, W); sample.resize_to resizes samples")
    if prc_neighborhood < 1 or min(n_gen, n_real) <= prc_neighborhood:
        raise ValueError(f"precision/recall with prc_neighborhood={prc_neighborhood} (>= 1) need more than that "
                         f"many images per side, got {n_gen} generated and {n_real} in {reference.path}[arr_0]")
    weights_path = local_weights(feature_extractor, weights_path)
    if feature_extractor not in FEATURE_EXTRACTORS_REGISTRY:
        raise ValueError(f'feature extractor "{feature_extractor}" is not registered '
                         f"(registered: {sorted(FEATURE_EXTRACTORS_REGISTRY)})")
    extractor = FEATURE_EXTRACTORS_REGISTRY[feature_extractor]
    layer = {m: extractor.get_default_feature_layer_for_metric(m) for m in ("fid", "isc", "prc")}
    cuda = device != "cpu"
    options = dict(cuda=cuda, batch_size=batch_size, save_cpu_ram=True, verbose=False)
    with _device_scope(device):
        fe = create_feature_extractor(feature_extractor, list(dict.fromkeys(layer.values())),
                                      feature_extractor_weights_path=str(weights_path), **options)
        _check_feature_size(fe, generated, layer["fid"], reference, cuda)
        features = extract_featuresdict_from_input_id(1, fe, input1=UInt8Images(generated), **options)
        real = extract_featuresdict_from_input_id(2, fe, input2=UInt8Images(reference.images()), **options)
        stats = {k: v.astype(np.float64) for k, v in fid_features_to_statistics(features[layer["fid"]]).items()}
        fid = fid_statistics_to_metric(stats, {"mu": reference.mu, "sigma": reference.sigma}, verbose=False)
        isc = isc_featuresdict_to_metric(features, layer["isc"], isc_splits=max(1, n_gen // ADM_ISC_SPLIT),
                                         samples_shuffle=False, verbose=False)
        move = (lambda t: t.cuda()) if cuda else (lambda t: t)  # the k-NN distances are the costly part
        prc = prc_features_to_metric(move(features[layer["prc"]]), move(real[layer["prc"]]),
                                     prc_neighborhood=prc_neighborhood, save_cpu_ram=True, verbose=False)
    return _result({**fid, **isc, **prc}, n_gen, n_real, feature_extractor)


def _check_feature_size(fe, generated: np.ndarray, layer: str, reference: ReferenceBatch, cuda: bool) -> None:
    """One image through the extractor: the reference statistics must have its FID layer's width."""
    x = UInt8Images(generated[:1])[0][None]
    with torch.no_grad():
        width = fe.convert_features_tuple_to_dict(fe(x.cuda() if cuda else x))[layer].shape[1]
    if width != len(reference.mu):
        raise ValueError(f"{reference.path}[mu] has {len(reference.mu)} features but feature extractor "
                         f'"{fe.get_name()}" layer "{layer}" gives {width}')
