"""Fréchet distance between image sets in the feature space of a small FP32 classifier.

This is the FID recipe (Heusel et al. 2017) with a different feature extractor:
Inception-v3 has never seen 28×28 grey clothes, and cannot be downloaded here,
so the features are the penultimate layer of a small CNN trained in FP32 on the
same dataset. Scores are comparable only between runs that used the same
extractor (its name and cache key are recorded in summary.json), never with
published Inception-FID figures.

The extractor is trained once per dataset and cached (atomically, loaded with
``weights_only=True``) under ``model.fid.cache_dir``, keyed by a hash of the
training images, the architecture version and the training budget.
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from mptrain.errors import UserError

log = logging.getLogger(__name__)
EXTRACTOR_VERSION = "smallcnn-v1"
FEATURE_DIM = 128


def frechet_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """‖μa − μb‖² + tr(Σa + Σb − 2 (Σa Σb)^½) of two (N, D) feature sets, in float64."""
    a, b = a.double(), b.double()
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = torch.cov(a.T), torch.cov(b.T)
    # tr (Σa Σb)^½ = Σ √λ of the symmetric Σa^½ Σb Σa^½ (same eigenvalues, stable to compute)
    w, v = torch.linalg.eigh(cov_a)
    sqrt_a = (v * w.clamp_min(0).sqrt()) @ v.T
    middle = sqrt_a @ cov_b @ sqrt_a
    trace_sqrt = torch.linalg.eigvalsh((middle + middle.T) / 2).clamp_min(0).sqrt().sum()
    return float((mu_a - mu_b).square().sum() + cov_a.trace() + cov_b.trace() - 2 * trace_sqrt)


class FeatureNet(nn.Module):
    """Three conv blocks → global average pool (the features) → linear classifier."""

    def __init__(self, channels: int, num_classes: int):
        super().__init__()

        def block(c_in, c_out, pool):
            layers = [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]
            return layers + [nn.MaxPool2d(2)] if pool else layers

        self.body = nn.Sequential(*block(channels, 32, True), *block(32, 64, True), *block(64, FEATURE_DIM, False))
        self.head = nn.Linear(FEATURE_DIM, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x).mean(dim=(2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def _dataset_key(data, steps: int) -> str:
    digest = hashlib.blake2b(digest_size=8)
    for tensor in (data.train.images, data.train.labels):
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    digest.update(f"{EXTRACTOR_VERSION}:{steps}".encode())
    return f"{data.spec.name}-{digest.hexdigest()}"


def _train(data, steps: int, device: torch.device) -> tuple[FeatureNet, float]:
    """Plain FP32 training (no precision mode touches the yardstick); returns the net and its test accuracy."""
    net = FeatureNet(data.spec.in_channels, data.spec.num_classes).to(device)
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=3e-3, total_steps=steps)
    done, epoch = 0, 0
    net.train()
    with torch.autocast(device.type, enabled=False):
        while done < steps:
            data.train.set_epoch(10_000 + epoch)  # a stream of its own, apart from the GAN's epochs
            for x, y in data.train:
                optimizer.zero_grad(set_to_none=True)
                F.cross_entropy(net(x), y).backward()
                optimizer.step()
                scheduler.step()
                done += 1
                if done == steps:
                    break
            epoch += 1
        net.eval()
        correct = total = 0
        with torch.no_grad():
            for x, y in data.test:
                correct += int((net(x).argmax(1) == y).sum())
                total += len(y)
    data.train.set_epoch(0)
    return net, correct / max(total, 1)


def load_or_train_extractor(data, cache_dir: str, steps: int, device: torch.device) -> tuple[FeatureNet, dict]:
    """The dataset's cached feature extractor (trained now if missing) and what summary.json says of it."""
    key = _dataset_key(data, steps)
    path = Path(os.path.expanduser(cache_dir)) / f"{key}.pt"
    net = FeatureNet(data.spec.in_channels, data.spec.num_classes).to(device)
    if path.is_file():
        try:
            saved = torch.load(path, map_location=device, weights_only=True)
            net.load_state_dict(saved["state_dict"])
            meta = saved["meta"]
        except Exception as err:
            raise UserError(f"feature-extractor cache {path} is unreadable ({err}); delete it to retrain") from None
    else:
        log.info("training the FID feature extractor (%s, %d steps, fp32) for %s", EXTRACTOR_VERSION, steps, data.spec.name)
        net, accuracy = _train(data, steps, device)
        meta = {
            "name": f"mptrain-{EXTRACTOR_VERSION}",
            "dataset": data.spec.name,
            "train_steps": steps,
            "test_accuracy": accuracy,
            "feature_dim": FEATURE_DIM,
            "key": key,
        }
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
            torch.save({"state_dict": {k: v.cpu() for k, v in net.state_dict().items()}, "meta": meta}, tmp)
            os.replace(tmp, path)  # concurrent runs: whole files only, the last one wins
        except OSError as err:
            log.warning("could not cache the feature extractor in %s (%s); it will be retrained next run", path, err)
    net.eval().requires_grad_(False)
    return net, {**meta, "path": str(path)}
