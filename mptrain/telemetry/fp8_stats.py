"""What FP8 with per-tensor scaling does to a Linear layer's operands (torchao's tensorwise recipe):

each operand is scaled so that its amax lands on the format's max (input and weight to E4M3, max 448; the output
gradient to E5M2, max 57344), then rounded. Nothing saturates by construction (the scale is the moment's amax);
what is lost is what falls below the format's smallest subnormal after scaling (E4M3 2^-9, E5M2 2^-16): small
values in a tensor with a large outlier. Per operand: amax, the scale, and the share of non-zero values that
underflow (flush to zero) or land among the subnormals.
"""

from __future__ import annotations

import math

import torch

FORMATS = {"e4m3": (448.0, 2.0**-9, 2.0**-6), "e5m2": (57344.0, 2.0**-16, 2.0**-14)}  # max, min subnormal, min normal
OPERANDS = {"input": "e4m3", "weight": "e4m3", "grad_output": "e5m2"}
SIZE = 5  # count, amax, non-zero, underflow, subnormal


def operand_stats(x: torch.Tensor, fmt: str) -> torch.Tensor:
    """[count, amax, non-zero, underflow, subnormal] of one operand under tensorwise scaling, on its device."""
    top, tiny, normal = FORMATS[fmt]
    magnitude = x.detach().float().abs().flatten()
    amax = magnitude.max() if magnitude.numel() else torch.zeros((), device=magnitude.device)
    scaled = magnitude * (top / amax.clamp_min(1e-12))
    nonzero = magnitude > 0
    return torch.stack([torch.tensor(float(magnitude.numel()), device=magnitude.device), amax,
                        nonzero.sum().float(), (nonzero & (scaled < tiny / 2)).sum().float(),
                        ((scaled >= tiny / 2) & (scaled < normal)).sum().float()])  # fmt: skip


def merge(old: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
    return torch.stack([old[0] + new[0], torch.maximum(old[1], new[1]), old[2] + new[2], old[3] + new[3],
                        old[4] + new[4]])


def to_record(layer: str, step: int | None, v: list[float]) -> dict:
    operand = layer.rsplit(".", 1)[-1]
    fmt = OPERANDS.get(operand, "e4m3")
    nonzero = v[2] or 1.0
    scale = FORMATS[fmt][0] / v[1] if v[1] > 0 else math.inf
    return {"step": step, "kind": "fp8", "layer": layer, "format": fmt, "count": v[0], "amax": v[1],
            "scale": scale, "underflow_frac": v[3] / nonzero, "subnormal_frac": v[4] / nonzero}  # fmt: skip


HEALTHY_UNDERFLOW = 0.01  # more than 1 % of an operand's non-zero values flushed: keep the layer in bf16


def unhealthy(records: list[dict]) -> list[str]:
    """Layers any of whose operands lose more than 1 % of their non-zero values to FP8 underflow."""
    return sorted({r["layer"].rsplit(".", 1)[0] for r in records if r["underflow_frac"] > HEALTHY_UNDERFLOW})
