"""Where mptrain's config tree and run folders are: one small, torch-free module every console script imports."""

from __future__ import annotations

from pathlib import Path


def config_dir() -> str:
    """conf/ ships inside the wheel as mptrain/conf; in a source checkout it sits beside mptrain/."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "conf", here.parent / "conf"):
        if (candidate / "config.yaml").is_file():
            return str(candidate)
    raise FileNotFoundError(f"mptrain's config tree is missing: looked in {here / 'conf'} and {here.parent / 'conf'}")


def group_options(group: str) -> list[str]:
    """The options of a config group: its YAML files (the schemas in Hydra's ConfigStore are not options)."""
    return sorted(p.stem for p in Path(config_dir(), group).glob("*.yaml"))


CLAIMED: set[str] = set()  # run folders this process made (a refused config removes its own, never another's)


def claim_run_dir(parent: str, stamp: str) -> str:
    """A run folder of its own: `parent/stamp`, or `stamp_2`, `stamp_3`, ... when a run started in the same second
    has it (created here, atomically, so two runs never share one and neither overwrites the other)."""
    for n in range(1, 10_000):
        candidate = Path(parent, stamp if n == 1 else f"{stamp}_{n}")
        try:
            candidate.mkdir(parents=True, exist_ok=False)
        except FileExistsError:
            continue
        CLAIMED.add(str(candidate.resolve()))
        return str(candidate)
    raise FileExistsError(f"{parent}/{stamp}: 10,000 runs started in this second")
