"""The `precision` group's schema: which of the paper's techniques run, and the loss scaler's policy."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from omegaconf import MISSING

from mptrain.errors import UserError
from mptrain.schema.rules import (
    ABOVE_ONE,
    OPEN_UNIT,
    POSITIVE,
    POSITIVE_INT,
    Rule,
    check_fields,
    is_number,
    knob,
    one_of,
)

# the one list of mode names (torch-free: the CLI, bench and report read it without importing torch)
MODES = ("fp32", "fp16_naive", "fp16_master", "mixed", "amp", "bf16", "bf16_pure", "bf16_sr", "bf16_kahan", "fp8")
CPU_FP16 = ("auto", "emulate", "native")
LOSS_SCALE = Rule(lambda v: v == "dynamic" or (is_number(v) and 0 < v < math.inf), "dynamic, null or a finite number > 0")


@dataclass
class PrecisionConfig:
    mode: str = knob(MISSING, "fp32 | fp16_naive | fp16_master | mixed | amp | bf16 | bf16_pure | bf16_sr | "
                              "bf16_kahan | fp8 (README: Precision modes)",
                     one_of(*MODES), example="mixed")
    loss_scale: Any = knob(None, "null: no scaling; dynamic: NVIDIA's recipe; a number: a static scale (skip on "
                                 "overflow)", LOSS_SCALE, example="dynamic")
    init_scale: float = knob(65536.0, "dynamic scaling's first scale (2^16, as torch's GradScaler and apex)", POSITIVE)
    growth_factor: float = knob(2.0, "dynamic: the scale grows by this after growth_interval clean steps", ABOVE_ONE)
    backoff_factor: float = knob(0.5, "dynamic: the scale shrinks by this (and the update is skipped) on inf/NaN",
                                 OPEN_UNIT)
    growth_interval: int = knob(2000, "dynamic: overflow-free steps before the scale grows", POSITIVE_INT)
    hysteresis: int = knob(1, "overflows tolerated before backing off (1: back off at once)", POSITIVE_INT)
    min_scale: float = knob(1.0e-4, "a dynamic scale below this stops the run (status diverged)", POSITIVE)
    max_consecutive_skips: int = knob(50, "a static scale that overflows this many steps in a row stops the run "
                                          "(status diverged): it does not adapt, so it would skip every step",
                                      POSITIVE_INT)
    keep_norm_fp32: bool = knob(True, "fp16-weight modes: BatchNorm, LayerNorm and GroupNorm weights, statistics and "
                                      "math stay FP32")
    keep_batchnorm_fp32: bool = knob(True, "the older name of keep_norm_fp32 (false in either turns it off)")
    allow_tf32: bool = knob(False, "CUDA only: TF32 changes FP32 arithmetic, so the control keeps it off")
    cpu_fp16: str = knob("auto", "CPU fp16 modes: auto (emulate unless the CPU has FP16 units) | emulate (the same "
                                 "FP16 values at FP32 speed) | native (torch's FP16 kernels: 10-40x slower)",
                         one_of(*CPU_FP16))
    fp8_recipe: str = knob("tensorwise", "precision=fp8: torchao's float8 recipe, tensorwise | rowwise | "
                                         "rowwise_with_gw_hp", one_of("tensorwise", "rowwise", "rowwise_with_gw_hp"))


SCHEMAS = {"precision_schema": PrecisionConfig}


def check(cfg) -> None:
    p = cfg.precision
    check_fields(p, PrecisionConfig, "precision")
    library = cfg.optim.get("library", "torch")
    if p.mode == "bf16_sr" and library == "optimi":
        raise UserError("precision=bf16_sr updates with torchao's optimizer (stochastic rounding); optim.library="
                        "optimi applies to the other modes: drop it, or use precision=bf16_kahan")
    if (p.mode == "bf16_kahan" or library == "optimi") and cfg.optim.name == "sgd" and cfg.optim.nesterov \
            and cfg.optim.momentum > 0:
        who = "precision=bf16_kahan" if p.mode == "bf16_kahan" else "optim.library=optimi"
        raise UserError(f"{who} updates with torch-optimi's SGD, which has no Nesterov momentum; set "
                        "optim.nesterov=false (heavy-ball momentum), or use another mode")
    if p.mode == "bf16_sr" and cfg.optim.name == "adam" and cfg.optim.weight_decay:
        raise UserError("precision=bf16_sr updates Adam with torchao's AdamW, whose weight decay is decoupled; use "
                        "optim=adamw for decay, or optim.weight_decay=0")
    if p.mode == "amp" and p.loss_scale == "dynamic" and p.hysteresis != 1:
        raise UserError("precision=amp uses torch.amp.GradScaler, which has no hysteresis; "
                        "use precision=mixed for precision.hysteresis>1, or set precision.hysteresis=1")
