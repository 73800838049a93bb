"""Model families: which Task trains a model (a registry keyed by `model.family`)."""

from __future__ import annotations

from mptrain.errors import UserError
from mptrain.tasks.base import Task
from mptrain.tasks.classification import ClassificationTask


def build_task(model_cfg, data, precision) -> Task:
    """Build the model of `model_cfg` for `data`, put it in the mode's precision, wrap it in its Task."""
    from mptrain.models import build_model

    family = model_cfg.get("family", "cnn")
    if family == "cnn":
        return ClassificationTask(precision.prepare(build_model(model_cfg, data.spec)))
    raise UserError(f"unknown model.family={family!r} for model={model_cfg.name}; known: cnn")


__all__ = ["Task", "build_task"]
