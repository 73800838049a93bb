"""One run: config → build (data, model, precision) → Trainer.fit → summary.json.

Every way a run can end is recorded in summary.json (`completed`, `failed`,
`diverged`, `interrupted`). A user's mistake prints one line and exits non-zero;
inside a sweep it is recorded and the sweep goes on.
"""

from __future__ import annotations

import logging
import random
import sys
import time
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import OmegaConf

from mptrain.errors import Diverged, Interrupted, UserError
from mptrain.signals import StopRequest, stop_signals_to
from mptrain.validate import validate_config

log = logging.getLogger("mptrain")

EXIT_USER_ERROR = 2
EXIT_DIVERGED = 3
EXIT_INTERRUPTED = 130


def run(cfg) -> float | None:
    """The Hydra task function's body; returns the primary metric (for sweepers)."""
    from mptrain.distributed import join

    hydra_cfg = HydraConfig.get()
    in_sweep = hydra_cfg.mode == RunMode.MULTIRUN
    replicas = join(str(cfg.trainer.device))  # under torchrun: this rank's place; else rank 0 of 1
    run_dir = Path(replicas.broadcast(hydra_cfg.runtime.output_dir))  # torchrun: every rank uses rank 0's
    summary = {
        "status": "running",
        "model": cfg.model.name,
        "family": cfg.model.get("family"),
        "dataset": cfg.dataset.name,
        "precision": cfg.precision.mode,
        "loss_scale": cfg.precision.loss_scale,
        "seed": cfg.seed,
        "overrides": list(hydra_cfg.overrides.task),
        "warnings": [],
    }
    started = time.perf_counter()
    try:
        code = _launch_or_execute(cfg, run_dir, summary, replicas)
    except Exception:  # a bug, not a user's mistake: keep the traceback
        _finish(run_dir, summary, started, replicas)
        if in_sweep:
            log.exception("run failed; the sweep goes on")
            return None
        raise
    _finish(run_dir, summary, started, replicas)
    if code:
        if replicas.is_main:
            status = "error" if code == EXIT_USER_ERROR else summary["status"]
            print(f"mptrain: {status}: {summary['error']}", file=sys.stderr)
        if not in_sweep or code == EXIT_INTERRUPTED:  # a signal stops the whole sweep, not just this job
            sys.exit(code)
        return None
    final = summary.get("final") or {}
    return final.get(summary.get("primary_metric"))


def _launch_or_execute(cfg, run_dir: Path, summary: dict, replicas) -> int:
    """trainer.devices=N (N > 1) outside torchrun: start N ranks and take rank 0's outcome; else train here."""
    devices = cfg.trainer.get("devices", 1)
    if replicas.enabled or devices == 1:
        return execute(cfg, run_dir, summary)
    from mptrain.distributed import launch

    try:
        validate_config(cfg)
        device = resolve_device(str(cfg.trainer.device))
        if device.type == "cuda":
            import torch

            if devices > torch.cuda.device_count():
                raise UserError(f"trainer.devices={devices} but torch sees {torch.cuda.device_count()} CUDA "
                                f"device(s); use trainer.devices={torch.cuda.device_count()} or fewer")
    except UserError as e:
        summary.update(status="failed", error=str(e))
        return EXIT_USER_ERROR
    try:
        code, outcome = launch(OmegaConf.to_yaml(cfg), run_dir, summary, devices, cuda=device.type == "cuda")
    except Exception as e:  # a rank crashed (a bug): torch's report above says which and where
        summary.update(status="failed", error=f"a rank failed: {type(e).__name__}: {str(e).strip()[:300]}")
        raise
    summary.update(outcome)
    return code


def execute(cfg, run_dir: Path, summary: dict) -> int:
    """Validate, build and train, recording how it ended in `summary`; the exit code (0: completed).
    A bug is recorded and re-raised."""
    stop = StopRequest()
    try:
        with stop_signals_to(stop.handler):  # from the start: a signal while building still ends cleanly
            validate_config(cfg)
            summary.update(_train(cfg, run_dir, summary, stop))
        summary["status"] = "completed"
        return 0
    except UserError as e:
        summary.update(status="failed", error=str(e))
        return EXIT_USER_ERROR
    except Diverged as e:
        summary.update(status="diverged", error=str(e))
        return EXIT_DIVERGED
    except Interrupted as e:
        summary.update(status="interrupted", error=str(e))
        return EXIT_INTERRUPTED
    except KeyboardInterrupt:
        summary.update(status="interrupted", error="interrupted by the user")
        return EXIT_INTERRUPTED
    except Exception as e:
        summary.update(status="failed", error=f"{type(e).__name__}: {e}")
        raise


def _finish(run_dir: Path, summary: dict, started: float, replicas) -> None:
    from mptrain.telemetry.summary import format_summary, write_summary

    if not replicas.is_main:  # rank 0 writes for all
        return
    summary["wall_time_s"] = round(time.perf_counter() - started, 3)
    write_summary(run_dir, summary)
    if "steps" in summary:
        print(format_summary(summary))
    log.info("summary: %s", run_dir / "summary.json")


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


def _train(cfg, run_dir: Path, summary: dict, stop) -> dict:
    from mptrain import checkpoint
    from mptrain.distributed import join, replica_device
    from mptrain.telemetry.env import environment
    from mptrain.telemetry.numerics import NumericsProbe
    from mptrain.telemetry.tensorboard import NullLogger, TensorBoardLogger

    replicas = join(str(cfg.trainer.device))
    if replicas.enabled and cfg.trainer.get("devices", 1) not in (1, replicas.world_size):
        raise UserError(f"trainer.devices={cfg.trainer.devices} under torchrun, which started "
                        f"{replicas.world_size} processes: drop trainer.devices (torchrun decides)")
    device = resolve_device(replica_device(str(cfg.trainer.device), replicas))
    summary["env"] = environment(device)
    if replicas.enabled:
        summary["env"]["world_size"] = replicas.world_size
    tb = TensorBoardLogger(run_dir / "tb") if replicas.is_main else NullLogger()
    tb.text("config", "```\n" + OmegaConf.to_yaml(cfg) + "\n```")
    numerics = None
    if cfg.telemetry.numerics.every and replicas.is_main:
        numerics = NumericsProbe(cfg.telemetry.numerics.every, run_dir, bool(cfg.telemetry.numerics.activations))
    try:
        resume = _checkpoint_to_resume(cfg, run_dir, device, replicas)
        trainer = build_trainer(cfg, device, run_dir, tb, numerics, summary["warnings"], replicas)
        trainer.checkpoint_path = run_dir / checkpoint.FILENAME
        trainer.stop = stop
        if resume is not None:
            path, state = resume
            checkpoint.restore(trainer, state)
            summary["resumed_from"] = {"checkpoint": str(path), "step": trainer.step}
            log.info("resumed from %s at step %d", path, trainer.step)
        summary["primary_metric"] = trainer.task.primary_metric
        summary["higher_is_better"] = trainer.task.higher_is_better
        return _fit(cfg, trainer, summary)
    finally:
        tb.close()
        replicas.close()


def _checkpoint_to_resume(cfg, run_dir: Path, device, replicas):
    """(path, state) of the checkpoint trainer.resume names, checked against this config; None: start afresh."""
    from mptrain import checkpoint

    resume = cfg.trainer.get("resume")
    path = checkpoint.locate(str(resume), run_dir) if resume else None
    if path is None:
        if resume:
            log.info("trainer.resume=auto: no checkpoint in %s, starting afresh", run_dir)
        return None
    return path, checkpoint.load(path, cfg, device, replicas.world_size)


def build_trainer(cfg, device, run_dir: Path, tb, numerics, warnings: list[str], replicas=None):
    """config → data, model, precision → Trainer; each warning is logged once and appended to `warnings`.
    Among data-parallel `replicas`, each trains on its shard through a DDP wrapper."""
    import torch

    from mptrain.data import build_data
    from mptrain.distributed import Replicas
    from mptrain.precision import Precision
    from mptrain.precision.pitfalls import find_pitfalls
    from mptrain.speed_check import speed_options, verify_speed_options
    from mptrain.tasks import build_task
    from mptrain.telemetry.summary import write_json_atomic
    from mptrain.trainer import Trainer

    if cfg.trainer.deterministic:
        torch.use_deterministic_algorithms(True)
    seed_everything(cfg.seed)
    precision = Precision(cfg.precision, device)
    replicas = replicas or Replicas()
    data = build_data(cfg.dataset, device, cfg.seed, augment=bool(cfg.model.get("augment", True)))
    if replicas.is_main:
        for filename, content in data.artifacts.items():
            write_json_atomic(run_dir / filename, content)
    data.shard(replicas.rank, replicas.world_size)
    task = build_task(cfg.model, data, precision)
    if cfg.trainer.get("channels_last"):
        data.use_channels_last()
        for net in task.networks().values():
            net.to(memory_format=torch.channels_last)
    if replicas.enabled:
        task.distribute(lambda net: replicas.wrap(net, device), replicas.sum)
    if cfg.trainer.get("compile"):
        if precision.emulate:
            raise UserError(f"trainer.compile with emulated FP16 kernels (precision.cpu_fp16={cfg.precision.cpu_fp16} "
                            "on this CPU): they run in Python, outside what torch.compile can trace; drop "
                            "trainer.compile, or set precision.cpu_fp16=native to compile torch's own FP16 kernels")
        task.wrap_training_forward(torch.compile)
    options = speed_options(cfg.trainer)
    checked = verify_speed_options(task, next(iter(data.train)), precision, options, replicas) if options else None
    trainer = Trainer(cfg, task, data, precision, device, tb, numerics, replicas)
    trainer.speed_options_check = checked
    for warning in precision.notes + find_pitfalls(precision, task.networks(), trainer.steppers):
        log.warning(warning)
        warnings.append(warning)
    return trainer


def _fit(cfg, trainer, summary: dict) -> dict:
    data, precision = trainer.data, trainer.precision
    log.info(
        "training %s on %s (%s), precision=%s, %d steps, device %s",
        cfg.model.name, cfg.dataset.name, f"{data.train_size} samples", precision.mode, trainer.total_steps,
        trainer.device,
    )
    try:
        return trainer.fit()
    except (Diverged, Interrupted, KeyboardInterrupt):
        summary.update(trainer.results())
        raise
