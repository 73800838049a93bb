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


# run folders this process made, each with the folders above it that did not exist before (a refused config
# removes its own folder and those, never another's)
CLAIMED: dict[str, list[str]] = {}


def _missing_ancestors(folder: Path) -> list[str]:
    """The folders above `folder` that do not exist yet, nearest first (mkdir(parents=True) will make them)."""
    return [str(p) for p in Path(folder).resolve().parents if not p.exists()]


def claim_run_dir(parent: str, stamp: str) -> str:
    """A run folder of its own: `parent/stamp`, or `stamp_2`, `stamp_3`, ... when a run started in the same second
    has it (created here, atomically, so two runs never share one and neither overwrites the other)."""
    for n in range(1, 10_000):
        candidate = Path(parent, stamp if n == 1 else f"{stamp}_{n}")
        made = _missing_ancestors(candidate)
        try:
            candidate.mkdir(parents=True, exist_ok=False)
        except FileExistsError:
            continue
        CLAIMED[str(candidate.resolve())] = made
        return str(candidate)
    raise FileExistsError(f"{parent}/{stamp}: 10,000 runs started in this second")


HYDRA_FILES: dict[str, dict[str, bytes]] = {}  # an existing run folder's .hydra/ before Hydra rewrites it


def claim_if_new(run_dir: str) -> None:
    """A folder the user named (hydra.run.dir=...) that does not exist yet is this process's to remove if its
    config is refused; one that exists (a run being resumed) never is, and its .hydra/ is kept aside so that a
    resume that cannot start puts it back (Hydra rewrites it before the job runs)."""
    if not run_dir:
        return
    folder, key = Path(run_dir), str(Path(run_dir).resolve())
    if not folder.exists():
        CLAIMED[key] = _missing_ancestors(folder)  # Hydra makes them, and the folder, for this run
        return
    CLAIMED.pop(key, None)  # made by an earlier run of this process (mptrain.train twice): a run's folder now
    if (folder / ".hydra").is_dir():
        HYDRA_FILES[key] = {p.name: p.read_bytes() for p in (folder / ".hydra").iterdir() if p.is_file()}


def restore_hydra_files(run_dir: Path) -> None:
    """Put back the .hydra/ an existing run folder had before this process (see claim_if_new)."""
    kept = HYDRA_FILES.get(str(Path(run_dir).resolve()))
    if kept is None:
        return
    hydra = Path(run_dir) / ".hydra"
    for stale in hydra.iterdir() if hydra.is_dir() else ():
        if stale.is_file() and stale.name not in kept:
            stale.unlink()
    for name, data in kept.items():
        (hydra / name).write_bytes(data)
