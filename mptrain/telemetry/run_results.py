"""What a run measured, assembled for summary.json once it ends (however it ends): throughput, memory, loss
scales and their verdicts (scale_history.py), bytes per parameter, and the run-end warnings."""

from __future__ import annotations

import math

from mptrain.telemetry import health
from mptrain.telemetry.scale_history import scale_verdict


def collect(trainer) -> dict:
    """What the run measured, for summary.json (the trainer's results())."""
    scales = {name: s.current_scale for name, s in trainer.steppers.items() if s.current_scale is not None}
    samples_per_s, steps_per_s, spread = trainer.throughput.median_rates()
    return {
        "steps": trainer.step,
        "epochs": trainer.step / trainer.steps_per_epoch,
        "parameters": parameter_count(trainer.task.networks().values()),
        "final": trainer.history[-1] if trainer.history else None,
        "best": trainer.best,
        "history": trainer.history,
        "batch_size": trainer.data.train.batch_size,
        "samples_per_s": samples_per_s,  # the median logging window after warm-up
        "samples_per_s_quartiles": spread,
        "steps_per_s": steps_per_s,
        "peak_memory_bytes": trainer.memory.read(),
        "peak_memory_method": trainer.memory.method,
        "skipped_steps": sum(s.skipped_steps for s in trainer.steppers.values()),
        "skipped_steps_by_network": _named_only({n: s.skipped_steps for n, s in trainer.steppers.items()}),
        "final_loss_scale": _single_or_named({n: float(v) for n, v in scales.items()}),
        "overflow_events": list(trainer.overflows.events),
        "loss_scale_verdict": scale_verdicts(trainer),
        "bytes_per_parameter": {name: s.bytes_per_parameter() for name, s in trainer.steppers.items()},
        "fp16_kernels": trainer.precision.fp16_kernels,
        "bf16_kernels": trainer.precision.bf16_kernels,
        "emulation": trainer.precision.emulation_path,
        "bf16_attention": "fp32 from bf16 values" if trainer.precision.fp32_attention else None,
        "fp8": trainer.precision.fp8_report,
        "mx": trainer.precision.mx_report,
        "cpu_fp16": trainer.precision.cpu_fp16,
        "cpu_bf16": trainer.precision.cpu_bf16,
        "arithmetic": trainer.precision.arithmetic,
        "speed_options_check": trainer.speed_options_check,
        **trainer.task.describe(),
    }


def parameter_count(networks) -> dict[str, int]:
    """Elements of the networks' parameters, each tensor once (a tied embedding and projection is one): total and
    trainable (requires_grad)."""
    unique = {id(p): p for net in networks for p in net.parameters()}.values()
    return {"total": sum(p.numel() for p in unique), "trainable": sum(p.numel() for p in unique if p.requires_grad)}


def scale_verdicts(trainer) -> dict | None:
    """Per scaled network, the verdict on its loss-scale history (telemetry/scale_history.py)."""
    verdicts = {}
    for name, stepper in trainer.steppers.items():
        if stepper.scaler is None:
            continue
        events = trainer.overflows.history.get(name, []) + trainer.overflows.history.get("all", [])
        verdicts[name] = scale_verdict(sorted(events, key=lambda e: e[0]), trainer.step, stepper.scaler.dynamic,
                                       stepper.scaler.growth_interval, float(stepper.current_scale))
    return verdicts or None


def mostly_skipped(trainer) -> list[str]:
    """A run that applied few of its updates did not train as asked, though it completed: say so."""
    found = (health.mostly_skipped(name, stepper.skipped_steps, trainer.step)
             for name, stepper in trainer.steppers.items())
    return [warning for warning in found if warning]


def _named_only(values: dict):
    return values if len(values) > 1 else None

def _single_or_named(values: dict):
    if not values:
        return None
    return next(iter(values.values())) if len(values) == 1 else values


def better(record: dict, best: dict | None, key: str, higher_is_better: bool) -> bool:
    """Whether an evaluation beats the best so far on `key` (a non-finite value never does)."""
    if best is None:
        return True
    new, old = record.get(key), best.get(key)
    if new is None or not math.isfinite(new):
        return False
    if old is None or not math.isfinite(old):
        return True
    return new > old if higher_is_better else new < old
