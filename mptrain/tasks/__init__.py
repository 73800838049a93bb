"""Model families: which Task trains a model (a registry keyed by `model.task`)."""

from __future__ import annotations

from mptrain.errors import UserError
from mptrain.tasks.base import Task


def _classification(model_cfg, data, precision) -> Task:
    from mptrain.models import build_model
    from mptrain.tasks.classification import ClassificationTask

    return ClassificationTask(precision.prepare(build_model(model_cfg, data.spec)))


def _language_model(model_cfg, data, precision) -> Task:
    from mptrain.models import build_model
    from mptrain.tasks.language_model import LanguageModelTask

    model = build_model(model_cfg, data.spec)
    context = getattr(model, "context", None)  # a transformer attends within a chunk of at most context tokens
    if context is not None and data.train.bptt > context:
        raise UserError(f"dataset.bptt={data.train.bptt} is longer than model.context={context}; use "
                        f"dataset.bptt={context} or less, or model.context={data.train.bptt}")
    return LanguageModelTask(precision.prepare(model), data.spec.level)


def _gan(model_cfg, data, precision) -> Task:
    from mptrain.tasks.gan import GanTask

    return GanTask.build(model_cfg, data, precision)


def _detection(model_cfg, data, precision) -> Task:
    from mptrain.models import build_model
    from mptrain.tasks.detection import DetectionTask

    return DetectionTask(precision.prepare(build_model(model_cfg, data.spec)))


# task name → (builder, the kind of data it reads)
TASKS = {
    "classification": (_classification, "image"),
    "language_model": (_language_model, "text"),
    "gan": (_gan, "image"),
    "detection": (_detection, "boxes"),
}
DATASETS_FOR = {
    "image": "dataset=fashion_mnist, mnist, cifar10 or synthetic",
    "text": "dataset=text or synthetic_text",
    "boxes": "dataset=fashion_mnist_detection",
}


def build_task(model_cfg, data, precision) -> Task:
    """Build the model of `model_cfg` for `data`, put it in the mode's precision, wrap it in its Task."""
    from mptrain.data import TextSpec
    from mptrain.schema import typed

    model_cfg = typed("model", model_cfg)
    name = model_cfg.task
    if name not in TASKS:
        raise UserError(f"unknown model.task={name!r} for model={model_cfg.name}; known: {', '.join(TASKS)}")
    builder, kind = TASKS[name]
    data_kind = "text" if isinstance(data.spec, TextSpec) else "boxes" if data.spec.boxes else "image"
    if kind != data_kind:
        fitting = [t for t in _settable_tasks(model_cfg) if TASKS[t][1] == data_kind]
        task_hint = (f"model.task={name} reads {kind}: for a network that reads {data_kind}, set "
                     f"model.task={fitting[0]}; or ") if fitting else ""
        raise UserError(f"model={model_cfg.name} reads {kind} data but dataset={data.spec.name} is {data_kind}; "
                        f"{task_hint}use {DATASETS_FOR[kind]}")
    return builder(model_cfg, data, precision)


def _settable_tasks(model_cfg) -> list[str]:
    """The tasks the model's schema lets `model.task` name (a custom or registry model: several; a family: one)."""
    import dataclasses

    from mptrain.schema import schema_of

    field = next(f for f in dataclasses.fields(schema_of("model", model_cfg)) if f.name == "task")
    rule = field.metadata.get("rule")
    return [t for t in TASKS if rule is None or rule.ok(t)]


__all__ = ["TASKS", "Task", "build_task"]
