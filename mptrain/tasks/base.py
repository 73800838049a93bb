"""The family-specific part of training, behind one small interface.

The trainer owns the loop (epochs, logging, eval, timing, memory); a Task owns
what a batch means: forward, loss, metrics, and which networks are optimised.
Each network gets its own PrecisionStepper (its own optimizer, master weights
and loss scaler), so a GAN's generator and discriminator scale independently.

Metric keys are TensorBoard tags under ``train/`` and ``eval/``; a key that
already holds a ``/`` (``gan/loss_d``) is its own tag.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable

import torch
from torch import nn

from mptrain.errors import UserError
from mptrain.families import TASKS
from mptrain.precision import Precision, PrecisionStepper
from mptrain.telemetry.meters import MeanMeter


class Task(ABC):
    #: the `model.task` it trains: its record in mptrain/families.py names the primary metric and its direction
    family: str
    #: sums an evaluation's meter over data-parallel ranks (set by `distribute`)
    reduce_over_ranks: Callable[[torch.Tensor], torch.Tensor] | None = None

    @property
    def primary_metric(self) -> str:
        """The eval metric the run is judged by (summary.json `primary_metric`)."""
        return TASKS[self.family].metric

    @property
    def higher_is_better(self) -> bool:
        return TASKS[self.family].primary.higher_is_better

    @abstractmethod
    def networks(self) -> dict[str, nn.Module]:
        """Networks to optimise, by name (one stepper each); already prepared for the mode."""

    @abstractmethod
    def train_step(self, batch, steppers: dict[str, PrecisionStepper], precision: Precision) -> dict[str, torch.Tensor]:
        """Forward, backward and step every network; return detached device scalars (batch means)."""

    @abstractmethod
    def eval_step(self, batch, precision: Precision) -> dict[str, torch.Tensor]:
        """Metrics of one held-out batch as device scalars (batch means)."""

    def wrap_training_forward(self, wrap: Callable[[nn.Module], nn.Module]) -> None:
        """Run the training forward through `wrap(network)` (a DDP replica, a compiled module); evaluation and the
        overflow hunt's replays keep using the plain networks."""
        raise UserError(f"{type(self).__name__} trains its networks as they are: no trainer.devices>1 or "
                        "trainer.compile for it yet")

    def check_loss(self, batch, precision: Precision, nets: dict[str, nn.Module] | None = None) -> torch.Tensor:
        """One training step's loss, whose backward gives every network its gradient (the speed options' check):
        through the training forward, or through `nets` (copies of the networks, by name) when given."""
        raise UserError(f"{type(self).__name__} cannot verify trainer speed options; train without them")

    def distribute(self, wrap: Callable[[nn.Module], nn.Module], reduce: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Train through data-parallel replicas: `wrap` gives the DDP module, `reduce` sums evaluation meters over ranks."""
        self.wrap_training_forward(wrap)
        self.reduce_over_ranks = reduce

    def start_pass(self, training: bool) -> None:
        """Called before each pass over a split: where a recurrent model resets its carried state."""

    def state_dict(self) -> dict:
        """What a checkpoint must carry besides the networks (an LM's hidden state mid-epoch)."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Restore `state_dict()`, after `start_pass(training=True)` of the resumed epoch."""

    def derived_metrics(self, means: dict[str, float]) -> dict[str, float]:
        """Metrics computed from a window's or an evaluation's means (perplexity from the mean loss)."""
        return {}

    def evaluate(self, batches: Iterable, precision: Precision) -> dict[str, float]:
        """One pass over held-out batches; per-batch means, weighted by batch size."""
        self.start_pass(training=False)
        meter = MeanMeter()
        for batch in batches:
            meter.add(self.eval_step(batch, precision), self.batch_size(batch))
        means, _ = meter.read(self.reduce_over_ranks)
        return {**means, **self.derived_metrics(means)}

    def replay_forward(self, batch, precision: Precision) -> None:
        """Run the training forward of ``batch`` again without side effects (the overflow hunt's replay)."""
        self.eval_step(batch, precision)

    def log_media(self, tb, step: int) -> None:
        """Write images or other non-scalar summaries (the trainer calls it every `trainer.media_every` steps)."""

    def describe(self) -> dict:
        """Extra fields for summary.json (e.g. which network scores the samples)."""
        return {}

    def batch_size(self, batch) -> int:
        """Samples in a batch: what throughput counts and metric means are weighted by."""
        return len(batch[0])
