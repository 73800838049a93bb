"""FP16 numerics at FP32 speed on a CPU: the arithmetic of FP16 tensor cores, emulated.

A CPU without FP16 units runs torch's FP16 convolutions and matrix products 10-40x
slower than FP32. Under `precision.cpu_fp16=emulate` every tensor stays exactly as the
native FP16 path holds it (weights, activations, gradients, tensors saved for backward:
autograd is untouched), but each convolution and matrix product whose inputs are FP16 is
computed from those FP16 values in FP32 and its result rounded to FP16 once: FP16 inputs,
FP32 accumulation, FP16 output, as a tensor core does and as torch's own CPU FP16 kernels
do (they accumulate in float too). Only the order of the FP32 sums can differ.

It works below autograd (a TorchDispatchMode), so forward and backward kernels
(`convolution_backward`, the `mm`s of a Linear's backward) are both covered.

Element-wise ops stay native on purpose: emulating add/mul/sigmoid/tanh the same way is
bit-identical (their CPU FP16 kernels compute in float and round once), but the two extra
conversions per op cost more than torch's FP16 element-wise loops: an LSTM LM step took
233 ms with them emulated against 159 ms without (measured side by side, 2-core EPYC).
"""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map

CPU_FP16 = ("native", "emulate")  # precision.cpu_fp16
aten = torch.ops.aten
HEAVY = {aten.convolution.default, aten.convolution_backward.default, aten.mm.default, aten.addmm.default,
         aten.bmm.default, aten.baddbmm.default, aten.mv.default, aten.addmv.default}  # fmt: skip


def _is_cpu_half(t) -> bool:
    return isinstance(t, torch.Tensor) and t.dtype == torch.float16 and t.device.type == "cpu"


def _up(t):
    return t.float() if _is_cpu_half(t) else t


def _down(t):
    return t.half() if isinstance(t, torch.Tensor) and t.dtype == torch.float32 else t


class EmulatedFP16Kernels(TorchDispatchMode):
    """Inside it, CPU FP16 convolutions and matrix products compute in FP32 and round their results to FP16."""

    def __init__(self):
        super().__init__()
        self.calls = 0  # kernels emulated: tests check the path is really taken

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in HEAVY and any(_is_cpu_half(a) for a in args):
            self.calls += 1
            return tree_map(_down, func(*tree_map(_up, args), **tree_map(_up, kwargs)))
        return func(*args, **kwargs)
