"""The `trainer` group's schema: how long, where and how fast a run trains, and what it keeps."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from mptrain.errors import UserError
from mptrain.schema.rules import COUNT, POSITIVE_INT, Rule, check_fields, knob, one_of

DEVICE = Rule(lambda v: v in ("auto", "cpu", "cuda") or (isinstance(v, str) and v.startswith("cuda:")),
              "auto, cpu, cuda or cuda:N")
RESUME = Rule(lambda v: isinstance(v, str) and v.strip() != "", "null, auto or a run dir")


@dataclass
class TrainerConfig:
    epochs: int = knob(1, "passes over the training set (one keeps the CPU quick start short)", POSITIVE_INT,
                       example=10)
    max_steps: Optional[int] = knob(None, "stop after this many optimizer steps (overrides epochs)", POSITIVE_INT,
                                    example=1000)
    log_every: int = knob(50, "steps between TensorBoard points (the only host syncs besides the skip decision)",
                          POSITIVE_INT)
    eval_every_epoch: bool = knob(True, "evaluate at each epoch's end")
    eval_every: Optional[int] = knob(None, "also evaluate every N steps within an epoch", POSITIVE_INT, example=200)
    device: str = knob("auto", "auto (cuda if present, else cpu) | cpu | cuda | cuda:N", DEVICE, example="cpu")
    devices: int = knob(1, "data-parallel processes (DDP: gloo on a CPU, NCCL on CUDA)", POSITIVE_INT, example=2)
    channels_last: bool = knob(False, "image models: NHWC weights and batches (verified before step 1)")
    compile: bool = knob(False, "torch.compile the training forward (verified before step 1)")
    perf_warmup_steps: int = knob(10, "steps left out of the mean throughput", COUNT)
    progress: Any = knob("auto", "a progress bar: auto (on a terminal) | true | false", one_of("auto", True, False))
    deterministic: bool = knob(False, "torch.use_deterministic_algorithms")
    eval_max_batches: Optional[int] = knob(None, "evaluate on at most this many held-out batches (null: all)",
                                           POSITIVE_INT, example=10)
    media_every: int = knob(100, "steps between image grids (GANs) in TensorBoard", POSITIVE_INT)
    checkpoint_every: Optional[int] = knob(None, "steps between checkpoints (<run dir>/checkpoint.pt, atomic); "
                                                 "SIGTERM/SIGINT always write one", POSITIVE_INT, example=500)
    replan_schedule: bool = knob(False, "resuming with another length (max_steps / epochs): rebuild the LR schedule "
                                        "for the new length from the resumed step (else refused)")
    resume: Optional[str] = knob(None, "a run dir or checkpoint file to continue from, or auto (this run dir's "
                                       "checkpoint, if any)", RESUME, example="auto")


SCHEMAS = {"trainer_schema": TrainerConfig}


def check(cfg) -> None:
    check_fields(cfg.trainer, TrainerConfig, "trainer")
    if cfg.trainer.compile and cfg.telemetry.numerics.every:
        raise UserError("trainer.compile with telemetry.numerics.every: the numerics hooks on every layer would "
                        "recompile the model; measure numerics without trainer.compile")
