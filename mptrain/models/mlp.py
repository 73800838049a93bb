"""A plain deep MLP: no normalisation, torch's default Linear init.

Each default-initialised Linear + ReLU shrinks the signal about 2.4x in both the forward
and the backward pass, so weight gradients shrink with depth: at depth 14 on
Fashion-MNIST about 6% of the non-zero ones lie below FP16's 2^-24 (the paper's Fig. 2b
shows ~5% for its Mandarin speech model). It is the underflow case `mptrain-numerics` checks.
"""

from __future__ import annotations

from torch import nn


def build_mlp(cfg, spec) -> nn.Module:
    depth, width = cfg.depth, cfg.width
    layers: list[nn.Module] = [nn.Flatten()]
    features = spec.in_channels * spec.image_size * spec.image_size
    for _ in range(depth - 1):
        layers += [nn.Linear(features, width), nn.ReLU()]
        features = width
    layers.append(nn.Linear(features, spec.num_classes))
    return nn.Sequential(*layers)


__all__ = ["build_mlp"]
