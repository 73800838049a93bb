"""Block-scaled training rehearsal: `precision=mx`, each Linear layer's three products in an MX / NVFP4 format.

A Linear layer does three matrix products a step, each with its own contraction dimension, and the recipes in
use give each its own format: the forward (input x weight, over in_features), the input gradient (output
gradient x weight, over out_features) and the weight gradient (output gradient x input, over the tokens).
Each operand is quantized in blocks along its product's contraction dimension (`blockfmt.qdq`: torchao's
`MXTensor` / `NVFP4Tensor` where they apply), dequantized to FP32, and multiplied in FP32: what an MX tensor
core computes (its products are exact, its accumulator FP32), at FP32 speed, numerics not speed. Options, as the
recipes disagree on them: the scale's rounding (floor, the OCP spec's; rceil/ceil, NVIDIA's), 2-D weight tiles
(the weight and its transpose quantize alike), stochastic rounding of the gradient operands, and a random
Hadamard transform of the weight-gradient operands along the tokens (NVIDIA's NVFP4 recipe).

Layers whose dimensions do not divide by the block size, those `precision.mx_keep` names and, when
`precision.mx_only` is given, those it does not name stay in bf16, as everything else does (bf16 autocast
around); the run says which once, like `precision=fp8`.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from mptrain.precision import blockfmt
from mptrain.precision.blockfmt import FORMATS, BlockFormat
from mptrain.precision.fp8 import conversion_tail

HADAMARD_SIZE = 16
GEMMS = ("forward", "grad_input", "grad_weight")


@dataclass(frozen=True)
class Recipe:
    forward: BlockFormat
    grad_input: BlockFormat
    grad_weight: BlockFormat
    block_size: int | None  # None: each format's own
    rounding: str
    tiles: bool  # 2-D weight tiles
    stochastic_grads: bool
    hadamard: bool

    @classmethod
    def from_config(cls, cfg) -> Recipe:
        fmt = FORMATS[cfg.block_format]
        return cls(fmt, FORMATS[cfg.block_format_grad_input or fmt.name],
                   FORMATS[cfg.block_format_grad_weight or fmt.name], cfg.block_size, cfg.scale_rounding,
                   cfg.weight_blocks == "2d", cfg.grad_rounding == "stochastic", bool(cfg.hadamard))  # fmt: skip

    def size(self, fmt: BlockFormat) -> int:
        return self.block_size or fmt.block_size

    def describe(self) -> dict:
        return {gemm: getattr(self, gemm).name for gemm in GEMMS} | {
            "block_size": {gemm: self.size(getattr(self, gemm)) for gemm in GEMMS}, "scale_rounding": self.rounding,
            "weight_blocks": "2d" if self.tiles else "1d", "grad_rounding": "stochastic" if self.stochastic_grads
            else "nearest", "hadamard": self.hadamard}  # fmt: skip


class MXLinear(nn.Linear):
    """An nn.Linear whose products run in the recipe's block formats (the class is swapped in place: the same
    parameters, state dict and checkpoints)."""

    mx_recipe: Recipe
    mx_sink = None  # the numerics instrument's: called with (operand key, format, statistics) when set

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kind = x.device.type
        dtype = torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else x.dtype
        flat = x.to(dtype).reshape(-1, x.shape[-1])  # the operand as the autocast region hands it over: bf16
        y = _MXLinearFn.apply(flat, self.weight, self.bias, self.mx_recipe, self.mx_sink)
        return y.to(dtype).reshape(*x.shape[:-1], self.out_features)


def _quantize(t: torch.Tensor, fmt: BlockFormat, recipe: Recipe, sink, key: str, tiles: bool = False,
              stochastic: bool = False) -> torch.Tensor:
    size = recipe.size(fmt)
    if sink is None:
        return blockfmt.qdq(t, fmt, size, recipe.rounding, stochastic, tiles)
    deq, stats = blockfmt.qdq(t, fmt, size, recipe.rounding, stochastic, tiles, with_stats=True)
    sink(key, fmt.name, stats)
    return deq


def _pad_rows(t: torch.Tensor, multiple: int) -> torch.Tensor:
    """Zero rows to a multiple of the block (zeros change neither a block's amax nor the product)."""
    return F.pad(t, (0, 0, 0, -t.shape[0] % multiple))


def _forward_product(x, weight, recipe: Recipe, sink) -> torch.Tensor:
    xq = _quantize(x, recipe.forward, recipe, sink, "input.forward")
    wq = _quantize(weight, recipe.forward, recipe, sink, "weight.forward", tiles=recipe.tiles)
    return xq @ wq.t()


def _backward_products(g, x, weight, recipe: Recipe, sink) -> tuple[torch.Tensor, torch.Tensor]:
    """The input and weight gradients (FP32) from the output gradient `g` (FP32), each product's operands in its
    format."""
    sr = recipe.stochastic_grads
    fmt = recipe.grad_input  # contraction over out_features: the weight is blocked along its rows
    gq = _quantize(g, fmt, recipe, sink, "grad_output.grad_input", stochastic=sr)
    wq = _quantize(weight.t(), fmt, recipe, sink, "weight.grad_input", tiles=recipe.tiles)
    grad_x = gq @ wq.t()
    fmt = recipe.grad_weight  # contraction over the tokens: both operands blocked along them
    multiple = max(recipe.size(fmt), HADAMARD_SIZE if recipe.hadamard else 1)
    g_t, x_t = _pad_rows(g, multiple).t(), _pad_rows(x.float(), multiple).t()
    if recipe.hadamard:
        h = blockfmt.hadamard(HADAMARD_SIZE, seed=0, device=g.device)
        g_t, x_t = (_blockwise(t, h) for t in (g_t, x_t))
    gq = _quantize(g_t, fmt, recipe, sink, "grad_output.grad_weight", stochastic=sr)
    xq = _quantize(x_t, fmt, recipe, sink, "input.grad_weight")
    return grad_x, gq @ xq.t()


class _MXLinearFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, recipe: Recipe, sink):
        ctx.recipe, ctx.sink, ctx.has_bias, ctx.x_dtype = recipe, sink, bias is not None, x.dtype
        ctx.save_for_backward(x, weight)
        with torch.autocast(x.device.type, enabled=False):
            y = _forward_product(x, weight, recipe, sink)
            return y if bias is None else y + bias.float()

    @staticmethod
    def backward(ctx, grad_y):
        x, weight = ctx.saved_tensors
        with torch.autocast(grad_y.device.type, enabled=False):
            g = grad_y.float()
            grad_x, grad_w = _backward_products(g, x, weight, ctx.recipe, ctx.sink)
            grad_b = g.sum(0) if ctx.has_bias else None
        return grad_x.to(ctx.x_dtype), grad_w.to(weight.dtype), grad_b, None, None


def observe(module: nn.Linear, recipe: Recipe, sink) -> list:
    """Hooks that leave a high-precision Linear's arithmetic alone and report what `recipe` would do to its
    operands (`mptrain-numerics --block-format`): the same quantizations, their products discarded."""

    def forward_hook(mod, inputs, output):
        x = inputs[0].detach().float().reshape(-1, mod.in_features)
        weight = mod.weight.detach().float()
        with torch.no_grad(), torch.autocast(x.device.type, enabled=False):
            _forward_product(x, weight, recipe, sink)
        if torch.is_tensor(output) and output.requires_grad:
            def backward_hook(g):
                with torch.no_grad(), torch.autocast(g.device.type, enabled=False):
                    _backward_products(g.detach().float().reshape(-1, mod.out_features), x, weight, recipe, sink)

            output.register_hook(backward_hook)

    return [module.register_forward_hook(forward_hook)]


def fits(module: nn.Linear, recipe: Recipe) -> bool:
    size = max(recipe.size(getattr(recipe, gemm)) for gemm in GEMMS)
    return not (module.in_features % size or module.out_features % size)


def _blockwise(t: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """`t` (rows, tokens) times the block-diagonal matrix of `h` along the tokens: orthogonal, so a product of
    two operands so transformed is unchanged."""
    rows, cols = t.shape
    return (t.reshape(rows, cols // h.shape[0], h.shape[0]) @ h).reshape(rows, cols)


def convert(model: nn.Module, cfg, prefix: str = "") -> dict:
    """Swap `model`'s Linear layers for MXLinear in place; what runs in which format, what stayed, and why."""
    recipe = Recipe.from_config(cfg)
    size = max(recipe.size(getattr(recipe, gemm)) for gemm in GEMMS)
    converted, kept = [], {}
    for name, module in model.named_modules():
        if type(module) is not nn.Linear:  # subclasses (attention's out_proj) are called through other paths
            continue
        full = prefix + name
        if _named(cfg.mx_keep, name, full):
            kept[full] = "precision.mx_keep"
        elif cfg.mx_only and not _named(cfg.mx_only, name, full):
            kept[full] = "not in precision.mx_only"
        elif not fits(module, recipe):
            kept[full] = f"{module.in_features}x{module.out_features}: blocks of {size} need multiples of {size}"
        else:
            module.__class__ = MXLinear
            module.mx_recipe = recipe
            converted.append(full)
    others = sorted({type(m).__name__ for m in model.modules() if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.RNNBase))})
    return {"recipe": recipe.describe(), "emulated": True, "layers": converted, "kept": kept, "not_linear": others}


def _named(patterns, *names: str) -> bool:
    return any(fnmatch.fnmatchcase(n, p) for p in patterns for n in names)


def describe(report: dict, network: str | None = None) -> str:
    """The one note a network's conversion prints."""
    r = report["recipe"]
    formats = "/".join(dict.fromkeys(r[g] for g in GEMMS))
    note = (f"precision=mx ({formats}, scale {r['scale_rounding']}, {r['weight_blocks']} weight blocks"
            f"{', stochastic gradients' if r['grad_rounding'] == 'stochastic' else ''}"
            f"{', Hadamard' if r['hadamard'] else ''}){f' {network}' if network else ''}: "
            f"{len(report['layers'])} Linear layer(s) quantize-dequantize their operands and multiply in FP32 (MX "
            f"numerics, not MX speed), {len(report['kept'])} kept in bf16")
    return note + conversion_tail(report, "a block format")
