"""Run the installed `mptrain` console script in a subprocess, as a user would."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

MPTRAIN = str(Path(sys.executable).with_name("mptrain"))
# tiny, fast settings for end-to-end runs on the CPU: the debug=tiny preset users have too (conf/debug/tiny.yaml:
# ResNet of width 4 on 8x8 synthetic images, 8 steps), at the smallest ResNet depth
TINY = ["debug=tiny", "model.depth=8"]


def mptrain(*args: str, cwd: Path, timeout: float = 600, env: dict | None = None,
            script: str = "mptrain") -> subprocess.CompletedProcess:
    """`script` (mptrain, or another of its console scripts) with these arguments, as a user runs it."""
    full_env = {**os.environ, "PYTHONWARNINGS": "ignore", **(env or {})}
    return subprocess.run(
        [str(Path(MPTRAIN).with_name(script)), *args], cwd=cwd, capture_output=True, text=True, timeout=timeout, env=full_env
    )


def train_inprocess(*args: str) -> dict:
    """The same run as `mptrain <args>`, in this process (mptrain.train): for runs whose exit code, signals or
    console output the test does not read; it skips the interpreter, torch and Hydra start-up of a subprocess."""
    from mptrain.api import train

    return train(list(args))


@contextlib.contextmanager
def user_package(folder: Path, monkeypatch, name: str, source: str):
    """A user's package `name` (its __init__.py is `source`) in `folder`, importable inside the block as it would
    be from the user's PYTHONPATH, and forgotten by the import system after."""
    (folder / name).mkdir()
    (folder / name / "__init__.py").write_text(textwrap.dedent(source))
    monkeypatch.syspath_prepend(str(folder))
    try:
        yield folder
    finally:
        sys.modules.pop(name, None)


def read_summary(run_dir: Path) -> dict:
    return json.loads((Path(run_dir) / "summary.json").read_text())


def scalar_tags(tb_dir: Path) -> dict[str, list]:
    """All scalar events, read with TensorBoard's own reader (no 10,000-point sampling)."""
    from tensorboard.backend.event_processing.event_accumulator import SCALARS, EventAccumulator

    acc = EventAccumulator(str(tb_dir), size_guidance={SCALARS: 0})
    acc.Reload()
    return {tag: acc.Scalars(tag) for tag in acc.Tags()["scalars"]}


def sigterm_once_training(*args: str, watch: Path, cwd: Path, after: float = 1.0) -> subprocess.CompletedProcess:
    """Start `mptrain args`, wait until TensorBoard events appear under `watch` (training has begun) and `after`
    seconds more, send SIGTERM, and wait for the process to end."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.Popen([MPTRAIN, *args], cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env)  # fmt: skip
    deadline = time.time() + 120
    while not list(Path(watch).rglob("events.*")) and time.time() < deadline:
        time.sleep(0.2)
    time.sleep(after)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)
