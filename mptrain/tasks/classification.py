"""Image classification (the CNN family): cross-entropy on FP32 logits, top-1 accuracy."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mptrain.tasks.base import Task


def build(model_cfg, data, precision) -> Task:
    """model.task=classification (families.TASKS): the model of `model_cfg` for `data`, in the mode's precision."""
    from mptrain.models import build_model

    return ClassificationTask(precision.prepare(build_model(model_cfg, data.spec)))


class ClassificationTask(Task):
    family = "classification"

    def __init__(self, model: nn.Module):
        self.model = model
        self.trained = model  # what the training forward runs: the model, or its DDP replica

    def networks(self) -> dict[str, nn.Module]:
        return {"model": self.model}

    def wrap_training_forward(self, wrap) -> None:
        self.trained = wrap(self.trained)

    def _loss_and_accuracy(self, x, y, precision, net=None):
        with precision.autocast():
            logits = (self.model if net is None else net)(x)
        # softmax is a reduction: the paper computes it in FP32
        loss = F.cross_entropy(logits.float(), y)
        accuracy = (logits.argmax(dim=1) == y).float().mean()
        return loss, accuracy

    def train_step(self, batch, steppers, precision):
        x, y = batch
        stepper = steppers["model"]
        stepper.zero_grad()
        loss, accuracy = self._loss_and_accuracy(x, y, precision, self.trained)
        stepper.backward(loss)
        stepper.step()
        return {"loss": loss.detach(), "accuracy": accuracy}

    def check_loss(self, batch, precision, nets=None):
        x, y = batch
        return self._loss_and_accuracy(x, y, precision, nets["model"] if nets else self.trained)[0]

    @torch.no_grad()
    def eval_step(self, batch, precision):
        x, y = batch
        loss, accuracy = self._loss_and_accuracy(x, y, precision)
        return {"loss": loss, "accuracy": accuracy}
