"""Model families: which Task trains a model. Each `model.task` is one record of mptrain/families.py (its builder,
data kind, primary metric, bench data); this module builds the Task a record names."""

from __future__ import annotations

from mptrain.errors import UserError
from mptrain.families import TASKS, datasets_text
from mptrain.tasks.base import Task


def build_task(model_cfg, data, precision) -> Task:
    """Build the model of `model_cfg` for `data`, put it in the mode's precision, wrap it in its Task."""
    from mptrain.schema import typed

    model_cfg = typed("model", model_cfg)
    name = model_cfg.task
    if name not in TASKS:
        raise UserError(f"unknown model.task={name!r} for model={model_cfg.name}; known: {', '.join(TASKS)}")
    family, data_kind = TASKS[name], data.spec.kind
    if family.data_kind != data_kind:
        fitting = [t for t in _settable_tasks(model_cfg) if TASKS[t].data_kind == data_kind]
        task_hint = (f"model.task={name} reads {family.data_kind}: for a network that reads {data_kind}, set "
                     f"model.task={fitting[0]}; or ") if fitting else ""
        raise UserError(f"model={model_cfg.name} reads {family.data_kind} data but dataset={data.spec.name} is "
                        f"{data_kind}; {task_hint}use {datasets_text(family.data_kind)}")
    return family.build(model_cfg, data, precision)


def _settable_tasks(model_cfg) -> list[str]:
    """The tasks the model's schema lets `model.task` name (a custom or registry model: several; a family: one)."""
    import dataclasses

    from mptrain.schema import schema_of

    field = next(f for f in dataclasses.fields(schema_of("model", model_cfg)) if f.name == "task")
    rule = field.metadata.get("rule")
    return [t for t in TASKS if rule is None or rule.ok(t)]


__all__ = ["TASKS", "Task", "build_task"]
