"""Pitfall checks: each known low-precision mistake is named once, and a clean setup gets none."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from mptrain.optim import build_optimizer
from mptrain.precision import MODES, Precision
from mptrain.precision.pitfalls import find_pitfalls

CPU = torch.device("cpu")


def _pitfalls(compose_cfg, model: nn.Module, *overrides: str) -> list[str]:
    cfg = compose_cfg(*overrides)
    precision = Precision(cfg.precision, CPU)
    model = precision.prepare(model)
    stepper = precision.stepper(model, lambda p: build_optimizer(cfg.optim, p))
    return find_pitfalls(precision, {"model": model}, {"model": stepper})


def _net() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU())


def _mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 10))


@pytest.mark.parametrize("mode", [m for m in MODES if m != "fp16_naive"])
def test_the_default_setups_have_no_pitfalls(compose_cfg, mode):
    for optim in ("sgd", "adam"):
        assert _pitfalls(compose_cfg, _net(), f"precision={mode}", f"optim={optim}") == []


def test_adam_eps_that_is_zero_in_fp16_state(compose_cfg):
    (found,) = _pitfalls(compose_cfg, _mlp(), "precision=fp16_naive", "optim=adam")
    assert "optim.eps=1e-08 is 0 in float16" in found and "Fix: optim.eps=1e-4" in found
    assert _pitfalls(compose_cfg, _mlp(), "precision=fp16_naive", "optim=adam", "optim.eps=1e-4") == []
    assert _pitfalls(compose_cfg, _mlp(), "precision=mixed", "optim=adamw") == []  # FP32 masters hold the state


def test_batchnorm_in_fp16(compose_cfg):
    (found,) = _pitfalls(compose_cfg, _net(), "precision=fp16_master", "precision.keep_batchnorm_fp32=false")
    assert "BatchNorm runs in float16" in found and "model.1" in found
    assert _pitfalls(compose_cfg, _net(), "precision=fp16_master") == []


def test_loss_scaler_under_bf16(compose_cfg):
    (found,) = _pitfalls(compose_cfg, _mlp(), "precision=bf16", "precision.loss_scale=128")
    assert "precision.loss_scale=128 under bf16" in found


def test_sigmoid_before_bce_under_autocast(compose_cfg):
    probabilities = nn.Sequential(nn.Linear(8, 1), nn.Sigmoid())
    (found,) = _pitfalls(compose_cfg, probabilities, "precision=amp")
    assert "binary_cross_entropy_with_logits" in found
    assert _pitfalls(compose_cfg, nn.Sequential(nn.Linear(8, 1), nn.Sigmoid()), "precision=fp16_master") == []


def test_tensor_core_shapes_only_on_cuda_fp16():
    nets = {"model": nn.Sequential(nn.Conv2d(3, 64, 3), nn.Conv2d(64, 30, 3), nn.Linear(30, 12))}
    on = lambda device, mode: SimpleNamespace(device=torch.device(device), spec=MODES[mode],  # noqa: E731
                                              mode=mode, cfg=SimpleNamespace(loss_scale=None))
    (found,) = find_pitfalls(on("cuda", "mixed"), nets, {})
    assert found.startswith("2 layers") and "model.1 64->30" in found and "model.2 30->12" in found
    assert find_pitfalls(on("cpu", "mixed"), nets, {}) == []
    assert find_pitfalls(on("cuda", "bf16"), nets, {}) == []
