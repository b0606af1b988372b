"""The workflow's steps other than GPT training, each a function of its job config (one CLI command each)."""
from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import torch

from varkd.aggregate import TRAIN_COSTS
from varkd.checkpoints import load_gpt, load_model, load_vq, save_model
from varkd.classifier import Classifier, accuracy, classifier_loss
from varkd.codes import load_code_set, save_code_set
from varkd.config import (ClassifierJob, EvaluateJob, ExtractCodesJob, GatherSamplesJob, PrepareDataJob, SampleJob,
                          TokenizerJob, to_yaml)
from varkd.data import load_splits, read_split, save_splits
from varkd.distill import check_codes, validation_nll
from varkd.images import to_model_input
from varkd.io import atomic_path, atomic_save_npz, atomic_write_json, load_npz, provenance
from varkd.loop import BatchOrder, train
from varkd.models.gpt import GPT, GPTConfig
from varkd.models.vq import VQModel
from varkd.npz import npz_headers, npz_writer
from varkd.sampling import generate
from varkd.tokenizer import reconstruction_mse, tokenizer_loss


def prepare_data(job: PrepareDataJob, device: torch.device) -> None:
    train_split, val_split = load_splits(job.data)
    save_splits(job.out, train_split, val_split)
    print(f"{job.out}: {len(train_split)} train / {len(val_split)} held-out images {train_split.images.shape[1:]}")


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
    """The VQ tokenizer (LlamaGen architecture); held-out reconstruction MSE is logged."""
    torch.manual_seed(job.seed)  # the initial weights too: a job is a function of its config
    model = VQModel(job.tokenizer.model).to(device)
    val = read_split(job.images, "val")
    summary = _train_images(job.images, model, job.tokenizer.optim, job.out_dir, to_yaml(job), job.seed,
                            lambda m, x, y: tokenizer_loss(m, x), lambda: {"val_rec_mse": reconstruction_mse(model, val.images)},
                            device, "tokenizer")
    save_model(Path(job.out_dir) / "tokenizer.pt", model, job.tokenizer.model, train=summary)
    (Path(job.out_dir) / "checkpoint.pt").unlink(missing_ok=True)
    print(f"tokenizer: held-out reconstruction MSE {summary['val_rec_mse']:.4f}")


def extract_codes(job: ExtractCodesJob, device: torch.device) -> None:
    """Codes of every image, one code set per split (out_dir/train, out_dir/val), each image once (A = 1)."""
    vq = load_vq(job.tokenizer).to(device)
    for split in ("train", "val"):
        images = read_split(job.images, split)
        codes = vq.encode_to_codes(images.images, job.batch_size)
        used = len(torch.unique(codes))
        save_code_set(Path(job.out_dir) / split, codes[:, None].numpy(), images.labels, vq.config.codebook_size)
        print(f"codes {split}: {tuple(codes.shape)}, {used} of {vq.config.codebook_size} codes used")


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


def _sample_seed(job: SampleJob) -> int:
    """Unsharded: the seed samples always had, so earlier results reproduce. Shard i: an independent stream drawn
    from (run seed, sample seed, i), so shards differ and each one reruns identically."""
    cfg = job.sample
    if cfg.num_shards == 1:
        return job.seed * 10007 + cfg.seed
    return int(np.random.SeedSequence([job.seed, cfg.seed, job.shard]).generate_state(1, np.uint64)[0])


def sample(job: SampleJob, device: torch.device) -> None:
    """N class-balanced samples (plain AR decoding, KV cache, CFG) -> samples.npz (arr_0 uint8 NHWC) + grid.png.

    With sample.num_shards > 1 this job draws shard `job.shard`, a contiguous slice of the label list
    (np.array_split), into samples/shard<i>.npz (same keys; no grid), which gather_samples joins in order.
    sample.resize_to > 0 resizes the decoded images bicubic before the uint8 conversion (VQModel.decode_to_uint8).
    """
    cfg = job.sample
    model, vq = load_gpt(job.checkpoint).to(device), load_vq(job.tokenizer).to(device)
    if model.config.vocab_size != vq.config.codebook_size:
        raise ValueError(f"{job.checkpoint} vocab_size={model.config.vocab_size} != tokenizer {job.tokenizer} "
                         f"codebook_size={vq.config.codebook_size}")
    classes = model.config.num_classes
    labels = np.repeat(np.arange(classes), math.ceil(cfg.num_samples / classes))[: cfg.num_samples]
    labels = torch.from_numpy(np.array_split(labels, cfg.num_shards)[job.shard])
    generator = torch.Generator(device).manual_seed(_sample_seed(job))
    start, images = time.perf_counter(), []
    for i in range(0, len(labels), cfg.batch_size):
        codes = generate(model, labels[i : i + cfg.batch_size].to(device), cfg_scale=cfg.cfg_scale,
                         temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p, generator=generator)
        images.append(vq.decode_to_uint8(codes, size=cfg.resize_to).numpy())
    images, labels = np.concatenate(images), labels.numpy()
    seconds = time.perf_counter() - start
    out = Path(job.out_dir)
    path = out / "samples.npz" if cfg.num_shards == 1 else out / "samples" / f"shard{job.shard}.npz"
    atomic_save_npz(path, arr_0=images, labels=labels, sample_seconds=np.float64(seconds))
    if cfg.num_shards == 1:
        save_grid(out / "grid.png", images, labels, cfg.grid_per_class, cfg.grid_classes)
    print(f"{path}: {images.shape} in {seconds:.1f} s")


def gather_samples(job: GatherSamplesJob, device: torch.device) -> None:
    """Sample shards, in order -> out_dir/samples.npz (ADM layout: arr_0 uint8 NHWC, labels; sample_seconds their
    sum) + grid.png. One shard is in memory at a time (50k samples at 256px are 9.8 GB): arr_0 is streamed."""
    if not job.shards:
        raise ValueError("gather-samples needs at least one shard")
    headers = [npz_headers(p, ["arr_0", "labels", "sample_seconds"]) for p in job.shards]
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
    small = [load_npz(p, ["labels", "sample_seconds"]) for p in job.shards]
    labels = np.concatenate([s["labels"] for s in small])
    seconds = sum(float(s["sample_seconds"]) for s in small)
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
        npz.write("sample_seconds", np.float64(seconds))
    save_grid(out / "grid.png", np.concatenate(grid), labels[in_grid], job.grid_per_class, job.grid_classes)
    print(f"{out / 'samples.npz'}: {len(labels)} samples from {len(job.shards)} shards")


def evaluate(job: EvaluateJob, device: torch.device) -> None:
    """FID / IS / precision / recall, plus the model's validation NLL. The real side is ADM's reference batch
    (evaluate.reference_batch, scored as ADM's evaluator does: IS splits of 5,000, so evaluate.isc_splits is unused)
    when set, else the held-out split of job.reference. The real side and the extractor's weights are checked
    before the samples are read."""
    from varkd.metrics import compute_metrics, local_weights, read_reference_batch, reference_batch_metrics

    start, cfg = time.perf_counter(), job.evaluate
    weights = cfg.weights or job.classifier
    if cfg.reference_batch:  # (EvaluateConfig refuses kid here: ADM's evaluator has none)
        reference = read_reference_batch(cfg.reference_batch)
    elif job.reference is None:
        raise ValueError("an evaluate job needs reference (an images.npz) or evaluate.reference_batch")
    local_weights(cfg.feature_extractor, weights)
    generated = load_npz(job.samples, [job.samples_key])[job.samples_key]
    if job.num_samples and len(generated) > job.num_samples:
        pick = np.random.default_rng(job.seed).choice(len(generated), job.num_samples, replace=False)
        generated = generated[np.sort(pick)]
    result = {**job.identity}
    if cfg.reference_batch:
        result.update(reference_batch_metrics(generated, reference, feature_extractor=cfg.feature_extractor,
                                              weights_path=weights, device=device.type,
                                              prc_neighborhood=cfg.prc_neighborhood))
    else:
        real = read_split(job.reference, "val").images
        result.update(compute_metrics(generated, real, feature_extractor=cfg.feature_extractor, weights_path=weights,
                                      device=device.type, kid=cfg.kid, prc_neighborhood=cfg.prc_neighborhood,
                                      isc_splits=cfg.isc_splits, seed=job.seed))
    if job.checkpoint:
        model, ckpt = load_model(job.checkpoint, GPTConfig, GPT, "GPT checkpoint")
        codes = load_code_set(job.codes_val)
        check_codes(codes, model)
        result["val_nll"] = validation_nll(model.eval().to(device), codes, device=device)
        train_summary = ckpt.get("train", {})  # cost of the run, to set quality against
        for key in TRAIN_COSTS:
            result[f"train_{key}"] = train_summary.get(key)
    result["eval_wall_s"] = round(time.perf_counter() - start, 2)
    result["provenance"] = provenance(device.type)
    atomic_write_json(job.out, result)
    print(f"{job.out}: " + ", ".join(f"{k}={result[k]:.4g}" for k in ("fid", "isc_mean", "precision", "recall")
                                     if isinstance(result.get(k), float)))
