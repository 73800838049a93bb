"""Starting data-parallel ranks ourselves (`trainer.devices=N`): torch's elastic launcher, in this process.

Two ways in, one code path:

    torchrun --nproc_per_node=N -m mptrain ...   # torchrun starts the processes
    mptrain ... trainer.devices=N                # `launch` runs torch's elastic launcher itself

Either way each rank joins the group (mptrain/replicas.py) and trains on its slice of each global
batch (`dataset.batch_size` per rank); DDP averages the gradients, and the skip decision of a
loss-scaled step is all-reduced so that every replica skips, and backs its scale off, together.
Rank 0 alone writes TensorBoard, checkpoints and summary.json. The launcher knows nothing of
training: it runs the function it is given in every rank and returns rank 0's result.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mptrain.signals import stop_signals_to

log = logging.getLogger(__name__)


def launch(rank_main: Callable[..., Any], args: tuple, processes: int, cuda: bool) -> Any:
    """Run `rank_main(*args)` in `processes` ranks through torch's elastic launcher (torchrun's engine, in this
    process; `rank_main` must be picklable: a module-level function); return rank 0's result."""
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    logging.getLogger("torch.distributed.elastic").setLevel(logging.WARNING)
    threads = os.environ.get("OMP_NUM_THREADS")
    if not cuda and threads is None:
        # N CPU ranks share the cores: more threads than cores makes every rank many times slower
        os.environ["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // processes))
    config = LaunchConfig(
        min_nodes=1, max_nodes=1, nproc_per_node=processes, run_id=str(uuid.uuid4()),
        rdzv_backend="c10d", rdzv_endpoint="localhost:0", max_restarts=0, monitor_interval=0.2,
        signals_to_handle="SIGHUP,SIGQUIT",  # SIGTERM and SIGINT: _forward_stop_signal
    )  # fmt: skip
    try:
        with stop_signals_to(_forward_stop_signal):
            results = elastic_launch(config, rank_main)(*args)
    finally:
        if threads is None:  # the next job of a sweep may start another number of ranks
            os.environ.pop("OMP_NUM_THREADS", None)
    return results[0]


def _forward_stop_signal(_signum, _frame) -> None:
    """SIGTERM or SIGINT to the launcher asks every rank to checkpoint and stop (as SIGTERM, so that a Ctrl-C the
    ranks also saw directly is not taken for a second, immediate one); the launcher waits for their outcome.
    (torch's agent would instead stop waiting and kill them 30 s later.)"""
    for pid in _child_processes():  # the ranks (multiprocessing's resource tracker ignores SIGTERM)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)


def _child_processes() -> list[int]:
    pids = []
    for task in Path("/proc/self/task").glob("*"):  # Linux; elsewhere the ranks only get signals sent to them
        with contextlib.suppress(OSError):
            pids += [int(pid) for pid in (task / "children").read_text().split()]
    return pids


def log_file() -> str | None:
    """The file Hydra logs this job to, so that rank 0's lines land there too (pass it to `rank_logging`)."""
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            return handler.baseFilename
    return None


def rank_logging(rank: int, file: str | None) -> None:
    """In a launched rank: rank 0 logs as Hydra would (console and the job's file); the others only errors."""
    if rank > 0:
        logging.disable(logging.WARNING)
        return
    handlers = [logging.StreamHandler()] + ([logging.FileHandler(file)] if file else [])
    logging.basicConfig(level=logging.INFO, handlers=handlers,
                        format="[%(asctime)s][%(name)s][%(levelname)s] - %(message)s")  # Hydra's format
