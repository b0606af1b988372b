"""Steps that make a run's samples: class-balanced AR samples as images (samples.npz, grid.png), whole or by shard."""
from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import torch

from varkd.checkpoints import load_gpt, load_vq
from varkd.config import GatherSamplesJob, SampleConfig, SampleJob
from varkd.decode import Decoder, generate
from varkd.io import atomic_path, atomic_save_npz, load_npz
from varkd.models.gpt import GPT
from varkd.models.vq import VQModel
from varkd.npz import npz_headers, npz_writer


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
        codes = generate(decoder, torch.from_numpy(labels[i : i + cfg.batch_size]).to(device), cfg.sampling,
                         generator=generator)
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
