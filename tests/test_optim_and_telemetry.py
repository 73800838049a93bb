"""Optimizer/schedule building and the telemetry pieces the trainer reads."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from mptrain.optim import build_optimizer, build_scheduler
from mptrain.precision import Precision
from mptrain.telemetry.memory import CPU_METHOD, PeakMemory
from mptrain.telemetry.meters import MeanMeter
from mptrain.telemetry.throughput import Throughput


def _net():
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                         nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 4))


@pytest.mark.parametrize("name", ["sgd", "adam", "adamw"])
def test_optimizers_build_with_no_decay_on_vectors(compose_cfg, name):
    cfg = compose_cfg(f"optim={name}", "optim.weight_decay=0.1").optim
    model = _net()
    opt = build_optimizer(cfg, list(model.parameters()))
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.ndim > 1 for p in decay["params"]) and all(p.ndim == 1 for p in no_decay["params"])


def _lr_trajectory(cfg, total_steps: int) -> list[float]:
    opt = build_optimizer(cfg, [nn.Parameter(torch.ones(2, 2))])
    sched = build_scheduler(cfg, opt, total_steps=total_steps)
    lrs = []
    for _ in range(total_steps):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return lrs


def test_warmup_then_cosine(compose_cfg):
    lrs = _lr_trajectory(compose_cfg("optim.lr=1.0", "optim.warmup_steps=4", "optim.warmup_start_factor=0.25").optim, 14)
    assert lrs[0] == pytest.approx(0.25) and lrs[4] == pytest.approx(1.0)
    assert lrs[:5] == sorted(lrs[:5]) and lrs[4:] == sorted(lrs[4:], reverse=True)
    assert lrs[-1] < 0.05


def test_step_schedule_milestones_are_fractions(compose_cfg):
    lrs = _lr_trajectory(compose_cfg("optim.lr=1.0", "optim.schedule=step").optim, 8)
    assert lrs == pytest.approx([1, 1, 1, 1, 0.1, 0.1, 0.01, 0.01])


def test_mean_meter_weights_by_batch_and_sets_nonfinite_apart():
    meter = MeanMeter()
    meter.add({"loss": torch.tensor(1.0)}, n=1)
    meter.add({"loss": torch.tensor(4.0)}, n=3)
    meter.add({"loss": torch.tensor(math.inf)}, n=2)
    means, nonfinite = meter.read()
    assert means["loss"] == pytest.approx(13 / 4) and nonfinite["loss"] == 1


def test_mean_meter_pools_steps_that_log_different_metrics_and_reduces_them_together():
    meter = MeanMeter()
    meter.add({"loss": torch.tensor(1.0), "accuracy": torch.tensor(0.5)}, n=2)
    meter.add({"loss": torch.tensor(math.nan), "accuracy": torch.tensor(1.0)}, n=2)
    meter.add({"loss": torch.tensor(3.0, dtype=torch.float16)}, n=6)  # a step without accuracy, in FP16
    means, nonfinite = meter.read(reduce=lambda stacked: stacked * 2)  # two ranks that saw the same
    assert means == {"loss": pytest.approx(20 / 8), "accuracy": pytest.approx(0.75)}
    assert nonfinite == {"loss": 2, "accuracy": 0}
    meter.reset()
    assert meter.read() == ({}, {})


def test_throughput_excludes_warmup_segments():
    tp = Throughput(torch.device("cpu"), warmup_steps=2)
    for samples in (10, 10):
        tp.begin()
        for _ in range(samples // 10 * 2):
            tp.count(5)
        tp.end()
    assert tp._steady_samples == 10 and tp._all_samples == 20
    samples_per_s, steps_per_s = tp.mean_rates()
    assert samples_per_s == pytest.approx(5 * steps_per_s)


def test_cpu_peak_memory_counts_saved_activations_and_fp16_halves_them(compose_cfg):
    peaks = {}
    for mode in ("fp32", "mixed"):
        engine = Precision(compose_cfg(f"precision={mode}").precision, torch.device("cpu"))
        model = engine.prepare(_net())
        stepper = engine.stepper(model, lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9))
        memory = PeakMemory(torch.device("cpu"))
        x = torch.randn(64, 3, 16, 16)
        for _ in range(2):
            with memory.measure_step(stepper.state_tensors):
                stepper.zero_grad()
                stepper.backward(model(x).float().logsumexp(1).mean())
                stepper.step()
        peaks[mode] = memory.read()
        assert memory.method == CPU_METHOD
    activations_fp32 = 64 * 16 * 16 * 16 * 4  # one conv output alone, in bytes
    assert peaks["fp32"] > 4 * activations_fp32  # activations dominate, and are counted
    assert peaks["mixed"] < 0.65 * peaks["fp32"]  # FP16 activations: "nearly halves"
