"""The workflow's steps other than GPT training, each a function of its job config (one CLI command each)."""
from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from varkd.aggregate import TRAIN_COSTS
from varkd.checkpoints import load_gpt, load_model, load_vq, save_model
from varkd.classifier import Classifier, accuracy, classifier_loss
from varkd.codes import load_code_set, save_code_set
from varkd.config import (ClassifierJob, EvaluateConfig, EvaluateJob, ExtractCodesJob, GatherSamplesJob, NoiseFloorJob,
                          PrepareDataJob, RealFeaturesJob, SampleConfig, SampleJob, TokenizerJob, to_yaml)
from varkd.data import SPLITS, load_digits, read_split, save_splits
from varkd.decode import Decoder, generate
from varkd.distill import check_codes, heldout_nll
from varkd.images import to_model_input
from varkd.io import atomic_path, atomic_save_npz, atomic_write_json, load_npz, provenance, reading
from varkd.loop import BatchOrder, train
from varkd.models.gpt import GPT, GPTConfig
from varkd.models.vq import VQModel
from varkd.npz import npz_headers, npz_writer
from varkd.tokenizer import reconstruction_mse, tokenizer_loss


def prepare_data(job: PrepareDataJob, device: torch.device) -> None:
    splits = load_digits(job.data)
    save_splits(job.out, splits)
    print(f"{job.out}: " + " / ".join(f"{len(s)} {name}" for name, s in splits.items())
          + f" images {splits['train'].images.shape[1:]}")


def _train_images(images: str, model: torch.nn.Module, optim, out_dir: str, config_text: str, seed: int,
                  loss, eval_fn, device: torch.device, desc: str) -> dict:
    """Shared by the tokenizer and the classifier: minibatches of the train split through `loss`."""
    split = read_split(images, "train")
    x, y = to_model_input(split.images), torch.from_numpy(split.labels)
    order = BatchOrder(len(x), optim.batch_size, seed)

    def loss_fn(step: int):
        index = order(step)
        return loss(model, x[index].to(device), y[index].to(device))

    return train(model, loss_fn, optim, out_dir, config_text=config_text, eval_fn=eval_fn, device=device, desc=desc)


def train_tokenizer(job: TokenizerJob, device: torch.device) -> None:
    """The VQ tokenizer (LlamaGen architecture); held-out reconstruction MSE is logged. A collapsed codebook fails
    the job (tokenizer.min_codebook_usage) before anything downstream trains on it."""
    cfg = job.tokenizer
    torch.manual_seed(cfg.seed)  # the initial weights too: a job is a function of its config
    model = VQModel(cfg.model).to(device)
    val = read_split(job.images, "val")
    summary = _train_images(job.images, model, cfg.optim, job.out_dir, to_yaml(job), cfg.seed,
                            lambda m, x, y: tokenizer_loss(m, x), lambda: {"val_rec_mse": reconstruction_mse(model, val.images)},
                            device, "tokenizer")
    used = len(torch.unique(model.encode_to_codes(read_split(job.images, "train").images)))
    summary["codes_used"] = used
    usage = used / cfg.model.codebook_size
    if usage < cfg.min_codebook_usage:
        raise ValueError(f"the tokenizer collapsed: {used} of {cfg.model.codebook_size} codes ({usage:.2f}) in use on "
                         f"the training images, below tokenizer.min_codebook_usage={cfg.min_codebook_usage}; every "
                         "model of the study would see a few codes. Change tokenizer.seed or tokenizer.optim and "
                         f"rerun (its training log: {Path(job.out_dir) / 'train_log.csv'})")
    save_model(Path(job.out_dir) / "tokenizer.pt", model, cfg.model, train=summary)
    (Path(job.out_dir) / "checkpoint.pt").unlink(missing_ok=True)
    print(f"tokenizer: held-out reconstruction MSE {summary['val_rec_mse']:.4f}, {used} of "
          f"{cfg.model.codebook_size} codes used")


def extract_codes(job: ExtractCodesJob, device: torch.device) -> None:
    """Codes of every image, one code set per split (out_dir/train, val, test): [N, A, T] with each image's A views."""
    vq = load_vq(job.tokenizer).to(device)
    for split in SPLITS:
        images = read_split(job.images, split)
        codes = vq.encode_to_codes(images.images, job.batch_size)
        used = len(torch.unique(codes))
        save_code_set(Path(job.out_dir) / split, codes.view(-1, images.views, codes.shape[1]).numpy(),
                      images.labels[:: images.views], vq.config.codebook_size)
        print(f"codes {split}: {len(images) // images.views} images x {images.views} views x {codes.shape[1]} codes, "
              f"{used} of {vq.config.codebook_size} codes used")


def train_classifier(job: ClassifierJob, device: torch.device) -> None:
    """The metric's feature network, trained on the train split; held-out accuracy is logged."""
    torch.manual_seed(job.seed)  # the initial weights too: a job is a function of its config
    model = Classifier(job.classifier.model).to(device)
    val = read_split(job.images, "val")
    summary = _train_images(job.images, model, job.classifier.optim, job.out_dir, to_yaml(job), job.seed,
                            classifier_loss, lambda: {"val_acc": accuracy(model, val.images, val.labels)},
                            device, "classifier")
    save_model(Path(job.out_dir) / "classifier.pt", model, job.classifier.model, train=summary)
    (Path(job.out_dir) / "checkpoint.pt").unlink(missing_ok=True)
    print(f"classifier: held-out accuracy {summary['val_acc']:.4f}")


def save_grid(path: str | Path, images: np.ndarray, labels: np.ndarray, per_class: int, classes: int) -> None:
    """One row per class (the first `classes` classes), its first `per_class` samples left to right."""
    from PIL import Image
    from torchvision.utils import make_grid

    rows = []
    for c in np.unique(labels)[:classes]:
        chosen = images[labels == c][:per_class]
        pad = np.zeros((per_class - len(chosen), *images.shape[1:]), dtype=np.uint8)
        rows.append(np.concatenate([chosen, pad]))
    grid = make_grid(torch.from_numpy(np.concatenate(rows)).permute(0, 3, 1, 2), nrow=per_class, padding=2)
    scale = max(1, 128 // images.shape[1])  # tiny images are upscaled so the grid is readable
    picture = Image.fromarray(grid.permute(1, 2, 0).numpy())
    picture = picture.resize((picture.width * scale, picture.height * scale), Image.NEAREST)
    with atomic_path(path, suffix=".png") as tmp:
        picture.save(tmp)


# sampling streams of one run: the reported samples, the validation samples, the noise floor's k-th set
TEST_STREAM, VAL_STREAM, NOISE_STREAM = 0, 1, 2


def sample_seed(seed: int, cfg: SampleConfig, stream: int, index: int = 0) -> int:
    """An independent stream per (run seed, sample.seed, stream, shard or noise set), so that shards and streams
    differ and each reruns identically."""
    return int(np.random.SeedSequence([seed, cfg.seed, stream, index]).generate_state(1, np.uint64)[0])


def load_sampler(checkpoint: str, tokenizer: str, device: torch.device) -> tuple[GPT, VQModel]:
    """The GPT to sample and the tokenizer that decodes its codes, checked to share a vocabulary."""
    model, vq = load_gpt(checkpoint).to(device), load_vq(tokenizer).to(device)
    if model.config.vocab_size != vq.config.codebook_size:
        raise ValueError(f"{checkpoint} vocab_size={model.config.vocab_size} != tokenizer {tokenizer} "
                         f"codebook_size={vq.config.codebook_size}")
    return model, vq


def balanced_labels(num_classes: int, count: int) -> np.ndarray:
    """`count` class labels, class-balanced, in class order."""
    return np.repeat(np.arange(num_classes), math.ceil(count / num_classes))[:count]


def draw_images(model: GPT, vq: VQModel, labels: np.ndarray, cfg: SampleConfig, seed: int,
                device: torch.device) -> np.ndarray:
    """Plain AR samples (KV cache, CFG) of `labels`, decoded to uint8 NHWC; sample.resize_to > 0 resizes them bicubic
    before the uint8 conversion (VQModel.decode_to_uint8)."""
    dtype = torch.bfloat16 if cfg.precision == "bf16" else torch.float32
    generator, images, decoder = torch.Generator(device).manual_seed(seed), [], Decoder(model, dtype)
    for i in range(0, len(labels), cfg.batch_size):
        codes = generate(decoder, torch.from_numpy(labels[i : i + cfg.batch_size]).to(device), cfg_scale=cfg.cfg_scale,
                         temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p, generator=generator)
        images.append(vq.decode_to_uint8(codes, size=cfg.resize_to).numpy())
    return np.concatenate(images)


def sample(job: SampleJob, device: torch.device) -> None:
    """N class-balanced samples -> samples.npz (arr_0 uint8 NHWC, labels) + grid.png, and sample.val_num_samples
    more from another stream -> samples_val.npz (scored against the val split).

    With sample.num_shards > 1 this job draws shard `job.shard`, a contiguous slice of the label list
    (np.array_split), into samples/shard<i>.npz (same keys; no grid), which gather_samples joins in order.
    """
    cfg = job.sample
    model, vq = load_sampler(job.checkpoint, job.tokenizer, device)
    labels = np.array_split(balanced_labels(model.config.num_classes, cfg.num_samples), cfg.num_shards)[job.shard]
    start = time.perf_counter()
    images = draw_images(model, vq, labels, cfg, sample_seed(job.seed, cfg, TEST_STREAM, job.shard), device)
    seconds = time.perf_counter() - start
    out = Path(job.out_dir)
    path = out / "samples.npz" if cfg.num_shards == 1 else out / "samples" / f"shard{job.shard}.npz"
    atomic_save_npz(path, arr_0=images, labels=labels)  # no timing inside: a rerun writes the same bytes
    if cfg.num_shards == 1:
        save_grid(out / "grid.png", images, labels, cfg.grid_per_class, cfg.grid_classes)
    if cfg.val_num_samples:
        val_labels = balanced_labels(model.config.num_classes, cfg.val_num_samples)
        val_images = draw_images(model, vq, val_labels, cfg, sample_seed(job.seed, cfg, VAL_STREAM), device)
        atomic_save_npz(out / "samples_val.npz", arr_0=val_images, labels=val_labels)
    print(f"{path}: {images.shape} in {seconds:.1f} s" + (f", {cfg.val_num_samples} validation samples"
                                                          if cfg.val_num_samples else ""))


def gather_samples(job: GatherSamplesJob, device: torch.device) -> None:
    """Sample shards, in order -> out_dir/samples.npz (ADM layout: arr_0 uint8 NHWC, labels) + grid.png. One shard is
    in memory at a time (50k samples at 256px are 9.8 GB): arr_0 is streamed."""
    if not job.shards:
        raise ValueError("gather-samples needs at least one shard")
    headers = [npz_headers(p, ["arr_0", "labels"]) for p in job.shards]
    shape, dtype = headers[0]["arr_0"]
    if dtype != np.uint8 or len(shape) != 4 or shape[-1] != 3:
        raise ValueError(f"{job.shards[0]}[arr_0] must be uint8 NHWC images with 3 channels, got {dtype} {shape}")
    for path, header in zip(job.shards, headers):
        odd_shape, odd_dtype = header["arr_0"]
        if odd_dtype != dtype or odd_shape[1:] != shape[1:]:
            raise ValueError(f"shard {path}: arr_0 is {odd_dtype} {odd_shape[1:]} per image, but {job.shards[0]} "
                             f"is {dtype} {shape[1:]}")
        if header["labels"][0] != odd_shape[:1]:
            raise ValueError(f"shard {path}: labels {header['labels'][0]} do not match arr_0 {odd_shape}")
    labels = np.concatenate([load_npz(p, ["labels"])["labels"] for p in job.shards])
    in_grid = np.zeros(len(labels), bool)  # the first grid_per_class samples of the first grid_classes classes
    for c in np.unique(labels)[: job.grid_classes]:
        in_grid[np.flatnonzero(labels == c)[: job.grid_per_class]] = True
    grid = []

    def shard_images():
        offset = 0
        for path in job.shards:
            images = load_npz(path, ["arr_0"])["arr_0"]
            grid.append(images[in_grid[offset : offset + len(images)]])
            offset += len(images)
            yield images
            del images  # before the next shard is read

    out = Path(job.out_dir)
    with npz_writer(out / "samples.npz") as npz:
        npz.stream("arr_0", (len(labels), *shape[1:]), dtype, shard_images())
        npz.write("labels", labels)
    save_grid(out / "grid.png", np.concatenate(grid), labels[in_grid], job.grid_per_class, job.grid_classes)
    print(f"{out / 'samples.npz'}: {len(labels)} samples from {len(job.shards)} shards")


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
