"""Forward activation headroom: how close each module's output comes to the largest number a format holds.

An FP16 forward overflows where an output exceeds 65504 (attention logits, a transformer's FFN output once
trained in bf16 or fp32: the T5 and BLOOM reports). Per module output: the amax, the share of values above each
format's max and within 2x, 4x and 16x of it (less than 1, 2 and 4 bits of headroom), for FP16 and, for later
use, bf16 and FP8 E4M3. NaN counts as beyond every limit (it is what an overflow becomes).
"""

from __future__ import annotations

import math

import torch

LIMITS = {"fp16": 65504.0, "bf16": 3.3895313892515355e38, "e4m3": 448.0}
WITHIN = (1, 2, 4, 16)  # above max / 1 (overflow), within 2x, 4x, 16x of max
# [count, amax, then per limit the counts above max / w for w in WITHIN]
SIZE = 2 + len(LIMITS) * len(WITHIN)


def headroom_stats(output: torch.Tensor) -> torch.Tensor:
    """[count, amax, counts above limit / w per limit and w] of one output, on its device (no host sync)."""
    magnitude = torch.nan_to_num(output.detach().float().abs(), nan=math.inf, posinf=math.inf).flatten()
    thresholds = torch.tensor([limit / w for limit in LIMITS.values() for w in WITHIN], device=magnitude.device)
    # one boolean mask per threshold, counted as it is (count_nonzero): a [numel, thresholds] mask, or .sum()'s cast
    # to int64, allocated and paged in 12-96 bytes per element per call: the system time that made
    # `mptrain-numerics --checkpoint` take 115 s for 8 batches of ResNet-20, 82 s of it system time (18 s after;
    # 2-core AMD EPYC, batches of 512)
    above = torch.stack([torch.count_nonzero(magnitude > t) for t in thresholds]).float()
    count = torch.tensor([float(magnitude.numel())], device=magnitude.device)
    amax = magnitude.max().view(1) if magnitude.numel() else torch.zeros(1, device=magnitude.device)
    return torch.cat([count, amax, above])


def merge(old: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
    """Two measurements of one module (it ran twice, or on two batches): counts add, amax is the larger."""
    return torch.cat([old[:1] + new[:1], torch.maximum(old[1:2], new[1:2]), old[2:] + new[2:]])


def merge_lists(old: list[float], new: list[float]) -> list[float]:
    return [old[0] + new[0], max(old[1], new[1]), *(a + b for a, b in zip(old[2:], new[2:]))]


def to_record(layer: str, step: int | None, v: list[float]) -> dict:
    n = v[0] or 1.0
    record = {"step": step, "kind": "forward", "layer": layer, "count": v[0], "amax": v[1]}
    for i, (fmt, limit) in enumerate(LIMITS.items()):
        record[f"headroom_bits_{fmt}"] = math.log2(limit / v[1]) if 0 < v[1] < math.inf else (
            math.inf if v[1] == 0 else -math.inf)  # fmt: skip
        for j, w in enumerate(WITHIN):
            name = "over" if w == 1 else f"within{w}x"
            record[f"{name}_{fmt}_frac"] = v[2 + i * len(WITHIN) + j] / n
    return record


def first_overflow(records: list[dict], fmt: str = "fp16") -> str | None:
    """The first module (in forward order) whose output exceeds `fmt`'s max; None if none does."""
    return next((r["layer"] for r in records if r[f"over_{fmt}_frac"] > 0), None)
