"""Datasets on disk: both CIFAR layouts, image folders, in memory and streamed, and their errors."""

import pickle

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from PIL import Image

from bqat.data import build_data
from bqat.errors import UserError
from conftest import CONF, ROOT, run_cli
from fake_data import CIFAR10_CLASSES, cifar_images, write_cifar10_python, write_image_tree


def data_cfg(name, root, **overrides):
    cfg = OmegaConf.load(CONF / "data" / f"{name}.yaml")
    cfg.root = str(root)
    cfg.batch_size = 8
    cfg.num_workers = 0
    cfg.cache_dir = None
    for k, v in overrides.items():
        cfg[k] = v
    return cfg


def to_uint8(x, cfg):
    """Undo the normalisation: float batch -> uint8 pixels (exact when nothing was interpolated)."""
    mean = torch.tensor(cfg.mean).view(1, 3, 1, 1)
    std = torch.tensor(cfg.std).view(1, 3, 1, 1)
    pixels = (x * std + mean) * 255
    assert (pixels - pixels.round()).abs().max() < 1e-3  # normalised with exactly data.mean/std
    return pixels.round().to(torch.uint8)


def find_padded_crop(img, candidates, pad=4):
    """(mirrored, shift) when img is a pad-pixel zero-padded crop of a candidate or its mirror image, else None."""
    for cand in candidates:
        for mirrored, src in ((False, cand), (True, cand.flip(-1))):
            padded = F.pad(src, (pad, pad, pad, pad))
            h, w = src.shape[-2:]
            for i in range(2 * pad + 1):
                for j in range(2 * pad + 1):
                    if torch.equal(padded[:, i : i + h, j : j + w], img):
                        return mirrored, (i - pad, j - pad)
    return None


@pytest.fixture(scope="module")
def cifar_on_disk(tmp_path_factory):
    """The same 30 train / 20 test images as a python release and as a PNG folder tree."""
    root = tmp_path_factory.mktemp("cifar")
    train, test = cifar_images(3, seed=0), cifar_images(2, seed=1)
    write_cifar10_python(root / "python", train, test)
    write_image_tree(root / "tree", "train", *train, CIFAR10_CLASSES)
    write_image_tree(root / "tree", "test", *test, CIFAR10_CLASSES)
    return root, train, test


@pytest.mark.parametrize("in_memory", [True, False], ids=["in_memory", "streamed"])
@pytest.mark.parametrize("layout", ["python", "tree"])
def test_cifar_layouts_give_the_stored_images_labels_and_standard_augmentation(cifar_on_disk, layout, in_memory):
    root, (train_x, train_y), (test_x, test_y) = cifar_on_disk
    cfg = data_cfg("cifar10", root / layout, in_memory=in_memory)
    data = build_data(cfg, seed=0)
    assert (data.num_classes, data.input_size, data.name) == (10, (3, 32, 32), "cifar10")
    assert (len(data.train), len(data.val)) == (30 // 8, 3)  # train drops the last partial batch

    # Validation: every test image exactly once, with its label, only normalised.
    stored = {test_x[i].tobytes(): int(test_y[i]) for i in range(len(test_y))}
    seen = []
    for x, y in data.val:
        for img, label in zip(to_uint8(x, cfg), y):
            key = img.permute(1, 2, 0).numpy().tobytes()
            assert stored[key] == int(label)
            seen.append(key)
    assert sorted(seen) == sorted(stored)

    # Training: each image is a 4-pixel padded random crop, maybe mirrored, of a train image of its class.
    originals = torch.from_numpy(train_x).permute(0, 3, 1, 2)
    labels = torch.from_numpy(train_y)
    found = []
    for x, y in data.train:
        assert x.shape == (8, 3, 32, 32) and x.dtype == torch.float32
        for img, label in zip(to_uint8(x, cfg), y):
            found.append(find_padded_crop(img, originals[labels == label]))
    assert None not in found and len(found) == 24
    assert {mirrored for mirrored, _ in found} == {False, True}  # 24 coin flips
    assert len({shift for _, shift in found}) > 5  # 81 possible shifts


def test_in_memory_augmentation_varies_and_restarts_with_reseed(cifar_on_disk):
    root, _, _ = cifar_on_disk
    data = build_data(data_cfg("cifar10", root / "python", batch_size=30), seed=0)
    first = [b for b in data.train]
    again = [b for b in data.train]
    assert not torch.equal(first[0][0], again[0][0])  # a new permutation and new crops every epoch
    data.train.reseed(0)
    replay = [b for b in data.train]
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(first, replay))
    # 30 images, 4-pixel shifts and flips: the black border shows up somewhere, not everywhere.
    cfg = data_cfg("cifar10", root / "python")
    pixels = to_uint8(first[0][0], cfg)
    black_cols = (pixels.sum(dim=(1, 2)) == 0)  # (N, W): all-black columns
    assert 0 < black_cols.any(1).sum() < 30


def test_jpeg_tree_decodes_like_pil_and_is_cached(tmp_path, monkeypatch):
    train, test = cifar_images(1, seed=2), cifar_images(1, seed=3)
    write_image_tree(tmp_path / "jpg", "train", *train, CIFAR10_CLASSES, ext="jpg")
    write_image_tree(tmp_path / "jpg", "test", *test, CIFAR10_CLASSES, ext="jpg")
    cfg = data_cfg("cifar10", tmp_path / "jpg", cache_dir=str(tmp_path / "cache"))
    data = build_data(cfg, seed=0)
    pil = np.stack([np.asarray(Image.open(tmp_path / "jpg" / "train" / c / f"{i:04d}.jpg").convert("RGB"))
                    for i, c in enumerate(CIFAR10_CLASSES)])
    decoded = data.train.images.permute(0, 2, 3, 1).numpy()
    assert np.abs(decoded.astype(int) - pil.astype(int)).max() <= 2  # libjpeg builds may round differently
    assert len(list((tmp_path / "cache").glob("*.pt"))) == 2  # train and test

    import bqat.data.files as files

    def no_decoding(*args, **kwargs):
        raise AssertionError("decoded again although the cache is current")

    monkeypatch.setattr(files, "decode_images", no_decoding)
    cached = build_data(cfg, seed=0)
    assert torch.equal(cached.train.images, data.train.images) and torch.equal(cached.val.images, data.val.images)

    Image.fromarray(test[0][0]).save(tmp_path / "jpg" / "test" / "airplane" / "0000.jpg", quality=50)  # rewritten
    with pytest.raises(AssertionError, match="decoded again"):
        build_data(cfg, seed=0)


def test_cifar100_python_release_uses_fine_labels(tmp_path):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    for name, n in (("train", 16), ("test", 8)):
        rng = np.random.default_rng(n)
        entry = {"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), "fine_labels": list(range(90, 90 + n // 2)) * 2,
                 "coarse_labels": [0] * n}
        with open(folder / name, "wb") as f:
            pickle.dump(entry, f)
    data = build_data(data_cfg("cifar100", tmp_path), seed=0)
    assert data.num_classes == 100
    assert sorted(torch.cat([y for _, y in data.val]).tolist()) == sorted(list(range(90, 94)) * 2)


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    """3 classes of 40x30 JPEGs: 4 per class in train/, 2 per class in val/."""
    root = tmp_path_factory.mktemp("folder")
    rng = np.random.default_rng(0)
    for split, n in (("train", 4), ("val", 2)):
        labels = np.repeat(np.arange(3), n)
        write_image_tree(root, split, rng.integers(0, 256, (len(labels), 30, 40, 3), dtype=np.uint8), labels, ["c0", "c1", "c2"], "jpg")
    return root


def test_image_folder_streams_timm_transforms_with_persistent_workers(image_folder):
    cfg = data_cfg("imagefolder", image_folder, image_size=16, batch_size=4, num_workers=1)
    data = build_data(cfg, seed=0)
    assert (data.num_classes, data.input_size) == (3, (3, 16, 16))
    assert (len(data.train), len(data.val)) == (3, 2)

    x, y = next(iter(data.train))
    assert x.shape == (4, 3, 16, 16) and y.shape == (4,) and set(y.tolist()) <= {0, 1, 2}
    assert data.train.loader.persistent_workers and data.train.loader.num_workers == 1

    # Validation: deterministic order, every image once, classes interleaved (not class by class).
    passes = [[(x.clone(), y.clone()) for x, y in data.val] for _ in range(2)]
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(*passes))
    val_labels = torch.cat([y for _, y in passes[0]])
    assert sorted(val_labels.tolist()) == [0, 0, 1, 1, 2, 2] and val_labels.tolist() != [0, 0, 1, 1, 2, 2]

    # Augmentation (random-resized crop, flip, jitter) restarts with the seed, whatever the
    # workers did before, and does not depend on the number of workers.
    data.train.reseed(7)
    a = next(iter(data.train))
    data.train.reseed(7)
    b = next(iter(data.train))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    in_main = build_data(data_cfg("imagefolder", image_folder, image_size=16, batch_size=4, num_workers=0), seed=0)
    in_main.train.reseed(7)
    rng = torch.get_rng_state()
    c = next(iter(in_main.train))
    assert torch.equal(a[0], c[0]) and torch.equal(a[1], c[1])
    assert torch.equal(torch.get_rng_state(), rng)  # the training's own random stream is untouched


def test_image_folder_in_memory_with_a_test_folder(image_folder, tmp_path):
    import shutil

    root = tmp_path / "tree"
    shutil.copytree(image_folder, root)
    (root / "val").rename(root / "test")
    data = build_data(data_cfg("imagefolder", root, image_size=16, in_memory=True), seed=0)
    assert data.train.images.shape == (12, 3, 16, 16) and data.train.images.dtype == torch.uint8
    assert sorted(data.val.labels.tolist()) == [0, 0, 1, 1, 2, 2]
    x, _ = next(iter(data.train))
    assert x.shape == (8, 3, 16, 16) and x.dtype == torch.float32


def test_stream_loader_shards_an_epoch_across_ranks(image_folder):
    cfg = data_cfg("imagefolder", image_folder, image_size=16, batch_size=1)
    shards = [build_data(cfg, seed=3) for _ in (0, 1)]
    for r, data in enumerate(shards):
        data.shard(r, 2)
    shards = [data.train.sampler for data in shards]
    a, b = [i for i, _ in shards[0]], [i for i, _ in shards[1]]  # (index, augmentation seed) keys
    assert len(a) == len(b) == 6 and sorted(a + b) == list(range(12))


@pytest.mark.parametrize("make, match", [
    (lambda root: None, "does not exist; expected .*cifar-10-batches-py/ .*train,test"),
    (lambda root: (root / "train" / "cat").mkdir(parents=True), "has no test/ or val/ folder"),
    (lambda root: [(root / s / "cat").mkdir(parents=True) for s in ("train", "test")], "cat holds no images"),
])
def test_missing_or_malformed_cifar_trees_name_the_path_and_layout(tmp_path, make, match):
    root = tmp_path / "data"
    make(root)
    with pytest.raises(UserError, match=match):
        build_data(data_cfg("cifar10", root), seed=0)


def test_wrong_class_count_and_unreadable_images_are_named(image_folder, tmp_path):
    with pytest.raises(UserError, match="has 3 class folders, CIFAR-10 has 10; use data=imagefolder"):
        build_data(data_cfg("cifar10", image_folder), seed=0)
    import shutil

    root = tmp_path / "tree"
    shutil.copytree(image_folder, root)
    bad = root / "val" / "c1" / "0003.jpg"
    bad.write_bytes(b"not an image")
    with pytest.raises(UserError, match=f"cannot read image {bad}"):
        build_data(data_cfg("imagefolder", root, image_size=16, in_memory=True), seed=0)
    streamed = build_data(data_cfg("imagefolder", root, image_size=16, batch_size=6, num_workers=1), seed=0)
    with pytest.raises(UserError) as err:
        list(streamed.val)  # fails in a worker process: still one line naming the file
    assert str(err.value).startswith(f"cannot read image {bad}") and "\n" not in str(err.value)


def test_malformed_or_unsafe_python_release_is_refused(cifar_on_disk, tmp_path):
    root, _, _ = cifar_on_disk
    import shutil

    shutil.copytree(root / "python", tmp_path / "bad")
    batch = tmp_path / "bad" / "cifar-10-batches-py" / "data_batch_2"
    with open(batch, "wb") as f:
        pickle.dump({"data": np.zeros((4, 100), np.uint8), "labels": [0] * 4}, f)
    with pytest.raises(UserError, match=f"{batch} is not a CIFAR-10 python-release batch .*3072"):
        build_data(data_cfg("cifar10", tmp_path / "bad"), seed=0)

    class Evil:
        def __reduce__(self):
            return (print, ("code ran",))

    with open(batch, "wb") as f:
        pickle.dump({"data": Evil(), "labels": [0]}, f)
    with pytest.raises(UserError, match="refusing to load builtins.print"):
        build_data(data_cfg("cifar10", tmp_path / "bad"), seed=0)


def test_download_failure_is_one_line(tmp_path, monkeypatch):
    import urllib.error

    import torchvision.datasets

    def offline(*args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", offline)
    with pytest.raises(UserError, match=r"cannot download CIFAR-10 into .*name resolution.*data.root at an existing copy"):
        build_data(data_cfg("cifar10", tmp_path / "empty", download=True), seed=0)


def test_cli_missing_data_exits_with_one_line(tmp_path):
    proc = run_cli(["data=cifar10", f"data.root={tmp_path / 'nowhere'}", f"hydra.run.dir={tmp_path / 'run'}"], cwd=ROOT)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"bqat-train: error: data.root={tmp_path / 'nowhere'} does not exist")


@pytest.mark.parametrize("name, in_memory, classes", [("cifar10", True, 10), ("cifar100", True, 100), ("imagenet", False, 1000),
                                                      ("imagefolder", False, None)])
def test_every_data_option_composes(compose_cfg, name, in_memory, classes):
    cfg = compose_cfg(f"data={name}", "data.root=/somewhere")
    assert (cfg.data.name, cfg.data.in_memory, cfg.data.num_classes) == (name, in_memory, classes)
    assert len(cfg.data.mean) == len(cfg.data.std) == 3 and cfg.data.cache_dir.startswith("outputs/")


@pytest.mark.parametrize("in_memory", [True, False], ids=["in_memory", "streamed"])
def test_drop_last_keeps_training_shapes_static_and_false_keeps_every_image(cifar_on_disk, in_memory):
    root, _, _ = cifar_on_disk  # 30 train images, batches of 8
    for drop_last, sizes in ((True, [8, 8, 8]), (False, [8, 8, 8, 6])):
        data = build_data(data_cfg("cifar10", root / "python", in_memory=in_memory, drop_last=drop_last), seed=0)
        assert [len(y) for _, y in data.train] == sizes and len(data.train) == len(sizes)
        assert [len(y) for _, y in data.val] == [8, 8, 4]  # validation never drops a batch
    digits = OmegaConf.load(CONF / "data" / "digits.yaml")
    assert digits.drop_last is True and all(OmegaConf.load(f).drop_last is True for f in (CONF / "data").glob("*.yaml"))
    digits.drop_last = False
    train = build_data(digits).train
    assert sum(len(y) for _, y in train) == len(train.labels) and len(train.labels) % digits.batch_size  # none dropped
    digits.drop_last = "yes"
    with pytest.raises(UserError, match="data.drop_last must be true or false"):
        build_data(digits)
