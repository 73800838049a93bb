"""The emulated FP16 (BF16) products of nn.Linear and the convolutions, computed in the layers themselves.

EmulatedKernels (emulation.py) reaches the products through a TorchDispatchMode, so every op of a step, products
or not, takes a Python hop (about 5 us: 222 ops a step for the MLP, where the products themselves take 6 ms).
Here the layers that hold a model's products compute them as the dispatch mode would, inside an autograd Function:
the forward product, the input- and weight-gradient products, each from the same FP16 (BF16) values in FP32 and
rounded once, with the same kernels and the same saved tensors, so the results are bit for bit the dispatch mode's.
Element-wise ops run natively in both. Measured side by side (results/bench/intel-xeon-amx_torch2.14.1): `mixed`
against fp32, MLP 0.43x -> 0.61x, LSTM LM 0.88x -> 1.06x, DCGAN 0.75x -> 0.84x, ResNet-20 1.00x -> 1.07x.

Whether a model's products all sit in such layers is seen, not assumed (`Coverage`): its first steps run under
the dispatch mode, which counts the low-precision products that reached it; if none did, later steps run without
it, and every REAUDIT_EVERY-th step looks again. The fused attention (F.scaled_dot_product_attention without
dropout or a mask) is routed through attention.py's Function in the audited steps, and in every later step if
an audit met it: a transformer leaves the dispatch mode too (an attention with dropout or a mask takes torch's own
path, and keeps the mode on if its products reach it). A product outside these (a functional call, autocast) keeps
the dispatch mode on for good. FP16 accumulation and reductions (precision.accumulate / reductions=fp16) need the
mode for every op: their steps always dispatch.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from mptrain.precision import emulation

AUDITED_FIRST = 2  # steps (kernels() entries) run under the dispatch mode before it may be left
REAUDIT_EVERY = 64  # then one step in this many runs under it again: a product that appears later is found
CONVOLUTIONS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
TRANSPOSED = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)


class _Linear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, mode):
        ctx.save_for_backward(x, weight)
        # as torch's linear: one addmm with the bias inside the product for a 2-D or contiguous input; else the
        # product, rounded, and the bias added to it in low precision
        ctx.mode, ctx.has_bias, ctx.fused = mode, bias is not None, bias is not None and (x.dim() == 2 or x.is_contiguous())
        mode.calls += 1
        if ctx.fused:
            return F.linear(x.float(), mode.up(weight), mode.up(bias)).to(x.dtype)
        out = F.linear(x.float(), mode.up(weight)).to(x.dtype)
        return out if bias is None else out.add_(bias)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        mode, dtype = ctx.mode, x.dtype
        grad2d = grad.reshape(-1, grad.shape[-1])
        g = grad2d.float()
        gx = gw = gb = None
        if ctx.needs_input_grad[0]:  # as addmm's backward: grad @ weight
            gx = (g @ mode.up(weight)).to(dtype).view(x.shape)
        if ctx.needs_input_grad[1]:  # grad^T @ input: mm_mat2_backward's order for a transposed weight
            gw = (g.t() @ x.reshape(-1, x.shape[-1]).float()).to(dtype)
        if ctx.has_bias and ctx.needs_input_grad[2]:  # as autograd sums a broadcast bias: in the grad's own dtype
            gb = grad2d.sum(0) if ctx.fused else grad.sum(tuple(range(grad.dim() - 1)))
        mode.calls += (gx is not None) + (gw is not None)
        return gx, gw, gb, None


class _Convolution(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, mode, options):
        ctx.save_for_backward(x, weight)
        ctx.mode, ctx.options = mode, options
        ctx.bias_sizes = None if bias is None else list(bias.shape)
        mode.calls += 1
        up_bias = None if bias is None else mode.up(bias)
        return torch.ops.aten.convolution(x.float(), mode.up(weight), up_bias, *options).to(x.dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        mode, dtype = ctx.mode, x.dtype
        mask = [ctx.needs_input_grad[0], ctx.needs_input_grad[1],
                ctx.bias_sizes is not None and ctx.needs_input_grad[2]]
        mode.calls += 1
        # only the weight gradient reads the input's values; the input gradient needs its shape and layout alone
        # (a GAN's generator step through the frozen discriminator: a whole pass over each saved input spared)
        x_up = x.float() if mask[1] else torch.empty_like(x, dtype=torch.float32)
        grads = torch.ops.aten.convolution_backward(grad.float(), x_up, mode.up(weight), ctx.bias_sizes,
                                                    *ctx.options, mask)
        return *(None if g is None else g.to(dtype) for g in grads), None, None


def _mode(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None):
    """The entered EmulatedKernels that computes this layer's products here, or None (torch's path: the dispatch
    mode, if entered, still emulates them)."""
    mode = emulation.layer_mode(x)
    if mode is None or weight.dtype != x.dtype or (bias is not None and bias.dtype != x.dtype):
        return None
    return mode


def _linear_forward(self, x):
    mode = _mode(x, self.weight, self.bias)
    if mode is None or x.dim() < 2:  # a vector: torch's matrix-vector product
        return type(self).forward(self, x)
    return _Linear.apply(x, self.weight, self.bias, mode)


def _conv_forward(self, x, weight, bias):
    mode = _mode(x, weight, bias)
    if mode is None or x.dim() != len(self.kernel_size) + 2:  # unbatched input: torch's path adds the batch
        return type(self)._conv_forward(self, x, weight, bias)
    padding = self.padding
    if self.padding_mode != "zeros":
        x = F.pad(x, self._reversed_padding_repeated_twice, mode=self.padding_mode)
        padding = (0,) * len(self.kernel_size)
    if isinstance(padding, str):  # "same"/"valid": torch's own path resolves them
        return type(self)._conv_forward(self, x, weight, bias)
    options = (self.stride, padding, self.dilation, False, (0,) * len(self.kernel_size), self.groups)
    return _Convolution.apply(x, weight, bias, mode, options)


def _conv_transpose_forward(self, x, output_size=None):
    mode = _mode(x, self.weight, self.bias)
    dims = len(self.kernel_size)
    if mode is None or self.padding_mode != "zeros" or x.dim() != dims + 2:  # torch's path refuses or unsqueezes
        return type(self).forward(self, x, output_size)
    output_padding = self._output_padding(x, output_size, self.stride, self.padding, self.kernel_size, dims,
                                          self.dilation)
    options = (self.stride, self.padding, self.dilation, True, output_padding, self.groups)
    return _Convolution.apply(x, self.weight, self.bias, mode, options)


def install(model: nn.Module) -> int:
    """Give `model`'s nn.Linear and convolution layers (and subclasses that keep their forward) the emulated
    products; returns how many. Their parameters, state dict and hooks are untouched."""
    installed = 0
    for module in model.modules():
        kind = type(module)
        # a partial, not a bound method: a pickled model (torch.save(model)) and its deep copies keep it
        if issubclass(kind, nn.Linear) and kind.forward is nn.Linear.forward:
            module.forward = functools.partial(_linear_forward, module)
        elif issubclass(kind, CONVOLUTIONS) and kind._conv_forward in [c._conv_forward for c in CONVOLUTIONS]:
            module._conv_forward = functools.partial(_conv_forward, module)
        elif issubclass(kind, TRANSPOSED) and kind.forward in [c.forward for c in TRANSPOSED]:
            module.forward = functools.partial(_conv_transpose_forward, module)
        else:
            continue
        installed += 1
    return installed


class Coverage:
    """Which steps run under the dispatch mode: the first AUDITED_FIRST and every REAUDIT_EVERY-th, while every
    low-precision product they ran was a layer's; all of them once one was not (or when no layer was installed)."""

    def __init__(self, layers: int):
        self.entries = 0
        self.uncovered = layers == 0  # nothing installed: every product needs the dispatch mode
        self.attention = False  # an audited step routed an attention (attention.py): every step routes it

    def routes_attention(self, audit: bool) -> bool:
        """Whether this step routes the fused attention outside the dispatch mode: while auditing, to see whether
        there is any (the routing has a Python hop per torch call), and after, where there was."""
        return not self.uncovered and (audit or self.attention)

    def dispatch_next(self) -> bool:
        audit = self.uncovered or self.entries < AUDITED_FIRST or self.entries % REAUDIT_EVERY == 0
        self.entries += 1
        return audit

    def record(self, mode) -> None:
        """A step's EmulatedKernels, left: if it dispatched and a product reached the dispatch mode itself, the
        model has products outside the layers."""
        if mode.dispatch and mode.dispatched:
            self.uncovered = True
        if mode.attention is not None and mode.attention.caught:
            self.attention = True

    @property
    def path(self) -> str:
        """summary.json `emulation`: where the emulated products ran."""
        return "dispatch mode" if self.uncovered else "layers"
