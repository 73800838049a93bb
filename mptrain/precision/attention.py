"""BF16 attention on a CPU at FP32 speed: `precision.cpu_bf16=auto` where the CPU has BF16 units.

torch's CPU BF16 flash-attention backward is several times slower than its FP32 one (measured on an AVX512-BF16
EPYC: 23.6 against 5.1 ms a step of the transformer LM), while BF16 products elsewhere are faster than FP32's. So
under `auto` the attention alone runs as the emulated BF16 kernels run it (precision/emulation.py): the FP32
flash-attention kernels on the BF16 values, the output and the input gradients rounded to BF16, the backward
given the rounded output, as the forward handed it on. The numerics are the emulation's, bit for bit (tested);
a BF16 kernel accumulates in FP32 too. `precision.cpu_bf16=native` keeps torch's BF16 attention.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

aten = torch.ops.aten


class FP32Attention(TorchFunctionMode):
    """Routes F.scaled_dot_product_attention on CPU BF16 tensors (no dropout, no mask) through `_Attention`."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            call = _bind(*args, **kwargs)
            if _applies(**call):
                return _Attention.apply(call["q"], call["k"], call["v"], bool(call["is_causal"]), call["scale"])
        return func(*args, **kwargs)


def _bind(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False) -> dict:
    """F.scaled_dot_product_attention's arguments by name, however they were passed."""
    return {"q": q, "k": k, "v": v, "attn_mask": attn_mask, "dropout_p": dropout_p, "is_causal": is_causal,
            "scale": scale, "enable_gqa": enable_gqa}


def _applies(q, k, v, attn_mask, dropout_p, is_causal, scale, enable_gqa) -> bool:
    tensors = (q, k, v)
    return (all(torch.is_tensor(t) and t.device.type == "cpu" and t.dtype == torch.bfloat16 for t in tensors)
            and attn_mask is None and not dropout_p and not enable_gqa and q.shape[-1] == v.shape[-1])


class _Attention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, is_causal: bool, scale):
        with torch.autocast("cpu", enabled=False):
            out, lse = aten._scaled_dot_product_flash_attention_for_cpu(q.float(), k.float(), v.float(), 0.0,
                                                                        is_causal, scale=scale)
        out = out.to(torch.bfloat16)
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
        return (*(g.to(torch.bfloat16) for g in grads), None, None)
