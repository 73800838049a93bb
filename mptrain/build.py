"""config → data, task (model in its precision), trainer: what a run, the bench, `mptrain-numerics` and the
scripts build alike. Nothing here decides how a run ends (mptrain/run.py does)."""

from __future__ import annotations

import logging
import random
from pathlib import Path

from mptrain.errors import UserError

log = logging.getLogger("mptrain")


def resolve_device(name: str):
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"trainer.device={name} but torch sees no CUDA device; use trainer.device=cpu or auto")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # seeds every CUDA device too


def build_trainer(cfg, device, run_dir: Path, tb, numerics=None, warnings: list[str] | None = None, replicas=None,
                  *, checkpoint_path: Path | None = None, stop=None):
    """config → data, model, precision → Trainer; each warning is logged once and appended to `warnings`.
    Among data-parallel `replicas`, each trains on its shard through a DDP wrapper."""
    import torch

    from mptrain import checkpoint
    from mptrain.data import build_data
    from mptrain.optim import build_optimizer, build_scheduler
    from mptrain.precision import Precision
    from mptrain.precision.pitfalls import find_pitfalls
    from mptrain.replicas import Replicas
    from mptrain.speed_check import speed_options, verify_speed_options
    from mptrain.tasks import build_task
    from mptrain.telemetry.summary import write_json_atomic
    from mptrain.trainer import Trainer, planned_steps

    if cfg.trainer.deterministic:
        torch.use_deterministic_algorithms(True)
    seed_everything(cfg.seed)
    precision = Precision(cfg.precision, device)
    replicas = replicas or Replicas()
    data = build_data(cfg.dataset, device, cfg.seed, augment=cfg.model.augment)
    data.shard(replicas.rank, replicas.world_size)
    task = build_task(cfg.model, data, precision)
    if cfg.trainer.channels_last:
        data.use_channels_last()
        for net in task.networks().values():
            net.to(memory_format=torch.channels_last)
    if replicas.enabled:
        task.distribute(lambda net: replicas.wrap(net, device), replicas.sum)
    if cfg.trainer.compile:
        if precision.emulate:
            name = "fp16" if precision.emulated_dtype == torch.float16 else "bf16"
            raise UserError(f"trainer.compile with emulated {name.upper()} kernels (precision.cpu_{name}="
                            f"{cfg.precision['cpu_' + name]} on this CPU): they run in Python, outside what "
                            f"torch.compile can trace; drop trainer.compile, or set precision.cpu_{name}=native to "
                            f"compile torch's own {name.upper()} kernels")
        task.wrap_training_forward(torch.compile)
    options = speed_options(cfg.trainer)
    checked = verify_speed_options(task, next(iter(data.train)), precision, options, replicas) if options else None
    warnings = warnings if warnings is not None else []
    total_steps = planned_steps(cfg.trainer, len(data.train))

    def make_scheduler(optimizer, steps: int = total_steps):
        return build_scheduler(cfg.optim, optimizer, steps)

    steppers = {name: precision.stepper(net, lambda params: build_optimizer(cfg.optim, params,
                                                                            update=precision.spec.update),
                                        make_scheduler, max_grad_norm=cfg.optim.max_grad_norm,
                                        agree_on_overflow=replicas.agree_on_overflow)
                for name, net in task.networks().items()}  # fmt: skip
    trainer = Trainer(cfg.trainer, task, data, precision, steppers, device, tb, numerics, replicas,
                      make_scheduler=make_scheduler, overflow_events=cfg.telemetry.overflow_events,
                      identity=checkpoint.identity(cfg), checkpoint_path=checkpoint_path, stop=stop,
                      speed_options_check=checked, warnings=warnings)
    for warning in precision.notes + find_pitfalls(precision, task.networks(), trainer.steppers):
        log.warning(warning)
        warnings.append(warning)
    if replicas.is_main:  # once the run is sure to start: a config refused above leaves its folder empty
        for filename, content in data.artifacts.items():
            write_json_atomic(run_dir / filename, content)
    return trainer
