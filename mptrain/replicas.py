"""This process's place among data-parallel replicas: rank and world size as torchrun (or mptrain's own
launcher) set them, the collectives the trainer needs (overflow vote, metric sums, stop vote), DDP wrapping.
Alone it is rank 0 of 1 and every collective is a no-op; torch is imported only when there are several."""

from __future__ import annotations

import os
from dataclasses import dataclass


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
