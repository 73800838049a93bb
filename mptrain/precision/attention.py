"""FP16/BF16 attention computed as the emulated kernels compute it, without a dispatch mode around every op.

The FP32 flash-attention kernels on the low-precision values, the output and the input gradients rounded to the
inputs' dtype, the backward given the rounded output, as the forward handed it on: the numerics of
precision/emulation.py's dispatch mode, bit for bit (tested). Two users:
- BF16 on a CPU with BF16 units (`precision.cpu_bf16=auto`): torch's CPU BF16 flash-attention backward is several
  times slower than its FP32 one (23.6 against 5.1 ms a step of the transformer LM on an AVX512-BF16 EPYC), while
  BF16 products elsewhere are faster than FP32's; a BF16 kernel accumulates in FP32 too. `cpu_bf16=native` keeps
  torch's BF16 attention.
- the emulated kernels' layers path (emulated_layers.py): the attention is the one product a transformer computes
  outside its Linear layers, so routing it here lets its steps leave the dispatch mode too.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

aten = torch.ops.aten


class FP32Attention(TorchFunctionMode):
    """Routes F.scaled_dot_product_attention on CPU `dtype` tensors (no dropout, no mask) through `_Attention`;
    `caught` counts the calls it routed."""

    def __init__(self, dtype: torch.dtype = torch.bfloat16):
        super().__init__()
        self.dtype = dtype
        self.caught = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            call = _bind(*args, **kwargs)
            if _applies(self.dtype, **call):
                self.caught += 1
                return _Attention.apply(call["q"], call["k"], call["v"], bool(call["is_causal"]), call["scale"])
        return func(*args, **kwargs)


def _bind(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False) -> dict:
    """F.scaled_dot_product_attention's arguments by name, however they were passed."""
    return {"q": q, "k": k, "v": v, "attn_mask": attn_mask, "dropout_p": dropout_p, "is_causal": is_causal,
            "scale": scale, "enable_gqa": enable_gqa}


def _applies(dtype, q, k, v, attn_mask, dropout_p, is_causal, scale, enable_gqa) -> bool:
    tensors = (q, k, v)
    return (all(torch.is_tensor(t) and t.device.type == "cpu" and t.dtype == dtype for t in tensors)
            and attn_mask is None and not dropout_p and not enable_gqa and q.shape[-1] == v.shape[-1])


class _Attention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, is_causal: bool, scale):
        with torch.autocast("cpu", enabled=False):
            out, lse = aten._scaled_dot_product_flash_attention_for_cpu(q.float(), k.float(), v.float(), 0.0,
                                                                        is_causal, scale=scale)
        out = out.to(q.dtype)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.is_causal, ctx.scale = is_causal, scale
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, lse = ctx.saved_tensors
        with torch.autocast("cpu", enabled=False):
            grads = aten._scaled_dot_product_flash_attention_for_cpu_backward(
                grad_out.float(), q.float(), k.float(), v.float(), out.float(), lse, 0.0, ctx.is_causal,
                scale=ctx.scale)
        return (*(g.to(q.dtype) for g in grads), None, None)
