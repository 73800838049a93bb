"""Data-parallel training on torch.distributed: one process per device, gloo on the CPU, NCCL on CUDA.

Two ways in, one code path:

    torchrun --nproc_per_node=N -m mptrain ...   # torchrun starts the processes
    mptrain ... trainer.devices=N                # mptrain runs torch's elastic launcher itself

Every rank trains on its slice of each global batch (`dataset.batch_size` per rank), DDP averages
the gradients, and the skip decision of a loss-scaled step is all-reduced so that every replica
skips, and backs its scale off, together. Rank 0 alone writes TensorBoard, checkpoints and
summary.json; logged metrics are reduced over all ranks first.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import uuid
from dataclasses import dataclass
from pathlib import Path

from mptrain.signals import stop_signals_to

log = logging.getLogger(__name__)


def launched_rank() -> int:
    """This process's rank as torchrun set it (0 when not launched by torchrun)."""
    return int(os.environ.get("RANK", 0))


def launched_world_size() -> int:
    """How many ranks torchrun (or `launch`) started (1 when not launched by either)."""
    return int(os.environ.get("WORLD_SIZE", 1))


@dataclass
class Replicas:
    """This process's place among the data-parallel replicas (rank 0 of 1 when training alone)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def agree_on_overflow(self, found_inf):
        """Make a found-inf flag global in place (max over ranks): one rank's overflow skips the step everywhere."""
        if self.enabled:
            import torch.distributed as dist

            dist.all_reduce(found_inf, op=dist.ReduceOp.MAX)
        return found_inf

    def sum(self, tensor):
        """Sum a tensor over ranks in place (a meter's sums and counts; exact weighted means follow)."""
        if self.enabled:
            import torch.distributed as dist

            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def any(self, flag: bool, device) -> bool:
        """Whether any rank says yes (a stop request); a collective: every rank must call it."""
        if not self.enabled:
            return flag
        import torch

        value = torch.tensor(float(flag), device=device)
        self.agree_on_overflow(value)
        return bool(value.item())

    def broadcast(self, value):
        """Rank 0's value of a picklable object, on every rank."""
        if not self.enabled:
            return value
        import torch.distributed as dist

        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def wrap(self, module, device):
        """A DDP replica of `module` for the training forward (the module itself stays what optimizers see)."""
        if not self.enabled:
            return module
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(module, device_ids=[device.index] if device.type == "cuda" else None)

    def close(self) -> None:
        if self.enabled:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()


def join(device_name: str) -> Replicas:
    """Join the process group torchrun (or our own launcher) described in the environment; alone: rank 0 of 1."""
    if launched_world_size() == 1:
        return Replicas()  # before importing torch: a config error still answers fast
    import torch
    import torch.distributed as dist

    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    cuda = device_name != "cpu" and torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    return Replicas(rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local_rank)


def replica_device(device_name: str, replicas: Replicas) -> str:
    """Each CUDA rank trains on its own GPU (cuda:LOCAL_RANK); CPU ranks share the CPU."""
    if replicas.enabled and device_name != "cpu":
        import torch

        if torch.cuda.is_available():
            return f"cuda:{replicas.local_rank}"
    return device_name


def launch(cfg_yaml: str, run_dir: Path, summary: dict, processes: int, cuda: bool) -> tuple[int, dict]:
    """Run `processes` training ranks through torch's elastic launcher (torchrun's engine, in this process);
    return rank 0's exit code and summary."""
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
            results = elastic_launch(config, _worker)(cfg_yaml, str(run_dir), summary, _log_file())
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


def _log_file() -> str | None:
    """The file Hydra logs this job to, so that rank 0's lines land there too."""
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            return handler.baseFilename
    return None


def _worker(cfg_yaml: str, run_dir: str, summary: dict, log_file: str | None):
    """One rank started by `launch`: join the group, train, hand rank 0's outcome back."""
    from omegaconf import OmegaConf

    from mptrain.run import execute

    if launched_rank() > 0:
        logging.disable(logging.WARNING)  # rank 0 speaks for all; errors still show
    else:
        handlers = [logging.StreamHandler()] + ([logging.FileHandler(log_file)] if log_file else [])
        logging.basicConfig(level=logging.INFO, handlers=handlers,
                            format="[%(asctime)s][%(name)s][%(levelname)s] - %(message)s")  # Hydra's format
    cfg = OmegaConf.create(cfg_yaml)
    code = execute(cfg, Path(run_dir), summary)
    return code, summary
