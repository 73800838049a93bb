"""Which static loss scale FP16 needs, read off FP32 gradient exponent histograms.

The paper (Sec. 3.2) picks a constant scale so that the gradients that matter move
above FP16's smallest subnormal (2^-24) while the largest stays below 65504. Given a
histogram of floor(log2|g|) per layer, scaling by 2^s shifts every bin by s, so for
power-of-two scales (what every scaler uses) the share flushed at a scale is exact.
Overflow is judged by a layer's top bin: values in bin e lie below 2^(e+1), so a scale
is called safe when the top bin lands at 2^14 at most (conservative by at most 2x:
it never calls an overflowing scale safe).
"""

from __future__ import annotations

from dataclasses import dataclass

FLUSH_EXPONENT = -24  # FP16 flushes |x| < 2^-24 to zero
SAFE_TOP_EXPONENT = 14  # bin 2^14 holds values < 2^15 < 65504: certainly representable
SCALE_EXPONENTS = range(-24, 40)  # candidate scales 2^s; the histogram's bottom bin is exact up to 2^39


@dataclass(frozen=True)
class RangeAdvice:
    nonzero: float
    flushed: float  # share of non-zero values FP16 flushes to zero at scale 1
    subnormal: float  # share in [2^-24, 2^-14) at scale 1: kept, with fewer significant bits
    min_scale: float | None  # smallest 2^s keeping `coverage` of non-zero values >= 2^-24 with no overflow
    max_scale: float | None  # largest 2^s with no overflow (an upper bound when the open top bin is used)


def advise(exponents: list[int], histogram: list[float], coverage: float) -> RangeAdvice:
    """FP16's verdict on one layer's gradients; the end bins of `exponents` hold everything beyond them."""
    nonzero = float(sum(histogram))
    if not nonzero:
        return RangeAdvice(0.0, 0.0, 0.0, None, None)
    max_s = SAFE_TOP_EXPONENT - max(e for e, c in zip(exponents, histogram) if c)

    def flushed_at(s: int) -> float:
        return sum(c for e, c in zip(exponents, histogram) if e + s < FLUSH_EXPONENT) / nonzero

    subnormal = sum(c for e, c in zip(exponents, histogram) if FLUSH_EXPONENT <= e < -14) / nonzero
    min_s = next((s for s in SCALE_EXPONENTS if flushed_at(s) <= 1 - coverage), None)
    if min_s is not None and min_s > max_s:
        min_s = None  # the layer's range is wider than FP16's at this coverage
    return RangeAdvice(
        nonzero=nonzero,
        flushed=flushed_at(0),
        subnormal=subnormal,
        min_scale=None if min_s is None else 2.0**min_s,
        max_scale=2.0**max_s,
    )


@dataclass(frozen=True)
class Recommendation:
    scale: float | None  # the static scale to use (None: no static scale fits; use dynamic scaling)
    needed: float  # the largest per-layer min_scale: below it some layer loses more than 1 - coverage
    ceiling: float | None  # the smallest per-layer max_scale: above it some gradient overflows
    reason: str


def recommend(advice: dict[str, RangeAdvice], headroom: float) -> Recommendation:
    """One scale for the whole model: as large as the overflow ceiling allows, `headroom` below it
    (gradients grow as training goes on), but never below what the most demanding layer needs."""
    measured = {k: a for k, a in advice.items() if a.nonzero}
    ceilings = [a.max_scale for a in measured.values() if a.max_scale is not None]
    ceiling = min(ceilings) if ceilings else None
    unfit = sorted(k for k, a in measured.items() if a.min_scale is None)
    needed = max((a.min_scale for a in measured.values() if a.min_scale is not None), default=1.0)
    if ceiling is not None and ceiling < 1.0:
        return Recommendation(None, needed, ceiling, "gradients overflow FP16 even unscaled; use dynamic scaling")
    if unfit:  # one answer: a static scale that some layer cannot live with is no recommendation
        return Recommendation(None, needed, ceiling, f"{len(unfit)} layer(s) cannot keep the coverage above 2^-24 "
                              f"at any static scale without overflowing: {listed(unfit)}; use dynamic scaling "
                              "(their range is wider than FP16's: dynamic scaling follows it as it moves)")
    if ceiling is not None and needed > ceiling:
        return Recommendation(None, needed, ceiling, f"no single scale covers every layer (needs {needed:g}, "
                              f"overflows above {ceiling:g}); use dynamic scaling")  # fmt: skip
    scale = needed if ceiling is None else max(needed, ceiling / headroom)
    reason = f"{headroom:g}x below the overflow ceiling {ceiling:g}" if ceiling is not None and scale > needed else \
        "the smallest scale every layer needs"  # fmt: skip
    return Recommendation(scale, needed, ceiling, reason)


SHOWN = 8


def listed(names: list[str]) -> str:
    """Every name up to SHOWN; past that the first SHOWN and where the rest are."""
    if len(names) <= SHOWN:
        return ", ".join(names)
    return ", ".join(names[:SHOWN]) + f" and {len(names) - SHOWN} more (--json lists every layer's min_scale: null)"
