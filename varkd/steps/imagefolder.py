"""An ImageNet-style folder into a code set at paper scale: index the split, extract shards of it, gather them.

LlamaGen's extraction (docs/llamagen.md A.5): the ADM centre crop to int(crop_range * image_size), then
TenCrop(image_size) in torchvision's order (4 corners and the centre, then the same five of the h-flipped image),
each view VQ-encoded; without ten-crop the image once, at the ADM centre crop. Shards are contiguous slices of
the sorted index, so gathering them in order gives what one job would have extracted.
"""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from varkd.checkpoints import load_vq
from varkd.codes import code_dtype, code_set_writer
from varkd.config import CodeShardJob, GatherCodesJob, IndexImagesJob
from varkd.data import center_crop_arr
from varkd.io import atomic_save_npz, load_npz
from varkd.npz import npz_headers


def index_images(job: IndexImagesJob, device: Optional[torch.device] = None) -> None:
    """Sorted class folders -> ids 0..C-1 and their images in torchvision ImageFolder's order (each class's slice
    [first, first + count) of them), to index.npz."""
    from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset

    root = Path(job.root)
    if not root.is_dir():
        raise FileNotFoundError(f"ImageFolder root {root} does not exist: it must hold one sub-folder per class "
                                "(ImageNet train/ or val/)")
    try:
        classes, class_to_idx = find_classes(str(root))
        samples = make_dataset(str(root), class_to_idx, extensions=IMG_EXTENSIONS)
    except FileNotFoundError as err:  # no class folder, or one without images
        raise FileNotFoundError(f"ImageFolder root {root}: {err}") from None
    paths = np.array([os.path.relpath(path, root) for path, _ in samples])
    labels = np.array([label for _, label in samples], dtype=np.int64)
    keep = np.concatenate([np.flatnonzero(labels == c)[job.first : job.first + job.count if job.count else None]
                           for c in range(len(classes))])
    short = [classes[c] for c in range(len(classes)) if np.sum(labels[keep] == c) < max(job.count, 1)]
    if short:
        raise ValueError(f"ImageFolder root {root}: classes {short[:5]}{'...' if len(short) > 5 else ''} have fewer "
                         f"than {job.first + max(job.count, 1)} images (images [{job.first}, "
                         f"{job.first + job.count}) of each class were asked for)")
    paths, labels = paths[keep], labels[keep]
    atomic_save_npz(job.out, paths=paths, labels=labels, classes=np.array(classes))
    print(f"{job.out}: {len(paths)} images in {len(classes)} classes under {root}")


def image_views(path: str | Path, image_size: int, augment: str, crop_range: float) -> np.ndarray:
    """uint8 [A, image_size, image_size, 3]: the views of one image file that extraction encodes."""
    from PIL import Image
    from torchvision.transforms.functional import ten_crop

    try:
        with Image.open(path) as file:
            image = file.convert("RGB")  # ImageNet holds a few CMYK and greyscale JPEGs
    except OSError as err:
        raise ValueError(f"image {path} cannot be read: {err}") from None
    if augment == "none":
        return center_crop_arr(image, image_size)[None]
    crop = torch.from_numpy(center_crop_arr(image, int(image_size * crop_range))).permute(2, 0, 1)
    return torch.stack(ten_crop(crop, image_size)).permute(0, 2, 3, 1).numpy()


class ImageViews(torch.utils.data.Dataset):
    """The views of each listed file, decoded in DataLoader workers so the GPU is not fed by one CPU thread."""

    def __init__(self, files: list[Path], image_size: int, augment: str, crop_range: float):
        self.files, self.options = files, (image_size, augment, crop_range)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.from_numpy(image_views(self.files[i], *self.options))


def extract_code_shard(job: CodeShardJob, device: torch.device = torch.device("cpu"),
                       workers: Optional[int] = None) -> None:
    """Codes [n, A, T] of shard `job.shard` of the index (np.array_split's slices) and their labels, to job.out.

    workers: DataLoader processes decoding images (None: torch's thread count, which the CLI's --threads sets).
    """
    index = load_npz(job.index, ["paths", "labels"])
    rows = np.array_split(np.arange(len(index["labels"])), job.num_shards)[job.shard]
    vq = load_vq(job.tokenizer).to(device)
    if job.image_size % vq.config.downsample:
        raise ValueError(f"image_size={job.image_size} is not a multiple of the tokenizer {job.tokenizer}'s "
                         f"downsampling factor {vq.config.downsample}")
    num_views = 10 if job.augment == "tencrop" else 1
    codes = np.empty((len(rows), num_views, (job.image_size // vq.config.downsample) ** 2),
                     dtype=code_dtype(vq.config.codebook_size))
    files = [Path(job.root) / p for p in index["paths"][rows]]
    views = ImageViews(files, job.image_size, job.augment, job.crop_range)
    loader = torch.utils.data.DataLoader(views, batch_size=max(1, job.batch_size // num_views),
                                         num_workers=torch.get_num_threads() if workers is None else workers,
                                         pin_memory=device.type == "cuda")
    start, done = time.perf_counter(), 0
    for batch in loader:
        encoded = vq.encode_to_codes(batch.flatten(0, 1).to(device, non_blocking=True), job.batch_size)
        codes[done : done + len(batch)] = encoded.view(len(batch), num_views, -1).numpy()
        done += len(batch)
    atomic_save_npz(job.out, codes=codes, labels=index["labels"][rows])
    seconds = time.perf_counter() - start
    print(f"{job.out}: shard {job.shard} of {job.num_shards}, {len(rows)} images x {num_views} views in "
          f"{seconds:.1f} s ({len(rows) / max(seconds, 1e-9):.1f} images/s)")


def gather_codes(job: GatherCodesJob, device: Optional[torch.device] = None) -> None:
    """The shards, in order, streamed into the code set job.out_dir (one shard in memory at a time)."""
    if not job.shards:
        raise ValueError("gather-codes: the job lists no shards")
    headers = [npz_headers(path, ["codes", "labels"]) for path in job.shards]  # every shard checked before writing
    shape, dtype = headers[0]["codes"]
    if len(shape) != 3:
        raise ValueError(f"shard {job.shards[0]} holds codes of shape {shape}, expected [n, A, T]")
    _, num_views, length = shape
    for path, header in zip(job.shards, headers):
        (codes_shape, codes_dtype), (labels_shape, _) = header["codes"], header["labels"]
        expected = (labels_shape[0], num_views, length)
        if codes_shape != expected or codes_dtype != dtype:
            raise ValueError(f"shard {path} holds codes {codes_dtype} {list(codes_shape)}, expected "
                             f"{dtype} {list(expected)} like {job.shards[0]} (and its own labels)")
    labels = np.concatenate([load_npz(path, ["labels"])["labels"] for path in job.shards])
    with code_set_writer(job.out_dir, labels, num_views, length, dtype) as out:
        start = 0
        for path in job.shards:
            codes = load_npz(path, ["codes"])["codes"]
            out[start : start + len(codes)] = codes
            start += len(codes)
    print(f"{job.out_dir}: {start} images x {num_views} views x {length} codes from {len(job.shards)} shards")
