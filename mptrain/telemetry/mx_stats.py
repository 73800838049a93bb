"""What a block-scaled format does to a Linear layer's operands (precision=mx), per operand and product.

Per `<layer>.<operand>.<product>` (e.g. `blocks.0.mlp.0.grad_output.grad_weight`): the share of non-zero values
flushed to zero inside their block (small values beside the block's amax), the share of values clamped at the
element format's max (a scale rounded down: `scale_rounding=floor`), the shares of blocks whose scale hit the
scale format's floor or ceiling (E8M0: 2^-127 / 2^127; NVFP4's E4M3 block scale: 2^-6 / 448 times the tensor
scale), and the quantisation error relative to the operand as it arrived (bf16 under autocast):
||q(x) - x|| / ||x||. The statistics come from precision/blockfmt.py, summed over the step's calls.
"""

from __future__ import annotations

import math

import torch

from mptrain.precision.blockfmt import FORMATS, STATS

FORMAT_NAMES = list(FORMATS)
HARMFUL_FLUSH = 0.05  # more than 5 % of an operand's non-zero values flushed, or 1 % clamped: keep it in bf16
HARMFUL_SATURATION = 0.01


def operand_stats(stats: torch.Tensor, fmt: str) -> torch.Tensor:
    """blockfmt's statistics with the format's index appended (the record names it)."""
    return torch.cat([stats, torch.tensor([float(FORMAT_NAMES.index(fmt))], device=stats.device)])


def merge(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.cat([a[:-1] + b[:-1], b[-1:]])


def to_record(layer: str, step: int | None, v: list[float]) -> dict:
    s = dict(zip(STATS, v))
    nonzero, blocks = s["nonzero"] or 1.0, s["blocks"] or 1.0
    return {"step": step, "kind": "mx", "layer": layer, "format": FORMAT_NAMES[int(v[len(STATS)])],
            "count": s["count"], "flushed_frac": s["flushed"] / nonzero, "saturated_frac": s["saturated"] / (s["count"] or 1.0),
            "scale_underflow_frac": s["scale_underflow"] / blocks, "scale_saturated_frac": s["scale_saturated"] / blocks,
            "rel_error": math.sqrt(s["sq_error"] / s["sq_norm"]) if s["sq_norm"] > 0 else 0.0}  # fmt: skip


def harmful(records: list[dict]) -> list[tuple[str, float]]:
    """Layers ranked by their worst operand's quantisation error, those past the flush or saturation limits
    first: the candidates for precision.mx_keep."""
    worst: dict[str, tuple[bool, float]] = {}
    for r in records:
        layer = r["layer"].rsplit(".", 2)[0]
        bad = r["flushed_frac"] > HARMFUL_FLUSH or r["saturated_frac"] > HARMFUL_SATURATION
        old = worst.get(layer, (False, 0.0))
        worst[layer] = (old[0] or bad, max(old[1], r["rel_error"]))
    return [(layer, err) for layer, (bad, err) in sorted(worst.items(), key=lambda kv: (not kv[1][0], -kv[1][1]))]
