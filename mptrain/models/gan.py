"""DCGAN (Radford et al. 2016): strided (transposed) convolutions, BatchNorm, ReLU / LeakyReLU.

Sized by the image: a ``base`` of 4 (32, 64 px) or 7 (28 px) doubled by each
stride-2 layer. The generator maps ``model.latent`` noise to tanh images in
[-1, 1]; the discriminator returns one logit per image (no sigmoid: the loss is
``binary_cross_entropy_with_logits``, which autocast keeps in FP32).
``model.width`` is the feature-map count next to the image (ngf = ndf).
"""

from __future__ import annotations

from torch import nn

from mptrain.errors import UserError

BASES = (4, 7)
MAX_WIDTH_FACTOR = 8  # feature maps grow ×2 per layer away from the image, capped at 8 × width


def _doublings(image_size: int) -> tuple[int, int]:
    for base in BASES:
        size, doublings = image_size, 0
        while size > base and size % 2 == 0:
            size, doublings = size // 2, doublings + 1
        if size == base and doublings >= 2:
            return base, doublings
    raise UserError(
        f"model=dcgan needs images of base × 2^k pixels with base 4 or 7 and k >= 2 "
        f"(28, 32, 64, ...); dataset gives {image_size}×{image_size}"
    )


def _widths(width: int, doublings: int) -> list[int]:
    """Feature maps from the image side inwards: width, 2·width, 4·width, ... (capped)."""
    return [width * min(2**i, MAX_WIDTH_FACTOR) for i in range(doublings)]


def init_dcgan_weights(module: nn.Module) -> None:
    """The paper's initialisation: N(0, 0.02) for convolutions, N(1, 0.02) for BatchNorm scales."""
    if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d)):
        nn.init.normal_(module.weight, 0.0, 0.02)
    elif isinstance(module, nn.BatchNorm2d):
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.zeros_(module.bias)


class Generator(nn.Sequential):
    def __init__(self, latent: int, width: int, channels: int, image_size: int):
        base, doublings = _doublings(image_size)
        widths = _widths(width, doublings)[::-1]  # deepest first
        layers = [
            nn.ConvTranspose2d(latent, widths[0], base, 1, 0, bias=False),  # 1×1 noise → base×base
            nn.BatchNorm2d(widths[0]),
            nn.ReLU(inplace=True),
        ]
        for w_in, w_out in zip(widths, widths[1:]):
            layers += [nn.ConvTranspose2d(w_in, w_out, 4, 2, 1, bias=False), nn.BatchNorm2d(w_out), nn.ReLU(inplace=True)]
        layers += [nn.ConvTranspose2d(widths[-1], channels, 4, 2, 1), nn.Tanh()]
        super().__init__(*layers)
        self.latent = latent
        self.apply(init_dcgan_weights)


class Discriminator(nn.Sequential):
    def __init__(self, width: int, channels: int, image_size: int):
        base, doublings = _doublings(image_size)
        widths = _widths(width, doublings)
        layers = [nn.Conv2d(channels, widths[0], 4, 2, 1), nn.LeakyReLU(0.2, inplace=True)]  # no BN on the input layer
        for w_in, w_out in zip(widths, widths[1:]):
            layers += [nn.Conv2d(w_in, w_out, 4, 2, 1, bias=False), nn.BatchNorm2d(w_out), nn.LeakyReLU(0.2, inplace=True)]
        layers += [nn.Conv2d(widths[-1], 1, base, 1, 0), nn.Flatten(0)]  # base×base → one logit per image
        super().__init__(*layers)
        self.apply(init_dcgan_weights)


def build_dcgan(cfg, spec) -> nn.ModuleDict:
    width, latent = cfg.width, cfg.latent
    return nn.ModuleDict(
        {
            "g": Generator(latent, width, spec.in_channels, spec.image_size),
            "d": Discriminator(width, spec.in_channels, spec.image_size),
        }
    )
