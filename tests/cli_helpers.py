"""Run the installed `mptrain` console script in a subprocess, as a user would."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

MPTRAIN = str(Path(sys.executable).with_name("mptrain"))
# tiny, fast settings for end-to-end runs on the CPU
TINY = [
    "dataset=synthetic",
    "dataset.image_size=8",
    "dataset.channels=3",
    "dataset.num_classes=4",
    "dataset.train_size=256",
    "dataset.test_size=64",
    "dataset.batch_size=32",
    "model.depth=8",
    "model.width=4",
    "trainer.log_every=2",
    "trainer.perf_warmup_steps=1",
]


def mptrain(*args: str, cwd: Path, timeout: float = 600, env: dict | None = None,
            script: str = "mptrain") -> subprocess.CompletedProcess:
    """`script` (mptrain, or another of its console scripts) with these arguments, as a user runs it."""
    full_env = {**os.environ, "PYTHONWARNINGS": "ignore", **(env or {})}
    return subprocess.run(
        [str(Path(MPTRAIN).with_name(script)), *args], cwd=cwd, capture_output=True, text=True, timeout=timeout, env=full_env
    )


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
