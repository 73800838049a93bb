"""Timed windows through mptrain's Trainer and through the bare loop, on the same model and batches.

Both sides: `warmup` steps untimed, then `windows` windows of `window` steps, each window
device-synchronised at its ends; the figure is the median window. The Trainer's windows are
its own logging windows (`trainer.log_every = window`), so its per-window host sync and
TensorBoard write are inside what is timed, as they are in a real run.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from mptrain.bench.bare import BareLoop
from mptrain.telemetry.memory import PeakMemory
from mptrain.telemetry.tensorboard import NullLogger
from mptrain.telemetry.throughput import synchronize


@dataclass
class Timing:
    step_ms: list[float] = field(default_factory=list)  # one per timed window
    samples_per_s: list[float] = field(default_factory=list)
    peak_bytes: int = 0

    def merge(self, other: Timing) -> None:
        self.step_ms += other.step_ms
        self.samples_per_s += other.samples_per_s
        self.peak_bytes = max(self.peak_bytes, other.peak_bytes)

    def summary(self) -> dict:
        ms = sorted(self.step_ms)
        quartiles = statistics.quantiles(ms, n=4) if len(ms) > 1 else [ms[0]] * 3
        return {"samples_per_s": statistics.median(self.samples_per_s), "step_ms": statistics.median(ms),
                "step_ms_iqr_pct": 100 * (quartiles[2] - quartiles[0]) / statistics.median(ms),
                "windows": len(ms), "peak_bytes": self.peak_bytes}  # fmt: skip


class RecordingLogger(NullLogger):
    """Stands in for TensorBoard: keeps the scalars, drops the rest."""

    def __init__(self):
        self.points: list[tuple[int, dict]] = []

    def scalars(self, values: dict, step: int) -> None:
        self.points.append((step, dict(values)))


def time_trainer(cfg, device, warmup: int) -> Timing:
    """One Trainer run as `mptrain` builds it (no evaluation, no numerics); its logged windows after warm-up."""
    from mptrain.build import build_trainer

    tb = RecordingLogger()
    with tempfile.TemporaryDirectory(prefix="mptrain-bench-") as tmp:
        trainer = build_trainer(cfg, device, Path(tmp), tb, None, [])
        trainer.fit(evaluate=False)
    timed = [v for step, v in tb.points if step > warmup and "perf/step_time_ms" in v]
    return Timing([v["perf/step_time_ms"] for v in timed], [v["perf/samples_per_s"] for v in timed],
                  int(trainer.results()["peak_memory_bytes"] or 0))


def bare_loop(cfg_fp32, device, kind: str, total_steps: int, kernels=None):
    """(the bare loop, the fp32 Trainer it was taken from): the model and batches an fp32 Trainer would get (same
    seed, same data), its steps run inside `kernels()` (the emulated FP16 kernels when its arm uses them)."""
    from mptrain.build import build_trainer

    with tempfile.TemporaryDirectory(prefix="mptrain-bench-") as tmp:
        trainer = build_trainer(cfg_fp32, device, Path(tmp), RecordingLogger(), None, [])
    loop = BareLoop(trainer.task.networks()["model"], cfg_fp32.model.task, kind, cfg_fp32.optim, total_steps, device,
                    kernels)  # fmt: skip
    return loop, trainer


def time_bare(cfg_fp32, device, kind: str, warmup: int, windows: int, window: int, kernels=None) -> Timing:
    """The bare loop's timed windows (see `bare_loop`)."""
    loop, trainer = bare_loop(cfg_fp32, device, kind, warmup + windows * window, kernels)
    batches = _forever(trainer.data.train)
    memory = PeakMemory(device)
    for i in range(warmup):
        if i < 3:  # as the Trainer does: the first steps are measured for peak memory
            with memory.measure_step(loop.state_tensors):
                loop.step(next(batches))
        else:
            loop.step(next(batches))
    timing = Timing()
    for _ in range(windows):
        samples = 0
        synchronize(device)
        start = time.perf_counter()
        for _ in range(window):
            batch = next(batches)
            loop.step(batch)
            samples += trainer.task.batch_size(batch)
        synchronize(device)
        elapsed = time.perf_counter() - start
        timing.step_ms.append(1000 * elapsed / window)
        timing.samples_per_s.append(samples / elapsed)
    timing.peak_bytes = memory.read()
    return timing


def _forever(loader):
    epoch = 0
    while True:
        loader.set_epoch(epoch)
        yield from loader
        epoch += 1


def cuda_reset(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
