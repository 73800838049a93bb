"""model=ssd: torchvision's SSD (its head, default boxes, box coder, matcher and hard-negative-mined MultiBox loss)
on a narrow VGG-style trunk small enough for a CPU, no pretrained weights.

The network a precision mode casts and runs in low precision is the trunk and the heads: `forward(x)` returns the
per-anchor box regressions and class logits. What a careful user keeps in FP32 stays outside it: the default
boxes (made once, in FP32, for the fixed canvas), the matching of boxes to anchors, the box encoding and the loss
(`loss`), and the decoding, score threshold and non-maximum suppression of `detect`, all on FP32 copies of the
heads' outputs. torchvision's own SSD.forward would build the default boxes in the features' dtype (FP16 under
`mixed`, where box coordinates near 96 px keep only 1/16-px steps) and normalise and resize inside the network;
here the loader has already normalised, and the canvas is the network's size, so nothing is resized.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn
from torchvision.models.detection.anchor_utils import DefaultBoxGenerator
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.ssd import SSD, SSDHead
from torchvision.ops import boxes as box_ops

from mptrain.errors import UserError


def _block(cin: int, cout: int, norm: bool, stride: int = 1, padding: int = 1) -> list[nn.Module]:
    layers = [nn.Conv2d(cin, cout, 3, stride=stride, padding=padding, bias=not norm)]
    return layers + ([nn.BatchNorm2d(cout)] if norm else []) + [nn.ReLU(inplace=True)]


class Trunk(nn.Module):
    """VGG-style: two stages of two 3x3 convolutions and a max-pool (stride 4), a third stage to stride 8 (the
    first feature map), then stride-2 convolutions to smaller maps down to one that is 1-3 cells wide."""

    def __init__(self, in_channels: int, width: int, image_size: int, norm: bool):
        super().__init__()
        w = width
        self.base = nn.Sequential(*_block(in_channels, w, norm), *_block(w, w, norm), nn.MaxPool2d(2),
                                  *_block(w, 2 * w, norm), *_block(2 * w, 2 * w, norm), nn.MaxPool2d(2),
                                  *_block(2 * w, 4 * w, norm), *_block(4 * w, 4 * w, norm), nn.MaxPool2d(2))  # fmt: skip
        self.extras = nn.ModuleList()
        size = image_size // 8
        while size > 3:
            self.extras.append(nn.Sequential(*_block(4 * w, 4 * w, norm, stride=2)))
            size = (size + 1) // 2
        if not self.extras:
            raise UserError(f"model=ssd needs a canvas of at least 32 px (dataset.canvas={image_size}): its trunk "
                            "reduces by 8 before its first feature map")
        self.out_channels = [4 * w] * (1 + len(self.extras))

    def forward(self, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        maps = [self.base(x)]
        for extra in self.extras:
            maps.append(extra(maps[-1]))
        return OrderedDict((str(i), m) for i, m in enumerate(maps))


class SSDDetector(nn.Module):
    """An SSD whose low-precision part is `forward` (trunk + heads); `loss` and `detect` run in FP32."""

    def __init__(self, cfg, spec):
        super().__init__()
        classes = cfg.num_classes if cfg.num_classes is not None else spec.num_classes
        if classes != spec.num_classes:
            raise UserError(f"model.num_classes={cfg.num_classes} does not match dataset={spec.name}, which has "
                            f"{spec.num_classes} classes; drop model.num_classes (null takes the data's)")
        size = spec.image_size
        trunk = Trunk(spec.in_channels, cfg.width, size, cfg.norm == "batch")
        ratios = [[2, 3] if 0 < i < len(trunk.out_channels) - 1 else [2] for i in range(len(trunk.out_channels))]
        boxes = DefaultBoxGenerator(ratios, min_ratio=cfg.min_ratio, max_ratio=cfg.max_ratio)
        head = SSDHead(trunk.out_channels, boxes.num_anchors_per_location(), classes + 1)  # class 0: background
        self.ssd = SSD(trunk, boxes, (size, size), classes + 1, head=head, score_thresh=cfg.score_thresh,
                       nms_thresh=cfg.nms_thresh, detections_per_img=cfg.detections_per_img,
                       iou_thresh=cfg.iou_thresh)  # fmt: skip
        self.size = size
        with torch.no_grad():  # the default boxes of the fixed canvas, once, in FP32 (not a buffer: never cast)
            maps = list(trunk(torch.zeros(1, spec.in_channels, size, size)).values())
            self._anchors = boxes(ImageList(torch.zeros(1, 1, size, size), [(size, size)]), maps)[0]

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per anchor: box regressions (N, A, 4) and class logits (N, A, classes + 1), in the network's dtype."""
        return self.ssd.head(list(self.ssd.backbone(x).values()))

    def anchors(self, device: torch.device) -> torch.Tensor:
        if self._anchors.device != device:
            self._anchors = self._anchors.to(device)
        return self._anchors

    def loss(self, head: dict[str, torch.Tensor], targets: torch.Tensor) -> dict[str, torch.Tensor]:
        """torchvision's MultiBox loss (smooth-L1 boxes + hard-negative-mined cross-entropy, per foreground box) in
        FP32, from the heads' outputs and padded targets (N, K, 5: class, x1, y1, x2, y2; class -1 empty)."""
        head = {k: v.float() for k, v in head.items()}
        anchors = self.anchors(targets.device)
        wanted, matched = [], []
        for rows in targets:
            rows = rows[rows[:, 0] >= 0]
            wanted.append({"boxes": rows[:, 1:], "labels": rows[:, 0].long() + 1})
            if rows.numel() == 0:
                matched.append(torch.full((anchors.shape[0],), -1, dtype=torch.int64, device=anchors.device))
            else:
                matched.append(self.ssd.proposal_matcher(box_ops.box_iou(rows[:, 1:], anchors)))
        return self.ssd.compute_loss(wanted, head, [anchors] * len(wanted), matched)

    @torch.no_grad()
    def detect(self, head: dict[str, torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        """Decoded boxes, scores and labels (the data's classes, from 0) per image, in FP32."""
        head = {k: v.float() for k, v in head.items()}
        n = head["cls_logits"].shape[0]
        found = self.ssd.postprocess_detections(head, [self.anchors(head["cls_logits"].device)] * n,
                                                [(self.size, self.size)] * n)  # fmt: skip
        return [{**d, "labels": d["labels"] - 1} for d in found]


def build_ssd(cfg, spec) -> nn.Module:
    if not getattr(spec, "boxes", False):
        raise UserError(f"model=ssd needs a dataset with boxes; dataset={spec.name} has class labels only; use "
                        "dataset=fashion_mnist_detection")
    return SSDDetector(cfg, spec)


__all__ = ["SSDDetector", "Trunk", "build_ssd"]
