"""Putting a model into a mode's storage precision.

FP16 modes hold weights in FP16 and feed FP16 inputs. Normalisation layers may be kept in
FP32 (`precision.keep_norm_fp32`, default true as apex O2 did; `keep_batchnorm_fp32` is its
older name, and false in either turns it off). BatchNorm's weights and running statistics
stay FP32, and torch's batch_norm, given an FP16 input with FP32 parameters, computes the
statistics in FP32 and returns FP16 (the paper's rule: reductions accumulate in FP32), on
the CPU as with cuDNN; its saved activations stay FP16, so this costs no memory. LayerNorm
GroupNorm and RMSNorm (a library's own norm classes too: found by type, whatever the model calls
the layers) have no mixed-dtype kernel: their input is cast to FP32 and their output back to
FP16 (apex O2's way), so they normalise in FP32 and hand FP16 on.
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm


def _cast_floating(value, dtype):
    if torch.is_tensor(value) and value.is_floating_point():
        return value.to(dtype)
    if isinstance(value, (tuple, list)):
        return type(value)(_cast_floating(v, dtype) for v in value)
    return value


class CastInputs:
    """Forward pre-hook: floating inputs arrive in the storage dtype."""

    def __init__(self, dtype: torch.dtype):
        self.dtype = dtype

    def __call__(self, _module, args):
        return _cast_floating(args, self.dtype)


class CastOutput:
    """Forward hook: a floating output goes on in the storage dtype (after a norm computed in FP32)."""

    def __init__(self, dtype: torch.dtype):
        self.dtype = dtype

    def __call__(self, _module, _args, output):
        return _cast_floating(output, self.dtype)


FP32_NORMS = (nn.LayerNorm, nn.GroupNorm, nn.RMSNorm)  # no mixed-dtype kernel: FP32 in, FP32 math, storage out


def is_fp32_norm(module: nn.Module) -> bool:
    """A LayerNorm/GroupNorm/RMSNorm by type, or a library's own norm class (Hugging Face's LlamaRMSNorm, timm's
    RmsNorm: plain Modules named ...Norm holding their own parameters, no children), BatchNorm aside."""
    if isinstance(module, _BatchNorm):
        return False
    if isinstance(module, FP32_NORMS):
        return True
    return (type(module).__name__.lower().endswith("norm") and next(module.children(), None) is None
            and next(module.parameters(recurse=False), None) is not None)


def cast_model(model: nn.Module, dtype: torch.dtype, keep_norm_fp32: bool) -> nn.Module:
    """Cast parameters and buffers to `dtype`, and cast floating inputs on the way in."""
    if dtype == torch.float32:
        return model
    model.to(dtype)
    if keep_norm_fp32:
        for module in model.modules():
            if isinstance(module, _BatchNorm):
                module.float()
            elif is_fp32_norm(module):
                module.float()
                module.register_forward_pre_hook(CastInputs(torch.float32))
                module.register_forward_hook(CastOutput(dtype))
    model.register_forward_pre_hook(CastInputs(dtype))
    return model


def fp64_copy(model: nn.Module) -> nn.Module:
    """A contiguous FP64 copy of a prepared model, inputs cast to FP64 too: the exact reference of a check."""
    reference = copy.deepcopy(model).to(torch.float64, memory_format=torch.contiguous_format)
    for module in reference.modules():
        for hook in [*module._forward_pre_hooks.values(), *module._forward_hooks.values()]:
            if isinstance(hook, (CastInputs, CastOutput)):
                hook.dtype = torch.float64
    return reference
