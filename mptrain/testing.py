"""Fault injection for the test suite, read from the environment; a run (run.py) calls `install_faults` once, on
the trainer it built: the Trainer itself never reads the environment.

    MPTRAIN_FAULT_OVERFLOW=<rank>:<step>      that rank's gradients become inf at that step (after backward and
                                              DDP's all-reduce, so only that rank sees it before the overflow vote)
    MPTRAIN_FAULT_KILL_AFTER_CHECKPOINT=<step>  SIGKILL right after the checkpoint of that step is on disk
"""

from __future__ import annotations

import os
import signal


def install_faults(trainer) -> None:
    overflow = os.environ.get("MPTRAIN_FAULT_OVERFLOW")
    if overflow:
        rank, step = (int(v) for v in overflow.split(":"))
        if rank == trainer.replicas.rank:
            def poison(grads):
                if trainer.step + 1 == step and grads:
                    grads[0].fill_(float("inf"))

            for stepper in trainer.steppers.values():
                stepper.grad_hooks.append(poison)
    kill_at = os.environ.get("MPTRAIN_FAULT_KILL_AFTER_CHECKPOINT")
    if kill_at:
        trainer.after_checkpoint.append(lambda step: step == int(kill_at) and os.kill(os.getpid(), signal.SIGKILL))
