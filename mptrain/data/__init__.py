"""Datasets held whole on the training device, batched and augmented there.

``build_data(dataset_cfg, device, seed)`` returns a ``DataModule`` whose
``train`` and ``test`` loaders yield ``(x, y)`` already on ``device``: for images
x float32 (B, C, H, W) normalised, y int64 (B,); for text (``text.py``) token ids
x and next-token targets y, both int64 (B, bptt). Shuffling and augmentation (random crop
with zero padding, horizontal flip) are batched tensor ops drawn from a device
generator seeded by (seed, epoch), so equal seeds give identical batches.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from mptrain import families
from mptrain.data.detection import load_fashion_mnist_detection
from mptrain.data.images import SOURCES, ImageSet
from mptrain.data.loaders import DataModule, DataSpec, DeviceLoader
from mptrain.data.text import StreamLoader, TextSpec, build_text_data
from mptrain.errors import UserError
from mptrain.schema import typed
from mptrain.schema.dataset import TEXT_SETS

IMAGE_SOURCES = {**SOURCES, "fashion_mnist_detection": load_fashion_mnist_detection}  # + canvases with boxes


def build_data(dataset_cfg, device: torch.device, seed: int, augment: bool = True) -> DataModule:
    """Load (or generate) the dataset named by ``dataset_cfg.name`` onto ``device``.

    ``augment=False`` turns augmentation off whatever the dataset says (a GAN must see real images as they are).
    """
    dataset_cfg = typed("dataset", dataset_cfg)  # keys left out take the schema's defaults (mptrain/schema)
    name = dataset_cfg.name
    if name in TEXT_SETS:
        return build_text_data(dataset_cfg, torch.device(device), seed)
    family_builder = next((o.builder for o in families.options("dataset") if name in o.names), None)
    if family_builder is not None:  # a family's own data (mptrain/families.py), imported when used
        return families.load(family_builder)(dataset_cfg, torch.device(device), seed)
    batch_size, eval_batch_size = dataset_cfg.batch_size, dataset_cfg.eval_batch_size
    device = torch.device(device)
    root = Path(os.path.expanduser(dataset_cfg.root))

    data: ImageSet = IMAGE_SOURCES[name](dataset_cfg, root, device)
    train_size = data.train_images.shape[0]
    if batch_size > train_size:
        raise UserError(
            f"dataset.batch_size={batch_size} is larger than the {train_size}-sample training set; "
            f"use dataset.batch_size={train_size} or less"
        )
    augment = augment and dataset_cfg.augment
    train = DeviceLoader(
        data.train_images.to(device), data.train_labels.to(device), batch_size, shuffle=True, drop_last=True,
        seed=seed, mean=data.mean, std=data.std,
        crop_padding=data.crop_padding if augment else 0, flip=data.flip and augment,
    )  # fmt: skip
    test = DeviceLoader(
        data.test_images.to(device), data.test_labels.to(device), eval_batch_size, shuffle=False, drop_last=False,
        mean=data.mean, std=data.std,
    )  # fmt: skip
    _, channels, height, width = data.train_images.shape
    spec = DataSpec(
        name=name, in_channels=channels, image_size=height, num_classes=data.num_classes,
        mean=tuple(data.mean) * (channels // len(data.mean)), std=tuple(data.std) * (channels // len(data.std)),
        boxes=data.boxes,
    )  # fmt: skip
    return DataModule(spec=spec, train=train, test=test)


__all__ = ["DataModule", "DataSpec", "DeviceLoader", "StreamLoader", "TextSpec", "build_data"]
