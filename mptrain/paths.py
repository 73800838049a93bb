"""Where mptrain's config tree is: one small, torch-free module every console script imports."""

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
