"""Run the installed `mptrain` console script in a subprocess, as a user would."""

from __future__ import annotations

import json
import os
import subprocess
import sys
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


def mptrain(*args: str, cwd: Path, timeout: float = 600, env: dict | None = None) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "PYTHONWARNINGS": "ignore", **(env or {})}
    return subprocess.run(
        [MPTRAIN, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout, env=full_env
    )


def read_summary(run_dir: Path) -> dict:
    return json.loads((Path(run_dir) / "summary.json").read_text())


def scalar_tags(tb_dir: Path) -> dict[str, list]:
    """All scalar events, read with TensorBoard's own reader (no 10,000-point sampling)."""
    from tensorboard.backend.event_processing.event_accumulator import SCALARS, EventAccumulator

    acc = EventAccumulator(str(tb_dir), size_guidance={SCALARS: 0})
    acc.Reload()
    return {tag: acc.Scalars(tag) for tag in acc.Tags()["scalars"]}
