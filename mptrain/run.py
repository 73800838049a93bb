"""One run: config → build (data, model, precision) → Trainer.fit → summary.json.

Every way a run can end is recorded in summary.json (`completed`, `failed`,
`diverged`, `interrupted`). A user's mistake prints one line and exits non-zero;
inside a sweep it is recorded and the sweep goes on.
"""

from __future__ import annotations

import contextlib
import logging
import random
import signal
import sys
import threading
import time
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import OmegaConf

from mptrain.errors import Diverged, Interrupted, UserError
from mptrain.validate import validate_config

log = logging.getLogger("mptrain")

EXIT_USER_ERROR = 2
EXIT_DIVERGED = 3
EXIT_INTERRUPTED = 130


def run(cfg) -> float | None:
    """The Hydra task function's body; returns the primary metric (for sweepers)."""
    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir)
    in_sweep = hydra_cfg.mode == RunMode.MULTIRUN
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
    code = 0
    try:
        validate_config(cfg)
        summary.update(_train(cfg, run_dir, summary))
        summary["status"] = "completed"
    except UserError as e:
        summary.update(status="failed", error=str(e))
        code = EXIT_USER_ERROR
    except Diverged as e:
        summary.update(status="diverged", error=str(e))
        code = EXIT_DIVERGED
    except Interrupted as e:
        summary.update(status="interrupted", error=str(e))
        code = EXIT_INTERRUPTED
    except KeyboardInterrupt:
        summary.update(status="interrupted", error="interrupted by the user")
        code = EXIT_INTERRUPTED
    except Exception as e:  # a bug, not a user's mistake: keep the traceback
        summary.update(status="failed", error=f"{type(e).__name__}: {e}")
        _finish(run_dir, summary, started)
        if in_sweep:
            log.exception("run failed; the sweep goes on")
            return None
        raise
    _finish(run_dir, summary, started)
    if code:
        print(f"mptrain: {'error' if code == EXIT_USER_ERROR else summary['status']}: {summary['error']}", file=sys.stderr)
        if not in_sweep or code == EXIT_INTERRUPTED:  # a signal stops the whole sweep, not just this job
            sys.exit(code)
        return None
    final = summary.get("final") or {}
    return final.get(summary.get("primary_metric"))


def _finish(run_dir: Path, summary: dict, started: float) -> None:
    from mptrain.telemetry.summary import format_summary, write_summary

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


def _train(cfg, run_dir: Path, summary: dict) -> dict:
    from mptrain import checkpoint
    from mptrain.telemetry.env import environment
    from mptrain.telemetry.numerics import NumericsProbe
    from mptrain.telemetry.tensorboard import TensorBoardLogger

    device = resolve_device(cfg.trainer.device)
    summary["env"] = environment(device)
    tb = TensorBoardLogger(run_dir / "tb")
    tb.text("config", "```\n" + OmegaConf.to_yaml(cfg) + "\n```")
    numerics = None
    if cfg.telemetry.numerics.every:
        numerics = NumericsProbe(cfg.telemetry.numerics.every, run_dir, bool(cfg.telemetry.numerics.activations))
    try:
        resume = _checkpoint_to_resume(cfg, run_dir, device)
        trainer = build_trainer(cfg, device, run_dir, tb, numerics, summary["warnings"])
        trainer.checkpoint_path = run_dir / checkpoint.FILENAME
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


def _checkpoint_to_resume(cfg, run_dir: Path, device):
    """(path, state) of the checkpoint trainer.resume names, checked against this config; None: start afresh."""
    from mptrain import checkpoint

    resume = cfg.trainer.get("resume")
    path = checkpoint.locate(str(resume), run_dir) if resume else None
    if path is None:
        if resume:
            log.info("trainer.resume=auto: no checkpoint in %s, starting afresh", run_dir)
        return None
    return path, checkpoint.load(path, cfg, device)


def build_trainer(cfg, device, run_dir: Path, tb, numerics, warnings: list[str]):
    """config → data, model, precision → Trainer; each warning is logged once and appended to `warnings`."""
    import torch

    from mptrain.data import build_data
    from mptrain.precision import Precision
    from mptrain.precision.pitfalls import find_pitfalls
    from mptrain.tasks import build_task
    from mptrain.telemetry.summary import write_json_atomic
    from mptrain.trainer import Trainer

    if cfg.trainer.deterministic:
        torch.use_deterministic_algorithms(True)
    seed_everything(cfg.seed)
    precision = Precision(cfg.precision, device)
    data = build_data(cfg.dataset, device, cfg.seed, augment=bool(cfg.model.get("augment", True)))
    for filename, content in data.artifacts.items():
        write_json_atomic(run_dir / filename, content)
    task = build_task(cfg.model, data, precision)
    trainer = Trainer(cfg, task, data, precision, device, tb, numerics)
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
        with _stop_on_signals(trainer):
            return trainer.fit()
    except (Diverged, Interrupted, KeyboardInterrupt):
        summary.update(trainer.results())
        raise


@contextlib.contextmanager
def _stop_on_signals(trainer):
    """SIGTERM / SIGINT ask the trainer to checkpoint and stop after the current step; a second SIGINT stops at once."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def ask(signum, _frame):
        if trainer.stop_signal and signum == signal.SIGINT:
            raise KeyboardInterrupt
        trainer.stop_signal = signal.Signals(signum).name

    previous = {sig: signal.signal(sig, ask) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
