"""Overflow attribution: on a skipped step, which gradients held inf/NaN and which layer made them.

Nothing here runs on a normal step. When a loss scaler skips a step (or a run
diverges), the trainer asks:

* which parameters' gradients are non-finite (the model's gradients are still
  there: a skipped step leaves them untouched until the next zero_grad);
* which module's forward output was the first to be non-finite, by replaying the
  step's forward once with hooks on every module (no grad; buffers and RNG state
  restored afterwards, so the replay changes nothing). If no forward output is
  non-finite, the overflow happened in backward: the gradients name the layers.
"""

from __future__ import annotations

import contextlib
import logging
from collections import deque

import torch
from torch import nn

log = logging.getLogger("mptrain.trainer")

MAX_NAMED = 8  # gradient names kept per event


def nonfinite_grads(networks: dict[str, nn.Module]) -> list[str]:
    """Names of parameters whose gradient holds inf or NaN, in model order (one host sync)."""
    named = [(f"{n}.{p_name}", p.grad) for n, net in networks.items() for p_name, p in net.named_parameters()
             if p.grad is not None]
    if not named:
        return []
    finite = torch.stack([torch.isfinite(g).all() for _, g in named]).tolist()
    return [name for (name, _), ok in zip(named, finite) if not ok]


@contextlib.contextmanager
def _unchanged(networks: dict[str, nn.Module]):
    """Run something and put back every buffer (BatchNorm statistics) and the RNG streams."""
    buffers = {(n, b): t.detach().clone() for n, net in networks.items() for b, t in net.named_buffers()}
    cpu_rng = torch.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    try:
        yield
    finally:
        with torch.no_grad():
            for (n, b), saved in buffers.items():
                networks[n].get_buffer(b).copy_(saved)
        torch.set_rng_state(cpu_rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state_all(cuda_rng)


def first_nonfinite_module(networks: dict[str, nn.Module], replay) -> str | None:
    """The first module (in execution order) whose forward output holds inf/NaN when ``replay()`` runs."""
    first: list[str] = []

    def hook(name):
        def check(_module, _inputs, output):
            if first:
                return
            tensors = output if isinstance(output, (tuple, list)) else (output,)
            if any(torch.is_tensor(t) and t.is_floating_point() and not torch.isfinite(t).all() for t in tensors):
                first.append(name)

        return check

    handles = [
        module.register_forward_hook(hook(f"{n}.{name}" if name else n))
        for n, net in networks.items()
        for name, module in net.named_modules()
        if not list(module.children())  # leaves: the layers that compute
    ]
    try:
        with _unchanged(networks), torch.no_grad():
            replay()
    finally:
        for handle in handles:
            handle.remove()
    return first[0] if first else None


class OverflowLog:
    """The last ``keep`` overflow events, for summary.json (`overflow_events`)."""

    def __init__(self, keep: int = 20):
        self.events: deque[dict] = deque(maxlen=keep)
        self.history: dict[str, list[tuple]] = {}  # every skip, by network: (step, scale, layer named)

    def record(self, step: int, network: str, grads: list[str], module: str | None, scale: float | None) -> dict:
        event = {
            "step": step,
            "network": network,
            "loss_scale": scale,
            "first_nonfinite_forward": module,
            "nonfinite_grads": grads[:MAX_NAMED],
            "nonfinite_grad_count": len(grads),
        }
        self.events.append(event)
        layer = module or (grads[0] if grads else None)
        self.history.setdefault(network, []).append((step, scale, layer))
        return event

    @staticmethod
    def describe(event: dict | None) -> str:
        """`first non-finite output in model.fc` / `gradients overflowed in backward, first model.fc.weight`."""
        if not event:
            return ""
        if event["first_nonfinite_forward"]:
            return f"first non-finite forward output in {event['first_nonfinite_forward']}"
        if event["nonfinite_grads"]:
            more = event["nonfinite_grad_count"] - 1
            return f"forward finite, gradients overflowed in backward, first {event['nonfinite_grads'][0]}" + (
                f" (+{more} more)" if more else "")
        return ""


def attribute_overflow(trainer, step: int, network: str | None) -> dict | None:
    """Name the gradients and the first layer behind a skipped step (runs only when one happens)."""
    networks = trainer.task.networks()
    suspects = networks if network is None else {network: networks[network]}
    grads = nonfinite_grads(suspects)
    module = first_nonfinite_module(networks, lambda: _replay(trainer))
    stepper = trainer.steppers[network] if network else next(iter(trainer.steppers.values()))
    scale = float(stepper.current_scale) if stepper.current_scale is not None else None
    event = trainer.overflows.record(step, network or "all", grads, module, scale)
    log.info("step %d: %s skipped: %s", step, event["network"], OverflowLog.describe(event))
    return event


def _replay(trainer) -> None:
    with trainer.precision.kernels():
        trainer.task.replay_forward(trainer.last_batch, trainer.precision)


def cause_of(event: dict | None) -> str:
    cause = OverflowLog.describe(event)
    return f" ({cause})" if cause else ""
