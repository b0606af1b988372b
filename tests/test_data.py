"""The embedded data sets: fixed, stratified, disjoint train / val / test splits, digits alone or on photographs."""
import numpy as np
import pytest

from varkd.config import ConfigError, DataConfig
from varkd.data import SPLITS, load_digits, photographs, read_split, save_splits


@pytest.fixture(scope="module")
def splits():
    return list(load_digits(DataConfig(source="mnist_photo", split_seed=0)).values())


@pytest.mark.slow
def test_splits_are_fixed_stratified_and_disjoint(splits, tmp_path):
    train, val, test = splits
    assert [s.images.shape for s in splits] == [(3500, 32, 32, 3), (500, 32, 32, 3), (1000, 32, 32, 3)]
    assert [s.views for s in splits] == [1, 1, 1]
    assert train.images.dtype == np.uint8 and train.labels.dtype == np.int64
    assert np.bincount(val.labels).tolist() == [50] * 10 and np.bincount(test.labels).tolist() == [100] * 10
    seen = [{im.tobytes() for im in s.images} for s in splits]
    assert not (seen[0] & seen[1]) and not (seen[0] & seen[2]) and not (seen[1] & seen[2])
    again = load_digits(DataConfig(source="mnist_photo", split_seed=0)).values()
    assert all(np.array_equal(a.images, b.images) and np.array_equal(a.labels, b.labels)
               for a, b in zip(splits, again))
    other = load_digits(DataConfig(source="mnist_photo", split_seed=1))["test"]
    assert not np.array_equal(other.images, test.images)

    save_splits(tmp_path / "images.npz", dict(zip(SPLITS, splits)))
    for name, split in zip(SPLITS, splits):
        back = read_split(tmp_path / "images.npz", name)
        assert np.array_equal(back.images, split.images) and np.array_equal(back.labels, split.labels)
        assert back.views == split.views


@pytest.mark.slow
def test_digits_sit_on_dimmed_photograph_patches(splits):
    """Grey RGB; the digits are the same as plain MNIST's where they are bright, the background is texture (no
    position of the grid is a flat black area across images, as MNIST's border is)."""
    photo_train = splits[0]
    plain_train = load_digits(DataConfig(source="mnist", split_seed=0))["train"]
    assert np.array_equal(photo_train.labels, plain_train.labels)  # the same digits in the same splits
    photo, plain = photo_train.images.astype(int), plain_train.images.astype(int)
    assert (photo[..., 0] == photo[..., 2]).all()
    assert (photo >= plain).all()  # max(patch, digit)
    strokes = plain == 255
    assert (photo[strokes] == 255).all()
    assert plain[:, :2].max() == 0 and photo[:, :2].mean() > 10  # MNIST's border is black; here it is texture
    assert photo[plain == 0].max() <= round(0.35 * 255)  # the background is dimmed below the strokes
    assert (photo[:, :4, :4].reshape(len(photo), -1).std(axis=1) > 0).mean() > 0.9  # corners hold texture


@pytest.mark.slow
def test_training_views_shift_each_digit_over_new_patches():
    """train_views images per training digit, each shifted by at most max_shift px over its own patch; the same
    digits (labels, count) as without views, val and test one view each."""
    cfg = DataConfig(source="mnist_photo", train_views=3, max_shift=2)
    splits = load_digits(cfg)
    plain = load_digits(DataConfig(source="mnist"))
    train = splits["train"]
    assert train.views == 3 and len(train) == 3 * len(plain["train"]) and splits["test"].views == 1
    assert np.array_equal(train.labels, np.repeat(plain["train"].labels, 3))
    for i in range(20):  # each view: the digit shifted within [-2, 2]^2, the background below the strokes
        digit = plain["train"].images[i, ..., 0].astype(int)
        for v in range(3):
            view = train.images[3 * i + v, ..., 0].astype(int)
            shifts = [(dy, dx) for dy in range(-2, 3) for dx in range(-2, 3)
                      if (view[np.roll(digit, (dy, dx), (0, 1)) == 255] == 255).all()]
            assert shifts, (i, v)
    assert not np.array_equal(train.images[0], train.images[1])  # other patch (and shift)
    with pytest.raises(ConfigError, match="max_shift"):
        DataConfig(max_shift=3)


def test_photographs_come_from_the_installed_wheel():
    photos = photographs(["camera", "coffee"], side=64)
    assert [p.shape[:2] for p in photos] == [(64, 64), (64, 96)] and all(p.dtype == np.uint8 for p in photos)
    with pytest.raises(ValueError, match="no bundled image 'nope'"):
        photographs(["nope"], side=64)


def test_bad_split_sizes_and_backgrounds_are_named():
    with pytest.raises(ValueError, match="val_per_class=300 \\+ data.test_per_class=300"):
        load_digits(DataConfig(source="mnist", val_per_class=300, test_per_class=300))
    with pytest.raises(ConfigError, match="background_intensity"):
        DataConfig(background_intensity=0.0)
    with pytest.raises(ConfigError, match="data.source='mnist_m'"):
        DataConfig(source="mnist_m")
