"""The logging window: every `trainer.log_every` steps, the step's one host sync: the window's mean metrics
(reduced over data-parallel ranks), throughput and memory, loss scales, one TensorBoard point and a log line;
a non-finite loss with no scaler to skip it ends the run there (Diverged), naming where it started."""

from __future__ import annotations

import logging

from mptrain.errors import Diverged
from mptrain.telemetry.overflow import attribute_overflow, cause_of
from mptrain.telemetry.summary import format_value

log = logging.getLogger("mptrain.trainer")


def tag(split: str, key: str) -> str:
    """TensorBoard tag of a task metric: `train/loss`, or the key itself when it names its own group."""
    return key if "/" in key else f"{split}/{key}"


def close(trainer, bar) -> None:
    """Close the timing window and write one TensorBoard point (one host sync)."""
    timing = trainer.throughput.end()
    means, nonfinite = trainer.train_meter.read(trainer.replicas.sum if trainer.replicas.enabled else None)
    trainer.train_meter.reset()
    if timing is None and not means:
        trainer.throughput.begin()
        return
    scaled = any(s.scaler is not None for s in trainer.steppers.values())
    bad = {k: v for k, v in nonfinite.items() if v and k.split("/")[-1].startswith("loss")}
    if bad and not scaled:
        event = attribute_overflow(trainer, trainer.step, None)
        what = f"non-finite {', '.join(bad)} at step {trainer.step} (no loss scaler to skip it)"
        raise Diverged(what + cause_of(event))
    means.update(trainer.task.derived_metrics(means))
    values = {tag("train", k): v for k, v in means.items()}
    if timing is not None:
        values["perf/samples_per_s"], values["perf/step_time_ms"] = timing
    values["memory/peak_bytes"] = trainer.memory.read()
    trainer._check_buffers()
    for name, stepper in trainer.steppers.items():
        suffix = "" if len(trainer.steppers) == 1 else f"_{name}"
        if stepper.scaler is not None:  # nothing is ever skipped without one
            values[f"scaler/loss_scale{suffix}"] = float(stepper.current_scale)
            values[f"scaler/skipped_steps{suffix}"] = stepper.skipped_steps
        values[f"optim/lr{suffix}"] = stepper.lr()
    trainer.tb.scalars(values, trainer.step)
    if bar.disable:  # no terminal: a log line instead of the bar
        shown = [tag("train", k) for k in means] + ["perf/samples_per_s"]
        shown += [k for k in values if k.startswith("scaler/loss_scale")]
        log.info("step %d/%d: %s", trainer.step, trainer.total_steps,
                 ", ".join(f"{k.split('/')[1]} {format_value(k, values[k])}" for k in shown if k in values))
    elif "train/loss" in values:
        bar.set_postfix(loss=f"{values['train/loss']:.4g}", refresh=False)
    if trainer.step - trainer.last_media_step >= trainer.cfg.media_every:
        trainer._log_media()
    trainer.throughput.begin()
