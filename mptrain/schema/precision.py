"""The `precision` group's schema: which of the paper's techniques run, and the loss scaler's policy."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, List

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
    list_of,
    one_of,
)

# the one list of mode names (torch-free: the CLI, bench and report read it without importing torch)
MODES = ("fp32", "fp16_naive", "fp16_master", "mixed", "amp", "bf16", "bf16_pure", "bf16_sr", "bf16_kahan", "fp8", "mx")
CPU_FP16 = ("auto", "emulate", "native")  # precision.cpu_fp16 and precision.cpu_bf16
FP8_RECIPES = ("tensorwise", "rowwise", "rowwise_with_gw_hp")  # torchao's float8 recipe names
ACCUMULATE = ("fp32", "fp16")  # precision.accumulate and precision.reductions
EMULATED_PRODUCTS = ("auto", "dispatch")  # precision.emulated_products: where the emulated kernels compute
FP16_ARITHMETIC = ("fp16_naive", "fp16_master", "mixed", "amp")  # the modes with FP16 products
BF16_ARITHMETIC = ("bf16", "bf16_pure", "bf16_sr", "bf16_kahan", "fp8", "mx")  # BF16 products (fp8, mx: around theirs)
BLOCK_FORMATS = ("mxfp8_e4m3", "mxfp8_e5m2", "mxfp6_e3m2", "mxfp6_e2m3", "mxfp4", "nvfp4")  # precision/blockfmt.py
SCALE_ROUNDINGS = ("floor", "ceil", "even", "rceil")  # torchao's ScaleCalculationMode names
LAYER_NAMES = list_of(Rule(lambda v: isinstance(v, str) and bool(v), "a layer name or pattern"),
                      text="a list of layer names or fnmatch patterns, e.g. [decoder, 'blocks.0.*']")
LOSS_SCALE = Rule(lambda v: v == "dynamic" or (is_number(v) and 0 < v < math.inf), "dynamic, null or a finite number > 0")


def preset_name(choice: str | None, mode: str) -> str:
    """The precision preset a run's plan knows it by: the config group's choice (mixed_scale1, fp16_naive_norm16,
    ...) when it is `mode` or a variant of it, else the mode itself (an experiment that sets precision.mode over
    the default preset, or a user's precision.mode=... override, ran `mode`, not the preset's name)."""
    variant = choice not in MODES and str(choice).startswith(mode + "_")
    return choice if choice and (choice == mode or variant) else mode


@dataclass
class PrecisionConfig:
    mode: str = knob(MISSING, "fp32 | fp16_naive | fp16_master | mixed | amp | bf16 | bf16_pure | bf16_sr | "
                              "bf16_kahan | fp8 | mx (docs/modes.md)",
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
    cpu_fp16: str = knob("auto", "CPU fp16 modes: auto (emulate on every CPU: FP16 units speed only the matrix "
                                 "products) | emulate (the same FP16 values at FP32 speed) | native (torch's FP16 "
                                 "kernels: 10-100x slower)",
                         one_of(*CPU_FP16))
    cpu_bf16: str = knob("auto", "CPU bf16 modes (bf16*, fp8's and mx's bf16 parts): auto (emulate unless the CPU has BF16 "
                                 "units: AVX512-BF16, AMX; with them torch's BF16 kernels, the attention in FP32 from "
                                 "BF16 values) | emulate (the same BF16 values at FP32 speed) | native (torch's BF16 "
                                 "kernels throughout)", one_of(*CPU_FP16))
    emulated_products: str = knob("auto", "where the emulated FP16/BF16 kernels compute (the same bits either way): "
                                          "auto (in the model's Linear and convolution layers when an audit of the "
                                          "first steps finds every product there; else a dispatch mode over every op) "
                                          "| dispatch (always the dispatch mode: the reference, slower)",
                                  one_of(*EMULATED_PRODUCTS))
    accumulate: str = knob("fp32", "FP16 products' partial sums: fp32 (the paper's sec. 3.3, a tensor core's) | fp16 "
                                   "(rounded to FP16 as they accumulate; emulated CPU kernels only)",
                           one_of(*ACCUMULATE), example="fp32")
    accumulate_block: int = knob(1, "accumulate=fp16: terms summed in FP32 before each FP16 rounding of the running "
                                    "sum (1: a sequential FP16 accumulator; 32: a tensor-core-like tile)",
                                 POSITIVE_INT, example=32)
    reductions: str = knob("fp32", "norm statistics, softmax and the loss's mean: fp32 (the paper's sec. 3.3) | fp16 "
                                   "(every partial sum rounded to FP16; emulated CPU kernels only)",
                           one_of(*ACCUMULATE), example="fp32")
    fp8_recipe: str = knob("tensorwise", "precision=fp8: torchao's float8 recipe, tensorwise | rowwise | "
                                         "rowwise_with_gw_hp", one_of(*FP8_RECIPES))
    block_format: str = knob("mxfp8_e4m3", "precision=mx: the forward product's block format, " + " | ".join(BLOCK_FORMATS),
                             one_of(*BLOCK_FORMATS))
    block_format_grad_input: Any = knob(None, "precision=mx: the input-gradient product's format (null: block_format)",
                                        Rule(lambda v: v is None or v in BLOCK_FORMATS, "null or a block format"))
    block_format_grad_weight: Any = knob(None, "precision=mx: the weight-gradient product's format (null: "
                                               "block_format)",
                                         Rule(lambda v: v is None or v in BLOCK_FORMATS, "null or a block format"))
    block_size: Any = knob(None, "precision=mx: values sharing one scale (null: the format's, MX 32, NVFP4 16)",
                           Rule(lambda v: v is None or (isinstance(v, int) and not isinstance(v, bool) and v >= 2
                                                        and v & (v - 1) == 0), "null or a power of two >= 2"))
    scale_rounding: str = knob("floor", "precision=mx: how an MX block's power-of-two scale is rounded: floor (the OCP "
                                        "spec's) | ceil | even | rceil (NVIDIA's round-up)", one_of(*SCALE_ROUNDINGS))
    weight_blocks: str = knob("1d", "precision=mx: 1d (blocks along the contraction) | 2d (square tiles: a weight "
                                    "and its transpose quantize alike)", one_of("1d", "2d"))
    grad_rounding: str = knob("nearest", "precision=mx: the gradient operands' element rounding, nearest | "
                                         "stochastic", one_of("nearest", "stochastic"))
    hadamard: bool = knob(False, "precision=mx: a random Hadamard transform (16) on the weight-gradient product's "
                                 "operands along the tokens")
    mx_keep: List[str] = knob([], "precision=mx: Linear layers kept in bf16, by name or fnmatch pattern (e.g. "
                                  "[decoder, 'blocks.0.*'])", LAYER_NAMES)
    mx_only: List[str] = knob([], "precision=mx: if given, only these Linear layers (names or patterns) run in the block "
                                  "format (a sensitivity sweep's 'one layer alone')", LAYER_NAMES)


SCHEMAS = {"precision_schema": PrecisionConfig}
MX_KNOBS = ("block_format", "block_format_grad_input", "block_format_grad_weight", "block_size", "scale_rounding",
            "weight_blocks", "grad_rounding", "hadamard", "mx_keep", "mx_only")


def _plain(value):
    from omegaconf import DictConfig, ListConfig, OmegaConf

    return OmegaConf.to_container(value) if isinstance(value, (DictConfig, ListConfig)) else value


def check(cfg) -> None:
    p = cfg.precision
    check_fields(p, PrecisionConfig, "precision")
    library = cfg.optim.get("library", "torch")
    if p.mode == "bf16_sr" and library == "optimi":
        raise UserError("precision=bf16_sr updates with mptrain's stochastic-rounding optimizers; optim.library="
                        "optimi applies to the other modes: drop it, or use precision=bf16_kahan")
    if (p.mode == "bf16_kahan" or library == "optimi") and cfg.optim.name == "sgd" and cfg.optim.nesterov \
            and cfg.optim.momentum > 0:
        who = "precision=bf16_kahan" if p.mode == "bf16_kahan" else "optim.library=optimi"
        raise UserError(f"{who} updates with torch-optimi's SGD, which has no Nesterov momentum; set "
                        "optim.nesterov=false (heavy-ball momentum), or use another mode")
    for key in ("accumulate", "reductions"):
        if p[key] == "fp16" and p.mode not in FP16_ARITHMETIC:
            raise UserError(f"precision.{key}=fp16 concerns FP16 arithmetic, which precision={p.mode} has none of; use "
                            f"one of {', '.join(FP16_ARITHMETIC)}, or drop precision.{key}")
        if p[key] == "fp16" and p.cpu_fp16 == "native":
            raise UserError(f"precision.{key}=fp16 runs inside the emulated FP16 kernels: drop precision.cpu_fp16="
                            "native (auto or emulate)")
    if p.mode != "mx":
        defaults = PrecisionConfig(mode=p.mode)
        changed = [k for k in MX_KNOBS if k in p and _plain(p[k]) != getattr(defaults, k)]
        if changed:
            raise UserError(f"precision.{changed[0]} applies to precision=mx (block formats), not precision={p.mode}: "
                            f"add precision=mx, or drop precision.{changed[0]}")
    if p.mode == "mx" and "nvfp4" in (p.block_format, p.block_format_grad_input, p.block_format_grad_weight) \
            and p.block_size not in (None, 16):
        raise UserError(f"precision.block_size={p.block_size}: NVFP4's blocks are 16 values (its E4M3 scales are "
                        "sized for them); drop precision.block_size, or use an MX format")
    if p.mode == "amp" and p.loss_scale == "dynamic" and p.hysteresis != 1:
        raise UserError("precision=amp uses torch.amp.GradScaler, which has no hysteresis; "
                        "use precision=mixed for precision.hysteresis>1, or set precision.hysteresis=1")
