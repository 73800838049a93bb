"""CUDA-only checks (skipped without CUDA): the hot loop's host syncs, TF32, peak memory."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from mptrain.precision import Precision
from mptrain.tasks.classification import ClassificationTask
from mptrain.telemetry.meters import MeanMeter

pytestmark = pytest.mark.gpu


def _tiny_cnn() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))


def _syncs_per_step(compose_cfg, mode: str, steps: int = 3) -> float:
    device = torch.device("cuda")
    engine = Precision(compose_cfg(f"precision={mode}").precision, device)
    task = ClassificationTask(engine.prepare(_tiny_cnn()))
    stepper = engine.stepper(task.model, lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, foreach=True))
    x, y = torch.randn(8, 3, 8, 8, device=device), torch.randint(0, 4, (8,), device=device)
    meter = MeanMeter()
    meter.add(task.train_step((x, y), {"model": stepper}, engine), 8)  # lazy state is created here
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for _ in range(steps):
                meter.add(task.train_step((x, y), {"model": stepper}, engine), 8)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    return sum("synchroniz" in str(w.message) for w in caught) / steps


@pytest.mark.parametrize("mode", ["fp32", "fp16_naive", "fp16_master", "bf16"])
def test_unscaled_modes_never_sync_in_a_step(compose_cfg, mode):
    assert _syncs_per_step(compose_cfg, mode) == 0


@pytest.mark.parametrize("mode", ["mixed", "amp"])
def test_scaled_modes_sync_once_per_step_for_the_skip_decision(compose_cfg, mode):
    assert _syncs_per_step(compose_cfg, mode) == 1


def test_tf32_is_off_for_fp32_unless_asked(compose_cfg):
    Precision(compose_cfg("precision=fp32").precision, torch.device("cuda"))
    assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
    Precision(compose_cfg("precision=fp32", "precision.allow_tf32=true").precision, torch.device("cuda"))
    assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
