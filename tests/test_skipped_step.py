"""A skipped step leaves no trace: the buffers its forward changed (BatchNorm's running statistics and batch
count) are as before it, so later evaluations stay finite."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from mptrain.bench.measure import RecordingLogger
from mptrain.build import build_trainer

CPU = torch.device("cpu")


def _trainer(compose_cfg, tmp_path: Path, mode: str):
    cfg = compose_cfg("debug=tiny", f"precision={mode}", "trainer.device=cpu")
    return build_trainer(cfg, CPU, tmp_path, RecordingLogger(), None, [])


def _bn_buffers(trainer) -> list[torch.Tensor]:
    return [b.detach().clone() for b in trainer.task.networks()["model"].buffers()]


def _train(trainer, batches) -> list[bool]:
    applied = []
    stepper = trainer.steppers["model"]
    for batch in batches:
        before = stepper.steps_applied
        with trainer.precision.kernels():
            trainer.task.train_step(batch, trainer.steppers, trainer.precision)
        applied.append(stepper.steps_applied > before)
    return applied


@pytest.mark.parametrize("mode", ["mixed_scale128", "amp"])
def test_a_batch_that_overflows_the_forward_is_skipped_without_a_trace(compose_cfg, tmp_path, mode):
    """Step 2's batch overflows FP16 in the forward (inputs x 1e6 > 65504): its update is skipped, and BatchNorm's
    statistics are those of a run that never saw that batch, bit for bit (a static scale: the skip changes
    nothing else); the evaluation after it is finite and equal."""
    seen = _trainer(compose_cfg, tmp_path / "seen", mode)
    batches = [tuple(t.clone() for t in b) for b, _ in zip(seen.data.train, range(3))]
    poisoned = (batches[1][0] * 1e6, batches[1][1])

    buffers = seen.task.networks()["model"].buffers
    _train(seen, batches[:1])
    before = _bn_buffers(seen)
    with seen.precision.kernels():  # the poisoned forward alone does leave NaN statistics behind ...
        seen.steppers["model"].zero_grad()
        loss = seen.task.check_loss(poisoned, seen.precision, seen.task.networks())
    assert not math.isfinite(loss.item())
    assert not all(torch.isfinite(b).all() for b in buffers() if b.dtype.is_floating_point)
    seen.steppers["model"]._undo_forward()
    assert all(torch.equal(a, b) for a, b in zip(_bn_buffers(seen), before))

    assert _train(seen, [poisoned, batches[2]]) == [False, True]  # ... the step puts them back
    never = _trainer(compose_cfg, tmp_path / "never", mode)
    assert _train(never, [batches[0], batches[2]]) == [True, True]
    for a, b in zip(_bn_buffers(seen), _bn_buffers(never)):
        assert torch.equal(a, b)
    if mode == "amp":  # GradScaler backs off on the skip; the static scale does not
        return
    evaluated = [t.evaluate(1)["loss"] for t in (seen, never)]
    assert math.isfinite(evaluated[0]) and evaluated[0] == evaluated[1]


def test_statistics_that_stop_being_finite_get_one_warning(compose_cfg, tmp_path):
    trainer = _trainer(compose_cfg, tmp_path, "fp32")
    batches = [b for b, _ in zip(trainer.data.train, range(2))]
    _train(trainer, [(batches[0][0] * float("inf"), batches[0][1])])  # inf in the data: no scaler skips it
    trainer._check_buffers()
    trainer._check_buffers()
    assert len(trainer.warnings) == 1 and "running statistic(s) are no longer finite" in trainer.warnings[0]
    assert "running_mean" in trainer.warnings[0] or "running_var" in trainer.warnings[0]


@pytest.mark.e2e
def test_a_static_scale_that_always_overflows_stops_as_diverged(tmp_path):
    from cli_helpers import mptrain, read_summary

    out = mptrain("debug=tiny", "precision=mixed", "precision.loss_scale=1e30", "precision.max_consecutive_skips=3",
                  f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert out.returncode == 3, out.stderr[-2000:]
    s = read_summary(tmp_path / "run")
    assert s["status"] == "diverged" and s["skipped_steps"] == 3 and "overflowed 3 steps in a row" in s["error"]
    assert "step 3:" in s["error"] and "gradients overflowed in backward, first model." in s["error"]  # and where
    assert "updates" in out.stdout and "0 applied, 3 skipped" in out.stdout


def test_a_completed_run_that_skipped_often_says_so(compose_cfg, tmp_path):
    trainer = _trainer(compose_cfg, tmp_path, "mixed")
    trainer.steppers["model"].scaler.skipped_steps = 2
    trainer.step = 8
    from mptrain.telemetry.run_results import mostly_skipped

    warnings = mostly_skipped(trainer)
    assert len(warnings) == 1 and "2 of 8 steps (25.0 %) of model were skipped" in warnings[0]
