"""FID / IS / precision / recall (and optionally KID), through torch-fidelity 0.4.0 or as ADM's evaluator computes them.

Every metric comes from one named feature extractor: `"varkd-classifier"` (the embedded study's small classifier,
registered here) or a built-in such as `"inception-v3-compat"` with a local `weights_path` at paper scale. Naming the
extractor matters: without it torch-fidelity would compute precision / recall on VGG16, a second network. Weights
are never downloaded: a missing file is an error that says where to get it.

Two real sides: images (`compute_metrics`), or ADM's reference batch (`reference_batch_metrics`: its stored
statistics and its images). Two protocols (`evaluate.protocol`): "torch-fidelity" (its arithmetic) and "adm", a port
of OpenAI's ADM evaluator (guided-diffusion evaluations/evaluator.py), whose numbers LlamaGen and VAR report: FID by
scipy's sqrtm, sFID on Inception's spatial features, IS over consecutive chunks of 5,000, precision / recall on its
float16 distances. Published tables are comparable with "adm" numbers only.
"""
from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch_fidelity
from scipy import linalg
from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3, FeatureExtractorInceptionV3
from torch_fidelity.helpers import vassert
from torch_fidelity.metric_fid import fid_statistics_to_metric
from torch_fidelity.metric_isc import isc_featuresdict_to_metric
from torch_fidelity.metric_prc import prc_features_to_metric
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY
from torch_fidelity.utils import extract_featuresdict_from_input_id

from varkd.checkpoints import load_classifier
from varkd.config import CLASSIFIER_EXTRACTOR as EXTRACTOR_NAME
from varkd.config import EvaluateConfig
from varkd.images import to_model_input
from varkd.io import load_checkpoint, load_npz, reading
from varkd.npz import npz_headers

PROTOCOLS = EvaluateConfig.PROTOCOLS


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

SPATIAL_FEATURE = "mixed_6/conv"  # ADM's sFID tensor, named as in the TF graph it comes from
ADM_SPATIAL_CHANNELS = 7


def adm_spatial_features(branch1x1: torch.Tensor) -> torch.Tensor:
    """ADM's sFID features from Mixed_6d.branch1x1's output [N, 192, 17, 17]: channels :7, flattened in TF's NHWC
    order (index (h * 17 + w) * 7 + c), the order of the reference batch's mu_s / sigma_s."""
    return branch1x1[:, :ADM_SPATIAL_CHANNELS].permute(0, 2, 3, 1).reshape(len(branch1x1), -1).float()


class InceptionSpatialFeatureExtractor(torch_fidelity.FeatureExtractorBase):
    """inception-v3-compat (same weights, same outputs) plus ADM's sFID features as `"mixed_6/conv"`.

    ADM reads `mixed_6/conv:0` of the 2015 TF Inception graph and keeps [..., :7] (17 * 17 * 7 = 2023 features). In
    that graph mixed, mixed_1, ... mixed_10 are the blocks torch-fidelity calls Mixed_5b ... Mixed_7c (its converter
    maps mixed_6/conv to Mixed_6d.branch1x1), and `<block>/conv` is the block's 1x1 branch after its ReLU: so the
    tensor is Mixed_6d.branch1x1's output ([N, 192, 17, 17], read by a forward hook), not the pooled 768-wide
    Mixed_6e output that torch-fidelity's "768" feature averages. Deviation from ADM: the network is torch-fidelity's
    PyTorch port of the TF graph, as for FID (equal up to float32 round-off, not bit-exact).
    """

    def __init__(self, name, features_list, **kwargs):
        super().__init__(name, features_list)
        pooled = [f for f in features_list if f != SPATIAL_FEATURE]
        self.inception = FeatureExtractorInceptionV3(name, pooled, **kwargs)

    @staticmethod
    def get_provided_features_list():
        return (*FeatureExtractorInceptionV3.get_provided_features_list(), SPATIAL_FEATURE)

    @staticmethod
    def get_default_feature_layer_for_metric(metric):
        return FeatureExtractorInceptionV3.get_default_feature_layer_for_metric(metric)

    @staticmethod
    def can_be_compiled():
        return False  # the hook would not survive compilation

    def forward(self, x):
        kept = []
        hook = self.inception.Mixed_6d.branch1x1.register_forward_hook(
            lambda module, args, out: kept.append(adm_spatial_features(out)))  # a copy: later layers may reuse it
        try:
            out = self.inception.convert_features_tuple_to_dict(self.inception(x))
        finally:
            hook.remove()
        out[SPATIAL_FEATURE] = kept[0]
        return tuple(out[name] for name in self.features_list)


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


def _check_protocol(protocol: str) -> None:
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol={protocol!r} is not one of {list(PROTOCOLS)}")


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
    protocol: str = "torch-fidelity",
) -> dict:
    """FID, IS, precision, recall (+ KID) of generated vs real images, all in one extractor's feature space.

    Precision is the fraction of generated samples inside the real manifold, recall the reverse (torch-fidelity's
    input1 = generated, input2 = real). Nothing is cached: a cache keyed by name would return stale numbers for
    regenerated samples. protocol="adm": ADM's arithmetic, FID / sFID against the real images' statistics (its
    fallback without stored ones); isc_splits and seed are unused, KID is torch-fidelity's only.
    """
    generated = _check_images("generated images", generated_uint8_NHWC)
    real = _check_images("real images", real_uint8_NHWC)
    if generated.shape[1:3] != real.shape[1:3]:
        raise ValueError(f"generated images are {generated.shape[1:3]} but real images are {real.shape[1:3]} (H, W)")
    n_gen, n_real = len(generated), len(real)
    _check_protocol(protocol)
    if prc_neighborhood < 1 or isc_splits < 1:
        raise ValueError(f"prc_neighborhood and isc_splits must be >= 1, got {prc_neighborhood} and {isc_splits}")
    if min(n_gen, n_real) <= max(prc_neighborhood, 1):
        raise ValueError(
            f"precision/recall with prc_neighborhood={prc_neighborhood} (and FID) need more than "
            f"{max(prc_neighborhood, 1)} images per side, got {n_gen} generated and {n_real} real"
        )
    if protocol == "adm" and kid:
        raise ValueError("ADM's evaluator has no KID: kid=True needs protocol='torch-fidelity'")
    if protocol == "torch-fidelity" and n_gen < isc_splits:
        raise ValueError(f"isc_splits={isc_splits} needs at least that many generated images, got {n_gen}")
    weights_path = local_weights(feature_extractor, weights_path)
    cuda = device != "cpu"
    if protocol == "adm":
        with _device_scope(device):
            layers, features, real_features = _extract(generated, lambda: real, feature_extractor, weights_path,
                                                       protocol, cuda, batch_size)
            scores = _score(features, real_features, {}, layers, protocol, prc_neighborhood, cuda)
        return _result(scores, n_gen, n_real, feature_extractor, protocol)

    kwargs = {}
    if kid:
        # torch-fidelity refuses subsets larger than an input; subsets that take all of both inputs are all the same
        # (permutations), so one is enough (100 took ~8 s at 1,000 vs 1,000 here).
        kwargs["kid_subset_size"] = size = min(1000, n_gen, n_real)
        kwargs["kid_subsets"] = 1 if n_gen == n_real == size else 100
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
    return _result(_our_keys(out), n_gen, n_real, feature_extractor, protocol)


# metrics.json key -> torch-fidelity's result key (KID only where computed)
METRIC_KEYS = {"fid": torch_fidelity.KEY_METRIC_FID, "isc_mean": torch_fidelity.KEY_METRIC_ISC_MEAN,
               "isc_std": torch_fidelity.KEY_METRIC_ISC_STD, "precision": torch_fidelity.KEY_METRIC_PRECISION,
               "recall": torch_fidelity.KEY_METRIC_RECALL, "kid_mean": torch_fidelity.KEY_METRIC_KID_MEAN,
               "kid_std": torch_fidelity.KEY_METRIC_KID_STD}


def _our_keys(out: dict) -> dict:
    return {ours: out[theirs] for ours, theirs in METRIC_KEYS.items() if theirs in out}


def _result(scores: dict, n_gen: int, n_real: int, feature_extractor: str, protocol: str) -> dict:
    """The scores under metrics.json's keys, with what they were computed on and how (protocol: which arithmetic,
    so that a table can tell numbers comparable with ADM's from torch-fidelity's)."""
    metrics = {**scores, "num_samples": n_gen, "num_real": n_real, "feature_extractor": feature_extractor,
               "protocol": protocol}
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


# --- ADM's evaluator, ported (guided-diffusion evaluations/evaluator.py) -------------------------------------------

ADM_ISC_SPLIT = 5000  # ADM's evaluator scores IS on consecutive, unshuffled splits of 5,000 samples
ADM_PRC_BATCH = 10000  # ManifoldEstimator's row and column batch: the float16 / float32 choice is made per block


def feature_statistics(features) -> tuple[np.ndarray, np.ndarray]:
    """(mu, sigma) as ADM's compute_statistics (and torch-fidelity) make them: the mean in the features' float32,
    the covariance (np.cov) in float64."""
    features = np.asarray(features)
    return np.mean(features, axis=0), np.cov(features, rowvar=False)


def adm_frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = 1e-6) -> float:
    """FIDStatistics.frechet_distance (1: the samples, 2: the reference): scipy's sqrtm of sigma1 sigma2, retried
    with eps added to both diagonals where it is not finite; an imaginary part is dropped when small on the diagonal
    (atol 1e-3) and an error otherwise. torch-fidelity instead sums the square roots of the product's eigenvalues."""
    diff = mu1 - mu2
    with warnings.catch_warnings():  # ADM's sqrtm(..., disp=False), quiet about a singular product
        warnings.simplefilter("ignore", linalg.LinAlgWarning)
        covmean = linalg.sqrtm(sigma1.dot(sigma2))
    if not np.isfinite(covmean).all():
        warnings.warn(f"fid calculation produces singular product; adding {eps} to diagonal of cov estimates")
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = linalg.sqrtm((sigma1 + offset).dot(sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"Frechet distance: sqrtm has an imaginary component {np.max(np.abs(covmean.imag))}")
        covmean = covmean.real
    return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def adm_inception_score(logits: torch.Tensor, split_size: int = ADM_ISC_SPLIT) -> tuple[float, float]:
    """Evaluator.compute_inception_score: exp(mean KL(p(y|x) || p(y))) per consecutive chunk of split_size samples
    (the last one may be smaller: 12,000 -> 5,000, 5,000, 2,000; torch-fidelity makes equal splits), in float32 as
    ADM's numpy; the mean over chunks, and their standard deviation (ADM prints the mean alone)."""
    preds = torch.softmax(logits.float(), dim=1).cpu().numpy()
    scores = []
    for i in range(0, len(preds), split_size):
        part = preds[i : i + split_size]
        kl = part * (np.log(part) - np.log(np.expand_dims(np.mean(part, 0), 0)))
        scores.append(np.exp(np.mean(np.sum(kl, 1))))
    return float(np.mean(scores)), float(np.std(scores))


def _squared_distances(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """ADM's _batch_pairwise_distances in the inputs' dtype: max(|u|² - 2 u.v + |v|², 0), each op rounded to it.
    In float16 the squares are rounded, then summed and multiplied with float32 accumulators (TF's GPU reductions and
    cuBLAS GEMMs of float16; products of float16 numbers are exact in float32, and in TF32) and rounded back. In
    float32 TF on Ampere+ GPUs would multiply in TF32; torch keeps float32 unless allow_tf32 is set."""
    norm_u = u.square().sum(1, dtype=torch.float32).to(u.dtype)
    norm_v = v.square().sum(1, dtype=torch.float32).to(v.dtype)
    uv = (u.float() @ v.float().T).to(u.dtype)
    return (norm_u[:, None] - 2 * uv + norm_v[None]).clamp_min(0)


def adm_distance_block(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """DistanceBlock.pairwise_distances: squared distances between the rows of u and v in float16 (~3 significant
    digits: many ties), the whole block in float32 instead where any float16 one is not finite (past 65504); float32
    out."""
    d = _squared_distances(u.half(), v.half())
    if not torch.isfinite(d).all():
        d = _squared_distances(u.float(), v.float())
    return d.float()


def adm_manifold_radii(features: torch.Tensor, k: int, batch: int = ADM_PRC_BATCH) -> torch.Tensor:
    """ManifoldEstimator.manifold_radii: each point's squared distance to its k-th nearest neighbour in its set,
    itself counted (index k of its sorted row), from blocks of batch x batch."""
    radii = []
    for rows in features.split(batch):
        d = torch.cat([adm_distance_block(rows, cols) for cols in features.split(batch)], dim=1)
        radii.append(d.kthvalue(k + 1, dim=1).values)
    return torch.cat(radii)


def adm_precision_recall(generated: torch.Tensor, real: torch.Tensor, k: int = 3,
                         batch: int = ADM_PRC_BATCH) -> tuple[float, float]:
    """ManifoldEstimator.evaluate_pr: precision, the share of generated points within (<=) the radius of some real
    point, and recall, the reverse; squared distances from real rows to generated columns (ADM's order, which float16
    rounding tells apart), both sides' radii as adm_manifold_radii."""
    radii_real, radii_gen = adm_manifold_radii(real, k, batch), adm_manifold_radii(generated, k, batch)
    real_in = torch.zeros(len(real), dtype=torch.bool, device=real.device)
    gen_in = torch.zeros(len(generated), dtype=torch.bool, device=generated.device)
    for i in range(0, len(real), batch):
        for j in range(0, len(generated), batch):
            d = adm_distance_block(real[i : i + batch], generated[j : j + batch])
            real_in[i : i + batch] |= (d <= radii_gen[None, j : j + batch]).any(1)
            gen_in[j : j + batch] |= (d <= radii_real[i : i + batch, None]).any(0)
    return gen_in.double().mean().item(), real_in.double().mean().item()


# --- scoring features -----------------------------------------------------------------------------------------------


def _extractor_class(feature_extractor: str, protocol: str):
    """The registered extractor; under "adm", inception-v3-compat with ADM's spatial features added."""
    if feature_extractor not in FEATURE_EXTRACTORS_REGISTRY:
        raise ValueError(f'feature extractor "{feature_extractor}" is not registered '
                         f"(registered: {sorted(FEATURE_EXTRACTORS_REGISTRY)})")
    cls = FEATURE_EXTRACTORS_REGISTRY[feature_extractor]
    return InceptionSpatialFeatureExtractor if protocol == "adm" and cls is FeatureExtractorInceptionV3 else cls


def _layers(cls, protocol: str) -> dict[str, str]:
    """metric -> the extractor's layer for it; sfid only under "adm" with a spatial layer (none in the embedded
    study's classifier: sfid is then left out of the results)."""
    layers = {m: cls.get_default_feature_layer_for_metric(m) for m in ("fid", "isc", "prc")}
    if protocol == "adm" and SPATIAL_FEATURE in cls.get_provided_features_list():
        layers["sfid"] = SPATIAL_FEATURE
    return layers


def _extract(generated: np.ndarray, real_images: Callable[[], np.ndarray], feature_extractor: str, weights_path: Path,
             protocol: str, cuda: bool, batch_size: int, reference: ReferenceBatch | None = None):
    """(layers, generated features, real features): one pass of each side through the extractor, all layers at once.
    A reference batch's stored statistics are checked against their layers' widths on one image first, and its images
    read only then."""
    cls = _extractor_class(feature_extractor, protocol)
    layers = _layers(cls, protocol)
    fe = cls(feature_extractor, list(dict.fromkeys(layers.values())),
             feature_extractor_weights_path=str(weights_path), verbose=False).requires_grad_(False).eval()
    fe = fe.cuda() if cuda else fe
    if reference is not None:
        _check_feature_size(fe, generated, layers, reference, cuda)
    options = dict(cuda=cuda, batch_size=batch_size, save_cpu_ram=True, verbose=False)
    features = extract_featuresdict_from_input_id(1, fe, input1=UInt8Images(generated), **options)
    return layers, features, extract_featuresdict_from_input_id(1, fe, input1=UInt8Images(real_images()), **options)


def _score(features: dict, real: dict, stored: dict, layers: dict, protocol: str, k: int, cuda: bool) -> dict:
    """The metrics of the generated features against the real ones. FID (and sFID) against the stored statistics
    where there are some, else against the real features' own, as ADM's evaluator falls back."""
    reference = {m: stored.get(m) or feature_statistics(real[layers[m]]) for m in ("fid", "sfid") if m in layers}
    move = (lambda t: t.cuda()) if cuda else (lambda t: t)  # the k-NN distances are the costly part
    generated, real_prc = move(features[layers["prc"]]), move(real[layers["prc"]])
    if protocol == "adm":
        out = {m: adm_frechet_distance(*feature_statistics(features[layers[m]]), *reference[m]) for m in reference}
        out["isc_mean"], out["isc_std"] = adm_inception_score(features[layers["isc"]], ADM_ISC_SPLIT)
        out["precision"], out["recall"] = adm_precision_recall(generated, real_prc, k)
        return out
    # torch-fidelity's arithmetic; IS on consecutive unshuffled splits of ~5,000 (equal ones: n // 5,000, at least
    # one). FID: both sides float64, since torch-fidelity asserts equal dtypes.
    (mu1, sigma1), (mu2, sigma2) = feature_statistics(features[layers["fid"]]), reference["fid"]
    fid = fid_statistics_to_metric({"mu": mu1.astype(np.float64), "sigma": sigma1},
                                   {"mu": mu2.astype(np.float64), "sigma": sigma2.astype(np.float64)}, verbose=False)
    splits = max(1, len(features[layers["isc"]]) // ADM_ISC_SPLIT)
    isc = isc_featuresdict_to_metric(features, layers["isc"], isc_splits=splits, samples_shuffle=False, verbose=False)
    prc = prc_features_to_metric(generated, real_prc, prc_neighborhood=k, save_cpu_ram=True, verbose=False)
    return _our_keys({**fid, **isc, **prc})


# --- ADM's reference batch ----------------------------------------------------------------------------------------

STATISTICS = {"fid": ("mu", "sigma"), "sfid": ("mu_s", "sigma_s")}  # ADM's names of each distance's statistics


@dataclass
class ReferenceBatch:
    """A validated ADM reference batch (e.g. VIRTUAL_imagenet256_labeled.npz): its images for precision / recall,
    read only when scored, and the statistics stored beside them (published numbers use these, not statistics
    recomputed from arr_0). A distance whose statistics the batch lacks is measured against arr_0's features'."""

    path: Path
    image_shape: tuple[int, ...]  # arr_0: uint8 [N, H, W, 3]
    statistics: dict[str, tuple[np.ndarray, np.ndarray]]  # "fid" / "sfid" -> (mu [D], sigma [D, D]), float64

    def images(self) -> np.ndarray:
        return load_npz(self.path, ["arr_0"])["arr_0"]


def read_reference_batch(path) -> ReferenceBatch:
    """Checks keys, shapes and dtypes (arr_0 from its header alone) so a bad file fails before any compute.
    Statistics come in pairs (mu and sigma, mu_s and sigma_s) or not at all."""
    path = Path(path)
    with reading(path, "reference batch"), np.load(path, allow_pickle=False) as npz:
        present = set(npz.files)
    pairs = {m: keys for m, keys in STATISTICS.items() if present & set(keys)}
    for keys in pairs.values():
        missing = [key for key in keys if key not in present]
        if missing:
            raise KeyError(f"{path} has {sorted(present & set(keys))} but lacks {missing}: store both statistics of a "
                           "pair, or neither (then they are computed from arr_0's images)")
    headers = npz_headers(path, ["arr_0", *(key for keys in pairs.values() for key in keys)])
    shape, dtype = headers["arr_0"]
    if dtype != np.uint8 or len(shape) != 4 or shape[-1] != 3 or shape[0] < 1:
        raise ValueError(f"{path}[arr_0] must be uint8 NHWC images with 3 channels, got {dtype} {shape}")
    for mu, sigma in pairs.values():
        (mu_shape, mu_dtype), (sigma_shape, sigma_dtype) = headers[mu], headers[sigma]
        if len(mu_shape) != 1 or mu_shape[0] < 1 or mu_dtype.kind != "f":
            raise ValueError(f"{path}[{mu}] must be a float vector [D], got {mu_dtype} {mu_shape}")
        D = mu_shape[0]
        if sigma_shape != (D, D) or sigma_dtype.kind != "f":
            raise ValueError(f"{path}[{sigma}] must be a float matrix [D, D] = [{D}, {D}] (D from {mu}), "
                             f"got {sigma_dtype} {sigma_shape}")
    stats = load_npz(path, [key for keys in pairs.values() for key in keys])
    for key, value in stats.items():
        if not np.isfinite(value).all():
            raise ValueError(f"{path}[{key}] holds non-finite values")
    return ReferenceBatch(path, shape, {m: (stats[mu].astype(np.float64), stats[sigma].astype(np.float64))
                                        for m, (mu, sigma) in pairs.items()})


def reference_batch_metrics(
    generated_uint8_NHWC,
    reference: ReferenceBatch,
    *,
    feature_extractor: str = "inception-v3-compat",
    weights_path=None,
    device: str = "cpu",
    prc_neighborhood: int = 3,
    batch_size: int = 64,
    protocol: str = "torch-fidelity",
) -> dict:
    """FID / IS / precision / recall (+ sFID under "adm" with inception-v3-compat) against ADM's reference batch.

    One pass of the generated images through the extractor gives all its layers. FID / sFID: against the batch's
    stored statistics (else those of its images' features). Precision / recall (k = prc_neighborhood): against the
    features of its arr_0 images. "adm": ADM's arithmetic throughout; "torch-fidelity": torch-fidelity's, IS on
    consecutive unshuffled splits as ADM's but of equal sizes. Same keys as compute_metrics.
    """
    generated = _check_images("generated images", generated_uint8_NHWC)
    n_gen, n_real = len(generated), reference.image_shape[0]
    if generated.shape[1:3] != reference.image_shape[1:3]:
        raise ValueError(f"generated images are {generated.shape[1:3]} but {reference.path}[arr_0] images are "
                         f"{reference.image_shape[1:3]} (H, W); sample.resize_to resizes samples")
    if prc_neighborhood < 1 or min(n_gen, n_real) <= prc_neighborhood:
        raise ValueError(f"precision/recall with prc_neighborhood={prc_neighborhood} (>= 1) need more than that "
                         f"many images per side, got {n_gen} generated and {n_real} in {reference.path}[arr_0]")
    _check_protocol(protocol)
    weights_path = local_weights(feature_extractor, weights_path)
    cuda = device != "cpu"
    with _device_scope(device):
        layers, features, real = _extract(generated, reference.images, feature_extractor, weights_path, protocol, cuda,
                                          batch_size, reference)
        scores = _score(features, real, reference.statistics, layers, protocol, prc_neighborhood, cuda)
    return _result(scores, n_gen, n_real, feature_extractor, protocol)


def _check_feature_size(fe, generated: np.ndarray, layers: dict, reference: ReferenceBatch, cuda: bool) -> None:
    """One image through the extractor: each stored statistic in use must have its layer's width."""
    x = UInt8Images(generated[:1])[0][None]
    with torch.no_grad():
        out = fe.convert_features_tuple_to_dict(fe(x.cuda() if cuda else x))
    for metric, (mu, _) in reference.statistics.items():
        if metric in layers and out[layers[metric]].shape[1] != len(mu):
            raise ValueError(f"{reference.path}[{STATISTICS[metric][0]}] has {len(mu)} features but feature extractor "
                             f'"{fe.get_name()}" layer "{layers[metric]}" gives {out[layers[metric]].shape[1]}')
