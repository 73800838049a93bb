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

from mptrain.schema import describe_composition_error

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


def config_dir() -> str:
    """conf/ ships inside the wheel as mptrain/conf; in a source checkout it sits beside mptrain/."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "conf", here.parent / "conf"):
        if (candidate / "config.yaml").is_file():
            return str(candidate)
    raise FileNotFoundError(f"mptrain's config tree is missing: looked in {here / 'conf'} and {here.parent / 'conf'}")


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="config")
def _hydra_main(cfg) -> float | None:
    from mptrain.run import run

    return run(cfg)


def main() -> float | None:
    from mptrain.replicas import launched_rank, launched_world_size

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
    finally:
        if own:
            os.environ.pop("HYDRA_FULL_ERROR", None)


if __name__ == "__main__":
    main()
