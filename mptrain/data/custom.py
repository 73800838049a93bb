"""`dataset=custom dataset.train._target_=my_pkg.data.MyImages`: a map-style torch Dataset of your own, built by
Hydra's instantiate, for the classification task.

Each item is `(image, label)`: the image a (C, H, W) tensor (uint8 in [0, 255] or floating point) or a PIL image,
the label an integer. Both splits are read whole onto the training device, as every mptrain image set is (so the
batches, shuffling and seeds follow the same rules); the held-out split is `dataset.test` when given, otherwise
each class's last `dataset.valid_fraction` after a `dataset.seed` shuffle (image_folder's rule). The class count
is `dataset.num_classes`, else the Dataset's `classes` attribute, else the largest label + 1. Normalisation uses
the training split's per-channel mean and std.
"""

from __future__ import annotations

import torch

from mptrain.data.image_folder import split_per_class
from mptrain.errors import UserError, first_line

MAX_ITEMS = 1_000_000  # read whole into memory: past this, subsample with your Dataset's own arguments


def read_custom_dataset(cfg, device: torch.device):
    """(train images, train labels, test images, test labels, class count, mean, std) on `device`."""
    train = _instantiate(cfg.train, "dataset.train")
    train_x, train_y = _read(train, "dataset.train")
    if cfg.test is not None and cfg.test.get("_target_"):
        test = _instantiate(cfg.test, "dataset.test")
        test_x, test_y = _read(test, "dataset.test")
        if test_x.shape[1:] != train_x.shape[1:]:
            raise UserError(f"dataset.test's images are {tuple(test_x.shape[1:])}, dataset.train's "
                            f"{tuple(train_x.shape[1:])}: both splits need one shape")
    else:
        train_idx, test_idx = split_per_class(train_y, cfg.valid_fraction, cfg.seed)
        train_x, train_y, test_x, test_y = train_x[train_idx], train_y[train_idx], train_x[test_idx], train_y[test_idx]
    largest = int(max(train_y.max(), test_y.max())) + 1
    classes = getattr(train, "classes", None)
    num_classes = cfg.num_classes or (len(classes) if classes is not None else largest)
    if num_classes < max(2, largest):
        raise UserError(f"labels go up to {largest - 1} but the class count is {num_classes}: set dataset.num_classes"
                        f"={max(2, largest)} (or fix the Dataset's classes attribute)")
    mean = tuple(train_x.mean(dim=(0, 2, 3)).tolist())
    std = tuple(train_x.std(dim=(0, 2, 3)).clamp_min(1e-3).tolist())
    return (train_x.to(device), train_y.to(device), test_x.to(device), test_y.to(device), num_classes, mean, std)


def _instantiate(node, key: str):
    from hydra.utils import instantiate

    target = node.get("_target_") if node is not None else None
    if not target:
        raise UserError(f"dataset=custom needs {key}._target_: your Dataset class or factory, e.g. "
                        f"{key}._target_=my_pkg.data.MyImages (its package on PYTHONPATH or installed)")
    try:
        dataset = instantiate(node)
    except Exception as e:
        cause = e.__cause__ or e
        raise UserError(f"{key}._target_={target} could not be built ({type(cause).__name__}: {first_line(cause)}); "
                        f"check the dotted path and its arguments (+{key}.<name>=...)") from None
    if not hasattr(dataset, "__getitem__") or not hasattr(dataset, "__len__"):
        raise UserError(f"{key}._target_={target} gave a {type(dataset).__name__}, not a map-style Dataset "
                        "(__len__ and __getitem__)")
    return dataset


def _read(dataset, key: str) -> tuple[torch.Tensor, torch.Tensor]:
    from torchvision.transforms.functional import pil_to_tensor

    n = len(dataset)
    if n == 0:
        raise UserError(f"{key} is empty: its Dataset has no items")
    if n > MAX_ITEMS:
        raise UserError(f"{key} has {n} items; mptrain holds a split whole on the device (at most {MAX_ITEMS}): "
                        "subsample it in your Dataset")
    images, labels, uint8 = [], [], None
    for i in range(n):
        item = dataset[i]
        if not isinstance(item, (tuple, list)) or len(item) < 2:
            raise UserError(f"{key}[{i}] is a {type(item).__name__}; a classification Dataset gives (image, label)")
        image, label = item[0], item[1]
        if not torch.is_tensor(image):
            try:
                image = pil_to_tensor(image)
            except TypeError:
                raise UserError(f"{key}[{i}]'s image is a {type(image).__name__}; give a (C, H, W) tensor or a PIL "
                                "image") from None
        if image.dim() == 2:
            image = image.unsqueeze(0)
        if image.dim() != 3 or image.shape[1] != image.shape[2] or (images and image.shape != images[0].shape):
            want = f"{tuple(images[0].shape)} like item 0" if images else "(C, S, S): square"
            raise UserError(f"{key}[{i}]'s image has shape {tuple(image.shape)}, not {want}; resize in your Dataset "
                            "(e.g. torchvision.transforms.Resize and CenterCrop)")
        label = int(label.item()) if torch.is_tensor(label) and label.numel() == 1 else label
        if not isinstance(label, int) or isinstance(label, bool) or label < 0:
            raise UserError(f"{key}[{i}]'s label is {label!r}; a class label is an integer >= 0")
        uint8 = image.dtype == torch.uint8 if uint8 is None else uint8
        images.append(image)
        labels.append(label)
    stacked = torch.stack(images).float()
    return (stacked.div_(255) if uint8 else stacked), torch.tensor(labels)
