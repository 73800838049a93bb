"""Trainer overhead per step, paired: one Trainer step, then one bare-loop step, on the same batch.

Whole timed windows, minutes apart on a shared machine, drift by more than the few percent a
trainer's overhead amounts to. Alternating single steps makes every drift hit both sides
alike: the medians' ratio is the per-step overhead; the logging window's cost (host sync,
TensorBoard write), spread over `trainer.log_every` steps, is added to it.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

from mptrain.bench.measure import RecordingLogger, bare_loop
from mptrain.telemetry import window
from mptrain.telemetry.throughput import synchronize

WARMUP_PAIRS = 3


def paired_overhead(cfg, cfg_fp32, device, kind: str, pairs: int, kernels=None) -> dict:
    """Median ms of a Trainer step (as `fit` runs it: memory measured every `log_every`-th step, metric meters,
    the skip decision) and of a bare step, `pairs` alternations after a warm-up; the overhead with logging."""
    from mptrain.build import build_trainer

    with tempfile.TemporaryDirectory(prefix="mptrain-bench-") as tmp:
        trainer = build_trainer(cfg, device, Path(tmp), RecordingLogger(), None, [])
    bare, _ = bare_loop(cfg_fp32, device, kind, WARMUP_PAIRS + pairs, kernels)
    batch = next(iter(trainer.data.train))
    n = trainer.task.batch_size(batch)
    ours, theirs, snapshots = [], [], []
    for i in range(WARMUP_PAIRS + pairs):
        synchronize(device)
        start = time.perf_counter()
        trainer.train_meter.add(trainer._train_step(batch), n)
        trainer.step += 1
        synchronize(device)
        middle = time.perf_counter()
        bare.step(batch)
        synchronize(device)
        if i >= WARMUP_PAIRS:
            ours.append(middle - start)
            theirs.append(time.perf_counter() - middle)
            snapshots.append(_snapshot_seconds(trainer, device))
    trainer.throughput.begin()
    start = time.perf_counter()
    window.close(trainer, _NoBar())
    window_s = time.perf_counter() - start
    o, b = statistics.median(ours), statistics.median(theirs)
    every = cfg.trainer.log_every
    snapshot = statistics.median(snapshots) if snapshots and snapshots[0] is not None else None
    return {"pairs": pairs, "ours_step_ms": 1e3 * o, "bare_step_ms": 1e3 * b, "log_window_ms": 1e3 * window_s,
            "log_every": every, "overhead": (o + window_s / every) / b - 1,
            "buffer_snapshot_ms": None if snapshot is None else 1e3 * snapshot,
            "buffer_snapshot_share": None if snapshot is None else snapshot / o}  # fmt: skip


def _snapshot_seconds(trainer, device) -> float | None:
    """One more of the copies a scaled step makes of the buffers its forward changes (BatchNorm statistics,
    restored if the step is skipped), timed alone: its share of the step is the cost of leaving no trace."""
    steppers = [s for s in trainer.steppers.values() if s.keeps_buffers]
    if not steppers:
        return None
    synchronize(device)
    start = time.perf_counter()
    for stepper in steppers:
        stepper.keep_buffers()
    synchronize(device)
    return time.perf_counter() - start


class _NoBar:
    """What the logging window (telemetry/window.py) expects of a progress bar, showing nothing."""

    disable = True

    def set_postfix(self, **_):
        pass
