"""What FP8 with per-tensor scaling does to a Linear layer's operands (torchao's tensorwise recipe):

each operand is scaled so that its amax lands on the format's max (input and weight to E4M3, max 448; the output
gradient to E5M2, max 57344), then rounded. Nothing saturates by construction (the scale is the moment's amax);
what is lost is what falls below the format's smallest subnormal after scaling (E4M3 2^-9, E5M2 2^-16): small
values in a tensor with a large outlier. Per operand: amax, the scale, the share of non-zero values that
underflow (flush to zero) or land among the subnormals, and the histogram of floor(log2) of the scaled values
(the paper's Fig. 3 against the FP8 formats' limits; the report draws it).
"""

from __future__ import annotations

import math

import torch

from mptrain.telemetry import headroom

FORMATS = {"e4m3": (448.0, 2.0**-9, 2.0**-6), "e5m2": (57344.0, 2.0**-16, 2.0**-14)}  # max, min subnormal, min normal
OPERANDS = {"input": "e4m3", "weight": "e4m3", "grad_output": "e5m2"}
EXPONENTS = torch.arange(-40, 17)  # bins of floor(log2 |x * scale|); the end bins take what lies beyond
SIZE = 5 + len(EXPONENTS)  # count, amax, non-zero, underflow, subnormal, histogram


def operand_stats(x: torch.Tensor, fmt: str) -> torch.Tensor:
    """[count, amax, non-zero, underflow, subnormal, *histogram] of one operand under tensorwise scaling, on its
    device (no host sync)."""
    top, tiny, normal = FORMATS[fmt]
    magnitude = x.detach().float().abs().flatten()
    amax = magnitude.max() if magnitude.numel() else torch.zeros((), device=magnitude.device)
    scaled = magnitude * (top / amax.clamp_min(1e-12))
    nonzero = magnitude > 0
    exponent = torch.frexp(scaled).exponent - 1  # floor(log2) of a non-zero value
    bins = (exponent.clamp(int(EXPONENTS[0]), int(EXPONENTS[-1])) - int(EXPONENTS[0])).long()
    histogram = torch.zeros(len(EXPONENTS), device=magnitude.device).index_add_(0, bins, nonzero.float())
    counts = torch.stack([torch.tensor(float(magnitude.numel()), device=magnitude.device), amax,
                          nonzero.sum().float(), (nonzero & (scaled < tiny / 2)).sum().float(),
                          ((scaled >= tiny / 2) & (scaled < normal)).sum().float()])  # fmt: skip
    return torch.cat([counts, histogram])


merge = headroom.merge  # counts and histogram add, amax is the larger


def to_record(layer: str, step: int | None, v: list[float]) -> dict:
    operand = layer.rsplit(".", 1)[-1]
    fmt = OPERANDS.get(operand, "e4m3")
    nonzero = v[2] or 1.0
    scale = FORMATS[fmt][0] / v[1] if v[1] > 0 else math.inf
    return {"step": step, "kind": "fp8", "layer": layer, "format": fmt, "count": v[0], "amax": v[1],
            "scale": scale, "underflow_frac": v[3] / nonzero, "subnormal_frac": v[4] / nonzero,
            "log2_hist": v[5:]}  # fmt: skip


HEALTHY_UNDERFLOW = 0.01  # more than 1 % of an operand's non-zero values flushed: keep the layer in bf16


def unhealthy(records: list[dict]) -> list[str]:
    """Layers any of whose operands lose more than 1 % of their non-zero values to FP8 underflow."""
    return sorted({r["layer"].rsplit(".", 1)[0] for r in records if r["underflow_frac"] > HEALTHY_UNDERFLOW})
