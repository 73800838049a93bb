"""`dataset=image_folder dataset.path=DIR`: your own images, one sub-folder per class (torchvision's ImageFolder).

Split rule: DIR/train beside DIR/val (or valid, or test) are used as they are; otherwise each class's images, in
sorted order, are shuffled with `dataset.seed` and its last `dataset.valid_fraction` held out (at least one
image a class), so the split is the same on every run. Every image is resized (shorter side to
`dataset.image_size`), centre-cropped square, made RGB or grayscale (`dataset.channels`), and kept on the device
as uint8-exact floats in [0, 1]; normalisation uses the training split's per-channel mean and std.
"""

from __future__ import annotations

from pathlib import Path

import torch

from mptrain.errors import UserError

HELD_OUT_NAMES = ("val", "valid", "test")


def read_image_folder(cfg, device: torch.device):
    """(train images, train labels, test images, test labels, class count, mean, std) on `device`."""
    path = Path(str(cfg.path)).expanduser()
    if not path.is_dir():
        raise UserError(f"dataset.path={cfg.path} is not a folder; give a folder with one sub-folder of images per "
                        "class (e.g. dataset.path=$HOME/data/flowers)")
    held_out = next((path / n for n in HELD_OUT_NAMES if (path / n).is_dir()), None)
    if (path / "train").is_dir() and held_out is not None:
        train_x, train_y, classes = _read(path / "train", cfg)
        test_x, test_y, test_classes = _read(held_out, cfg)
        if test_classes != classes:
            raise UserError(f"{held_out} has classes {test_classes}, {path / 'train'} has {classes}: the held-out "
                            "split must have the same class folders")
    else:
        images, labels, classes = _read(path, cfg)
        train_idx, test_idx = split_per_class(labels, cfg.valid_fraction, cfg.seed)
        train_x, train_y, test_x, test_y = images[train_idx], labels[train_idx], images[test_idx], labels[test_idx]
    if len(classes) < 2:
        raise UserError(f"dataset.path={cfg.path} holds {len(classes)} class folder(s); a classifier needs two or more")
    mean = tuple(train_x.mean(dim=(0, 2, 3)).tolist())
    std = tuple(train_x.std(dim=(0, 2, 3)).clamp_min(1e-3).tolist())
    return (train_x.to(device), train_y.to(device), test_x.to(device), test_y.to(device), len(classes), mean, std)


def _read(folder: Path, cfg):
    from PIL import Image, UnidentifiedImageError
    from torchvision import datasets, transforms

    steps = [transforms.Resize(cfg.image_size), transforms.CenterCrop(cfg.image_size)]
    steps.append(transforms.Grayscale(1) if cfg.channels == 1 else transforms.Lambda(lambda im: im.convert("RGB")))
    steps.append(transforms.PILToTensor())
    try:
        found = datasets.ImageFolder(str(folder), transform=transforms.Compose(steps))
    except (FileNotFoundError, RuntimeError) as e:  # no class folders, or folders without images
        raise UserError(f"{folder}: {str(e).splitlines()[0]} (one sub-folder per class, each holding .jpg/.png/... "
                        "images)") from None
    images, labels = [], []
    for (file, label) in found.samples:
        try:
            with Image.open(file) as image:
                images.append(found.transform(image))
        except (UnidentifiedImageError, OSError) as e:
            raise UserError(f"{file} cannot be read as an image ({type(e).__name__}); remove or replace it") from None
        labels.append(label)
    return torch.stack(images).float().div_(255), torch.tensor(labels), found.classes


def split_per_class(labels: torch.Tensor, fraction: float, seed: int):
    """Per class: shuffle its indices with `seed`, hold out the last `fraction` (at least one)."""
    generator = torch.Generator().manual_seed(seed)
    train, test = [], []
    for c in labels.unique():
        idx = (labels == c).nonzero().flatten()
        if len(idx) < 2:
            raise UserError(f"class {int(c)} has {len(idx)} image: each class needs two or more to hold one out "
                            "(or give DIR/train and DIR/val)")
        idx = idx[torch.randperm(len(idx), generator=generator)]
        n_test = max(1, round(fraction * len(idx)))
        train.append(idx[:-n_test])
        test.append(idx[-n_test:])
    return torch.cat(train).sort().values, torch.cat(test).sort().values
