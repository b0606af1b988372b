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

import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch_fidelity
from scipy import linalg
from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3, FeatureExtractorInceptionV3
from torch_fidelity.helpers import vassert
from torch_fidelity.metric_fid import fid_statistics_to_metric
from torch_fidelity.metric_isc import isc_featuresdict_to_metric
from torch_fidelity.metric_kid import kid_features_to_metric
from torch_fidelity.metric_prc import prc_features_to_metric
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

from varkd.checkpoints import load_classifier
from varkd.config import CLASSIFIER_EXTRACTOR as EXTRACTOR_NAME
from varkd.config import EvaluateConfig
from varkd.features import extract_features
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


def check_counts(n_gen: int, n_real: int, *, prc_neighborhood: int = 3, isc_splits: int | None = None,
                 kid: bool = False, protocol: str = "torch-fidelity", real: str = "real images") -> None:
    """What the metrics need of the two sides' sizes and options, checked before any feature is extracted.
    isc_splits None: consecutive splits of ~5,000 (a reference batch's IS), which any count allows."""
    _check_protocol(protocol)
    if prc_neighborhood < 1 or (isc_splits is not None and isc_splits < 1):
        raise ValueError(f"prc_neighborhood and isc_splits must be >= 1, got {prc_neighborhood} and {isc_splits}")
    if min(n_gen, n_real) <= max(prc_neighborhood, 1):
        raise ValueError(
            f"precision/recall with prc_neighborhood={prc_neighborhood} (and FID) need more than "
            f"{max(prc_neighborhood, 1)} images per side, got {n_gen} generated and {n_real} {real}"
        )
    if protocol == "adm" and kid:
        raise ValueError("ADM's evaluator has no KID: kid=True needs protocol='torch-fidelity'")
    if protocol == "torch-fidelity" and isc_splits is not None and n_gen < isc_splits:
        raise ValueError(f"isc_splits={isc_splits} needs at least that many generated images, got {n_gen}")


class Extractor:
    """One feature extractor on one device, built (and its weights read) once per job: which of its layers each
    metric reads, and the one pass over a set of images that gives them all (varkd.features.extract_features)."""

    def __init__(self, feature_extractor: str = EXTRACTOR_NAME, weights_path=None, protocol: str = "torch-fidelity",
                 device: str | torch.device = "cpu", batch_size: int = 250):
        _check_protocol(protocol)
        self.name, self.protocol, self.batch_size = feature_extractor, protocol, batch_size
        self.weights = local_weights(feature_extractor, weights_path)
        self.device = torch.device(device)
        cls = _extractor_class(feature_extractor, protocol)
        self.layers = _layers(cls, protocol)
        self.network = cls(feature_extractor, list(dict.fromkeys(self.layers.values())),
                           feature_extractor_weights_path=str(self.weights), verbose=False)
        self.network = self.network.requires_grad_(False).eval().to(self.device)

    def __call__(self, images_uint8_NHWC) -> dict[str, torch.Tensor]:
        """{layer: [N, D] float32 on the extractor's device}."""
        return extract_features(self.network, _check_images("images", images_uint8_NHWC), self.batch_size,
                                self.device)

    def check_statistics(self, statistics: dict, source) -> None:
        """One blank image through the network: each stored statistic (metric -> (mu, sigma)) must have its layer's
        width, checked before a whole set is extracted."""
        size = getattr(self.network, "image_size", 32)
        features = extract_features(self.network, np.zeros((1, size, size, 3), np.uint8), 1, self.device)
        for metric, (mu, _) in statistics.items():
            width = features[self.layers[metric]].shape[1] if metric in self.layers else len(mu)
            if width != len(mu):
                raise ValueError(f"{source}[{STATISTICS[metric][0]}] has {len(mu)} features but feature extractor "
                                 f'"{self.name}" layer "{self.layers[metric]}" gives {width}')


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
    batch_size: int = 250,
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
    check_counts(len(generated), len(real), prc_neighborhood=prc_neighborhood, isc_splits=isc_splits, kid=kid,
                 protocol=protocol)
    extractor = Extractor(feature_extractor, weights_path, protocol, device, batch_size)
    return score(extractor(generated), extractor(real), {}, extractor, prc_neighborhood=prc_neighborhood,
                 isc_splits=isc_splits, seed=seed, kid=kid)


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
    features = features.cpu().numpy() if torch.is_tensor(features) else np.asarray(features)
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


def score(generated: dict, real: dict, stored: dict, extractor: Extractor, *, prc_neighborhood: int = 3,
          isc_splits: int | None = None, seed: int = 0, kid: bool = False) -> dict:
    """The metrics of generated features against real ones ({layer: [N, D]}, from `extractor`'s layers, on its
    device), under metrics.json's keys. FID (and sFID) against the stored statistics where there are some
    (metric -> (mu, sigma)), else against the real features' own, as ADM's evaluator falls back.

    torch-fidelity's arithmetic: IS over isc_splits splits shuffled with `seed` (isc_splits None: consecutive
    unshuffled splits of ~5,000, equal ones: n // 5,000, at least one), KID over subsets of up to 1,000. "adm": ADM's
    arithmetic throughout (isc_splits, seed and kid unused)."""
    layers, protocol, k = extractor.layers, extractor.protocol, prc_neighborhood
    n_gen, n_real = len(generated[layers["prc"]]), len(real[layers["prc"]])
    reference = {m: stored.get(m) or feature_statistics(real[layers[m]]) for m in ("fid", "sfid") if m in layers}
    generated_prc, real_prc = generated[layers["prc"]], real[layers["prc"]]
    if protocol == "adm":
        out = {m: adm_frechet_distance(*feature_statistics(generated[layers[m]]), *reference[m]) for m in reference}
        out["isc_mean"], out["isc_std"] = adm_inception_score(generated[layers["isc"]], ADM_ISC_SPLIT)
        out["precision"], out["recall"] = adm_precision_recall(generated_prc, real_prc, k)
        return _result(out, n_gen, n_real, extractor.name, protocol)
    # FID: both sides' means in float64, since torch-fidelity asserts equal dtypes and stored ones are float64.
    (mu1, sigma1), (mu2, sigma2) = feature_statistics(generated[layers["fid"]]), reference["fid"]
    out = fid_statistics_to_metric({"mu": mu1.astype(np.float64), "sigma": sigma1},
                                   {"mu": mu2.astype(np.float64), "sigma": sigma2.astype(np.float64)}, verbose=False)
    shuffle = isc_splits is not None
    splits = isc_splits if shuffle else max(1, n_gen // ADM_ISC_SPLIT)
    out.update(isc_featuresdict_to_metric(generated, layers["isc"], isc_splits=splits, samples_shuffle=shuffle,
                                          rng_seed=seed, verbose=False))
    out.update(prc_features_to_metric(generated_prc, real_prc, prc_neighborhood=k, save_cpu_ram=True, verbose=False))
    if kid:
        # torch-fidelity refuses subsets larger than an input; subsets that take all of both inputs are all the same
        # (permutations), so one is enough (100 took ~8 s at 1,000 vs 1,000 here).
        size = min(1000, n_gen, n_real)
        out.update(kid_features_to_metric(generated[layers["fid"]], real[layers["fid"]], kid_subset_size=size,
                                          kid_subsets=1 if n_gen == n_real == size else 100, rng_seed=seed,
                                          verbose=False))
    return _result(_our_keys(out), n_gen, n_real, extractor.name, protocol)


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
    batch_size: int = 250,
    protocol: str = "torch-fidelity",
) -> dict:
    """FID / IS / precision / recall (+ sFID under "adm" with inception-v3-compat) against ADM's reference batch.

    One pass of the generated images through the extractor gives all its layers. FID / sFID: against the batch's
    stored statistics (else those of its images' features). Precision / recall (k = prc_neighborhood): against the
    features of its arr_0 images. "adm": ADM's arithmetic throughout; "torch-fidelity": torch-fidelity's, IS on
    consecutive unshuffled splits as ADM's but of equal sizes. Same keys as compute_metrics.
    """
    generated = _check_images("generated images", generated_uint8_NHWC)
    check_reference_shape(generated, reference)
    check_counts(len(generated), reference.image_shape[0], prc_neighborhood=prc_neighborhood, protocol=protocol,
                 real=f"in {reference.path}[arr_0]")
    extractor = Extractor(feature_extractor, weights_path, protocol, device, batch_size)
    extractor.check_statistics(reference.statistics, reference.path)
    return score(extractor(generated), extractor(reference.images()), reference.statistics, extractor,
                 prc_neighborhood=prc_neighborhood)


def check_reference_shape(generated: np.ndarray, reference: ReferenceBatch) -> None:
    if generated.shape[1:3] != reference.image_shape[1:3]:
        raise ValueError(f"generated images are {generated.shape[1:3]} but {reference.path}[arr_0] images are "
                         f"{reference.image_shape[1:3]} (H, W); sample.resize_to resizes samples")
