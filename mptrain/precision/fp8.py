"""FP8 training rehearsal through torchao's float8: `precision=fp8`, recipe `precision.fp8_recipe`.

torchao swaps each `nn.Linear` whose dimensions fit (both multiples of 16) for a `Float8Linear`: its input,
weight and output gradient are scaled per tensor (or per row) to E4M3 / E5M2 for the matrix products, from the
amax of the moment (dynamic scaling: FP8's loss scaling). The rest of the network runs under bf16 autocast.
On a GPU with FP8 units (compute capability 8.9+: Ada, Hopper) the products are real FP8; elsewhere, a CPU
included, torchao's own emulation (`emulate=True`) computes the same FP8-rounded values in higher precision:
FP8 numerics, not FP8 speed. mptrain adds no arithmetic of its own, with one exception: torchao casts a
Float8Linear's input to CUDA autocast's dtype only (pytorch/ao#1522), so mptrain casts it to the autocast
dtype of the device it is on, as torchao does on a GPU: the CPU rehearsal rounds where a GPU run rounds, and
`rowwise_with_gw_hp`'s high-precision weight-gradient product gets operands of one dtype.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from mptrain.errors import UserError


def has_fp8_units(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)


def convert(model: nn.Module, recipe: str, device: torch.device, prefix: str = "") -> dict:
    """Convert `model`'s Linear layers to torchao Float8Linear in place; what ran in FP8 and what stayed, and why
    (layer names after `prefix`, e.g. the network's name)."""
    try:
        from torchao.float8 import Float8LinearConfig, convert_to_float8_training
    except ImportError:
        raise UserError("precision=fp8 needs torchao: pip install 'mptrain[fp8]' (or torchao)") from None
    emulate = not has_fp8_units(device)
    config = dataclasses.replace(Float8LinearConfig.from_recipe_name(recipe), emulate=emulate)
    converted, kept = [], {}

    def fits(module: nn.Module, name: str) -> bool:
        if not isinstance(module, nn.Linear):
            return False
        if module.in_features % 16 or module.out_features % 16:
            kept[prefix + name] = f"{module.in_features}x{module.out_features}: FP8 products need multiples of 16"
            return False
        converted.append(prefix + name)
        return True

    convert_to_float8_training(model, config=config, module_filter_fn=fits)
    for module in model.modules():
        if type(module).__name__ == "Float8Linear":  # by name: torchao keeps the class out of its public API
            module.register_forward_pre_hook(_cast_input_like_cuda_autocast)
    others = sorted({type(m).__name__ for m in model.modules() if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.RNNBase))})
    return {"recipe": recipe, "emulated": emulate, "layers": converted, "kept": kept,
            "not_linear": others}  # fmt: skip


def _cast_input_like_cuda_autocast(module: nn.Module, args: tuple) -> tuple | None:
    x, kind = args[0], args[0].device.type
    if kind == "cuda" or not x.is_floating_point() or not torch.is_autocast_enabled(kind):
        return None  # torchao's own autocast logic covers CUDA
    return (x.to(torch.get_autocast_dtype(kind)), *args[1:])


def merge(old: dict | None, new: dict) -> dict:
    """One report for a run that converts several networks (the GAN's generator and discriminator)."""
    if old is None:
        return new
    return {**old, "layers": old["layers"] + new["layers"], "kept": {**old["kept"], **new["kept"]},
            "not_linear": sorted(set(old["not_linear"]) | set(new["not_linear"]))}  # fmt: skip


def describe(report: dict, network: str | None = None) -> str:
    """The one note a network's conversion prints: how many layers run in FP8, which stay, emulated or not."""
    where = "torchao's emulation (FP8 numerics, not FP8 speed)" if report["emulated"] else "FP8 tensor cores"
    note = (f"precision=fp8 ({report['recipe']}){f' {network}' if network else ''}: {len(report['layers'])} "
            f"Linear layer(s) in FP8 on {where}, {len(report['kept'])} kept in bf16")
    return note + conversion_tail(report, "FP8", " (torchao converts Linear layers only)")


def conversion_tail(report: dict, fmt: str, why: str = "") -> str:
    """The end of a conversion's note (fp8, mx): a kept layer and why, the other kinds of layer, none converted."""
    note = ""
    if report["kept"]:
        first = next(iter(report["kept"].items()))
        note += f" (e.g. {first[0]}: {first[1]})"
    if report["not_linear"]:
        note += f"; {', '.join(report['not_linear'])} layers stay bf16{why}"
    if not report["layers"]:
        note += f"; no layer runs in {fmt}: this is a bf16 run"
    return note
