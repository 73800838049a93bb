"""One training loop for every model family.

Host syncs: the skip decision inside a loss-scaled step, and the reads of the
device-side meters every `trainer.log_every` steps; nothing else per step. Evaluation runs each epoch
(optionally) and at the end; eval time is excluded from throughput.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import math
import sys
from pathlib import Path

import torch
from tqdm import tqdm

from mptrain.errors import Diverged, Interrupted
from mptrain.precision import LossScaleCollapsed, Precision
from mptrain.replicas import Replicas
from mptrain.signals import StopRequest
from mptrain.tasks import Task
from mptrain.telemetry import health, run_results, window
from mptrain.telemetry.memory import PeakMemory
from mptrain.telemetry.meters import MeanMeter
from mptrain.telemetry.numerics import NumericsProbe
from mptrain.telemetry.overflow import OverflowLog, attribute_overflow, cause_of
from mptrain.telemetry.tensorboard import TensorBoardLogger
from mptrain.telemetry.throughput import Throughput
from mptrain.telemetry.window import tag

log = logging.getLogger(__name__)
MEMORY_STEPS = 3  # the first steps (and every logging step) are measured for peak memory



def planned_steps(cfg, steps_per_epoch: int) -> int:
    """The run's length from the trainer section: max_steps, else whole epochs."""
    return cfg.max_steps or cfg.epochs * steps_per_epoch


class Trainer:
    def __init__(self, cfg, task: Task, data, precision: Precision, steppers: dict, device: torch.device,
                 tb: TensorBoardLogger, numerics: NumericsProbe | None = None, replicas: Replicas | None = None, *,
                 make_scheduler=None, overflow_events: int = 0, identity: dict | None = None,
                 checkpoint_path: Path | None = None, stop: StopRequest | None = None,
                 speed_options_check: dict | None = None, warnings: list[str] | None = None):
        """`cfg`: the trainer section; `steppers`: one PrecisionStepper per network (build.py makes them with the
        optimizer and schedule); `make_scheduler(optimizer, total_steps)`: rebuilds a schedule when a resumed run's
        length changed; `overflow_events`: how many overflow attributions to keep; `identity`: what a checkpoint
        must match to resume; `checkpoint_path`: where checkpoints go (None: none); `stop`: the request the run's
        signal handlers fill (checkpoint, then stop); `speed_options_check`: what the speed options were verified
        against; `warnings`: the run's list (summary.json), to which training adds what it finds."""
        self.cfg = cfg
        # read every step: plain ints, as a DictConfig attribute read costs ~10 us (a fast model's step is ~8 ms)
        self.log_every, self.eval_every = cfg.log_every, cfg.eval_every or 0
        self.checkpoint_every = cfg.checkpoint_every or 0
        self.replicas = replicas or Replicas()  # data-parallel ranks: rank 0 writes, metrics are reduced
        self.numerics = numerics  # None: no numerics hooks exist, the step costs nothing extra
        self.overflows = OverflowLog(overflow_events)
        self.last_batch = None
        self.task = task
        self.data = data
        self.precision = precision
        self.device = device
        self.tb = tb
        self.steps_per_epoch = len(data.train)
        self.total_steps = planned_steps(cfg, self.steps_per_epoch)
        self.steppers = steppers
        self.make_scheduler = make_scheduler
        self.identity = identity or {}
        self.after_checkpoint: list = []  # called with the step once a checkpoint is on disk
        self.throughput = Throughput(device, cfg.perf_warmup_steps)
        self.memory = PeakMemory(device)
        self.train_meter = MeanMeter()
        self.step = 0
        self.last_media_step = 0
        self.history: list[dict] = []  # eval results, one per evaluation
        self.best: dict | None = None
        self.epoch = self.batch_in_epoch = 0  # the data position a checkpoint records
        self.checkpoint_path = checkpoint_path
        self.checkpoint_step: int | None = None  # the step of the last whole checkpoint on disk (written or resumed)
        self.stop = stop or StopRequest()
        self.resumed_task_state: dict | None = None
        self.speed_options_check = speed_options_check
        self.warnings = warnings if warnings is not None else []
        self._buffers_checked_finite = True  # until a logging step finds a non-finite BatchNorm statistic

    # -- public --------------------------------------------------------------------------
    def fit(self, evaluate: bool = True) -> dict:
        """Train `total_steps` steps, evaluating every `eval_every` steps and each epoch (if asked) and at the end;
        `evaluate=False`: no evaluation."""
        t = self.cfg
        epochs = math.ceil(self.total_steps / self.steps_per_epoch)
        show = t.progress is True or (t.progress == "auto" and sys.stderr.isatty())
        bar = tqdm(total=self.total_steps, initial=self.step, disable=not show, dynamic_ncols=True, leave=False)
        try:
            for epoch in range(self.epoch, epochs):  # a resumed run starts where its checkpoint stopped
                self._train_epoch(epoch, bar, evaluate)
                last = self.step >= self.total_steps
                fresh = self.history and self.history[-1]["step"] == self.step  # eval_every just did it
                if evaluate and (t.eval_every_epoch or last) and not fresh:
                    self.evaluate(epoch + 1)
                if last:
                    break
            if self.checkpoint_path and self.checkpoint_every and self.replicas.is_main:
                self.save_checkpoint()  # the final state
            for warning in run_results.mostly_skipped(self):
                self._warn(warning)
        finally:
            bar.close()
        return self.results()

    def evaluate(self, epoch: int) -> dict:
        for net in self.task.networks().values():
            net.eval()
        limit = self.cfg.eval_max_batches
        batches = itertools.islice(self.data.test, limit) if limit else self.data.test
        with self.precision.kernels():
            metrics = self.task.evaluate(batches, self.precision)
        self.tb.scalars({tag("eval", k): v for k, v in metrics.items()}, self.step)
        self._log_media()
        record = {"step": self.step, "epoch": epoch, **metrics}
        self.history.append(record)
        if run_results.better(record, self.best, self.task.primary_metric, self.task.higher_is_better):
            self.best = record
        log.info("eval step %d: %s", self.step, ", ".join(f"{k} {v:.4g}" for k, v in metrics.items()))
        return record

    def results(self) -> dict:
        """What the run measured, for summary.json (telemetry/run_results.py)."""
        return run_results.collect(self)

    # -- the loop ------------------------------------------------------------------------
    def _train_epoch(self, epoch: int, bar, evaluate: bool) -> None:
        skip = self.batch_in_epoch if epoch == self.epoch else 0  # resumed mid-epoch: batches already trained on
        self.epoch, self.batch_in_epoch = epoch, skip
        for net in self.task.networks().values():
            net.train()
        self.data.train.set_epoch(epoch)
        self.task.start_pass(training=True)
        if self.resumed_task_state is not None:
            self.task.load_state_dict(self.resumed_task_state)
            self.resumed_task_state = None
        self.throughput.begin()
        for batch in itertools.islice(self.data.train, skip, None):
            metrics = self._train_step(batch)
            n = self.task.batch_size(batch)
            self.train_meter.add(metrics, n)
            self.throughput.count(n * self.replicas.world_size)  # every rank trained on as many
            self.step += 1
            self.batch_in_epoch += 1
            bar.update(1)
            done = self.step >= self.total_steps
            logged = self.step % self.log_every == 0 or done
            if logged:
                window.close(self, bar)
            elif self.throughput.at_warmup_boundary:
                self.throughput.end()
                self.throughput.begin()
            if done:
                break
            if evaluate and self.eval_every and self.step % self.eval_every == 0:
                if not logged:
                    window.close(self, bar)
                self.evaluate(epoch + 1)  # between two timing windows: not counted as training time
                for net in self.task.networks().values():
                    net.train()
                self.throughput.begin()
                logged = True
            stop = self._stop_requested(logged)
            if stop or (self.checkpoint_path and self.checkpoint_every and self.step % self.checkpoint_every == 0):
                if not logged:  # a checkpoint holds no half-filled logging window
                    window.close(self, bar)
                if self.replicas.is_main:
                    self.save_checkpoint()
                if stop:
                    raise Interrupted(f"{self.stop.signal} at step {self.step}; checkpoint saved in "
                                      f"{self.checkpoint_path.parent}")
                self.throughput.begin()
        window.close(self, bar)

    def _stop_requested(self, logged: bool) -> bool:
        """Whether a signal asked to stop. Data-parallel ranks decide together, at logging steps only
        (a per-step vote would cost a sync per step): a signal to any rank stops all within log_every steps.
        The vote's result is the answer: a signal landing just after the vote waits for the next one, or this rank
        would stop alone and leave the others waiting in their next collective."""
        if not self.replicas.enabled:
            return self.stop.signal is not None
        if not logged:
            return False
        voted = self.replicas.any(self.stop.signal is not None, self.device)
        if voted and self.stop.signal is None:
            self.stop.signal = "a signal to another rank"
        return voted

    def save_checkpoint(self) -> None:
        from mptrain import checkpoint
        from mptrain.errors import DiskFull, disk_full_as

        whole = f"the last whole checkpoint is step {self.checkpoint_step} ({self.checkpoint_path})" \
            if self.checkpoint_step is not None else "no checkpoint was written before it"  # fmt: skip
        with disk_full_as(lambda: DiskFull(f"no space left on the device writing the checkpoint of step {self.step} "
                                           f"to {self.checkpoint_path.parent}; {whole}; free space there, then "
                                           "continue")):
            checkpoint.save(self.checkpoint_path, checkpoint.capture(self))
        self.checkpoint_step = self.step
        log.info("step %d: checkpoint %s", self.step, self.checkpoint_path)
        for hook in self.after_checkpoint:
            hook(self.step)

    def _train_step(self, batch) -> dict:
        measure = self.step < MEMORY_STEPS or (self.step + 1) % self.log_every == 0
        probe = self.numerics is not None and self.numerics.due(self.step + 1)
        skipped = {name: s.skipped_steps for name, s in self.steppers.items()}  # host ints: no sync
        self.last_batch = batch
        try:
            with contextlib.ExitStack() as stack:
                if measure:
                    stack.enter_context(self.memory.measure_step(self._state_tensors))
                if probe:
                    stack.enter_context(self.numerics.capture(self.task.networks(), self.steppers))
                stack.enter_context(self.precision.kernels())
                metrics = self.task.train_step(batch, self.steppers, self.precision)
        except LossScaleCollapsed as e:
            event = attribute_overflow(self, self.step + 1, None)
            self.step += 1  # the step ran (and was skipped): counted, as the scaler counted it
            raise Diverged(f"step {self.step}: {e}{cause_of(event)}") from None
        if probe:
            self.numerics.flush(self.tb, self.step + 1)
        for name, stepper in self.steppers.items():
            if stepper.skipped_steps > skipped[name]:
                attribute_overflow(self, self.step + 1, name)
        return metrics

    # -- helpers -------------------------------------------------------------------------
    def _check_buffers(self) -> None:
        """Warn once when a running statistic (BatchNorm's mean or variance) stops being finite. At logging
        steps only: one host sync."""
        if self._buffers_checked_finite:
            bad = health.nonfinite_buffers(self.task.networks())
            if bad:
                self._buffers_checked_finite = False
                self._warn(health.nonfinite_buffers_warning(self.step, bad))

    def _warn(self, warning: str) -> None:
        """Logged once, and kept in summary.json's warnings."""
        log.warning(warning)
        self.warnings.append(warning)

    def _log_media(self) -> None:
        self.task.log_media(self.tb, self.step)
        self.last_media_step = self.step

    def _state_tensors(self):
        for stepper in self.steppers.values():
            yield from stepper.state_tensors()
