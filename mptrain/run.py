"""A run's lifecycle: config → validate → build (mptrain/build.py) → Trainer.fit → an Outcome → summary.json.

Every way a run can end is an Outcome (`completed`, `failed`, `diverged`, `interrupted`) written to
summary.json. A user's mistake prints one line and exits non-zero; inside a sweep it is recorded and
the sweep goes on. `trainer.devices=N` starts N ranks (mptrain/distributed.py), each running `rank_main`.
"""

from __future__ import annotations

import logging
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import OmegaConf

from mptrain.errors import Interrupted, RunEnded, UserError, is_disk_full
from mptrain.paths import CLAIMED, restore_hydra_files
from mptrain.replicas import Replicas, join
from mptrain.schema import validate
from mptrain.schema.precision import preset_name
from mptrain.signals import StopRequest, stop_signals_to

log = logging.getLogger("mptrain")

EXIT_USER_ERROR = 2
EXIT_DIVERGED = 3
EXIT_INTERRUPTED = 130
EXIT_CODES = {"completed": 0, "failed": EXIT_USER_ERROR, "diverged": EXIT_DIVERGED, "interrupted": EXIT_INTERRUPTED}


@dataclass
class Outcome:
    """How a run ended, what it measured (`record`: env, results, resumed_from, warnings...) and, for a bug,
    the exception (kept to re-raise once the summary is written)."""

    status: str
    error: str | None = None
    record: dict = field(default_factory=dict)
    bug: BaseException | None = field(default=None, repr=False)
    refused: bool = False  # the config was refused before anything ran: no run to record
    resumable: bool = False  # stopped where a checkpoint continues it (a signal, a full disk)

    @property
    def code(self) -> int:
        return EXIT_CODES[self.status]


class Refused(SystemExit):
    """A config refused before the run began: the CLI exits with `code`; mptrain.train raises `message`."""

    def __init__(self, code: int, message: str | None):
        super().__init__(code)
        self.message = message


class _RefusedBeforeStart(UserError):
    """A user's mistake met while building the run or reading its checkpoint: nothing has trained yet."""


def run(cfg) -> float | None:
    """The Hydra task function's body; returns the primary metric (for sweepers)."""
    hydra_cfg = HydraConfig.get()
    in_sweep = hydra_cfg.mode == RunMode.MULTIRUN
    replicas = join(str(cfg.trainer.device))  # under torchrun: this rank's place; else rank 0 of 1
    run_dir = Path(replicas.broadcast(hydra_cfg.runtime.output_dir))  # torchrun: every rank uses rank 0's
    started = time.perf_counter()
    try:
        launching = not replicas.enabled and cfg.trainer.devices != 1
        outcome = _launch(cfg, run_dir) if launching else execute(cfg, run_dir, replicas)
    finally:
        replicas.close()
    if outcome.refused and not in_sweep:
        if _claimed_here(run_dir):
            _remove_stray(run_dir)  # a refused config leaves no run folder behind
        else:  # an existing run's folder (a resume that could not start): its record stays as it was
            restore_hydra_files(run_dir)
    elif outcome.refused and (run_dir / "summary.json").is_file():
        pass  # a sweep's job that was resumed and refused: the interrupted record stays
    elif replicas.is_main:  # (a sweep's refused job gets a record: the sweep goes on and its report lists it)
        summary = _summary(cfg, list(hydra_cfg.overrides.task), outcome, started)
        summary["precision_preset"] = preset_name(hydra_cfg.runtime.choices.get("precision"), cfg.precision.mode)
        _write_summary(run_dir, summary)
    if outcome.bug is not None:  # a bug, not a user's mistake: keep the traceback
        if in_sweep:
            log.error("run failed; the sweep goes on", exc_info=outcome.bug)
            return None
        raise outcome.bug
    if outcome.code:
        if replicas.is_main:
            print(f"mptrain: {'error' if outcome.status == 'failed' else outcome.status}: {outcome.error}",
                  file=sys.stderr)
            if outcome.resumable and (run_dir / "checkpoint.pt").is_file() and not in_sweep:
                print(f"mptrain: continue with: {resume_command(list(hydra_cfg.overrides.task), run_dir)}",
                      file=sys.stderr)
        if outcome.refused and not in_sweep:
            raise Refused(outcome.code, outcome.error)  # SystemExit for the CLI; mptrain.train raises its line
        if not in_sweep or outcome.code == EXIT_INTERRUPTED:  # a signal stops the whole sweep, not just this job
            sys.exit(outcome.code)
        return None
    final = outcome.record.get("final") or {}
    return final.get(outcome.record.get("primary_metric"))


# the environment a run's own code may need again: a user's package on PYTHONPATH (model.net._target_, dataset=custom)
RESUME_ENV = ("PYTHONPATH",)


def resume_command(overrides: list[str], run_dir: Path) -> str:
    """The whole command that continues a run in its own folder: the environment it ran with (PYTHONPATH, as
    absolute paths), its overrides, its folder, resume=auto (so the report sees one run, not two)."""
    import os
    import shlex

    env = []
    for name in RESUME_ENV:
        value = os.environ.get(name)
        if value:
            value = os.pathsep.join(str(Path(p).resolve()) for p in value.split(os.pathsep) if p)
            env.append(f"{name}={shlex.quote(value)}")
    kept = [o for o in overrides if o.lstrip("+~").split("=")[0] not in ("trainer.resume", "hydra.run.dir")]
    return " ".join([*env, shlex.join(["mptrain", *kept, f"hydra.run.dir={run_dir}", "trainer.resume=auto"])])


def _claimed_here(run_dir: Path) -> bool:
    return str(Path(run_dir).resolve()) in CLAIMED


def _remove_stray(run_dir: Path) -> None:
    """Drop the folder this process made for a run that never started: Hydra's config copy and the log only."""
    import shutil

    if not all(p.name == ".hydra" or p.name.endswith(".log") for p in run_dir.iterdir()):
        return
    _detach_log_files(run_dir)  # the log's file handler, before its folder goes (a later line would reopen it)
    shutil.rmtree(run_dir, ignore_errors=True)
    for parent in CLAIMED.get(str(Path(run_dir).resolve()), []):  # runs/<model>-<dataset>-<mode>/, runs/: if made
        try:  # for this run and still empty
            Path(parent).rmdir()
        except OSError:
            break


def _detach_log_files(run_dir: Path) -> None:
    """Close and remove every logging file handler writing inside `run_dir` (Hydra's job log)."""
    folder = Path(run_dir).resolve()
    loggers = [logging.getLogger(), *(v for v in logging.Logger.manager.loggerDict.values()
                                      if isinstance(v, logging.Logger))]
    for logger in loggers:
        for handler in list(logger.handlers):
            path = getattr(handler, "baseFilename", None)
            if path and folder in Path(path).resolve().parents:
                logger.removeHandler(handler)
                handler.close()


def execute(cfg, run_dir: Path, replicas: Replicas) -> Outcome:
    """Validate, build and train; how it ended. Signals from the start: one while building still ends cleanly."""
    stop = StopRequest()
    try:
        with stop_signals_to(stop.handler):
            try:
                validate(cfg)
            except UserError as e:
                return Outcome("failed", str(e), refused=True)
            return Outcome("completed", record=_train(cfg, run_dir, stop, replicas))
    except _RefusedBeforeStart as e:
        return Outcome("failed", str(e), refused=True)
    except UserError as e:
        return Outcome("failed", str(e))
    except RunEnded as e:
        return Outcome(e.status, str(e), record=e.results, resumable=e.resumable)
    except KeyboardInterrupt:
        return Outcome("interrupted", "interrupted by the user", resumable=True)
    except Exception as e:
        if is_disk_full(e):  # a write other than the checkpoint's (events, numerics, artifacts): one line
            where = getattr(e, "filename", None) or run_dir
            return Outcome("failed", f"no space left on the device writing {where}; free space there, then "
                           "continue", resumable=True)
        return Outcome("failed", f"{type(e).__name__}: {e}", bug=e)


def _launch(cfg, run_dir: Path) -> Outcome:
    """trainer.devices=N outside torchrun: start N ranks, each running `rank_main`; rank 0's outcome."""
    from mptrain.build import resolve_device
    from mptrain.distributed import launch, log_file

    devices = cfg.trainer.devices
    try:
        validate(cfg)
        device = resolve_device(str(cfg.trainer.device))
        if device.type == "cuda":
            import torch

            if devices > torch.cuda.device_count():
                raise UserError(f"trainer.devices={devices} but torch sees {torch.cuda.device_count()} CUDA "
                                f"device(s); use trainer.devices={torch.cuda.device_count()} or fewer")
    except UserError as e:
        return Outcome("failed", str(e), refused=True)
    try:
        ended = launch(rank_main, (OmegaConf.to_yaml(cfg), str(run_dir), log_file()), devices,
                       cuda=device.type == "cuda")
    except Exception as e:  # a rank crashed (a bug): torch's report above says which and where
        return Outcome("failed", f"a rank failed: {type(e).__name__}: {str(e).strip()[:300]}", bug=e)
    return Outcome(**ended)


def rank_main(cfg_yaml: str, run_dir: str, log_file: str | None) -> dict:
    """One rank started by `_launch`: join the group, train, hand the outcome back (rank 0's is the run's)."""
    from mptrain.distributed import rank_logging

    cfg = OmegaConf.create(cfg_yaml)
    replicas = join(str(cfg.trainer.device))
    rank_logging(replicas.rank, log_file)
    try:
        outcome = execute(cfg, Path(run_dir), replicas)
    finally:
        replicas.close()
    if outcome.bug is not None:
        raise outcome.bug
    return {k: v for k, v in asdict(outcome).items() if k != "bug"}


def _train(cfg, run_dir: Path, stop: StopRequest, replicas: Replicas) -> dict:
    """Build the trainer (resumed from a checkpoint if asked) and fit; what it measured, with the run's setting."""
    from mptrain import checkpoint
    from mptrain.build import build_trainer, resolve_device
    from mptrain.replicas import replica_device
    from mptrain.telemetry.env import environment
    from mptrain.telemetry.numerics import NumericsProbe
    from mptrain.telemetry.tensorboard import NullLogger, TensorBoardLogger
    from mptrain.testing import install_faults

    if replicas.enabled and cfg.trainer.devices not in (1, replicas.world_size):
        raise UserError(f"trainer.devices={cfg.trainer.devices} under torchrun, which started "
                        f"{replicas.world_size} processes: drop trainer.devices (torchrun decides)")
    device = resolve_device(replica_device(str(cfg.trainer.device), replicas))
    record = {"warnings": [], "env": environment(device)}
    if replicas.enabled:
        record["env"]["world_size"] = replicas.world_size
    tb = TensorBoardLogger(run_dir / "tb") if replicas.is_main else NullLogger()
    numerics = None
    if cfg.telemetry.numerics.every and replicas.is_main:
        numerics = NumericsProbe(cfg.telemetry.numerics.every, run_dir, cfg.telemetry.numerics.activations)
    try:
        try:
            resume = _checkpoint_to_resume(cfg, run_dir, device, replicas)
            trainer = build_trainer(cfg, device, run_dir, tb, numerics, record["warnings"], replicas,
                                    checkpoint_path=run_dir / checkpoint.FILENAME, stop=stop)
            if resume is not None:
                path, state = resume
                checkpoint.restore(trainer, state)
                record["resumed_from"] = {"checkpoint": str(path), "step": trainer.step}
                if Path(path).resolve() == (run_dir / checkpoint.FILENAME).resolve():
                    trainer.checkpoint_step = trainer.step  # the last whole checkpoint in this folder
                log.info("resumed from %s at step %d", path, trainer.step)
        except UserError as e:
            raise _RefusedBeforeStart(str(e)) from None
        install_faults(trainer)  # the test suite's fault injection (mptrain/testing.py): nothing unless its env asks
        tb.text("config", "```\n" + OmegaConf.to_yaml(cfg) + "\n```")
        record["primary_metric"] = trainer.task.primary_metric
        record["higher_is_better"] = trainer.task.higher_is_better
        log.info("training %s on %s (%d samples), precision=%s, %d steps, device %s", cfg.model.name,
                 cfg.dataset.name, trainer.data.train_size, trainer.precision.mode, trainer.total_steps, device)
        try:
            return {**record, **trainer.fit()}
        except RunEnded as e:
            e.results = {**record, **trainer.results()}
            raise
        except KeyboardInterrupt:  # a second Ctrl-C: stop at once, with what was measured
            raise Interrupted("interrupted by the user", {**record, **trainer.results()}) from None
    finally:
        tb.close()


def _checkpoint_to_resume(cfg, run_dir: Path, device, replicas: Replicas):
    """(path, state) of the checkpoint trainer.resume names, checked against this config; None: start afresh."""
    from mptrain import checkpoint

    resume = cfg.trainer.resume
    path = checkpoint.locate(str(resume), run_dir) if resume else None
    if path is None:
        if resume:
            log.info("trainer.resume=auto: no checkpoint in %s, starting afresh", run_dir)
        return None
    return path, checkpoint.load(path, cfg, device, replicas.world_size)


def _summary(cfg, overrides: list[str], outcome: Outcome, started: float) -> dict:
    record = dict(outcome.record)
    summary = {
        "status": outcome.status, "model": cfg.model.name, "family": cfg.model.family, "dataset": cfg.dataset.name,
        "precision": cfg.precision.mode, "loss_scale": cfg.precision.loss_scale, "seed": cfg.seed,
        "overrides": overrides, "warnings": record.pop("warnings", []), **record,
    }  # fmt: skip
    if cfg.get("plan") is not None:  # the pre-registered plan the report judges this run against
        summary["plan"] = OmegaConf.to_container(cfg.plan, resolve=True)
    if outcome.error is not None:
        summary["error"] = outcome.error
    summary["wall_time_s"] = round(time.perf_counter() - started, 3)
    return summary


def _write_summary(run_dir: Path, summary: dict) -> None:
    from mptrain.telemetry.summary import format_summary, write_summary

    try:
        write_summary(run_dir, summary)
    except OSError as e:
        if not is_disk_full(e):
            raise
        print(f"mptrain: error: no space left on the device writing {run_dir / 'summary.json'} (the run ended "
              f"{summary['status']}); free space there: trainer.resume=auto continues from its last checkpoint",
              file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)
    if "steps" in summary:
        print(format_summary(summary))
    log.info("summary: %s", run_dir / "summary.json")
