"""FP32 master weights (the paper's technique 1).

The optimizer updates FP32 copies; the FP16 model weights are rounded from them
after each step, so updates smaller than 2^-11 of a weight are accumulated
instead of lost. Parameters already held in FP32 (BatchNorm kept in FP32) serve
as their own master: no copy, no extra memory.
"""

from __future__ import annotations

import torch
from torch import nn


class MasterWeights:
    def __init__(self, params: list[nn.Parameter]):
        self.model_params = [p for p in params if p.requires_grad]
        self.master_params = [
            p if p.dtype == torch.float32 else nn.Parameter(p.detach().float().clone())
            for p in self.model_params
        ]
        self._copied = [(m, p) for m, p in zip(self.master_params, self.model_params) if m is not p]

    @torch.no_grad()
    def grads_to_master(self) -> list[torch.Tensor]:
        """Copy the low-precision grads into FP32 master grads; return all master grads."""
        dst, src = [], []
        for master, param in self._copied:
            if param.grad is None:
                master.grad = None  # unused this step: the optimizer must not reuse a stale grad
                continue
            if master.grad is None:
                master.grad = torch.empty_like(master)
            dst.append(master.grad)
            src.append(param.grad)
        if dst:
            torch._foreach_copy_(dst, src)
        return [m.grad for m in self.master_params if m.grad is not None]

    @torch.no_grad()
    def master_to_model(self) -> None:
        """Round the updated FP32 masters into the model's low-precision weights."""
        if self._copied:
            masters, params = zip(*self._copied)
            torch._foreach_copy_(list(params), list(masters))
