"""The `optim` group's schemas: the optimizer, its LR schedule and gradient clipping."""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

from omegaconf import MISSING

from mptrain.schema.rules import (
    COUNT,
    HALF_OPEN_UNIT,
    NON_NEGATIVE,
    OPEN_UNIT,
    POSITIVE,
    Rule,
    check_fields,
    is_number,
    knob,
    list_of,
    one_of,
)

OPTIMIZERS = ("sgd", "adam", "adamw")
LIBRARIES = ("torch", "optimi")
SCHEDULES = ("cosine", "step", "none")
STATES = ("fp32", "bf16", "8bit", "4bit", "fp8")  # the optimizer state's precision (optim.state)
FRACTIONS = list_of(Rule(lambda v: is_number(v) and 0 < v < 1, "in (0, 1)"), text="a list of fractions in (0, 1)")
BETAS = list_of(HALF_OPEN_UNIT, length=2, text="two numbers in [0, 1)")


@dataclass
class OptimConfig:
    name: str = knob(MISSING, "sgd | adam | adamw", one_of(*OPTIMIZERS), example="sgd")
    library: str = knob("torch", "whose implementation steps: torch | optimi (torch-optimi's, without Kahan "
                                 "summation: the control of precision=bf16_kahan, which always runs optimi's)",
                        one_of(*LIBRARIES))
    state: str = knob("fp32", "the optimizer's moments: fp32 | bf16 | 8bit | 4bit | fp8 (adam/adamw: torchao's "
                              "block-quantized states for tensors of >= 4096 values, bitsandbytes' rule)",
                      one_of(*STATES))
    lr: float = knob(MISSING, "the peak learning rate", POSITIVE, example=0.1)
    weight_decay: float = knob(0.0, "L2 penalty (decoupled for adamw)", NON_NEGATIVE, example=5e-4)
    decay_norm_and_bias: bool = knob(False, "weight decay on BatchNorm weights and biases too")
    max_grad_norm: Optional[float] = knob(None, "clip the unscaled gradients to this global norm", POSITIVE,
                                          example=1.0)
    schedule: str = knob("cosine", "cosine | step | none (per optimizer step, to the end of the run)",
                         one_of(*SCHEDULES))
    warmup_steps: int = knob(0, "linear warm-up steps from warmup_start_factor x lr", COUNT, example=100)
    warmup_start_factor: float = knob(0.1, "the warm-up's first LR as a fraction of lr", OPEN_UNIT)
    milestones: List[float] = knob([0.5, 0.75], "step schedule: fractions of the run where the LR drops", FRACTIONS)
    gamma: float = knob(0.1, "step schedule: the LR factor at each milestone", OPEN_UNIT)


@dataclass
class SGDConfig(OptimConfig):
    momentum: float = knob(0.9, "heavy-ball momentum", HALF_OPEN_UNIT)
    nesterov: bool = knob(True, "Nesterov momentum (when momentum > 0)")


@dataclass
class AdamConfig(OptimConfig):
    betas: List[float] = knob([0.9, 0.999], "Adam's moment decay rates", BETAS)
    eps: float = knob(1.0e-8, "added to the second moment's root (underflows to 0 in pure FP16: fp16_naive)",
                      POSITIVE)


SCHEMAS = {"sgd_schema": SGDConfig, "adam_schema": AdamConfig}
BY_NAME = {"sgd": SGDConfig, "adam": AdamConfig, "adamw": AdamConfig}


def check(cfg) -> None:
    from mptrain.errors import UserError

    check_fields(cfg.optim, OptimConfig, "optim")
    check_fields(cfg.optim, BY_NAME[cfg.optim.name], "optim")
    state = cfg.optim.get("state", "fp32")
    if state == "fp32":
        return
    if cfg.optim.name == "sgd":
        raise UserError(f"optim.state={state} quantizes Adam's moments (torchao's optimizers); optim=sgd keeps its "
                        "momentum in FP32: use optim=adam or adamw, or drop optim.state")
    if cfg.optim.get("library", "torch") == "optimi":
        raise UserError(f"optim.state={state} runs torchao's optimizers; drop optim.library=optimi")
    mode = cfg.precision.mode
    if mode in ("fp16_naive", "bf16_pure", "bf16_sr", "bf16_kahan"):
        raise UserError(f"optim.state={state} applies to FP32 weights or FP32 master weights; precision={mode} "
                        "updates its own 16-bit weights: use another mode (fp32, mixed, amp, bf16, fp8, mx)")
