"""One `mptrain` run inside this process: what `mptrain.train` and `mptrain-study` run.

The config is composed as the command line composes it (the same groups, overrides and checks) and the job runs
through Hydra's own `run_job` (the run folder, `.hydra/` and the log as the CLI makes them); the run's
summary.json comes back as a dict, whatever its status; a refused config raises `UserError` with the CLI's line.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from mptrain.errors import UserError


def run_overrides(overrides: Sequence[str] = ()) -> dict:
    """One training run with these overrides (as `mptrain <overrides>`); its summary."""
    from hydra import compose, initialize_config_dir
    from hydra._internal.callbacks import Callbacks  # what HydraContext holds (the job runs no callbacks)
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.utils import run_job
    from hydra.errors import HydraException
    from hydra.types import HydraContext, RunMode
    from omegaconf import OmegaConf, open_dict
    from omegaconf.errors import OmegaConfBaseException

    from mptrain import cli  # noqa: F401 (registers mptrain's resolvers)
    from mptrain.paths import claim_if_new, config_dir
    from mptrain.run import run
    from mptrain.schema import describe_composition_error, refuse_schema_choices, validate

    overrides = [str(o) for o in overrides]
    if any(o in ("-m", "--multirun") for o in overrides):
        raise UserError("mptrain.train runs one job; for a sweep, call it once per setting (or use mptrain -m)")
    refuse_schema_choices(overrides)
    outcome: dict = {}

    def task(cfg):
        try:
            outcome["metric"] = run(cfg)
        except SystemExit as e:  # the CLI's exit code for a failed, diverged or interrupted run
            outcome["exit"] = e.code
            outcome["refused"] = getattr(e, "message", None)  # run.Refused: refused before it began

    with initialize_config_dir(config_dir=config_dir(), version_base="1.3", job_name="mptrain"):
        try:
            cfg = compose(config_name="config", overrides=overrides, return_hydra_config=True)
        except (HydraException, OmegaConfBaseException) as e:
            raise UserError(describe_composition_error(e)) from None
        validate(cfg)  # a refused config: the CLI's one line, raised, and no run folder
        if not OmegaConf.is_interpolation(cfg.hydra.run, "dir"):  # a folder the caller named
            claim_if_new(str(cfg.hydra.run.dir))
        with open_dict(cfg):
            cfg.hydra.mode = RunMode.RUN
        context = HydraContext(config_loader=GlobalHydra.instance().config_loader(), callbacks=Callbacks())
        job = run_job(hydra_context=context, task_function=task, config=cfg, job_dir_key="hydra.run.dir",
                      job_subdir_key=None)
    if outcome.get("refused"):
        raise UserError(outcome["refused"])
    summary = Path(job.working_dir if cfg.hydra.job.chdir else job.hydra_cfg.hydra.runtime.output_dir) / "summary.json"
    if not summary.is_file():
        raise UserError(f"the run wrote no summary (exit {outcome.get('exit')}): see its log above")
    return json.loads(summary.read_text())
