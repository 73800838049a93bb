"""The paper's third technique switched off: FP16 products whose partial sums accumulate in FP16 (sec. 3.3).

`precision.accumulate=fp16` with `precision.accumulate_block=K`: every emulated FP16 product (matrix products,
2-D convolutions and their two backward products, the fused attention) splits its reduction axis into blocks of
K consecutive terms, in the order documented per kernel below. Each term is an exact product of two FP16 values
(22 significant bits fit FP32); a block's K terms are summed in FP32 (by the BLAS, in its order); then the running
sum, an FP16 value, is updated as `acc = fp16(fp32(acc) + block_sum)` (round to nearest even). K=1 is a strictly
sequential FP16 accumulator; a tensor core's inner tile is a larger K. Terms beyond the axis' length are zero
(adding an exact zero never changes an FP16 value), so the axis need not divide by K.

Reduction axes and their order (the term index runs slowest first):
- `mm(a, b)`, `bmm`, `mv`: the shared dimension, in index order. `addmm`/`baddbmm`/`addmv` add the bias to
  the FP16 product in FP32 and round once (a GEMM epilogue).
- 2-D convolution forward: (input channel, kernel row, kernel column) of the window, channel slowest
  (im2col's order, the weight's memory order); the bias is added as an epilogue.
- its weight gradient: (image, output row, output column) of the batch, image slowest;
- its input gradient: kernel tap (row, column) slowest, then output channels in blocks of K within each tap (each
  input pixel's running sum continues across taps; a block never straddles two taps);
- its bias gradient: (image, row, column), like the weight gradient.
A transposed convolution is the input gradient of the convolution it inverts (and the other way round).
- fused attention: `S = Q Kᵀ` over the head dimension; the softmax (FP32, or FP16 under `precision.reductions`);
  P rounded to FP16 (FlashAttention's P·V operand); `O = P V` over key positions; backward `dV = Pᵀ dO` and
  `dK = dSᵀ Q` over query positions, `dP = dO Vᵀ` over the head dimension, `dQ = dS K` over key positions.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F

from mptrain.errors import UserError

PARTIAL_BYTES = 64 * 2**20  # block sums computed at once: bounded memory, few large BLAS calls


def block_sums(a: torch.Tensor, b: torch.Tensor, block: int) -> Iterator[torch.Tensor]:
    """The FP32 sums of each block of K terms of `a @ b` (a: [..., M, R], b: [..., R, N]), in term order."""
    size = a.shape[-1]
    blocks = max(1, math.ceil(size / block))
    pad = blocks * block - size
    a = F.pad(a.float(), (0, pad)).unflatten(-1, (blocks, block)).movedim(-2, 0)  # [C, ..., M, K]
    b = F.pad(b.float(), (0, 0, 0, pad)).unflatten(-2, (blocks, block)).movedim(-3, 0)  # [C, ..., K, N]
    out_numel = math.prod(torch.broadcast_shapes(a.shape[1:-2], b.shape[1:-2])) * a.shape[-2] * b.shape[-1]
    group = max(1, PARTIAL_BYTES // (4 * max(1, out_numel)))
    for start in range(0, blocks, group):
        yield from torch.matmul(a[start:start + group], b[start:start + group])


def accumulate_sums(view: torch.Tensor, sums) -> None:
    """view (FP16) += each FP32 block sum in turn, the running sum rounded to FP16 after each."""
    tmp = torch.empty(view.shape, dtype=torch.float32)
    for block_sum in sums:
        torch.add(view, block_sum, out=tmp)  # FP16 running sum + FP32 block sum, in FP32
        view.copy_(tmp)  # rounded to FP16


def accumulate_terms(view: torch.Tensor, factors) -> None:
    """K=1: view (FP16) += x * y for each pair of FP32 factors (their product is exact), rounded after each."""
    tmp = torch.empty(view.shape, dtype=torch.float32)
    for x, y in factors:
        torch.addcmul(view, x, y, out=tmp)  # one fused op per term: 5x faster than block_sums at K=1
        view.copy_(tmp)


def matmul(a: torch.Tensor, b: torch.Tensor, block: int | None) -> torch.Tensor:
    """FP16 a @ b (batched, broadcast) with FP16 accumulation in blocks of `block` (None: FP32 accumulation)."""
    if block is None:
        return torch.matmul(a.float(), b.float()).half()
    shape = (*torch.broadcast_shapes(a.shape[:-2], b.shape[:-2]), a.shape[-2], b.shape[-1])
    acc = torch.zeros(shape, dtype=torch.float16)
    if block == 1:
        a, b = a.float(), b.float()
        accumulate_terms(acc, ((a[..., :, r:r + 1], b[..., r:r + 1, :]) for r in range(a.shape[-1])))
        return acc
    if a.dim() != b.dim():  # block_sums needs equal ranks to broadcast its batch dimensions
        rank = max(a.dim(), b.dim())
        a, b = a.reshape((1,) * (rank - a.dim()) + a.shape), b.reshape((1,) * (rank - b.dim()) + b.shape)
    accumulate_sums(acc, block_sums(a, b, block))
    return acc


def epilogue(product: torch.Tensor, bias, beta=1, alpha=1) -> torch.Tensor:
    """beta * bias + alpha * product in FP32, rounded once to FP16 (a GEMM epilogue)."""
    if bias is None:
        return product if alpha == 1 else (alpha * product.float()).half()
    return (beta * bias.float() + alpha * product.float()).half()


# ---- 2-D convolutions ----------------------------------------------------------------------------------------------

def _check_2d(x: torch.Tensor) -> None:
    if x.dim() != 4:
        raise UserError(f"precision.accumulate=fp16 emulates 2-D convolutions only (met a {x.dim() - 2}-D one); "
                        "use precision.accumulate=fp32 for this model")


def conv_forward(x, w, stride, padding, dilation, groups, block) -> torch.Tensor:
    """Convolution: each output sums over (input channel, kernel row, kernel column), channel slowest."""
    _check_2d(x)
    n, _, h, width = x.shape
    c_out, c_group, kh, kw = w.shape
    out_h = (h + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    out_w = (width + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    cols = F.unfold(x.float(), (kh, kw), dilation=dilation, padding=padding, stride=stride)  # [N, Cin*kh*kw, L]
    per_group, out_group = c_group * kh * kw, c_out // groups
    outs = [matmul(w[g * out_group:(g + 1) * out_group].reshape(1, out_group, per_group),
                   cols[:, g * per_group:(g + 1) * per_group], block) for g in range(groups)]
    return torch.cat(outs, 1).view(n, c_out, out_h, out_w)


def conv_weight_grad(grad_out, x, w_shape, stride, padding, dilation, groups, block) -> torch.Tensor:
    """dL/dW[o, c, i, j] sums over (image, output row, output column), image slowest."""
    _check_2d(x)
    n, c_out = grad_out.shape[:2]
    _, c_group, kh, kw = w_shape
    cols = F.unfold(x.float(), (kh, kw), dilation=dilation, padding=padding, stride=stride)  # [N, Cin*kh*kw, L]
    terms = cols.permute(0, 2, 1).reshape(-1, cols.shape[1])  # [(N, L), Cin*kh*kw]
    dy = grad_out.permute(1, 0, 2, 3).reshape(c_out, -1)  # [Cout, (N, L)]
    per_group, out_group = c_group * kh * kw, c_out // groups
    grads = [matmul(dy[g * out_group:(g + 1) * out_group], terms[:, g * per_group:(g + 1) * per_group], block)
             for g in range(groups)]
    return torch.cat(grads, 0).view(w_shape)


def conv_input_grad(grad_out, w, x_shape, stride, padding, dilation, groups, block) -> torch.Tensor:
    """dL/dx: per input pixel, the kernel taps in row-major order, output channels in blocks of K within each."""
    _check_2d(grad_out)
    n, c_in, h, width = x_shape
    c_out, c_group, kh, kw = w.shape
    out_h, out_w = grad_out.shape[2:]
    out_group = c_out // groups
    acc = torch.zeros(n, c_in, h + 2 * padding[0], width + 2 * padding[1], dtype=torch.float16)
    for g in range(groups):
        outs = slice(g * out_group, (g + 1) * out_group)
        dy = grad_out[:, outs].float()  # [N, Cout_g, OH, OW]
        channels = slice(g * c_group, (g + 1) * c_group)
        for i in range(kh):
            for j in range(kw):
                rows = slice(i * dilation[0], i * dilation[0] + stride[0] * (out_h - 1) + 1, stride[0])
                cols = slice(j * dilation[1], j * dilation[1] + stride[1] * (out_w - 1) + 1, stride[1])
                view = acc[:, channels, rows, cols]
                tap = w[outs, :, i, j].float()  # [Cout_g, Cin_g]
                if block == 1:
                    accumulate_terms(view, ((tap[o].view(1, -1, 1, 1), dy[:, o:o + 1]) for o in range(out_group)))
                else:
                    sums = block_sums(tap.t().unsqueeze(0), dy.reshape(n, out_group, -1), block)
                    accumulate_sums(view, (s.view(n, c_group, out_h, out_w) for s in sums))
    return acc[:, :, padding[0]:padding[0] + h, padding[1]:padding[1] + width]


def bias_grad(grad_out, block) -> torch.Tensor:
    """dL/db sums over (image, row, column), image slowest."""
    dy = grad_out.permute(1, 0, 2, 3).reshape(grad_out.shape[1], -1)
    return matmul(dy, torch.ones(dy.shape[1], 1), block).view(-1)


def convolution(x, w, bias, stride, padding, dilation, transposed, output_padding, groups, block):
    if transposed:  # the input gradient of the convolution from the output back to x
        n, _, h, width = x.shape
        c_out = w.shape[1] * groups
        out_h = (h - 1) * stride[0] - 2 * padding[0] + dilation[0] * (w.shape[2] - 1) + output_padding[0] + 1
        out_w = (width - 1) * stride[1] - 2 * padding[1] + dilation[1] * (w.shape[3] - 1) + output_padding[1] + 1
        out = conv_input_grad(x, w, (n, c_out, out_h, out_w), stride, padding, dilation, groups, block)
    else:
        out = conv_forward(x, w, stride, padding, dilation, groups, block)
    return out if bias is None else epilogue(out, bias.view(1, -1, 1, 1))


def convolution_backward(grad_out, x, w, bias_sizes, stride, padding, dilation, transposed, output_padding, groups,
                         output_mask, block):
    grad_x = grad_w = grad_b = None
    if transposed:
        if output_mask[0]:
            grad_x = conv_forward(grad_out, w, stride, padding, dilation, groups, block)
        if output_mask[1]:
            grad_w = conv_weight_grad(x, grad_out, w.shape, stride, padding, dilation, groups, block)
    else:
        if output_mask[0]:
            grad_x = conv_input_grad(grad_out, w, x.shape, stride, padding, dilation, groups, block)
        if output_mask[1]:
            grad_w = conv_weight_grad(grad_out, x, w.shape, stride, padding, dilation, groups, block)
    if output_mask[2]:
        grad_b = bias_grad(grad_out, block)
    return grad_x, grad_w, grad_b


# ---- fused attention, decomposed ----------------------------------------------------------------------------------

def _scores(q, k, is_causal, scale, block, softmax):
    """FP32 logits (S = Q Kᵀ in FP16, scaled in FP32, causal mask) and the FP32 probabilities."""
    scale = 1 / math.sqrt(q.shape[-1]) if scale is None else scale
    logits = matmul(q, k.transpose(-2, -1), block).float() * scale
    if is_causal:
        mask = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool).tril()
        logits = logits.masked_fill(~mask, -math.inf)
    return logits, softmax(logits, -1).float(), scale


def attention(q, k, v, dropout_p, is_causal, attn_mask, scale, block, softmax):
    """`_scaled_dot_product_flash_attention_for_cpu`: (output FP16, log-sum-exp FP32)."""
    _supported(dropout_p, attn_mask)
    logits, p, _ = _scores(q, k, is_causal, scale, block, softmax)
    out = matmul(p.half(), v, block)
    return out, torch.logsumexp(logits, dim=-1)


def attention_backward(grad_out, q, k, v, out, _logsumexp, dropout_p, is_causal, attn_mask, scale, block, softmax):
    _supported(dropout_p, attn_mask)
    _, p, scale = _scores(q, k, is_causal, scale, block, softmax)
    p16 = p.half()
    grad_v = matmul(p16.transpose(-2, -1), grad_out, block)
    grad_p = matmul(grad_out, v.transpose(-2, -1), block).float()
    grad_s = (p * (grad_p - (grad_out.float() * out.float()).sum(-1, keepdim=True)) * scale).half()
    grad_q = matmul(grad_s, k, block)
    grad_k = matmul(grad_s.transpose(-2, -1), q, block)
    return grad_q, grad_k, grad_v


def _supported(dropout_p, attn_mask) -> None:
    if dropout_p or attn_mask is not None:
        raise UserError("precision.accumulate=fp16 / reductions=fp16 decompose causal attention without dropout or "
                        "a mask only: set model.dropout=0 (or precision.accumulate=fp32 reductions=fp32)")
