"""Both datasets behind one interface: the shipped MNIST subset and an ImageFolder tree."""
import numpy as np
import pytest
from PIL import Image

from varkd.config import DataConfig
from varkd.data import load_splits, read_split, save_splits


def test_mnist_split_is_fixed_stratified_and_disjoint(tmp_path):
    cfg = DataConfig(source="mnist", image_size=32, num_classes=10, heldout_per_class=100, split_seed=0)
    train, val = load_splits(cfg)
    assert train.images.shape == (4000, 32, 32, 3) and val.images.shape == (1000, 32, 32, 3)
    assert train.images.dtype == np.uint8 and train.labels.dtype == np.int64
    assert np.bincount(val.labels).tolist() == [100] * 10
    assert (train.images[..., 0] == train.images[..., 2]).all()  # grey replicated to RGB
    assert train.images[:, :2].max() == 0  # zero padding around the 28x28 digits
    flat = {im.tobytes() for im in val.images}
    assert not any(im.tobytes() in flat for im in train.images[:500])
    again_train, again_val = load_splits(cfg)
    assert np.array_equal(again_val.images, val.images)
    other = load_splits(DataConfig(split_seed=1))[1]
    assert not np.array_equal(other.images, val.images)

    save_splits(tmp_path / "images.npz", train, val)
    back = read_split(tmp_path / "images.npz", "val")
    assert np.array_equal(back.images, val.images) and np.array_equal(back.labels, val.labels)


def test_imagefolder_tree_uses_the_same_interface(tmp_path):
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for cls in ("n01", "n02"):
            (tmp_path / split / cls).mkdir(parents=True)
            for i in range(3):
                pixels = rng.integers(0, 255, (40, 60, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(tmp_path / split / cls / f"{i}.png")
    cfg = DataConfig(source="imagefolder", root=str(tmp_path), image_size=16, num_classes=2)
    train, val = load_splits(cfg)
    assert train.images.shape == (6, 16, 16, 3) and train.images.dtype == np.uint8
    assert train.labels.tolist() == [0, 0, 0, 1, 1, 1]


def test_missing_imagefolder_root_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere/train"):
        load_splits(DataConfig(source="imagefolder", root=str(tmp_path / "nowhere"), num_classes=2))
