"""Image classifiers used in the paper's CNN experiments (ResNet, VGG, AlexNet).

Every builder takes the ``model`` config and the dataset's ``DataSpec``
(``in_channels``, ``image_size``, ``num_classes``) and returns a module that maps
a float batch (B, C, H, W) to logits (B, num_classes). All of them accept
28x28 and 32x32 images with any channel count, and larger ones too.
"""

from __future__ import annotations

import torch
from torch import nn


def _scaled(channels: int, mult: float) -> int:
    return max(1, int(round(channels * mult)))


def _kaiming_init(module: nn.Module) -> None:
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


# --- CIFAR-style ResNet (He et al. 2016, sec. 4.2) ------------------------------------


class BasicBlock(nn.Module):
    """Two 3x3 conv+BN layers with an identity or 1x1-conv (option B) shortcut."""

    def __init__(self, in_planes: int, planes: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = nn.Identity()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """3 stages of n BasicBlocks at widths w, 2w, 4w; depth = 6n + 2."""

    def __init__(self, depth: int, width: int, in_channels: int, num_classes: int):
        super().__init__()
        blocks_per_stage = (depth - 2) // 6
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True)
        )
        stages, in_planes = [], width
        for stage, planes in enumerate((width, 2 * width, 4 * width)):
            for i in range(blocks_per_stage):
                stride = 2 if stage > 0 and i == 0 else 1
                stages.append(BasicBlock(in_planes, planes, stride))
                in_planes = planes
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_planes, num_classes)
        _kaiming_init(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.stages(self.stem(x)))
        return self.fc(torch.flatten(x, 1))


def build_resnet(cfg, spec) -> nn.Module:
    return CifarResNet(cfg.depth, cfg.width, spec.in_channels, spec.num_classes)


# --- ResNet-50 (torchvision) -----------------------------------------------------------


def build_resnet50(cfg, spec) -> nn.Module:
    import torchvision  # here, not at import: torchvision brings torch._dynamo (1.5 s a process)

    model = torchvision.models.resnet50(weights=None, num_classes=spec.num_classes)
    small = spec.image_size < 64 if cfg.small_input == "auto" else cfg.small_input
    if small:
        # The usual CIFAR adaptation: a 7x7/2 stem plus max-pool would shrink 32x32 to 8x8 at once.
        model.conv1 = nn.Conv2d(spec.in_channels, 64, 3, 1, 1, bias=False)
        model.maxpool = nn.Identity()
    elif spec.in_channels != 3:
        model.conv1 = nn.Conv2d(spec.in_channels, 64, 7, 2, 3, bias=False)
    nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")
    return model


# --- VGG-16 with BatchNorm, small-image variant ----------------------------------------

VGG16_LAYERS = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")


class SmallVGG(nn.Module):
    """VGG-16-BN (config D) whose ceil-mode pools take 28x28 down to 1x1 too."""

    def __init__(self, in_channels: int, num_classes: int, width_mult: float, dropout: float):
        super().__init__()
        layers, channels = [], in_channels
        for item in VGG16_LAYERS:
            if item == "M":
                layers.append(nn.MaxPool2d(2, ceil_mode=True))  # 28 -> 14 -> 7 -> 4 -> 2 -> 1
            else:
                out = _scaled(item, width_mult)
                layers += [nn.Conv2d(channels, out, 3, padding=1, bias=False), nn.BatchNorm2d(out), nn.ReLU(inplace=True)]
                channels = out
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        hidden = _scaled(512, width_mult)
        self.classifier = nn.Sequential(
            nn.Linear(channels, hidden), nn.ReLU(inplace=True), nn.Dropout(dropout), nn.Linear(hidden, num_classes)
        )
        _kaiming_init(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.pool(self.features(x)), 1))


def build_vgg(cfg, spec) -> nn.Module:
    return SmallVGG(spec.in_channels, spec.num_classes, cfg.width_mult, cfg.dropout)


# --- AlexNet, small-image variant (no BatchNorm, as in the original) -------------------


class SmallAlexNet(nn.Module):
    """Five conv layers and three fully connected ones; no normalisation layers.

    Ceil-mode pools leave 3x3 (28x28 input) or 4x4 (32x32) maps, which the
    adaptive pool brings to a fixed 3x3 so the classifier fits any image size.
    """

    def __init__(self, in_channels: int, num_classes: int, width_mult: float, dropout: float):
        super().__init__()
        c1, c2, c3, c4, c5 = (_scaled(c, width_mult) for c in (64, 192, 384, 256, 256))
        hidden = _scaled(1024, width_mult)
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, c1, 5, padding=2), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2, ceil_mode=True),
            nn.Conv2d(c1, c2, 5, padding=2), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2, ceil_mode=True),
            nn.Conv2d(c2, c3, 3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(c3, c4, 3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(c4, c5, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2, ceil_mode=True),
        )  # fmt: skip
        self.pool = nn.AdaptiveAvgPool2d(3)
        self.classifier = nn.Sequential(
            nn.Dropout(dropout), nn.Linear(c5 * 9, hidden), nn.ReLU(inplace=True),
            nn.Dropout(dropout), nn.Linear(hidden, hidden), nn.ReLU(inplace=True),
            nn.Linear(hidden, num_classes),
        )  # fmt: skip
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                # fan_out: with no BN to rescale them, fan_in-scaled activations grow through the max-pools
                # and training stalls at chance for hundreds of steps; fan_out starts learning at once.
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(m.bias)
        nn.init.normal_(self.classifier[-1].weight, std=0.01)  # start with near-uniform predictions

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.pool(self.features(x)), 1))


def build_alexnet(cfg, spec) -> nn.Module:
    return SmallAlexNet(spec.in_channels, spec.num_classes, cfg.width_mult, cfg.dropout)
