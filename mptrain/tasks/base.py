"""The family-specific part of training, behind one small interface.

The trainer owns the loop (epochs, logging, eval, timing, memory); a Task owns
what a batch means: forward, loss, metrics, and which networks are optimised.
Each network gets its own PrecisionStepper (its own optimizer, master weights
and loss scaler), so a GAN's generator and discriminator scale independently.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
from torch import nn

from mptrain.precision import Precision, PrecisionStepper


class Task(ABC):
    #: eval metric the run is judged by (summary.json `primary_metric`)
    primary_metric: str
    higher_is_better: bool = True

    @abstractmethod
    def networks(self) -> dict[str, nn.Module]:
        """Networks to optimise, by name (one stepper each); already prepared for the mode."""

    @abstractmethod
    def train_step(self, batch, steppers: dict[str, PrecisionStepper], precision: Precision) -> dict[str, torch.Tensor]:
        """Forward, backward and step every network; return detached device scalars (batch means)."""

    @abstractmethod
    def eval_step(self, batch, precision: Precision) -> dict[str, torch.Tensor]:
        """Metrics of one held-out batch as device scalars (batch means)."""

    @staticmethod
    def batch_size(batch) -> int:
        return len(batch[0])
