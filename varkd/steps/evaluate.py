"""Steps that make the scores: the real side's features, a run's metrics.json, a backbone's noise floor."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from varkd.aggregate import TRAIN_COSTS
from varkd.checkpoints import load_model
from varkd.codes import load_code_set
from varkd.config import EvaluateConfig, EvaluateJob, NoiseFloorJob, RealFeaturesJob
from varkd.data import read_split
from varkd.distill import check_codes, heldout_nll
from varkd.io import atomic_write_json, load_npz, provenance, reading
from varkd.models.gpt import GPT, GPTConfig
from varkd.steps.sample import (NOISE_STREAM, TEST_STREAM, VAL_STREAM, balanced_labels, draw_images, load_sampler,
                                sample_seed)


def real_features(job: RealFeaturesJob, device: torch.device) -> None:
    """The real side of a study's evaluations in the extractor's feature space, once: a split of images.npz or the
    images of ADM's reference batch (whose stored statistics are checked against the extractor's widths first)."""
    from varkd.features import save_features
    from varkd.metrics import Extractor, read_reference_batch

    cfg = job.evaluate
    extractor = Extractor(cfg.feature_extractor, cfg.weights or job.classifier, cfg.protocol, device, cfg.batch_size)
    if job.images is None:
        batch = read_reference_batch(cfg.reference_batch)
        extractor.check_statistics(batch.statistics, batch.path)
        images, source = batch.images(), cfg.reference_batch
    else:
        images, source = read_split(job.images, job.split).images, f"{job.images}[{job.split}_images]"
    start = time.perf_counter()
    features = extractor(images)
    seconds = time.perf_counter() - start
    save_features(job.out, features, images.shape, feature_extractor=extractor.name, protocol=extractor.protocol,
                  weights=str(extractor.weights), source=source)
    print(f"{job.out}: {len(images)} images of {source} -> " + ", ".join(f"{layer} {tuple(f.shape)}"
                                                                         for layer, f in features.items())
          + f" in {seconds:.1f} s ({len(images) / seconds:.0f} img/s)")


VAL_IMAGE_METRICS = ("fid", "sfid", "isc_mean", "precision", "recall", "num_samples")  # stored as val_<key>


class RealSide:
    """What samples are scored against: the real side's features per split (RealFeaturesJob's files) and, with ADM's
    reference batch, its stored statistics; all read and checked against the evaluation's extractor, whose weights
    are read too, before any sample is."""

    def __init__(self, cfg: EvaluateConfig, features: dict[str, str], classifier: Optional[str],
                 device: torch.device):
        from varkd.features import load_features
        from varkd.metrics import STATISTICS, Extractor, read_reference_batch

        if not features:
            raise ValueError("an evaluation needs real_features (features files made by `varkd real-features`)")
        self.cfg = cfg
        self.statistics = read_reference_batch(cfg.reference_batch).statistics if cfg.reference_batch else {}
        self.extractor = Extractor(cfg.feature_extractor, cfg.weights or classifier, cfg.protocol, device,
                                   cfg.batch_size)
        made_with = {"feature_extractor": self.extractor.name, "protocol": self.extractor.protocol,
                     "weights": str(Path(self.extractor.weights).resolve())}
        loaded = {path: load_features(path, device) for path in dict.fromkeys(features.values())}
        for path, (real, info) in loaded.items():
            info = {**info, "weights": str(Path(info["weights"]).resolve())}
            differ = {k: (info[k], v) for k, v in made_with.items() if info[k] != v}
            if differ:
                raise ValueError(f"real features {path} were made with " + ", ".join(
                    f"{k} {made:s} but this evaluation uses {used}" for k, (made, used) in differ.items())
                    + ": rerun its real-features job")
            for metric, (mu, _) in self.statistics.items():
                layer = self.extractor.layers.get(metric)
                if layer and real[layer].shape[1] != len(mu):
                    raise ValueError(f"{cfg.reference_batch}[{STATISTICS[metric][0]}] has {len(mu)} features but "
                                     f'layer "{layer}" of {path} has {real[layer].shape[1]}')
        self.features = {split: loaded[path][0] for split, path in features.items()}
        self.image_shapes = {split: loaded[path][1]["image_shape"] for split, path in features.items()}
        self.sources = features

    def score(self, generated: np.ndarray, split: str, seed: int) -> dict:
        """FID / IS / precision / recall of `generated` against the `split` side (ADM's reference batch for both
        splits at paper scale, scored as ADM's evaluator splits IS, so evaluate.isc_splits is unused there)."""
        from varkd.metrics import check_counts, score

        cfg, real = self.cfg, self.features[split]
        if tuple(generated.shape[1:3]) != self.image_shapes[split][1:3]:
            raise ValueError(f"generated images are {generated.shape[1:3]} but the real images of "
                             f"{self.sources[split]} are {self.image_shapes[split][1:3]} (H, W); sample.resize_to "
                             "resizes samples")
        isc_splits = None if cfg.reference_batch else cfg.isc_splits
        check_counts(len(generated), len(real[self.extractor.layers["prc"]]), prc_neighborhood=cfg.prc_neighborhood,
                     isc_splits=isc_splits, kid=cfg.kid, protocol=cfg.protocol, real=f"in {self.sources[split]}")
        return score(self.extractor(generated), real, self.statistics, self.extractor,
                     prc_neighborhood=cfg.prc_neighborhood, isc_splits=isc_splits, seed=seed, kid=cfg.kid)


def _read_samples(path: str, key: str, count: int, rng: np.random.Generator) -> np.ndarray:
    """The images of a samples file, or a random subset of `count` of them (in file order)."""
    images = load_npz(path, [key])[key]
    if count and len(images) > count:
        images = images[np.sort(rng.choice(len(images), count, replace=False))]
    return images


def training_wall_seconds(checkpoint: str) -> Optional[float]:
    """The run's training wall time: the last `elapsed_s` of train_log.csv beside its checkpoint (not stored in the
    checkpoint, so that a rerun writes the same bytes); None for imported models."""
    import csv

    log = Path(checkpoint).parent / "train_log.csv"
    if not log.is_file():
        return None
    with reading(log, "training log"), log.open() as f:
        rows = list(csv.DictReader(f))
    return float(rows[-1]["elapsed_s"]) if rows and rows[-1].get("elapsed_s") else None


def evaluate(job: EvaluateJob, device: torch.device) -> None:
    """The reported metrics (samples against the test split or ADM's reference batch; NLL on the test codes) and
    the validation ones (val_*: validation samples against the val split; NLL on the val codes). The real side and
    the extractor's weights are checked before the samples are read."""
    start = time.perf_counter()
    real = RealSide(job.evaluate, job.real_features, job.classifier, device)
    key = job.real_key or "arr_0"
    generated = _read_samples(job.samples, key, job.num_samples, np.random.default_rng([job.seed, TEST_STREAM]))
    result = {**job.identity, **real.score(generated, "test", job.seed)}
    if job.val_samples:
        generated = _read_samples(job.val_samples, key, job.num_samples, np.random.default_rng([job.seed, VAL_STREAM]))
        scores = real.score(generated, "val", job.seed)
        result.update({f"val_{k}": scores[k] for k in VAL_IMAGE_METRICS if k in scores})
    if job.checkpoint:
        model, ckpt = load_model(job.checkpoint, GPTConfig, GPT, "GPT checkpoint")
        model = model.eval().to(device)
        for name, codes_path in (("nll", job.codes_test), ("val_nll", job.codes_val)):
            codes = load_code_set(codes_path)
            check_codes(codes, model)
            result[name] = heldout_nll(model, codes, device=device)
        train_summary = {**ckpt.get("train", {}), "wall_s": training_wall_seconds(job.checkpoint)}
        for key in TRAIN_COSTS:  # cost of the run, to set quality against
            result[f"train_{key}"] = train_summary.get(key)
    result["eval_wall_s"] = round(time.perf_counter() - start, 2)
    result["provenance"] = provenance(device.type)
    atomic_write_json(job.out, result)
    print(f"{job.out}: " + ", ".join(f"{k}={result[k]:.4g}" for k in ("fid", "isc_mean", "precision", "recall",
                                                                       "nll", "val_fid", "val_nll")
                                     if isinstance(result.get(k), float)))


def noise_floor(job: NoiseFloorJob, device: torch.device) -> None:
    """The model sampled with evaluate.noise_seeds sampling seeds, each set scored against the test split like a
    run's samples -> noise.json: every set's metrics, their mean and standard deviation over sampling seeds."""
    real = RealSide(job.evaluate, {"test": job.real_features}, job.classifier, device)
    model, vq = load_sampler(job.checkpoint, job.tokenizer, device)
    labels = balanced_labels(model.config.num_classes, job.sample.num_samples)
    sets = []
    for k in range(job.evaluate.noise_seeds):
        images = draw_images(model, vq, labels, job.sample, sample_seed(job.seed, job.sample, NOISE_STREAM, k), device)
        sets.append(real.score(images, "test", job.seed))
    metrics = [k for k in ("fid", "sfid", "isc_mean", "precision", "recall") if k in sets[0]]
    values = {k: np.array([s[k] for s in sets], dtype=np.float64) for k in metrics}
    atomic_write_json(job.out, {**job.identity, "num_samples": job.sample.num_samples, "noise_seeds": len(sets),
                                "mean": {k: float(v.mean()) for k, v in values.items()},
                                "sd": {k: float(v.std(ddof=1)) for k, v in values.items()},
                                "sets": sets, "provenance": provenance(device.type)})
    print(f"{job.out}: " + ", ".join(f"{k} {v.mean():.3f} ± {v.std(ddof=1):.3f} (sd)" for k, v in values.items()))
