"""`mptrain`: one training run, or a sweep with -m.

    mptrain model=resnet precision=mixed
    mptrain -m precision=fp32,fp16_naive,fp16_master,mixed,amp,bf16 seed=0,1,2
    mptrain --cfg job            # print the composed config

Heavy imports (torch) happen inside the task, so --help, --cfg and config
errors answer fast.
"""

from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path

import hydra
from hydra.errors import ConfigCompositionException, OverrideParseException
from omegaconf import OmegaConf

from mptrain.paths import claim_if_new, claim_run_dir, config_dir
from mptrain.schema import describe_composition_error

__all__ = ["claim_run_dir", "config_dir", "main", "sweep_dirname"]

MAX_DIRNAME = 120  # file systems stop at 255 bytes a name; keep sweep folders readable well below
EXCLUDED_FROM_DIRNAME = {"seed"}  # seeds of one setting sit side by side under it


def sweep_dirname(overrides) -> str:
    """A sweep job's folder name from its overrides: group choices first (precision=mixed, ...),
    then dotted keys, seed left out; a long name keeps its start and gains a hash of the rest."""
    items = [str(o).lstrip("+~") for o in overrides]
    items = [o.replace("/", "_") for o in items if o.split("=", 1)[0] not in EXCLUDED_FROM_DIRNAME]
    items.sort(key=lambda o: ("." in o.split("=", 1)[0], o))
    name = ",".join(items) or "default"
    if len(name) <= MAX_DIRNAME:
        return name
    digest = hashlib.sha1(name.encode()).hexdigest()[:10]
    return f"{name[:MAX_DIRNAME - 11]}~{digest}"


OmegaConf.register_new_resolver("mptrain_sweep_dirname", sweep_dirname, replace=True)


# cached: one config object resolves hydra.run.dir to one folder however often it is read
OmegaConf.register_new_resolver("mptrain_run_dir", claim_run_dir, replace=True, use_cache=True)


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="config")
def _hydra_main(cfg) -> float | None:
    from mptrain.run import run

    return run(cfg)


def help_text() -> str:
    """`mptrain --help`: the groups and their options (Hydra's own lists the schemas too, which are not options)."""
    from mptrain.paths import group_options

    groups = sorted(p.name for p in Path(config_dir()).iterdir() if p.is_dir() and p.name != "hydra")
    lines = [__doc__.strip(), "", "Config groups (group=option):"]
    lines += [f"  {g}: {', '.join(group_options(g))}" for g in groups]
    lines += ["", "Any key: group.key=value (mptrain --cfg job prints the composed config; docs/configuration.md "
              "lists every key). Hydra's own flags: mptrain --hydra-help."]
    return "\n".join(lines)


def main() -> float | None:
    from mptrain.errors import UserError
    from mptrain.replicas import launched_rank, launched_world_size
    from mptrain.schema import refuse_schema_choices

    if {"--help", "-h"} & set(sys.argv[1:]):
        print(help_text())
        return None
    try:
        refuse_schema_choices(sys.argv[1:])
    except UserError as e:
        print(f"mptrain: error: {e}", file=sys.stderr)
        sys.exit(2)

    named = [a.partition("=")[2] for a in sys.argv[1:] if a.lstrip("+").startswith("hydra.run.dir=")]
    if named and not {"-m", "--multirun"} & set(sys.argv[1:]):
        claim_if_new(named[-1].strip("'\""))
    if launched_world_size() > 1:  # started by torchrun: one job, rank 0 owns its folder
        if {"-m", "--multirun"} & set(sys.argv[1:]):
            print("mptrain: error: torchrun runs one job, not a sweep (-m); sweep with trainer.devices=N instead, "
                  "e.g. mptrain -m trainer.devices=2 precision=fp32,mixed", file=sys.stderr)
            sys.exit(2)
        if launched_rank() > 0:  # other ranks make no folder, no log and no .hydra of their own
            sys.argv += ["hydra.run.dir=.", "hydra.output_subdir=null", "hydra/job_logging=disabled",
                         "hydra/hydra_logging=disabled"]
    return _composed_or_one_line(_hydra_main)


def _composed_or_one_line(hydra_main):
    """Hydra prints a refused override over several lines and exits 1; mptrain says it in one and exits 2
    (HYDRA_FULL_ERROR makes Hydra hand the exception over instead of printing it)."""
    own = "HYDRA_FULL_ERROR" not in os.environ
    os.environ.setdefault("HYDRA_FULL_ERROR", "1")
    try:
        return hydra_main()
    except (ConfigCompositionException, OverrideParseException) as e:  # before the job they concern ran
        print(f"mptrain: error: {describe_composition_error(e)}", file=sys.stderr)
        sys.exit(2)
    except ValueError as e:
        if not str(e).startswith("Only one of --run, --multirun, --cfg"):
            raise
        print("mptrain: error: Hydra takes one of -m/--multirun, --cfg, --info at a time; to see a sweep's jobs' "
              "config, drop -m and give one job's values (mptrain +experiment=X precision=fp32 --cfg job)",
              file=sys.stderr)
        sys.exit(2)
    finally:
        if own:
            os.environ.pop("HYDRA_FULL_ERROR", None)


if __name__ == "__main__":
    main()
