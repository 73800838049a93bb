"""Where each dataset's pixels come from: local files, a download, or a generator.

Every source returns an ``ImageSet``: the whole train and test split as tensors
(uint8 N,C,H,W images, or float32 already normalised for synthetic data) plus
what the loader needs to normalise and augment them.
"""

from __future__ import annotations

import math
import shutil
import socket
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from mptrain.data.idx import find_idx_file, read_idx
from mptrain.errors import UserError

FASHION_MNIST_SYSTEM_DIRS = [Path("/usr/share/datasets/fashion-mnist")]  # Debian: dataset-fashion-mnist
IDX_STEMS = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
DOWNLOAD_SOCKET_TIMEOUT_S = 20.0  # urllib has no timeout of its own; a dead network must not hang a run


@dataclass
class ImageSet:
    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor
    num_classes: int
    mean: tuple[float, ...] = (0.0,)
    std: tuple[float, ...] = (1.0,)
    crop_padding: int = 0  # random-crop padding for augmentation; 0 = no crop
    flip: bool = False  # random horizontal flip for augmentation
    boxes: bool = False  # labels are padded detection targets (data/detection.py), not class indices


# --- downloads that leave nothing behind when they fail ---------------------------------


def _topmost_missing(path: Path) -> Path | None:
    missing = None
    for candidate in (path, *path.parents):
        if candidate.exists():
            break
        missing = candidate
    return missing


def download_cleanly(download: Callable[[], object], target_dir: Path) -> str | None:
    """Run ``download()``; on failure delete what it created in/above ``target_dir`` and return why."""
    created_dir = _topmost_missing(target_dir)
    existing = set(target_dir.iterdir()) if target_dir.is_dir() else set()
    previous_timeout = socket.getdefaulttimeout()
    socket.setdefaulttimeout(DOWNLOAD_SOCKET_TIMEOUT_S)
    try:
        download()
        return None
    except BaseException as err:
        if created_dir is not None:
            shutil.rmtree(created_dir, ignore_errors=True)
        elif target_dir.is_dir():
            for entry in set(target_dir.iterdir()) - existing:  # half-written archives
                if entry.is_dir():
                    shutil.rmtree(entry, ignore_errors=True)
                else:
                    entry.unlink(missing_ok=True)
        if not isinstance(err, Exception):
            raise
        # torchvision's messages span lines; the last one names the root cause.
        lines = [line.strip() for line in str(err).splitlines() if line.strip()]
        return lines[-1] if lines else type(err).__name__
    finally:
        socket.setdefaulttimeout(previous_timeout)


# --- MNIST and Fashion-MNIST (IDX files) ------------------------------------------------


def _idx_files(directory: Path) -> list[Path] | None:
    files = [find_idx_file(directory, stem) for stem in IDX_STEMS]
    return files if all(files) else None


def _read_idx_split(images_path: Path, labels_path: Path, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = read_idx(images_path), read_idx(labels_path)
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise UserError(
            f"{images_path} ({images.shape}) and {labels_path} ({labels.shape}) do not pair up as "
            "N images and N labels; delete them and fetch the dataset again"
        )
    if labels.size and int(labels.max()) >= num_classes:
        raise UserError(f"{labels_path} has label {int(labels.max())} but the dataset has {num_classes} classes")
    return torch.from_numpy(images.copy()).unsqueeze(1), torch.from_numpy(labels.astype(np.int64))


def _load_idx_dataset(cfg, root: Path, title: str, torchvision_name: str, system_dirs: list[Path], fixes: str):
    raw_dir = root / torchvision_name / "raw"  # where torchvision puts (and downloads) them
    for directory in (root, raw_dir, *system_dirs):
        files = _idx_files(directory)
        if files:
            break
    else:
        files = None
        if cfg.download:
            import torchvision  # only to download: reading the files is ours (a 1.5 s import, torch._dynamo included)

            dataset_class = getattr(torchvision.datasets, torchvision_name)
            reason = download_cleanly(lambda: dataset_class(str(root), train=True, download=True), raw_dir)  # noqa: B023
            files = _idx_files(raw_dir)
            problem = f"the download failed ({reason or 'no files arrived'})"
        else:
            problem = "dataset.download=false"
        if not files:
            places = " or ".join([f"dataset.root={root}", *map(str, system_dirs)])
            raise UserError(f"{title} not found in {places}, and {problem}; fix: {fixes.format(root=root)}")
    train_images, train_labels = _read_idx_split(files[0], files[1], 10)
    test_images, test_labels = _read_idx_split(files[2], files[3], 10)
    return train_images, train_labels, test_images, test_labels


def load_fashion_mnist(cfg, root: Path, device: torch.device) -> ImageSet:
    fixes = (
        "apt-get install dataset-fashion-mnist, or put the four idx .gz files in {root}, "
        "or allow internet access (dataset.download=true) for torchvision's download"
    )
    tensors = _load_idx_dataset(cfg, root, "Fashion-MNIST", "FashionMNIST", FASHION_MNIST_SYSTEM_DIRS, fixes)
    return ImageSet(*tensors, num_classes=10, mean=(0.2860,), std=(0.3530,), crop_padding=2, flip=True)


def load_mnist(cfg, root: Path, device: torch.device) -> ImageSet:
    fixes = (
        "put the four MNIST idx .gz files in {root}, or point dataset.root at a folder that holds them, "
        "or allow internet access (dataset.download=true) for torchvision's download"
    )
    tensors = _load_idx_dataset(cfg, root, "MNIST", "MNIST", [], fixes)
    # No flips: a mirrored digit is a different (or no) digit.
    return ImageSet(*tensors, num_classes=10, mean=(0.1307,), std=(0.3081,), crop_padding=2, flip=False)


# --- CIFAR-10 ---------------------------------------------------------------------------


def _cifar10_splits(cfg, root: Path):
    import torchvision

    def load(download: bool):
        return [torchvision.datasets.CIFAR10(str(root), train=t, download=download) for t in (True, False)]

    try:
        return load(download=False)
    except RuntimeError:  # torchvision: "Dataset not found or corrupted"
        pass
    if cfg.download:
        failure = download_cleanly(lambda: load(download=True), root)
        if failure is None:
            return load(download=False)
        problem = f"the download failed ({failure})"
    else:
        problem = "dataset.download=false"
    raise UserError(
        f"CIFAR-10 not found (or corrupt) in dataset.root={root}, and {problem}; fix: put "
        f"cifar-10-python.tar.gz or its extracted cifar-10-batches-py folder in {root}, or point "
        "dataset.root at a folder that holds them, or allow internet access (dataset.download=true)"
    )


def load_cifar10(cfg, root: Path, device: torch.device) -> ImageSet:
    archive, folder = root / "cifar-10-python.tar.gz", root / "cifar-10-batches-py"
    if archive.is_file() and not folder.is_dir():
        import torchvision

        try:
            torchvision.datasets.utils.extract_archive(str(archive), str(root))
        except Exception as err:
            shutil.rmtree(folder, ignore_errors=True)
            raise UserError(f"cannot extract {archive} ({err}); delete it and fetch it again") from err

    train, test = _cifar10_splits(cfg, root)

    def tensors(split):  # torchvision keeps (N, 32, 32, 3) uint8 and a list of labels
        images = torch.from_numpy(split.data).permute(0, 3, 1, 2).contiguous()
        return images, torch.as_tensor(split.targets, dtype=torch.int64)

    return ImageSet(
        *tensors(train), *tensors(test), num_classes=10,
        mean=(0.4914, 0.4822, 0.4465), std=(0.2470, 0.2435, 0.2616), crop_padding=4, flip=True,
    )  # fmt: skip


# --- synthetic, generated on the device -------------------------------------------------


def load_synthetic(cfg, root: Path, device: torch.device) -> ImageSet:
    """Class templates (smooth random images) plus gaussian noise; a CNN beats chance within a few steps."""
    num_classes, channels, size = cfg.num_classes, cfg.channels, cfg.image_size
    train_size, test_size, noise, seed = cfg.train_size, cfg.test_size, cfg.noise, cfg.seed

    # Own generator: the data stays the same whichever run seed trains on it.
    generator = torch.Generator(device=device).manual_seed(seed)
    coarse = torch.randn(num_classes, channels, max(1, size // 4), max(1, size // 4), generator=generator, device=device)
    templates = F.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)
    flat = templates.flatten(1)
    templates = ((flat - flat.mean(1, keepdim=True)) / flat.std(1, keepdim=True).clamp_min(1e-6)).view_as(templates)
    scale = 1.0 / math.sqrt(1.0 + float(noise) ** 2)  # keeps inputs at unit variance

    def sample(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        balanced = torch.arange(n, device=device) % num_classes
        labels = balanced[torch.randperm(n, generator=generator, device=device)]
        images = torch.randn(n, channels, size, size, generator=generator, device=device).mul_(float(noise))
        return images.add_(templates[labels]).mul_(scale), labels

    return ImageSet(*sample(train_size), *sample(test_size), num_classes=num_classes)


def load_image_folder(cfg, root: Path, device: torch.device) -> ImageSet:
    """Your own images, one sub-folder per class (data/image_folder.py: the split rule and the resizing)."""
    from mptrain.data.image_folder import read_image_folder

    *tensors, num_classes, mean, std = read_image_folder(cfg, device)
    return ImageSet(*tensors, num_classes=num_classes, mean=mean, std=std, crop_padding=max(1, cfg.image_size // 8),
                    flip=True)


def load_custom(cfg, root: Path, device: torch.device) -> ImageSet:
    """A torch Dataset of your own (data/custom.py: what an item is, the split and the class count)."""
    from mptrain.data.custom import read_custom_dataset

    *tensors, num_classes, mean, std = read_custom_dataset(cfg, device)
    size = tensors[0].shape[-1]
    return ImageSet(*tensors, num_classes=num_classes, mean=mean, std=std, crop_padding=max(1, size // 8), flip=True)


SOURCES: dict[str, Callable[..., ImageSet]] = {
    "fashion_mnist": load_fashion_mnist,
    "mnist": load_mnist,
    "cifar10": load_cifar10,
    "synthetic": load_synthetic,
    "image_folder": load_image_folder,
    "custom": load_custom,
}
