"""Detection canvases from real Fashion-MNIST items (dataset=fashion_mnist_detection), generated offline.

Each canvas is a `canvas` x `canvas` grayscale image holding `min_objects`..`max_objects` items of its split (train
canvases from the training images, test canvases from the test images), each resized to a random square size in
`min_size`..`max_size` px and placed at a random position inside its own cell of a grid (ceil(sqrt(max_objects))
cells a side), so items never overlap and every box is exact. A box is tight around the item's non-zero pixels
after resizing, `[x1, y1, x2, y2]` in pixels with x2, y2 exclusive (torchvision's and COCO's convention). Targets are
one padded tensor per canvas, `(max_objects, 5)` rows of `[class, x1, y1, x2, y2]`, class -1 for an empty row, so the
whole split batches like a classification set. Everything is drawn from one generator seeded by `dataset.seed` and
the split: the same canvases whichever run seed trains on them.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from mptrain.data.images import ImageSet, load_fashion_mnist
from mptrain.data.seeds import stream_seed
from mptrain.errors import UserError

EMPTY = -1  # the class of a padding row
SPLITS = {"train": 0, "test": 1}


def grid_cells(canvas: int, max_objects: int) -> tuple[int, int]:
    """(cells a side, cell size in px) of the layout that holds up to max_objects items."""
    side = math.ceil(math.sqrt(max_objects))
    return side, canvas // side


def check_layout(cfg) -> None:
    """The one-line refusals of a layout that cannot be drawn."""
    if cfg.min_objects > cfg.max_objects:
        raise UserError(f"dataset.min_objects={cfg.min_objects} is more than dataset.max_objects={cfg.max_objects}; "
                        "lower min_objects or raise max_objects")
    if cfg.min_size > cfg.max_size:
        raise UserError(f"dataset.min_size={cfg.min_size} is more than dataset.max_size={cfg.max_size}; swap them")
    side, cell = grid_cells(cfg.canvas, cfg.max_objects)
    if cfg.max_size > cell:
        raise UserError(f"objects of up to dataset.max_size={cfg.max_size} px do not fit the {cfg.canvas}-px canvas "
                        f"with up to {cfg.max_objects} objects (each gets a {cell}-px cell of a {side}x{side} grid); "
                        f"use dataset.max_size={cell} or less, a larger dataset.canvas, or fewer dataset.max_objects")


def draw_canvases(items: torch.Tensor, labels: torch.Tensor, count: int, cfg, split: str):
    """`count` canvases (uint8, count x 1 x canvas x canvas) and their targets (float32, count x max_objects x 5)
    from `items` (uint8, N x 28 x 28) and their `labels`."""
    canvas, k = cfg.canvas, cfg.max_objects
    side, cell = grid_cells(canvas, k)
    g = torch.Generator().manual_seed(stream_seed(cfg.seed, SPLITS[split]))
    present = torch.randint(cfg.min_objects, k + 1, (count,), generator=g)
    # each canvas's items take distinct cells, in a random order of the grid's cells
    cells = torch.rand(count, side * side, generator=g).argsort(dim=1)[:, :k]
    which = torch.randint(0, items.shape[0], (count, k), generator=g)
    sizes = torch.randint(cfg.min_size, cfg.max_size + 1, (count, k), generator=g)
    jitter = torch.rand(count, k, 2, generator=g)
    images = torch.zeros(count, 1, canvas, canvas, dtype=torch.uint8)
    targets = torch.full((count, k, 5), float(EMPTY))
    resized = _resized(items, which, sizes, present)
    for i in range(count):
        for j in range(int(present[i])):
            item = resized[(i, j)]
            size = item.shape[-1]
            row, col = divmod(int(cells[i, j]), side)
            top = row * cell + int(jitter[i, j, 0] * (cell - size + 1))
            left = col * cell + int(jitter[i, j, 1] * (cell - size + 1))
            images[i, 0, top:top + size, left:left + size] = item
            y1, x1, y2, x2 = _tight_box(item)
            targets[i, j] = torch.tensor([float(labels[which[i, j]]), left + x1, top + y1, left + x2, top + y2])
    return images, targets


def _resized(items, which, sizes, present) -> dict[tuple[int, int], torch.Tensor]:
    """Every placed item at its size, resized in one batched call per size (antialiased bilinear, as PIL would)."""
    slots = [(i, j) for i in range(which.shape[0]) for j in range(int(present[i]))]
    out = {}
    for size in sizes.unique().tolist():
        chosen = [s for s in slots if int(sizes[s]) == size]
        if not chosen:
            continue
        batch = items[torch.tensor([int(which[s]) for s in chosen])][:, None].float()
        scaled = F.interpolate(batch, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        scaled = scaled.round_().clamp_(0, 255).to(torch.uint8)[:, 0]
        out.update(zip(chosen, scaled))
    return out


def _tight_box(item: torch.Tensor) -> tuple[int, int, int, int]:
    """(y1, x1, y2, x2) of the item's non-zero pixels, the ends exclusive; the whole square if it has none."""
    rows, cols = item.any(dim=1).nonzero(), item.any(dim=0).nonzero()
    if rows.numel() == 0:
        return 0, 0, item.shape[0], item.shape[1]
    return int(rows[0]), int(cols[0]), int(rows[-1]) + 1, int(cols[-1]) + 1


def load_fashion_mnist_detection(cfg, root, device):
    """The ImageSet of canvases: Fashion-MNIST's own items (found or downloaded as dataset=fashion_mnist finds them)."""
    check_layout(cfg)
    source = load_fashion_mnist(cfg, root, device)
    train = draw_canvases(source.train_images[:, 0], source.train_labels, cfg.train_size, cfg, "train")
    test = draw_canvases(source.test_images[:, 0], source.test_labels, cfg.test_size, cfg, "test")
    pixels = train[0].float().div_(255)  # normalised by the training canvases' own mean and spread
    return ImageSet(*train, *test, num_classes=source.num_classes, mean=(pixels.mean().item(),),
                    std=(pixels.std().item(),), boxes=True)
