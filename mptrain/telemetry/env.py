"""What a result was measured on: recorded in every summary.json."""

from __future__ import annotations

import os
import platform
import subprocess
from importlib import metadata
from pathlib import Path

import torch


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return cpu_name()


def torchvision_version() -> str | None:
    """torchvision.__version__ (with its build tag, +cu130) read from its version.py, not imported: importing
    torchvision brings torch._dynamo, 1.5 s of every run that does not otherwise need it."""
    import importlib.util
    import re

    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        path = Path(folder) / "version.py"
        if path.is_file():
            match = re.search(r"^__version__ = ['\"]([^'\"]+)['\"]", path.read_text(), re.MULTILINE)
            if match:
                return match.group(1)
    return None


def environment(device: torch.device) -> dict:
    return {
        "torch": torch.__version__,
        "torchvision": torchvision_version(),
        "cuda": torch.version.cuda if device.type == "cuda" else None,
        "device": str(device),
        "device_name": device_name(device),
        "cpu_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        **source_version(),
        "packages": package_versions(),
    }


# what a result depends on besides torch: a reviewer reruns with these versions
PACKAGES = ("mptrain", "torch", "torchvision", "numpy", "hydra-core", "omegaconf", "torchao", "torch-optimi",
            "scipy", "pandas")


def package_versions() -> dict[str, str | None]:
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def source_version() -> dict:
    """The git commit the code ran from and whether its tracked files had uncommitted changes (null outside a
    checkout, e.g. an installed wheel)."""
    root = Path(__file__).resolve().parents[2]

    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    if commit is None:
        return {"git_commit": None, "git_dirty": None}
    return {"git_commit": commit, "git_dirty": bool(git("status", "--porcelain", "--untracked-files=no"))}
