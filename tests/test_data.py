"""Datasets: determinism, augmentation, IDX reading, file lookup and user-facing errors."""

from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from omegaconf import OmegaConf

import mptrain.data.images as images
from mptrain.data import DeviceLoader, build_data
from mptrain.data.idx import read_idx, write_idx
from mptrain.errors import UserError

CPU = torch.device("cpu")
SYSTEM_FASHION = Path("/usr/share/datasets/fashion-mnist")
CONF_DIR = Path(__file__).resolve().parents[1] / "conf" / "dataset"


def synthetic(**overrides):
    cfg = {"name": "synthetic", "batch_size": 32, "eval_batch_size": 100, "train_size": 256, "test_size": 130,
           "image_size": 16, "channels": 3, "num_classes": 4, "noise": 1.0, "seed": 0}  # fmt: skip
    return OmegaConf.create({**cfg, **overrides})


def all_batches(loader):
    return [(x.clone(), y.clone()) for x, y in loader]


def write_fake_idx_dataset(directory: Path, n_train=64, n_test=20, gz=True) -> None:
    rng = np.random.default_rng(0)
    directory.mkdir(parents=True, exist_ok=True)
    suffix = ".gz" if gz else ""
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        write_idx(directory / f"{prefix}-images-idx3-ubyte{suffix}", rng.integers(0, 256, (n, 28, 28)))
        write_idx(directory / f"{prefix}-labels-idx1-ubyte{suffix}", np.arange(n) % 10)


@pytest.fixture
def no_system_fashion(monkeypatch, tmp_path):
    """Hide the Debian package so lookups only see tmp_path."""
    monkeypatch.setattr(images, "FASHION_MNIST_SYSTEM_DIRS", [tmp_path / "no-system-dir"])


# --- synthetic data and the loader ------------------------------------------------------


def test_synthetic_shapes_dtypes_and_sizes():
    data = build_data(synthetic(), CPU, seed=0)
    assert (data.spec.in_channels, data.spec.image_size, data.spec.num_classes) == (3, 16, 4)
    assert (data.train_size, data.test_size) == (256, 130)
    assert (len(data.train), len(data.test)) == (8, 2)
    train = all_batches(data.train)
    assert len(train) == 8 and all(x.shape == (32, 3, 16, 16) for x, _ in train)
    x, y = train[0]
    assert x.dtype == torch.float32 and y.dtype == torch.int64 and x.device == CPU and y.device == CPU
    test = all_batches(data.test)
    assert [len(y) for _, y in test] == [100, 30]  # last partial batch kept
    assert torch.equal(torch.cat([y for _, y in test]), data.test.labels)  # no shuffle


def test_synthetic_is_deterministic_per_seed_and_epoch():
    a, b = build_data(synthetic(), CPU, seed=3), build_data(synthetic(), CPU, seed=3)
    for (xa, ya), (xb, yb) in zip(all_batches(a.train), all_batches(b.train)):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    epoch0 = torch.cat([y for _, y in all_batches(a.train)])
    a.train.set_epoch(1)
    epoch1 = torch.cat([y for _, y in all_batches(a.train)])
    assert not torch.equal(epoch0, epoch1)
    assert torch.equal(epoch0.sort().values, epoch1.sort().values)  # same samples, new order
    # The data itself follows dataset.seed, not the run seed.
    other_run = build_data(synthetic(), CPU, seed=4)
    assert torch.equal(other_run.test.images, a.test.images)
    assert not torch.equal(build_data(synthetic(seed=1), CPU, seed=3).test.images, a.test.images)


def test_synthetic_is_learnable():
    data = build_data(synthetic(train_size=512, test_size=256), CPU, seed=0)
    flat = data.train.images.flatten(1)
    centroids = torch.stack([flat[data.train.labels == c].mean(0) for c in range(4)])
    predicted = torch.cdist(data.test.images.flatten(1), centroids).argmin(1)
    assert (predicted == data.test.labels).float().mean() > 0.9  # chance is 0.25


def test_crop_and_flip_match_a_padded_crop_of_the_original():
    torch.manual_seed(0)
    pictures = torch.randint(1, 256, (64, 2, 8, 8), dtype=torch.uint8)  # no zeros, so padding shows
    labels = torch.arange(64)
    loader = DeviceLoader(pictures, labels, 16, shuffle=True, drop_last=True, seed=7, crop_padding=2, flip=True)
    padded = torch.nn.functional.pad(pictures, (2, 2, 2, 2)).float() / 255.0
    flips = 0
    for x, y in loader:
        assert x.shape == (16, 2, 8, 8)
        for image, label in zip(x, y):
            candidates = [padded[label, :, dy : dy + 8, dx : dx + 8] for dy in range(5) for dx in range(5)]
            if any(torch.allclose(image, c) for c in candidates):
                continue
            assert any(torch.allclose(image, c.flip(-1)) for c in candidates)
            flips += 1
    assert 10 < flips < 54


def test_augmentation_is_deterministic_per_seed_and_epoch():
    pictures = torch.randint(0, 256, (40, 1, 6, 6), dtype=torch.uint8)

    def epoch(seed, number):
        loader = DeviceLoader(pictures, torch.arange(40), 8, shuffle=True, drop_last=True, seed=seed,
                              crop_padding=2, flip=True)  # fmt: skip
        loader.set_epoch(number)
        return torch.cat([x for x, _ in loader])

    assert torch.equal(epoch(1, 0), epoch(1, 0))
    assert not torch.equal(epoch(1, 0), epoch(1, 1))
    assert not torch.equal(epoch(1, 0), epoch(2, 0))


def test_uint8_images_are_normalised():
    pictures = torch.full((4, 1, 3, 3), 255, dtype=torch.uint8)
    loader = DeviceLoader(pictures, torch.zeros(4, dtype=torch.int64), 4, shuffle=False, drop_last=False,
                          mean=(0.5,), std=(0.25,))  # fmt: skip
    (x, _), = list(loader)
    assert torch.allclose(x, torch.full_like(x, 2.0))


# --- IDX files and Fashion-MNIST / MNIST lookup -----------------------------------------


@pytest.mark.parametrize("name", ["tiny.idx.gz", "tiny.idx"])
def test_idx_round_trip(tmp_path, name):
    array = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    write_idx(tmp_path / name, array)
    assert np.array_equal(read_idx(tmp_path / name), array)


def test_corrupt_idx_files_are_user_errors(tmp_path):
    (tmp_path / "magic.idx").write_bytes(b"\x00\x00\x0d\x01\x00\x00\x00\x02ab")
    with pytest.raises(UserError, match="magic.idx.*magic"):
        read_idx(tmp_path / "magic.idx")
    write_idx(tmp_path / "short.idx", np.zeros((5,), np.uint8))
    (tmp_path / "short.idx").write_bytes((tmp_path / "short.idx").read_bytes()[:-1])
    with pytest.raises(UserError, match="short.idx"):
        read_idx(tmp_path / "short.idx")
    (tmp_path / "bad.gz").write_bytes(b"not gzip at all")
    with pytest.raises(UserError, match="bad.gz"):
        read_idx(tmp_path / "bad.gz")


@pytest.mark.parametrize("layout", ["", "FashionMNIST/raw"])
@pytest.mark.parametrize("gz", [True, False])
def test_fashion_mnist_from_a_root_of_idx_files(tmp_path, no_system_fashion, layout, gz):
    write_fake_idx_dataset(tmp_path / "root" / layout, gz=gz)
    cfg = OmegaConf.create({"name": "fashion_mnist", "root": str(tmp_path / "root"), "download": False,
                            "batch_size": 16, "eval_batch_size": 8})  # fmt: skip
    data = build_data(cfg, CPU, seed=0)
    assert (data.spec.in_channels, data.spec.image_size, data.spec.num_classes) == (1, 28, 10)
    assert (data.train_size, data.test_size, len(data.train), len(data.test)) == (64, 20, 4, 3)
    assert data.train.flip and data.train.crop_padding > 0 and not data.test.flip
    x, y = next(iter(data.train))
    assert x.shape == (16, 1, 28, 28) and x.dtype == torch.float32 and y.dtype == torch.int64


def test_mnist_from_a_root_does_not_flip(tmp_path):
    write_fake_idx_dataset(tmp_path / "MNIST" / "raw")
    cfg = OmegaConf.create({"name": "mnist", "root": str(tmp_path), "download": False, "batch_size": 16})
    data = build_data(cfg, CPU, seed=0)
    assert data.train_size == 64 and not data.train.flip and data.train.crop_padding > 0


def test_missing_fashion_mnist_names_all_fixes_and_creates_nothing(tmp_path, no_system_fashion):
    root = tmp_path / "data"
    cfg = OmegaConf.create({"name": "fashion_mnist", "root": str(root), "download": False})
    with pytest.raises(UserError) as err:
        build_data(cfg, CPU, seed=0)
    message = str(err.value)
    assert "\n" not in message and str(root) in message
    assert "apt-get install dataset-fashion-mnist" in message
    assert "idx .gz files" in message and "dataset.download=true" in message
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("root_exists", [False, True])
def test_failed_download_removes_what_it_created(tmp_path, no_system_fashion, monkeypatch, root_exists):
    root = tmp_path / "cache" / "data"
    if root_exists:
        root.mkdir(parents=True)
        (root / "keep.txt").write_text("mine")

    class FailingDownload:  # stands in for torchvision: leaves a half-written file, then fails
        def __init__(self, root, train, download):
            raw = Path(root) / "FashionMNIST" / "raw"
            raw.mkdir(parents=True, exist_ok=True)
            (raw / "train-images-idx3-ubyte.gz").write_bytes(b"\x1f\x8b partial")
            raise RuntimeError("Error downloading train-images-idx3-ubyte.gz:\n<urlopen error no network>")

    monkeypatch.setattr(torchvision.datasets, "FashionMNIST", FailingDownload)
    cfg = OmegaConf.create({"name": "fashion_mnist", "root": str(root), "download": True})
    with pytest.raises(UserError, match=r"download failed \(<urlopen error no network>\)"):
        build_data(cfg, CPU, seed=0)
    if root_exists:
        assert [p.name for p in root.iterdir()] == ["keep.txt"]
    else:
        assert list(tmp_path.iterdir()) == []


def test_missing_cifar10_is_a_user_error(tmp_path):
    cfg = OmegaConf.create({"name": "cifar10", "root": str(tmp_path / "data"), "download": False})
    with pytest.raises(UserError, match="cifar-10-python.tar.gz.*dataset.download=true"):
        build_data(cfg, CPU, seed=0)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(not SYSTEM_FASHION.is_dir(), reason="dataset-fashion-mnist is not installed")
def test_real_fashion_mnist_from_the_debian_package(tmp_path):
    cfg = OmegaConf.create({"name": "fashion_mnist", "root": str(tmp_path), "download": False})
    data = build_data(cfg, CPU, seed=0)
    assert (data.train_size, data.test_size) == (60000, 10000)
    assert data.train.images.dtype == torch.uint8 and data.train.images.shape[1:] == (1, 28, 28)
    assert torch.bincount(data.train.labels).tolist() == [6000] * 10
    x, _ = next(iter(data.test))
    assert abs(x.mean().item()) < 0.1 and abs(x.std().item() - 1.0) < 0.1  # normalisation constants fit


# --- config validation ------------------------------------------------------------------


@pytest.mark.parametrize("key,value", [("batch_size", 0), ("batch_size", "big"), ("eval_batch_size", -1),
                                       ("batch_size", True)])  # fmt: skip
def test_batch_sizes_must_be_positive_integers(key, value):
    with pytest.raises(UserError, match=f"dataset.{key} must be a positive integer"):
        build_data(synthetic(**{key: value}), CPU, seed=0)


def test_batch_larger_than_training_set_is_a_user_error():
    with pytest.raises(UserError, match="larger than the 256-sample training set"):
        build_data(synthetic(batch_size=512), CPU, seed=0)


def test_unknown_dataset_is_a_user_error():
    with pytest.raises(UserError, match="unknown dataset.name"):
        build_data(OmegaConf.create({"name": "imagenet22k"}), CPU, seed=0)


def test_dataset_yamls_have_the_common_keys(compose_cfg):
    for name in ("fashion_mnist", "mnist", "cifar10", "synthetic"):
        cfg = compose_cfg(f"dataset={name}").dataset
        assert cfg.name == name and cfg.batch_size == 128 and cfg.eval_batch_size == 512
        assert cfg.root == "~/.cache/mptrain/data" and "augment" in cfg


def test_sharding_splits_held_out_data_and_refuses_more_ranks_than_samples():
    pictures = torch.arange(5 * 4, dtype=torch.uint8).view(5, 1, 2, 2)
    parts = []
    for rank in range(2):
        loader = DeviceLoader(pictures, torch.arange(5), 4, shuffle=False, drop_last=False)
        loader.shard(rank, 2)
        parts.append(torch.cat([y for _, y in loader]))
    assert sorted(torch.cat(parts).tolist()) == list(range(5))  # every sample once, over the ranks
    with pytest.raises(UserError, match="fewer than the 8 ranks"):
        DeviceLoader(pictures, torch.arange(5), 4, shuffle=False, drop_last=False).shard(0, 8)


def test_sharded_training_batches_are_slices_of_one_global_batch():
    pictures = torch.arange(16 * 4, dtype=torch.uint8).view(16, 1, 2, 2)
    whole = DeviceLoader(pictures, torch.arange(16), 8, shuffle=True, drop_last=True, seed=3)
    halves = []
    for rank in range(2):
        loader = DeviceLoader(pictures, torch.arange(16), 4, shuffle=True, drop_last=True, seed=3)
        loader.shard(rank, 2)
        halves.append([y for _, y in loader])
    assert len(halves[0]) == len(whole) == 2
    for i, (_, y) in enumerate(whole):
        assert torch.equal(torch.cat([halves[0][i], halves[1][i]]), y)
