"""Sharded sampling, gathering shards into one ADM-layout samples.npz, and the streaming npz writer behind it."""
import zipfile

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from varkd import cli
from varkd.checkpoints import load_gpt, load_vq, save_model
from varkd.config import GatherSamplesJob, SampleConfig, SampleJob, to_yaml
from varkd.decode import generate
from varkd.images import to_uint8
from varkd.steps.sample import TEST_STREAM, VAL_STREAM, gather_samples, sample, sample_seed
from varkd.models.vq import VQModel
from varkd.npz import npz_headers, npz_rows, npz_writer

from tests.helpers import tiny_config, tiny_model

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A tiny GPT over the tiny VQ's 8x8 grid of 64 codes (32px images), two classes, and the tokenizer."""
    root = tmp_path_factory.mktemp("models")
    gpt = tiny_model(vocab_size=64, block_size=64, num_classes=2)
    save_model(root / "gpt.pt", gpt, gpt.config)
    torch.manual_seed(1)
    vq = VQModel(tiny_config())
    save_model(root / "vq.pt", vq, vq.config)
    return str(root / "gpt.pt"), str(root / "vq.pt")


def sample_job(models, out, shard=0, **sample):
    config = SampleConfig(**{**dict(num_samples=6, batch_size=4, cfg_scale=1.0, grid_per_class=2), **sample})
    return SampleJob(sample=config, checkpoint=models[0], tokenizer=models[1], seed=3, shard=shard, out_dir=str(out))


def load(path):
    with np.load(path, allow_pickle=False) as f:
        return {k: f[k] for k in f.files}


def test_unsharded_sampling_draws_its_stream_and_validation_samples_from_another(models, tmp_path):
    job = sample_job(models, tmp_path, val_num_samples=4)
    sample(job, CPU)
    out = load(tmp_path / "samples.npz")
    assert (tmp_path / "grid.png").is_file() and not (tmp_path / "samples").exists()
    labels = torch.tensor([0, 0, 0, 1, 1, 1])
    generator = torch.Generator().manual_seed(sample_seed(job.seed, job.sample, TEST_STREAM))
    codes = torch.cat([generate(load_gpt(models[0]), labels[i : i + 4], generator=generator) for i in (0, 4)])
    assert np.array_equal(out["arr_0"], load_vq(models[1]).decode_to_uint8(codes).numpy())
    assert list(out) == ["arr_0", "labels"] and np.array_equal(out["labels"], labels.numpy())
    val = load(tmp_path / "samples_val.npz")
    generator = torch.Generator().manual_seed(sample_seed(job.seed, job.sample, VAL_STREAM))
    codes = generate(load_gpt(models[0]), torch.tensor([0, 0, 1, 1]), generator=generator)
    assert np.array_equal(val["arr_0"], load_vq(models[1]).decode_to_uint8(codes).numpy())
    assert np.array_equal(val["labels"], [0, 0, 1, 1])
    first = (tmp_path / "samples.npz").read_bytes()
    sample(job, CPU)  # a rerun writes the same bytes
    assert (tmp_path / "samples.npz").read_bytes() == first


def test_three_shards_gather_into_the_label_order(models, tmp_path):
    shards = [tmp_path / "samples" / f"shard{i}.npz" for i in range(3)]
    for i in range(3):
        sample(sample_job(models, tmp_path, shard=i, num_shards=3), CPU)
    parts = [load(p) for p in shards]
    assert [len(p["labels"]) for p in parts] == [2, 2, 2] and not (tmp_path / "samples.npz").exists()
    # Shards 0 and 1 both start with class 0: different seeds draw different images.
    assert parts[0]["labels"][0] == parts[1]["labels"][0] == 0
    assert not np.array_equal(parts[0]["arr_0"][0], parts[1]["arr_0"][0])
    # A shard reruns identically.
    sample(sample_job(models, tmp_path / "again", shard=1, num_shards=3), CPU)
    again = load(tmp_path / "again" / "samples" / "shard1.npz")
    assert np.array_equal(again["arr_0"], parts[1]["arr_0"]) and np.array_equal(again["labels"], parts[1]["labels"])

    job = GatherSamplesJob(shards=[str(p) for p in shards], grid_per_class=2, out_dir=str(tmp_path / "gathered"))
    (tmp_path / "gather.yaml").write_text(to_yaml(job))
    assert cli.main(["gather-samples", str(tmp_path / "gather.yaml"), "--device", "cpu"]) == 0
    gathered = load(tmp_path / "gathered" / "samples.npz")
    assert np.array_equal(gathered["labels"], [0, 0, 0, 1, 1, 1])
    assert gathered["arr_0"].dtype == np.uint8 and gathered["arr_0"].shape == (6, 32, 32, 3)
    assert np.array_equal(gathered["arr_0"], np.concatenate([p["arr_0"] for p in parts]))
    from PIL import Image

    grid = Image.open(tmp_path / "gathered" / "grid.png")  # 2 classes x 2 samples of 32px, scaled 4x, padding 2
    assert grid.size == (4 * (2 * 34 + 2), 4 * (2 * 34 + 2))
    job.grid_classes, job.out_dir = 1, str(tmp_path / "one-class")
    gather_samples(job, CPU)
    assert Image.open(tmp_path / "one-class" / "grid.png").size == (4 * (2 * 34 + 2), 4 * (34 + 2))


def test_gathered_file_loads_like_savez(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (7, 5, 4, 3), dtype=np.uint8)
    labels = np.array([2, 0, 1, 0, 2, 1, 1])
    for i, part in enumerate((slice(0, 3), slice(3, 3), slice(3, 7))):  # an empty shard too
        np.savez(tmp_path / f"shard{i}.npz", arr_0=images[part], labels=labels[part])
    gather_samples(GatherSamplesJob(shards=[str(tmp_path / f"shard{i}.npz") for i in range(3)], grid_per_class=1,
                                    out_dir=str(tmp_path / "out")), CPU)
    np.savez(tmp_path / "savez.npz", arr_0=images, labels=labels)
    ours, theirs = load(tmp_path / "out" / "samples.npz"), load(tmp_path / "savez.npz")
    assert list(ours) == list(theirs) == ["arr_0", "labels"]
    for key in theirs:
        assert ours[key].dtype == theirs[key].dtype and ours[key].shape == theirs[key].shape
        assert np.array_equal(ours[key], theirs[key])
    with zipfile.ZipFile(tmp_path / "out" / "samples.npz") as a, zipfile.ZipFile(tmp_path / "savez.npz") as b:
        for name in b.namelist():  # byte for byte the same members (npy header and data), stored uncompressed
            assert a.read(name) == b.read(name) and a.getinfo(name).compress_type == zipfile.ZIP_STORED


def test_gather_rejects_odd_shards_by_name(tmp_path):
    good = dict(arr_0=np.zeros((2, 8, 8, 3), np.uint8), labels=np.zeros(2, np.int64))
    np.savez(tmp_path / "good.npz", **good)
    odd = {
        "small.npz": {**good, "arr_0": np.zeros((2, 4, 4, 3), np.uint8)},
        "float.npz": {**good, "arr_0": np.zeros((2, 8, 8, 3), np.float32)},
        "labels.npz": {**good, "labels": np.zeros(3, np.int64)},
    }
    for name, arrays in odd.items():
        np.savez(tmp_path / name, **arrays)
        job = GatherSamplesJob(shards=[str(tmp_path / "good.npz"), str(tmp_path / name)], out_dir=str(tmp_path / "o"))
        with pytest.raises(ValueError, match=f"shard .*{name}"):
            gather_samples(job, CPU)
    first_bad = GatherSamplesJob(shards=[str(tmp_path / "float.npz")], out_dir=str(tmp_path / "o"))
    with pytest.raises(ValueError, match=r"float\.npz\[arr_0\] must be uint8"):
        gather_samples(first_bad, CPU)
    missing = GatherSamplesJob(shards=[str(tmp_path / "good.npz"), str(tmp_path / "gone.npz")], out_dir=str(tmp_path))
    with pytest.raises(FileNotFoundError, match="gone.npz"):
        gather_samples(missing, CPU)
    np.savez(tmp_path / "no-labels.npz", arr_0=good["arr_0"])
    with pytest.raises(KeyError, match=r"no-labels\.npz.*labels"):
        gather_samples(GatherSamplesJob(shards=[str(tmp_path / "no-labels.npz")], out_dir=str(tmp_path)), CPU)
    assert not (tmp_path / "o").exists()


def test_resize_to_resizes_bicubic_before_uint8(models, tmp_path):
    sample(sample_job(models, tmp_path, num_samples=2, resize_to=48), CPU)
    out = load(tmp_path / "samples.npz")
    assert out["arr_0"].shape == (2, 48, 48, 3) and out["arr_0"].dtype == np.uint8
    vq, codes = load_vq(models[1]), torch.randint(0, 64, (3, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        decoded = vq.decode_code(codes, shape=(3, vq.config.codebook_embed_dim, 8, 8))
    expected = to_uint8(F.interpolate(decoded, size=(48, 48), mode="bicubic"))  # LlamaGen's order of operations
    assert torch.equal(vq.decode_to_uint8(codes, size=48), expected)


def test_bad_shard_settings_fail_before_loading_models(tmp_path):
    missing = ("no-gpt.pt", "no-vq.pt")
    with pytest.raises(ValueError, match="shard 3 is not one of sample.num_shards=3"):
        sample(sample_job(missing, tmp_path, shard=3, num_shards=3), CPU)
    with pytest.raises(ValueError, match="num_samples=2 leaves some of num_shards=3 empty"):
        sample(sample_job(missing, tmp_path, num_samples=2, num_shards=3), CPU)


def test_npz_writer_checks_the_streamed_size_and_leaves_nothing_behind(tmp_path):
    path = tmp_path / "x.npz"
    with pytest.raises(ValueError, match=r"x\.npz\[a\]: chunks hold 24 bytes.*needs 32"):
        with npz_writer(path) as npz:
            npz.stream("a", (4, 2), np.int32, [np.zeros((3, 2), np.int32)])
    with pytest.raises(ValueError, match=r"x\.npz\[a\]: chunk int64"):
        with npz_writer(path) as npz:
            npz.stream("a", (4, 2), np.int32, [np.zeros((4, 2), np.int64)])
    assert list(tmp_path.iterdir()) == []
    with npz_writer(path) as npz:
        npz.stream("a", (4, 2), np.int32, [np.ones((1, 2), np.int32), np.ones((3, 2), np.int32)])
        npz.write("b", np.float64(2.5))
    assert npz_headers(path, ["a", "b"]) == {"a": ((4, 2), np.dtype(np.int32)), "b": ((), np.dtype(np.float64))}
    assert load(path)["b"] == 2.5 and load(path)["a"].sum() == 8


@pytest.mark.parametrize("save", [np.savez, np.savez_compressed])
def test_npz_rows_are_the_loaded_arrays_rows(save, tmp_path):
    path, rows = tmp_path / "x.npz", [7, 0, 3, 3, 11]
    array = np.random.default_rng(0).integers(0, 256, (12, 5, 4, 3), dtype=np.uint8)
    save(path, arr_0=array, labels=np.arange(12))
    assert np.array_equal(npz_rows(path, "arr_0", rows), array[rows])
    assert npz_rows(path, "arr_0", []).shape == (0, 5, 4, 3)
    with pytest.raises(IndexError, match=r"x\.npz\[arr_0\]: rows \[12\] outside its 12"):
        npz_rows(path, "arr_0", [12])
    with pytest.raises(KeyError, match="lacks arrays"):
        npz_rows(path, "images", [0])
