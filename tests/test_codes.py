"""Code sets and their extraction: the folder format, ImageFolder indexing, LlamaGen's ten-crop views, sharded
extraction and gathering, random views in training, and the teacher pool with or without its logits."""
import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from torchvision.transforms import TenCrop

from varkd import cli, distill, sources
from varkd.checkpoints import load_gpt, save_model
from varkd.codes import CodeSet, code_set_writer, load_code_set, save_code_set
from varkd.config import (CodeShardJob, ExtractCodesJob, GatherCodesJob, IndexImagesJob, MethodConfig, RolloutConfig,
                          PoolJob, TeacherLogitsJob, TermConfig)
from varkd.data import SPLITS, Split, center_crop_arr, save_splits
from varkd.loop import BatchOrder
from varkd.models.gpt import GPT, GPTConfig
from varkd.models.vq import VQModel
from varkd.steps import imagefolder
from varkd.steps.data import extract_codes
from varkd.steps.teacher import cache_teacher_logits, sample_pool
from varkd.steps.train import train_gpt
from tests.helpers import TINY, job, tiny_config

SIZE = 32  # tiny_config: 32x32 -> 8x8 codes
# class folder -> (mode, width, height, extension) of its images; created unsorted, some greyscale, one CMYK
TREE = {"zebra": [("RGB", 48, 40, ".JPEG"), ("L", 36, 90, ".png")],
        "ant": [("RGB", 100, 70, ".jpg"), ("CMYK", 35, 35, ".jpeg"), ("RGB", 64, 33, ".png")],
        "mole": [("L", 50, 50, ".JPEG"), ("RGB", 40, 120, ".png"), ("RGB", 77, 41, ".jpg")]}


@pytest.fixture
def image_tree(tmp_path):
    """An ImageFolder split of random-content images of varied sizes and modes, plus a file that is no image."""
    rng = np.random.default_rng(0)
    root = tmp_path / "train"
    for name, images in TREE.items():
        (root / name).mkdir(parents=True)
        for i, (mode, w, h, ext) in enumerate(images):
            channels = {"RGB": 3, "L": 1, "CMYK": 4}[mode]
            pixels = rng.integers(0, 256, (h, w, channels), dtype=np.uint8).squeeze(-1 if channels == 1 else ())
            Image.fromarray(pixels, mode).save(root / name / f"img{i}{ext}")
    (root / "ant" / "notes.txt").write_text("not an image")
    return root


@pytest.fixture
def tokenizer(tmp_path):
    torch.manual_seed(0)
    model = VQModel(tiny_config())
    save_model(tmp_path / "tokenizer.pt", model, model.config)
    return str(tmp_path / "tokenizer.pt"), model.eval()


def reference_views(path, augment):
    """LlamaGen's pipeline built directly: ADM centre crop to 1.1 x size, then torchvision's TenCrop."""
    image = Image.open(path).convert("RGB")
    if augment == "none":
        return center_crop_arr(image, SIZE)[None]
    crops = TenCrop(SIZE)(Image.fromarray(center_crop_arr(image, int(SIZE * 1.1))))
    return np.stack([np.asarray(c) for c in crops])


def test_index_lists_sorted_classes_and_files(image_tree, tmp_path):
    imagefolder.index_images(IndexImagesJob(root=str(image_tree), out=str(tmp_path / "index.npz")))
    index = np.load(tmp_path / "index.npz")
    assert index["classes"].tolist() == ["ant", "mole", "zebra"]
    expected = [(f"{name}/{f}", c) for c, name in enumerate(sorted(TREE))
                for f in sorted(f"img{i}{ext}" for i, (*_, ext) in enumerate(TREE[name]))]
    assert list(zip(index["paths"].tolist(), index["labels"].tolist())) == expected
    assert index["labels"].dtype == np.int64


def test_index_slices_each_class_into_disjoint_val_and_test_parts(image_tree, tmp_path):
    """ImageNet's val/ tree gives the val split (each class's first images) and the test split (the next ones)."""
    full = tmp_path / "all.npz"
    imagefolder.index_images(IndexImagesJob(root=str(image_tree), out=str(full)))
    paths, labels = np.load(full)["paths"].tolist(), np.load(full)["labels"]
    parts = {}
    for name, first, count in (("val", 0, 1), ("test", 1, 1)):
        imagefolder.index_images(IndexImagesJob(root=str(image_tree), first=first, count=count,
                                                out=str(tmp_path / f"{name}.npz")))
        parts[name] = np.load(tmp_path / f"{name}.npz")["paths"].tolist()
        assert np.load(tmp_path / f"{name}.npz")["labels"].tolist() == [0, 1, 2]
    assert parts["val"] == [paths[np.flatnonzero(labels == c)[0]] for c in range(3)]
    assert parts["test"] == [paths[np.flatnonzero(labels == c)[1]] for c in range(3)]
    with pytest.raises(ValueError, match="fewer than 9 images"):
        imagefolder.index_images(IndexImagesJob(root=str(image_tree), first=8, count=1, out=str(tmp_path / "x.npz")))


def test_index_errors_name_the_folder(image_tree, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nowhere does not exist: it must hold one sub-folder per class"):
        imagefolder.index_images(IndexImagesJob(root=str(tmp_path / "nowhere"), out=str(tmp_path / "i.npz")))
    (image_tree / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"train: .*no valid file for the classes empty"):
        imagefolder.index_images(IndexImagesJob(root=str(image_tree), out=str(tmp_path / "i.npz")))
    (tmp_path / "flat").mkdir()
    with pytest.raises(FileNotFoundError, match="flat: .*class folder"):
        imagefolder.index_images(IndexImagesJob(root=str(tmp_path / "flat"), out=str(tmp_path / "i.npz")))
    assert not (tmp_path / "i.npz").exists()


def test_views_are_llamagen_ten_crop_and_adm_centre_crop(image_tree):
    for path in sorted(image_tree.rglob("img*")):
        tencrop = imagefolder.image_views(path, SIZE, "tencrop", 1.1)
        assert tencrop.shape == (10, SIZE, SIZE, 3) and tencrop.dtype == np.uint8
        np.testing.assert_array_equal(tencrop, reference_views(path, "tencrop"))
        # crops of the h-flipped image follow the five crops: its top-left corner is the flipped top-right one
        np.testing.assert_array_equal(tencrop[5:9], tencrop[[1, 0, 3, 2], :, ::-1])
        np.testing.assert_array_equal(imagefolder.image_views(path, SIZE, "none", 1.1), reference_views(path, "none"))


def test_sharded_extraction_gathers_to_the_one_job_extraction(image_tree, tokenizer, tmp_path):
    tokenizer_path, vq = tokenizer
    index = str(tmp_path / "index.npz")
    imagefolder.index_images(IndexImagesJob(root=str(image_tree), out=index))

    def extract(shard, num_shards, workers):
        out = str(tmp_path / f"shard{shard}of{num_shards}.npz")
        imagefolder.extract_code_shard(CodeShardJob(tokenizer=tokenizer_path, index=index, root=str(image_tree),
                                                    image_size=SIZE, augment="tencrop", shard=shard,
                                                    num_shards=num_shards, batch_size=25, out=out), workers=workers)
        return out

    shards = [extract(i, 3, workers=0) for i in range(3)]
    assert [len(np.load(s)["labels"]) for s in shards] == [3, 3, 2]  # np.array_split's contiguous slices
    imagefolder.gather_codes(GatherCodesJob(shards=shards, out_dir=str(tmp_path / "gathered")))
    whole = np.load(extract(0, 1, workers=2))  # DataLoader workers decode the images
    gathered = load_code_set(tmp_path / "gathered")
    assert gathered.codes.dtype == np.int16 and (gathered.N, gathered.A, gathered.T) == (8, 10, 64)
    np.testing.assert_array_equal(gathered.codes, whole["codes"])
    np.testing.assert_array_equal(gathered.labels.numpy(), np.load(index)["labels"])

    # view k of each image is the code of the k-th crop encoded on its own
    paths = np.load(index)["paths"]
    for i, path in enumerate(paths):
        crops = reference_views(image_tree / path, "tencrop")
        for k in range(10):
            alone = vq.encode_to_codes(crops[k : k + 1], batch_size=1)[0]
            assert torch.equal(gathered.batch(np.array([i]), np.array([k]))[0], alone), (path, k)


def test_gather_names_the_odd_shard(tmp_path):
    np.savez(tmp_path / "a.npz", codes=np.zeros((2, 10, 4), np.int16), labels=np.zeros(2, np.int64))
    np.savez(tmp_path / "b.npz", codes=np.zeros((3, 1, 4), np.int16), labels=np.zeros(3, np.int64))
    with pytest.raises(ValueError, match=r"shard .*b.npz holds codes int16 \[3, 1, 4\], expected int16 \[3, 10, 4\]"):
        imagefolder.gather_codes(GatherCodesJob(shards=[str(tmp_path / "a.npz"), str(tmp_path / "b.npz")],
                                                out_dir=str(tmp_path / "set")))
    assert not (tmp_path / "set" / "labels.npy").exists() and not (tmp_path / "set" / "codes.npy").exists()


def test_cli_runs_the_extraction_commands(image_tree, tmp_path, capsys):
    config = tmp_path / "index.yaml"
    config.write_text(yaml.safe_dump({"root": str(tmp_path / "missing"), "out": str(tmp_path / "index.npz")}))
    assert cli.main(["index-images", str(config), "--device", "cpu"]) == 2
    assert "missing does not exist" in capsys.readouterr().err
    config.write_text(yaml.safe_dump({"root": str(image_tree), "out": str(tmp_path / "index.npz")}))
    assert cli.main(["index-images", str(config), "--device", "cpu"]) == 0
    assert cli.command("extract-code-shard")[0] is CodeShardJob and cli.command("gather-codes")[0] is GatherCodesJob


def test_embedded_extraction_writes_one_view_code_sets(tokenizer, tmp_path):
    tokenizer_path, vq = tokenizer
    rng = np.random.default_rng(1)
    splits = [Split(rng.integers(0, 256, (n, SIZE, SIZE, 3), dtype=np.uint8), rng.integers(0, 3, n)) for n in (6, 4, 5)]
    save_splits(tmp_path / "images.npz", dict(zip(SPLITS, splits)))
    extract_codes(ExtractCodesJob(tokenizer=tokenizer_path, images=str(tmp_path / "images.npz"),
                                       out_dir=str(tmp_path / "codes")), torch.device("cpu"))
    for split, images in zip(SPLITS, splits):
        codes = load_code_set(tmp_path / "codes" / split)
        assert (codes.N, codes.A, codes.T) == (len(images), 1, 64)
        assert torch.equal(codes.batch(np.arange(codes.N)), vq.encode_to_codes(images.images))
        assert torch.equal(codes.labels, torch.from_numpy(images.labels))


def test_missing_or_corrupt_code_set_files_are_named(codes):
    (codes / "val" / "labels.npy").unlink()
    with pytest.raises(FileNotFoundError, match=r"val/labels.npy does not exist"):
        load_code_set(codes / "val")
    (codes / "train" / "codes.npy").write_bytes(b"garbage")
    with pytest.raises(ValueError, match=r"train/codes.npy is corrupt"):
        load_code_set(codes / "train")
    np.save(codes / "train" / "codes.npy", np.zeros((5, 16), np.int16))
    with pytest.raises(ValueError, match=r"code set .*train: codes must be an integer array \[N, A, T\]"):
        load_code_set(codes / "train")


def test_a_failed_write_leaves_no_complete_looking_set(codes):
    """A rewrite removes labels.npy first, and codes.npy lands only when the block succeeds."""
    before = np.load(codes / "train" / "codes.npy")
    with pytest.raises(RuntimeError):
        with code_set_writer(codes / "train", np.zeros(4, np.int64), 1, 16, np.int16) as out:
            out[:] = 1
            raise RuntimeError("killed")
    assert not (codes / "train" / "labels.npy").exists()
    np.testing.assert_array_equal(np.load(codes / "train" / "codes.npy"), before)
    assert sorted(p.name for p in (codes / "train").iterdir()) == ["codes.npy"]  # no temporary file left


def test_code_range_reads_in_chunks_and_checks_the_vocabulary(codes):
    train = load_code_set(codes / "train")
    values = np.asarray(train.codes)
    assert train.code_range(chunk=7) == (values.min(), values.max()) == train.code_range()
    model = GPT(GPTConfig(**{**TINY, "vocab_size": 8}))
    with pytest.raises(ValueError, match=rf"code set .*train: codes span \[0, {values.max()}\], model vocab_size=8"):
        distill.check_codes(train, model)


def ten_view_set(n=48):
    """Row i, view a: every code is a (so a batch shows which view each sequence got)."""
    codes = np.broadcast_to(np.arange(10, dtype=np.int16)[None, :, None], (n, 10, 16)).copy()
    return CodeSet(codes, np.arange(n) % 3, "ten views")


def test_ground_truth_views_are_random_per_sequence_and_seeded_by_step():
    model = GPT(GPTConfig(**TINY))
    method = MethodConfig(terms=[TermConfig(divergence="ce")])

    def views(seed, step):
        data = sources.StepData(method, ten_view_set(), BatchOrder(48, 16, seed=0), student=model, teacher=None,
                                seed=seed, total_steps=10, validation=lambda: 1.0, device=torch.device("cpu"))
        batch = data(0, step)
        assert (batch.codes == batch.codes[:, :1]).all()  # one whole view per sequence
        return batch.codes[:, 0]

    assert torch.equal(views(5, 3), views(5, 3))  # a pure function of (seed, step): resumes draw the same
    assert not torch.equal(views(5, 3), views(5, 4)) and not torch.equal(views(5, 3), views(6, 3))
    drawn = torch.cat([views(5, s) for s in range(10)])
    assert set(drawn.tolist()) == set(range(10))
    assert (torch.bincount(drawn, minlength=10) > 5).all()  # about uniform: 16 of 160 each
    validation = ten_view_set()
    assert torch.equal(validation.batch(np.arange(4)), torch.zeros(4, 16, dtype=torch.long))  # view 0


def test_ten_view_ground_truth_logits_cache_holds_every_view(tmp_path):
    """Views are cached too ([N, A, 2, T, V]): a batch's targets are the teacher's logits on the view it drew."""
    n = 48
    rng = np.random.default_rng(0)
    save_code_set(tmp_path / "train", rng.integers(0, 16, (n, 10, 16)), rng.integers(0, 3, n), vocab_size=16)
    save_code_set(tmp_path / "val", rng.integers(0, 16, (8, 1, 16)), rng.integers(0, 3, 8), vocab_size=16)
    run = train_gpt(job(tmp_path, tmp_path / "ce", steps=2))
    cache_teacher_logits(TeacherLogitsJob(teacher=str(run), codes_train=str(tmp_path / "train"),
                                          out=str(tmp_path / "logits.npy")))
    assert np.load(tmp_path / "logits.npy", mmap_mode="r").shape == (n, 10, 2, 16, 16)
    train_set, teacher = load_code_set(tmp_path / "train"), load_gpt(run)
    method = MethodConfig(terms=[TermConfig(divergence="fkl")])
    data = sources.StepData(method, train_set, BatchOrder(n, 16, seed=0), student=teacher, teacher=None, seed=1,
                            total_steps=4, validation=lambda: 1.0, device=torch.device("cpu"))
    targets = distill.TeacherTargets(None, {"ground_truth": str(tmp_path / "logits.npy")}, train_set, null_class=3)
    batch = data(0, 2)
    assert len(set(batch.views.tolist())) > 1 and torch.equal(batch.codes, train_set.batch(batch.index, batch.views))
    live = distill.teacher_logits(teacher, batch.codes, batch.labels)
    cached = targets(batch, batch.codes, batch.labels)
    assert cached.dtype == torch.float16  # as stored: the losses upcast per position
    torch.testing.assert_close(cached.float(), live.float(), atol=0.02, rtol=0.01)
    student = train_gpt(job(tmp_path, tmp_path / "fkl", method="fkl", steps=2,
                            teacher_logits=str(tmp_path / "logits.npy")))
    assert torch.load(student, weights_only=True)["train"]["teacher_forwards"] == 0


def test_pool_without_logits_is_scored_by_the_live_teacher(codes, tmp_path):
    teacher = train_gpt(job(codes, tmp_path / "teacher", steps=2, checkpoint_name="teacher.pt"))
    rollout = RolloutConfig(null_fraction=0.3, teacher_pool=True)
    pool_dir = tmp_path / "pool"
    sample_pool(PoolJob(model=str(teacher), codes_train=str(codes / "train"), rollout=rollout,
                        out_dir=str(pool_dir), logits=False, batch_size=32))
    assert sorted(p.name for p in pool_dir.iterdir()) == ["codes.npy", "labels.npy"]
    pool = load_code_set(pool_dir)
    assert (pool.N, pool.A, pool.T) == (96, 1, 16)
    method = MethodConfig(terms=[TermConfig(data="teacher", divergence="fkl")], rollout=rollout)
    with pytest.raises(ValueError, match="pool_logits: false.*TrainJob.teacher is unset"):
        train_gpt(job(codes, tmp_path / "bad", method="pooled", kd=method, teacher_pool=str(pool_dir),
                      pool_logits=False))
    run = train_gpt(job(codes, tmp_path / "run", method="pooled", kd=method, steps=3, teacher=str(teacher),
                        teacher_pool=str(pool_dir), pool_logits=False))
    train = torch.load(run, weights_only=True)["train"]
    assert train["teacher_forwards"] == 3 and train["rollouts"] == 0  # pool sequences, live teacher targets


def test_sharded_teacher_pool_gathers_to_a_pool_of_the_same_labels(codes, tmp_path):
    teacher = train_gpt(job(codes, tmp_path / "teacher", steps=2, checkpoint_name="teacher.pt"))
    rollout = RolloutConfig(null_fraction=0.3, teacher_pool=True)
    base = PoolJob(model=str(teacher), codes_train=str(codes / "train"), rollout=rollout, seed=5,
                   out_dir=str(tmp_path / "whole"), logits=False, batch_size=32)
    sample_pool(base)
    sharded = dict(out_dir=str(tmp_path / "sharded"), num_shards=3)
    for i in range(3):
        sample_pool(PoolJob(**{**base.__dict__, **sharded, "shard": i}))
    shards = [str(tmp_path / "sharded" / "shards" / f"shard{i}.npz") for i in range(3)]
    imagefolder.gather_codes(GatherCodesJob(shards=shards, out_dir=str(tmp_path / "sharded")))
    whole, gathered = load_code_set(tmp_path / "whole"), load_code_set(tmp_path / "sharded")
    assert (gathered.N, gathered.A, gathered.T) == (whole.N, 1, 16)
    assert torch.equal(gathered.labels, whole.labels)  # the same null draws: only the sampling streams differ
    low, high = gathered.code_range()
    assert (gathered.labels == 3).sum() > 0 and 0 <= low and high < 16
    with pytest.raises(ValueError, match="sharded pool stores no logits"):
        sample_pool(PoolJob(**{**base.__dict__, **sharded, "logits": True}))
