"""FID / IS / precision / recall (and optionally KID) through torch-fidelity 0.4.0.

Every metric comes from one `calculate_metrics` call with one named feature extractor: `"varkd-classifier"` (the
embedded study's small classifier, registered here) or a built-in such as `"inception-v3-compat"` with a local
`weights_path` at paper scale. Naming the extractor matters: without it torch-fidelity would compute precision /
recall on VGG16, a second network.
"""
import contextlib

import numpy as np
import torch
import torch_fidelity
from torch_fidelity.helpers import vassert
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

from varkd.checkpoints import load_classifier
from varkd.config import CLASSIFIER_EXTRACTOR as EXTRACTOR_NAME
from varkd.images import to_model_input


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

    kwargs = {}
    if kid:
        # torch-fidelity refuses subsets larger than an input; subsets that take all of both inputs are all the same
        # (permutations), so one is enough (100 took ~8 s at 1,000 vs 1,000 here).
        kwargs["kid_subset_size"] = size = min(1000, n_gen, n_real)
        kwargs["kid_subsets"] = 1 if n_gen == n_real == size else 100
    cuda = device != "cpu"
    device_scope = torch.cuda.device(device) if cuda and ":" in device else contextlib.nullcontext()
    with device_scope:
        out = torch_fidelity.calculate_metrics(
            input1=UInt8Images(generated),
            input2=UInt8Images(real),
            feature_extractor=feature_extractor,
            feature_extractor_weights_path=None if weights_path is None else str(weights_path),
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
    result = {
        "fid": out[torch_fidelity.KEY_METRIC_FID],
        "isc_mean": out[torch_fidelity.KEY_METRIC_ISC_MEAN],
        "isc_std": out[torch_fidelity.KEY_METRIC_ISC_STD],
        "precision": out[torch_fidelity.KEY_METRIC_PRECISION],
        "recall": out[torch_fidelity.KEY_METRIC_RECALL],
    }
    if kid:
        result["kid_mean"] = out[torch_fidelity.KEY_METRIC_KID_MEAN]
        result["kid_std"] = out[torch_fidelity.KEY_METRIC_KID_STD]
    result.update(num_samples=n_gen, num_real=n_real, feature_extractor=feature_extractor)
    return {k: float(v) if isinstance(v, (float, np.floating)) else v for k, v in result.items()}
