"""Overflow attribution: the gradients and the first layer behind a skipped step, found without side effects."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from cli_helpers import TINY, mptrain, read_summary
from mptrain.precision import Precision
from mptrain.telemetry.overflow import OverflowLog, first_nonfinite_module, nonfinite_grads

CPU = torch.device("cpu")


def _net() -> nn.Sequential:
    return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Dropout(0.5), nn.Linear(8, 2))


def test_first_nonfinite_forward_output_is_named_and_the_replay_changes_nothing():
    net = _net().half()
    net[1].float()
    with torch.no_grad():
        net[3].weight.fill_(30000.0)  # BN outputs ~1, summed over 8 inputs x 30000 > 65504: overflows in FP16
    x = torch.randn(16, 4, generator=torch.Generator().manual_seed(0)).half()
    net.train()
    torch.manual_seed(0)  # dropout's draw
    stats, rng = net[1].running_mean.clone(), torch.get_rng_state()
    assert first_nonfinite_module({"model": net}, lambda: net(x)) == "model.3"
    assert torch.equal(net[1].running_mean, stats) and torch.equal(torch.get_rng_state(), rng)
    with torch.no_grad():
        net[3].weight.fill_(0.01)
    assert first_nonfinite_module({"model": net}, lambda: net(x)) is None
    assert not net[3]._forward_hooks  # hooks only for the hunt


def test_a_backward_overflow_names_the_gradients(compose_cfg):
    cfg = compose_cfg("precision=mixed", "precision.init_scale=1024")
    precision = Precision(cfg.precision, CPU)
    net = precision.prepare(_net())
    stepper = precision.stepper(net, lambda p: torch.optim.SGD(p, lr=0.1))
    net[0].weight.register_hook(lambda g: g * float("inf"))
    stepper.zero_grad()
    stepper.backward(net(torch.randn(16, 4)).float().sum())
    assert stepper.step() is False
    grads = nonfinite_grads({"model": net})
    assert grads == ["model.0.weight"]
    log = OverflowLog(keep=2)
    for step in range(3):
        event = log.record(step, "model", grads, None, 512.0)
    assert len(log.events) == 2 and log.events[0]["step"] == 1  # the last K only
    assert OverflowLog.describe(event) == "forward finite, gradients overflowed in backward, first model.0.weight"


@pytest.mark.e2e
def test_divergence_message_names_the_first_layer_and_events_are_kept(tmp_path):
    run = tmp_path / "run"
    out = mptrain("precision=mixed", *TINY, "trainer.max_steps=12", "optim.lr=1e30", "precision.min_scale=256",
                  f"hydra.run.dir={run}", cwd=tmp_path)
    assert out.returncode == 3
    assert "below precision.min_scale=256" in out.stderr and "(first non-finite forward output in model." in out.stderr
    events = read_summary(run)["overflow_events"]
    assert events and all(e["nonfinite_grad_count"] > 0 and e["first_nonfinite_forward"] for e in events)
    assert [e["loss_scale"] for e in events[:3]] == [32768.0, 16384.0, 8192.0]
