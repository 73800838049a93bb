"""Large reductions in FP16 (`precision.reductions=fp16`): what the paper's FP32 reductions guard against (sec. 3.3).

A naive FP16 kernel sums in FP16, rounding every partial sum. The order here is a GPU block's: the reduced axis is
dealt to LANES interleaved lanes (term r to lane r mod LANES), each lane adds its terms in FP16 in index order,
then the lanes are combined by a pairwise FP16 tree (lane i with lane i + half, halving). Every addition is
`fp16(fp32(a) + fp32(b))`, which is how torch's and NumPy's float16 additions round; terms past the axis' end are
zero. Element-wise steps round to FP16 as they go (x - mean, its square, exp, ...).

Under it, inside the emulated FP16 kernels:
- batch norm (training): the batch mean and variance, and the backward's sums of dy and dy·x̂, over (N, H, W);
- layer norm: the mean and variance over the normalised dimensions, the backward's two sums per row, and the
  weight and bias gradients' sums over rows;
- softmax and log-softmax (the loss's, and the attention's): the normaliser and the backward's sum;
- the loss's mean (cross entropy's NLL over the batch, or tokens).
The normalisation itself (x̂ · weight + bias, with FP32 weights under keep_norm_fp32) is computed in FP32 from the
FP16 statistics and rounded once to the op's dtype. GroupNorm and the GAN's BCE mean stay torch's (FP32 sums).
"""

from __future__ import annotations

import torch

LANES = 256


def fp16_sum(x: torch.Tensor, dims, keepdim: bool = False) -> torch.Tensor:
    """Sum over `dims` in FP16 (lanes, then a pairwise tree); returns FP16."""
    dims = sorted(d % x.dim() for d in ([dims] if isinstance(dims, int) else dims))
    kept = [d for d in range(x.dim()) if d not in dims]
    terms = x.half().permute(*kept, *dims).reshape(*(x.shape[d] for d in kept), -1)
    size = terms.shape[-1]
    rows = -(-size // LANES)
    terms = torch.nn.functional.pad(terms, (0, rows * LANES - size)).unflatten(-1, (rows, LANES))
    acc = terms[..., 0, :].clone()
    for r in range(1, rows):
        acc += terms[..., r, :]
    width = LANES
    while width > 1:
        width //= 2
        acc = acc[..., :width] + acc[..., width:]
    out = acc[..., 0]
    if keepdim:
        for d in dims:
            out = out.unsqueeze(d)
    return out


def fp16_mean(x, dims, keepdim: bool = False) -> torch.Tensor:
    count = 1
    for d in [dims] if isinstance(dims, int) else dims:
        count *= x.shape[d]
    return fp16_sum(x, dims, keepdim) / count  # an FP16 division: rounded once


def fp16_moments(x16: torch.Tensor, dims):
    """Mean and biased variance (two passes, every step in FP16), kept dimensions."""
    mean = fp16_mean(x16, dims, keepdim=True)
    centred = x16 - mean
    return mean, fp16_mean(centred * centred, dims, keepdim=True)


def softmax(x: torch.Tensor, dim: int) -> torch.Tensor:
    shifted = x.half() - x.half().amax(dim, keepdim=True)
    e = shifted.exp()
    return e / fp16_sum(e, dim, keepdim=True)


def log_softmax(x: torch.Tensor, dim: int) -> torch.Tensor:
    shifted = x.half() - x.half().amax(dim, keepdim=True)
    return shifted - fp16_sum(shifted.exp(), dim, keepdim=True).log()


def softmax_backward(grad, out, dim: int) -> torch.Tensor:
    grad, out = grad.half(), out.half()
    return out * (grad - fp16_sum(grad * out, dim, keepdim=True))


def log_softmax_backward(grad, out, dim: int) -> torch.Tensor:
    grad = grad.half()
    return grad - out.half().exp() * fp16_sum(grad, dim, keepdim=True)


def nll_loss(logp, target, weight, reduction: int, ignore_index: int):
    """aten.nll_loss_forward: (loss, total weight), the mean's sum in FP16."""
    if weight is not None or logp.dim() != 2:
        return None  # not ours: the caller runs torch's kernel
    keep = target != ignore_index
    picked = -logp.half().gather(1, target.clamp(min=0).unsqueeze(1)).squeeze(1) * keep
    count = keep.sum().to(logp.dtype)
    if reduction == 0:
        return picked.to(logp.dtype), count
    total = fp16_sum(picked, 0)
    loss = total if reduction == 2 else total / count.half()
    return loss.to(logp.dtype), count


def batch_norm(x, weight, bias, running_mean, running_var, momentum: float, eps: float):
    """aten.native_batch_norm in training: (output, save_mean, save_invstd) from FP16 statistics."""
    dims = [0, *range(2, x.dim())]
    mean, var = fp16_moments(x.half(), dims)
    invstd = (var + eps).rsqrt()  # FP16
    count = x.numel() // x.shape[1]
    with torch.no_grad():
        if running_mean is not None:
            running_mean.mul_(1 - momentum).add_(mean.flatten().to(running_mean.dtype), alpha=momentum)
        if running_var is not None:
            unbiased = var.flatten().float() * count / max(count - 1, 1)
            running_var.mul_(1 - momentum).add_(unbiased.to(running_var.dtype), alpha=momentum)
    shape = [1, -1] + [1] * (x.dim() - 2)
    out = (x.float() - mean.float()) * invstd.float()
    if weight is not None:
        out = out * weight.float().view(shape)
    if bias is not None:
        out = out + bias.float().view(shape)
    stat_dtype = torch.float32 if weight is None else weight.dtype
    return out.to(x.dtype), mean.flatten().to(stat_dtype), invstd.flatten().to(stat_dtype)


def batch_norm_backward(grad, x, weight, save_mean, save_invstd, output_mask):
    dims = [0, *range(2, x.dim())]
    shape = [1, -1] + [1] * (x.dim() - 2)
    count = x.numel() // x.shape[1]
    xhat = ((x.half() - save_mean.half().view(shape)) * save_invstd.half().view(shape))
    dy = grad.half()
    sum_dy = fp16_sum(dy, dims)
    sum_dy_xhat = fp16_sum(dy * xhat, dims)
    grad_x = None
    if output_mask[0]:
        scale = save_invstd.float() * (weight.float() if weight is not None else 1.0) / count
        grad_x = (scale.view(shape) * (count * dy.float() - sum_dy.float().view(shape)
                                       - xhat.float() * sum_dy_xhat.float().view(shape))).to(x.dtype)
    dtype = weight.dtype if weight is not None else x.dtype
    return (grad_x, sum_dy_xhat.to(dtype) if output_mask[1] else None, sum_dy.to(dtype) if output_mask[2] else None)


def layer_norm(x, normalized_shape, weight, bias, eps: float):
    """aten.native_layer_norm: (output, mean, rstd) from FP16 statistics over the last dimensions."""
    dims = list(range(x.dim() - len(normalized_shape), x.dim()))
    mean, var = fp16_moments(x.half(), dims)
    rstd = (var + eps).rsqrt()
    out = (x.float() - mean.float()) * rstd.float()
    if weight is not None:
        out = out * weight.float()
    if bias is not None:
        out = out + bias.float()
    return out.to(x.dtype), mean.to(x.dtype), rstd.to(x.dtype)


def layer_norm_backward(grad, x, normalized_shape, mean, rstd, weight, bias, output_mask):
    dims = list(range(x.dim() - len(normalized_shape), x.dim()))
    rows = list(range(x.dim() - len(normalized_shape)))
    count = 1
    for d in dims:
        count *= x.shape[d]
    xhat = (x.half() - mean.half()) * rstd.half()
    dy = grad.half()
    dy_w = dy * weight.half() if weight is not None else dy
    grad_x = grad_w = grad_b = None
    if output_mask[0]:
        sum_dyw = fp16_sum(dy_w, dims, keepdim=True)
        sum_dyw_xhat = fp16_sum(dy_w * xhat, dims, keepdim=True)
        grad_x = (rstd.float() / count * (count * dy_w.float() - sum_dyw.float() - xhat.float() * sum_dyw_xhat.float())
                  ).to(x.dtype)
    if output_mask[1] and weight is not None:
        grad_w = fp16_sum(dy * xhat, rows).to(weight.dtype)
    if output_mask[2] and bias is not None:
        grad_b = fp16_sum(dy, rows).to(bias.dtype)
    return grad_x, grad_w, grad_b
