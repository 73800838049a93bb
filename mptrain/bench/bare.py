"""The reference: a training step written in plain PyTorch, as its AMP docs show it.

fp32: no autocast. Every FP16 mode is compared with `torch.autocast(float16)` +
`torch.amp.GradScaler` (what a user would write instead of mptrain); bf16 with
`torch.autocast(bfloat16)`. Same model definition, same optimizer and schedule, same batches.
Against an arm with `precision.cpu_fp16=emulate`, its forward and backward run in the same
emulated FP16 kernels, so that the ratio compares loops, not kernels.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from mptrain.optim import build_optimizer, build_scheduler
from mptrain.tasks.language_model import detach_state

BARE_FOR_MODE = {"fp32": "fp32", "bf16": "bf16", "amp": "amp", "mixed": "amp", "fp16_master": "amp",
                 "fp16_naive": "amp"}  # fmt: skip
AUTOCAST = {"fp32": None, "bf16": torch.bfloat16, "amp": torch.float16}
SUPPORTED_TASKS = ("classification", "language_model")
# the master weights' rivals and fp8 have no few-line plain-PyTorch equivalent: they are timed without a bare loop


class BareLoop:
    """One model, its optimizer, schedule and scaler; `step(batch)` is one plain training step."""

    def __init__(self, model: torch.nn.Module, task: str, kind: str, optim_cfg, total_steps: int, device,
                 kernels=None):
        if task not in SUPPORTED_TASKS:
            raise ValueError(f"no bare loop for the {task} task")
        self.model, self.task, self.device = model.train(), task, device
        self.dtype = AUTOCAST[kind]
        self.optimizer = build_optimizer(optim_cfg, list(model.parameters()))
        self.scheduler = build_scheduler(optim_cfg, self.optimizer, total_steps)
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.dtype is torch.float16)
        self.max_grad_norm = optim_cfg.max_grad_norm
        self.state = None  # the language model's carried hidden state
        self.kernels = kernels or contextlib.nullcontext  # e.g. the emulated FP16 kernels on a CPU

    def step(self, batch) -> torch.Tensor:
        x, y = batch
        self.optimizer.zero_grad(set_to_none=True)
        with self.kernels():
            with torch.autocast(self.device.type, dtype=self.dtype or torch.float32, enabled=self.dtype is not None):
                loss = self._loss(x, y)
            self.scaler.scale(loss).backward()
        if self.max_grad_norm:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.max_grad_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        return loss.detach()

    def _loss(self, x, y):
        if self.task == "classification":
            return F.cross_entropy(self.model(x).float(), y)
        if self.state is None:
            self.state = self.model.initial_state(x.shape[0], x.device)
        logits, state = self.model(x, self.state)
        self.state = detach_state(state)
        return F.cross_entropy(logits.float().flatten(0, 1), y.flatten())

    def state_tensors(self):
        """What the step holds besides saved activations: weights, gradients, optimizer state."""
        yield from self.model.parameters()
        yield from (p.grad for p in self.model.parameters() if p.grad is not None)
        for state in self.optimizer.state.values():
            yield from (v for v in state.values() if torch.is_tensor(v) and v.dim() > 0)
