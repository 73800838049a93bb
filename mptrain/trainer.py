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

from mptrain.errors import Diverged, Interrupted, UserError
from mptrain.optim import build_optimizer, build_scheduler
from mptrain.precision import LossScaleCollapsed, Precision
from mptrain.replicas import Replicas
from mptrain.signals import StopRequest
from mptrain.tasks import Task
from mptrain.telemetry import health
from mptrain.telemetry.memory import PeakMemory
from mptrain.telemetry.meters import MeanMeter
from mptrain.telemetry.numerics import NumericsProbe
from mptrain.telemetry.overflow import OverflowLog, first_nonfinite_module, nonfinite_grads
from mptrain.telemetry.scale_history import scale_verdict
from mptrain.telemetry.summary import format_value
from mptrain.telemetry.tensorboard import TensorBoardLogger
from mptrain.telemetry.throughput import Throughput
from mptrain.testing import install_faults

log = logging.getLogger(__name__)
MEMORY_STEPS = 3  # the first steps (and every logging step) are measured for peak memory


def tag(split: str, key: str) -> str:
    """TensorBoard tag of a task metric: `train/loss`, or the key itself when it names its own group."""
    return key if "/" in key else f"{split}/{key}"


class Trainer:
    def __init__(self, cfg, task: Task, data, precision: Precision, device: torch.device, tb: TensorBoardLogger,
                 numerics: NumericsProbe | None = None, replicas: Replicas | None = None, *,
                 checkpoint_path: Path | None = None, stop: StopRequest | None = None,
                 speed_options_check: dict | None = None, warnings: list[str] | None = None):
        """`checkpoint_path`: where checkpoints go (None: none); `stop`: the request the run's signal handlers
        fill (checkpoint, then stop); `speed_options_check`: what the speed options were verified against;
        `warnings`: the run's list (summary.json), to which training adds what it finds."""
        self.cfg = cfg
        self.replicas = replicas or Replicas()  # data-parallel ranks: rank 0 writes, metrics are reduced
        self.numerics = numerics  # None: no numerics hooks exist, the step costs nothing extra
        self.overflows = OverflowLog(cfg.telemetry.overflow_events)
        self.last_batch = None
        self.task = task
        self.data = data
        self.precision = precision
        self.device = device
        self.tb = tb
        self.steps_per_epoch = len(data.train)
        t = cfg.trainer
        self.total_steps = t.max_steps or t.epochs * self.steps_per_epoch
        self.steppers = {
            name: precision.stepper(
                net,
                lambda params: build_optimizer(cfg.optim, params, update=precision.spec.update),
                lambda opt: build_scheduler(cfg.optim, opt, self.total_steps),
                max_grad_norm=cfg.optim.max_grad_norm,
                agree_on_overflow=self.replicas.agree_on_overflow,
            )
            for name, net in task.networks().items()
        }
        self.after_checkpoint: list = []  # called with the step once a checkpoint is on disk
        install_faults(self)  # test-only fault injection (mptrain/testing.py); nothing unless asked
        self.throughput = Throughput(device, t.perf_warmup_steps)
        self.memory = PeakMemory(device)
        self.train_meter = MeanMeter()
        self.step = 0
        self.last_media_step = 0
        self.history: list[dict] = []  # eval results, one per evaluation
        self.best: dict | None = None
        self.epoch = self.batch_in_epoch = 0  # the data position a checkpoint records
        self.checkpoint_path = checkpoint_path
        self.stop = stop or StopRequest()
        self.resumed_task_state: dict | None = None
        self.speed_options_check = speed_options_check
        self.warnings = warnings if warnings is not None else []
        self._buffers_checked_finite = True  # until a logging step finds a non-finite BatchNorm statistic

    # -- public --------------------------------------------------------------------------
    def fit(self, evaluate: bool = True) -> dict:
        """Train `total_steps` steps, evaluating every `eval_every` steps and each epoch (if asked) and at the end;
        `evaluate=False`: no evaluation."""
        t = self.cfg.trainer
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
            if self.checkpoint_path and t.checkpoint_every and self.replicas.is_main:
                self.save_checkpoint()  # the final state
            self._warn_if_mostly_skipped()
        finally:
            bar.close()
        return self.results()

    def evaluate(self, epoch: int) -> dict:
        for net in self.task.networks().values():
            net.eval()
        limit = self.cfg.trainer.eval_max_batches
        batches = itertools.islice(self.data.test, limit) if limit else self.data.test
        with self.precision.kernels():
            metrics = self.task.evaluate(batches, self.precision)
        self.tb.scalars({tag("eval", k): v for k, v in metrics.items()}, self.step)
        self._log_media()
        record = {"step": self.step, "epoch": epoch, **metrics}
        self.history.append(record)
        if self._better(record):
            self.best = record
        log.info("eval step %d: %s", self.step, ", ".join(f"{k} {v:.4g}" for k, v in metrics.items()))
        return record

    def results(self) -> dict:
        scales = {name: s.current_scale for name, s in self.steppers.items() if s.current_scale is not None}
        samples_per_s, steps_per_s, spread = self.throughput.median_rates()
        return {
            "steps": self.step,
            "epochs": self.step / self.steps_per_epoch,
            "final": self.history[-1] if self.history else None,
            "best": self.best,
            "history": self.history,
            "batch_size": self.data.train.batch_size,
            "samples_per_s": samples_per_s,  # the median logging window after warm-up
            "samples_per_s_quartiles": spread,
            "steps_per_s": steps_per_s,
            "peak_memory_bytes": self.memory.read(),
            "peak_memory_method": self.memory.method,
            "skipped_steps": sum(s.skipped_steps for s in self.steppers.values()),
            "skipped_steps_by_network": self._named_only({n: s.skipped_steps for n, s in self.steppers.items()}),
            "final_loss_scale": self._single_or_named({n: float(v) for n, v in scales.items()}),
            "overflow_events": list(self.overflows.events),
            "loss_scale_verdict": self._scale_verdicts(),
            "bytes_per_parameter": {name: s.bytes_per_parameter() for name, s in self.steppers.items()},
            "fp16_kernels": self.precision.fp16_kernels,
            "fp8": self.precision.fp8_report,
            "cpu_fp16": self.precision.cpu_fp16,
            "arithmetic": self.precision.arithmetic,
            "speed_options_check": self.speed_options_check,
            **self.task.describe(),
        }

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
            logged = self.step % self.cfg.trainer.log_every == 0 or done
            if logged:
                self._log_window(bar)
            elif self.throughput.at_warmup_boundary:
                self.throughput.end()
                self.throughput.begin()
            if done:
                break
            eval_every = self.cfg.trainer.eval_every
            if evaluate and eval_every and self.step % eval_every == 0:
                if not logged:
                    self._log_window(bar)
                self.evaluate(epoch + 1)  # between two timing windows: not counted as training time
                for net in self.task.networks().values():
                    net.train()
                self.throughput.begin()
                logged = True
            checkpoint_every = self.cfg.trainer.checkpoint_every
            stop = self._stop_requested(logged)
            if stop or (self.checkpoint_path and checkpoint_every and self.step % checkpoint_every == 0):
                if not logged:  # a checkpoint holds no half-filled logging window
                    self._log_window(bar)
                if self.replicas.is_main:
                    self.save_checkpoint()
                if self.stop.signal:
                    raise Interrupted(f"{self.stop.signal} at step {self.step}; checkpoint saved in "
                                      f"{self.checkpoint_path.parent}")
                self.throughput.begin()
        self._log_window(bar)

    def _stop_requested(self, logged: bool) -> bool:
        """Whether a signal asked to stop. Data-parallel ranks decide together, at logging steps only
        (a per-step vote would cost a sync per step): a signal to any rank stops all within log_every steps."""
        if not self.replicas.enabled:
            return self.stop.signal is not None
        if not logged:
            return False
        if self.replicas.any(self.stop.signal is not None, self.device) and self.stop.signal is None:
            self.stop.signal = "a signal to another rank"
        return self.stop.signal is not None

    def save_checkpoint(self) -> None:
        from mptrain import checkpoint

        checkpoint.save(self.checkpoint_path, checkpoint.capture(self))
        log.info("step %d: checkpoint %s", self.step, self.checkpoint_path)
        for hook in self.after_checkpoint:
            hook(self.step)

    def state_dict(self) -> dict:
        """Everything but the RNG streams that continuing bit-identically needs: weights, steppers (optimizer,
        masters, loss scaler, schedule), the task's carried state, the data position, history."""
        return {
            "step": self.step, "epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch,
            "networks": {name: net.state_dict() for name, net in self.task.networks().items()},
            "steppers": {name: stepper.state_dict() for name, stepper in self.steppers.items()},
            "task": self.task.state_dict(),
            "history": self.history, "best": self.best, "last_media_step": self.last_media_step,
            "overflow_events": list(self.overflows.events), "total_steps": self.total_steps,
            "overflow_history": {net: [list(e) for e in events] for net, events in self.overflows.history.items()},
        }  # fmt: skip

    def load_state_dict(self, state: dict) -> None:
        """Continue where `state_dict` left off (weights first, then the steppers' masters over them)."""
        for name, net in self.task.networks().items():
            net.load_state_dict(state["networks"][name])
        for name, stepper in self.steppers.items():
            stepper.load_state_dict(state["steppers"][name])
        self.step, self.epoch, self.batch_in_epoch = state["step"], state["epoch"], state["batch_in_epoch"]
        self.history, self.best, self.last_media_step = state["history"], state["best"], state["last_media_step"]
        self.overflows.events.extend(state["overflow_events"])
        for net, events in state.get("overflow_history", {}).items():  # checkpoints before it was kept: none
            self.overflows.history[net] = [tuple(e) for e in events]
        self.resumed_task_state = state["task"]  # loaded when its pass starts (an LM's hidden state)
        planned = state.get("total_steps", self.total_steps)
        if planned != self.total_steps:  # the LR schedule was built for the checkpoint's length
            if not self.cfg.trainer.replan_schedule:
                raise UserError(f"the checkpoint's run was planned for {planned} steps and this one for "
                                f"{self.total_steps}: its LR schedule would continue past its end (a cosine climbs "
                                "back up); set trainer.replan_schedule=true to rebuild the schedule for "
                                f"{self.total_steps} steps from step {self.step}, or resume with the same length")
            for stepper in self.steppers.values():
                stepper.replan_schedule(lambda opt: build_scheduler(self.cfg.optim, opt, self.total_steps))
            log.info("LR schedule rebuilt for %d steps (was %d) from step %d", self.total_steps, planned, self.step)

    def _train_step(self, batch) -> dict:
        measure = self.step < MEMORY_STEPS or (self.step + 1) % self.cfg.trainer.log_every == 0
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
            event = self._attribute_overflow(self.step + 1, None)
            self.step += 1  # the step ran (and was skipped): counted, as the scaler counted it
            raise Diverged(f"step {self.step}: {e}{self._cause(event)}") from None
        if probe:
            self.numerics.flush(self.tb, self.step + 1)
        for name, stepper in self.steppers.items():
            if stepper.skipped_steps > skipped[name]:
                self._attribute_overflow(self.step + 1, name)
        return metrics

    def _attribute_overflow(self, step: int, network: str | None) -> dict | None:
        """Name the gradients and the first layer behind a skipped step (runs only when one happens)."""
        networks = self.task.networks()
        suspects = networks if network is None else {network: networks[network]}
        grads = nonfinite_grads(suspects)
        module = first_nonfinite_module(networks, self._replay)
        stepper = self.steppers[network] if network else next(iter(self.steppers.values()))
        scale = float(stepper.current_scale) if stepper.current_scale is not None else None
        event = self.overflows.record(step, network or "all", grads, module, scale)
        log.info("step %d: %s skipped: %s", step, event["network"], OverflowLog.describe(event))
        return event

    def _replay(self) -> None:
        with self.precision.kernels():
            self.task.replay_forward(self.last_batch, self.precision)

    @staticmethod
    def _cause(event: dict | None) -> str:
        cause = OverflowLog.describe(event)
        return f" ({cause})" if cause else ""

    def _log_window(self, bar) -> None:
        """Close the timing window and write one TensorBoard point (one host sync)."""
        timing = self.throughput.end()
        means, nonfinite = self.train_meter.read(self.replicas.sum if self.replicas.enabled else None)
        self.train_meter.reset()
        if timing is None and not means:
            self.throughput.begin()
            return
        scaled = any(s.scaler is not None for s in self.steppers.values())
        bad = {k: v for k, v in nonfinite.items() if v and k.split("/")[-1].startswith("loss")}
        if bad and not scaled:
            event = self._attribute_overflow(self.step, None)
            what = f"non-finite {', '.join(bad)} at step {self.step} (no loss scaler to skip it)"
            raise Diverged(what + self._cause(event))
        means.update(self.task.derived_metrics(means))
        values = {tag("train", k): v for k, v in means.items()}
        if timing is not None:
            values["perf/samples_per_s"], values["perf/step_time_ms"] = timing
        values["memory/peak_bytes"] = self.memory.read()
        self._check_buffers()
        for name, stepper in self.steppers.items():
            suffix = "" if len(self.steppers) == 1 else f"_{name}"
            if stepper.scaler is not None:  # nothing is ever skipped without one
                values[f"amp/loss_scale{suffix}"] = float(stepper.current_scale)
                values[f"amp/skipped_steps{suffix}"] = stepper.skipped_steps
            values[f"optim/lr{suffix}"] = stepper.lr()
        self.tb.scalars(values, self.step)
        if bar.disable:  # no terminal: a log line instead of the bar
            shown = [tag("train", k) for k in means] + ["perf/samples_per_s"]
            shown += [k for k in values if k.startswith("amp/loss_scale")]
            log.info("step %d/%d: %s", self.step, self.total_steps,
                     ", ".join(f"{k.split('/')[1]} {format_value(k, values[k])}" for k in shown if k in values))
        elif "train/loss" in values:
            bar.set_postfix(loss=f"{values['train/loss']:.4g}", refresh=False)
        if self.step - self.last_media_step >= self.cfg.trainer.media_every:
            self._log_media()
        self.throughput.begin()

    # -- helpers -------------------------------------------------------------------------
    def _scale_verdicts(self) -> dict | None:
        """Per scaled network, the verdict on its loss-scale history (telemetry/scale_history.py)."""
        verdicts = {}
        for name, stepper in self.steppers.items():
            if stepper.scaler is None:
                continue
            events = self.overflows.history.get(name, []) + self.overflows.history.get("all", [])
            verdicts[name] = scale_verdict(sorted(events, key=lambda e: e[0]), self.step, stepper.scaler.dynamic,
                                           self.cfg.precision.growth_interval, float(stepper.current_scale))
        return verdicts or None

    def _warn_if_mostly_skipped(self) -> None:
        """A run that applied few of its updates did not train as asked, though it completed: say so."""
        for name, stepper in self.steppers.items():
            warning = health.mostly_skipped(name, stepper.skipped_steps, self.step)
            if warning:
                self._warn(warning)

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

    def _better(self, record: dict) -> bool:
        key = self.task.primary_metric
        if self.best is None:
            return True
        new, old = record.get(key), self.best.get(key)
        if new is None or not math.isfinite(new):
            return False
        if old is None or not math.isfinite(old):
            return True
        return new > old if self.task.higher_is_better else new < old

    @staticmethod
    def _named_only(values: dict):
        return values if len(values) > 1 else None

    @staticmethod
    def _single_or_named(values: dict):
        if not values:
            return None
        return next(iter(values.values())) if len(values) == 1 else values

