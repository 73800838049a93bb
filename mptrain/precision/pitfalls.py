"""Known ways a low-precision setup goes wrong, checked once before training.

Each finding is one line naming the setting, what goes wrong and the fix; the run
prints it once and records it in summary.json (`warnings`). The checks read the
built networks and optimizers, so they see what will run, not what was meant.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

TENSOR_CORE_MULTIPLE = 8  # FP16 tensor cores want GEMM dimensions divisible by 8
MAX_LISTED = 4


def find_pitfalls(precision, networks: dict[str, nn.Module], steppers: dict) -> list[str]:
    found = []
    for name, stepper in steppers.items():
        found += _optimizer_eps(name, stepper.optimizer, precision.mode)
    found += _batchnorm_in_fp16(networks)
    found += _scaler_under_bf16(precision)
    found += _sigmoid_then_bce(networks, precision)
    found += _tensor_core_shapes(networks, precision)
    return found


def _optimizer_eps(name: str, optimizer: torch.optim.Optimizer, mode: str) -> list[str]:
    for group in optimizer.param_groups:
        eps = group.get("eps")
        dtypes = {p.dtype for p in group["params"]}
        for dtype in dtypes - {torch.float32, torch.float64}:
            if eps and torch.tensor(eps, dtype=dtype).item() == 0:
                return [
                    f"{type(optimizer).__name__} ({name}): optim.eps={eps:g} is 0 in {_dtype_name(dtype)}, the dtype "
                    f"of its state under precision={mode}; once the second moment underflows too, the update "
                    "m / (sqrt(v) + eps) divides by zero. Fix: optim.eps=1e-4, or a master-weight mode "
                    "(fp16_master, mixed)"
                ]
    return []


def _batchnorm_in_fp16(networks) -> list[str]:
    layers = [
        f"{net}.{layer}"
        for net, module in networks.items()
        for layer, m in module.named_modules()
        if isinstance(m, _BatchNorm) and m.running_var is not None and m.running_var.dtype == torch.float16
    ]
    if not layers:
        return []
    return [
        f"BatchNorm runs in float16 without fp32 statistics ({_listed(layers)}): its running variance and "
        "batch statistics lose precision and can overflow. Fix: precision.keep_norm_fp32=true (and keep_batchnorm_fp32)"
    ]


def _scaler_under_bf16(precision) -> list[str]:
    if precision.spec.autocast_dtype != torch.bfloat16 or precision.cfg.loss_scale is None:
        return []
    return [
        f"precision.loss_scale={precision.cfg.loss_scale} under bf16: bfloat16 has float32's exponent range, "
        "so gradients do not underflow and a scale only adds overflow (skipped steps). Fix: precision.loss_scale=null"
    ]


def _sigmoid_then_bce(networks, precision) -> list[str]:
    if precision.spec.autocast_dtype is None:
        return []
    found = []
    for net, module in networks.items():
        leaves = [m for m in module.modules() if not list(m.children())]
        if any(isinstance(m, nn.BCELoss) for m in module.modules()) or (leaves and isinstance(leaves[-1], nn.Sigmoid)):
            found.append(
                f"{net} ends in a Sigmoid (or holds a BCELoss): under autocast, binary_cross_entropy on "
                "probabilities is unsafe (log of a rounded 0 or 1) and torch refuses it. Fix: return logits "
                "and use binary_cross_entropy_with_logits"
            )
    return found


def _tensor_core_shapes(networks, precision) -> list[str]:
    if precision.device.type != "cuda" or not precision.spec.uses_fp16:
        return []
    odd = []
    for net, module in networks.items():
        for layer, m in module.named_modules():
            dims = ()
            if isinstance(m, nn.Linear):
                dims = (m.in_features, m.out_features)
            elif isinstance(m, nn.modules.conv._ConvNd):
                dims = (m.in_channels // m.groups, m.out_channels)
            if any(d % TENSOR_CORE_MULTIPLE for d in dims) and dims[0] > 4:  # 1-4 input channels (images): unavoidable
                odd.append(f"{net}.{layer} {dims[0]}->{dims[1]}")
    if not odd:
        return []
    return [
        f"{len(odd)} layers have fp16 GEMM dimensions that are not multiples of {TENSOR_CORE_MULTIPLE} "
        f"({_listed(odd)}): they miss tensor cores or pad. Fix: widths in multiples of {TENSOR_CORE_MULTIPLE}"
    ]


def _listed(items: list[str]) -> str:
    more = f", and {len(items) - MAX_LISTED} more" if len(items) > MAX_LISTED else ""
    return ", ".join(items[:MAX_LISTED]) + more


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
