"""The `optim` config group: optimizer and LR schedule (per optimizer step).

A skipped (overflowed) step does not advance the schedule: the stepper steps it
only when an update is applied.
"""

from __future__ import annotations

import functools
import warnings

import torch
from torch import nn
from torch.optim import lr_scheduler

from mptrain.errors import UserError
from mptrain.precision import rounding
from mptrain.schema.optim import OPTIMIZERS, SCHEDULES  # the one list of names (torch-free)


def _param_groups(params: list[nn.Parameter], cfg) -> list[dict]:
    if cfg.decay_norm_and_bias or not cfg.weight_decay:
        return [{"params": params, "weight_decay": cfg.weight_decay}]
    # BatchNorm weights and biases are vectors: decaying them only hurts
    decay = [p for p in params if p.ndim > 1]
    no_decay = [p for p in params if p.ndim <= 1]
    return [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def kernel_choice(params: list[nn.Parameter]) -> dict:
    """torch's fused kernel for FP32 weights (one kernel for all parameters; 2-4x faster than the loop even on a
    CPU), its foreach kernels otherwise: an FP16 update (fp16_naive) must keep doing its arithmetic in FP16,
    which the fused kernels would do in FP32."""
    try:
        from torch.utils._foreach_utils import _get_fused_kernels_supported_devices

        fused_devices = _get_fused_kernels_supported_devices()
    except ImportError:  # a private helper: if it moves, fused kernels where torch has had them longest
        fused_devices = ["cuda"]
    if params and all(p.dtype == torch.float32 and p.device.type in fused_devices for p in params):
        return {"fused": True}
    return {"foreach": True}


def build_optimizer(cfg, params: list[nn.Parameter], update: str = "nearest") -> torch.optim.Optimizer:
    """The optimizer of `optim.name`; `update` (the precision mode's): how updates reach BF16 weights without a
    master copy (stochastic rounding, Kahan summation: precision/rounding.py), else torch's own optimizers (or
    torch-optimi's, `optim.library=optimi`)."""
    groups = _param_groups(params, cfg)
    if update == "stochastic":
        return rounding.stochastic_optimizer(cfg, groups)
    if update == "kahan" or cfg.get("library") == "optimi":
        return rounding.optimi_optimizer(cfg, groups, kahan_sum=update == "kahan")
    if cfg.get("state", "fp32") != "fp32":
        return state_optimizer(cfg, groups)
    kernels = kernel_choice(params)
    if cfg.name == "sgd":
        nesterov = bool(cfg.nesterov) and cfg.momentum > 0
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=nesterov, **kernels)
    if cfg.name == "adam":
        return torch.optim.Adam(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, **kernels)
    if cfg.name == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, **kernels)
    raise UserError(f"unknown optim.name={cfg.name!r}; choose one of {', '.join(OPTIMIZERS)}")


def state_optimizer(cfg, groups) -> torch.optim.Optimizer:
    """Adam/AdamW whose moments are held in `optim.state`: torchao's block-quantized 8-bit, 4-bit and FP8 states
    (tensors under 4096 values, or not a multiple of the block, keep FP32 moments, as bitsandbytes does), or BF16
    moments. The update itself is computed in FP32 from the dequantized moments (torchao's single_param_adam)."""
    try:
        from torchao import optim
    except ImportError:
        raise UserError(f"optim.state={cfg.state} needs torchao: pip install 'mptrain[lowp]' (or torchao)") from None
    # torch compiles torchao's update once per shape; its note that the state classes lack a cache hash is torchao's
    warnings.filterwarnings("ignore", message=".*_stable_hash_for_caching.*")
    adamw = cfg.name == "adamw"
    common = {"lr": cfg.lr, "betas": tuple(cfg.betas), "eps": cfg.eps}
    if cfg.state == "bf16":
        return _bf16_state_class(optim)(groups, adamw=adamw, **common)
    name = {"8bit": "8bit", "4bit": "4bit", "fp8": "Fp8"}[cfg.state]
    return getattr(optim, f"Adam{'W' if adamw else ''}{name}")(groups, **common)


@functools.cache
def _bf16_state_class(optim):
    """torchao's Adam/AdamW with every moment held in BF16: rounded to nearest once a step, read back in FP32."""

    class BF16StateAdam(optim.adam._AdamBase):
        def __init__(self, params, lr, betas, eps, adamw: bool):
            super().__init__(params, lr, betas, eps, 0.0, False, block_size=1, bf16_stochastic_round=False,
                             is_adamw=adamw)

        def _new_buffer(self, p, signed):
            return torch.zeros_like(p, dtype=torch.bfloat16)

    return BF16StateAdam


def build_scheduler(cfg, optimizer: torch.optim.Optimizer, total_steps: int):
    warmup = min(int(cfg.warmup_steps), max(total_steps - 1, 0))
    main_steps = max(total_steps - warmup, 1)
    if cfg.schedule == "cosine":
        main = lr_scheduler.CosineAnnealingLR(optimizer, T_max=main_steps)
    elif cfg.schedule == "step":
        milestones = sorted({max(1, round(f * main_steps)) for f in cfg.milestones})
        main = lr_scheduler.MultiStepLR(optimizer, milestones=milestones, gamma=cfg.gamma)
    elif cfg.schedule == "none":
        main = lr_scheduler.ConstantLR(optimizer, factor=1.0, total_iters=0)
    else:
        raise UserError(f"unknown optim.schedule={cfg.schedule!r}; choose one of {', '.join(SCHEDULES)}")
    if warmup == 0:
        return main
    ramp = lr_scheduler.LinearLR(optimizer, start_factor=cfg.warmup_start_factor, total_iters=warmup)
    return lr_scheduler.SequentialLR(optimizer, [ramp, main], milestones=[warmup])
