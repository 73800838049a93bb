"""A verdict on a run's loss-scale history, per network: is "Gradient overflow, skipping step" normal here?

- `no overflow`: no step was skipped.
- `normal probing`: a dynamic scale came down from its initial value in a burst of skips at the start (the
  descent), then backs off now and then after growing: the scaler working as designed.
- `occasional overflow`: a static scale skipped a few isolated steps (it does not probe: each skip is a batch
  whose gradients overflowed at that scale).
- `trouble`: after the descent, skips cluster in time (3 within a tenth of the growth interval), are more
  than 5 % of the steps, the scale falls steadily (the last skip's scale 16x below the first's) or below 1,
  or one layer is behind most of them (at least 5 and half the skips): the model, not the scaler.
"""

from __future__ import annotations

from collections import Counter

DESCENT_GAP = 5  # skips at most this many steps apart from the start: the scale coming down to its level
CLUSTER = 3
RATE = 0.05
FALL = 16.0
FLOOR = 1.0


def scale_verdict(events: list[tuple[int, float | None, str | None]], total_steps: int, dynamic: bool,
                  growth_interval: int, final_scale: float | None) -> dict:
    """`events`: (step, scale in effect, layer named) of every skipped step, in order."""
    steps = [e[0] for e in events]
    result = {"verdict": "no overflow", "skips": len(steps), "skip_rate": len(steps) / total_steps if total_steps
              else 0.0, "descent_skips": 0, "scale_range": _range([e[1] for e in events] + [final_scale]),
              "layers": [], "reasons": [], "skip_steps": steps[:1000]}  # fmt: skip
    if not steps:
        return result
    descent = 0
    while dynamic and descent < len(steps) and steps[descent] - (steps[descent - 1] if descent else 0) <= DESCENT_GAP:
        descent += 1
    later = events[descent:]
    result["descent_skips"] = descent
    layers = Counter(layer for _, _, layer in later if layer)
    result["layers"] = [f"{layer} ({n})" for layer, n in layers.most_common(3)]
    window = max(10, growth_interval // 10)
    later_steps = [e[0] for e in later]
    reasons = []
    if any(later_steps[i + CLUSTER - 1] - later_steps[i] < window for i in range(len(later_steps) - CLUSTER + 1)):
        reasons.append(f"{CLUSTER} or more skips within {window} steps")
    if total_steps and len(later) / total_steps > RATE:
        reasons.append(f"{100 * len(later) / total_steps:.1f} % of the steps skipped")
    scales = [s for _, s, _ in later if s]
    if dynamic and len(scales) >= 2 and scales[-1] < scales[0] / FALL:
        reasons.append(f"the scale fell from {scales[0]:g} to {scales[-1]:g} over the run")
    if dynamic and final_scale is not None and final_scale < FLOOR:
        reasons.append(f"the scale ended at {final_scale:g}, below {FLOOR:g}")
    if layers and layers.most_common(1)[0][1] >= 5 and layers.most_common(1)[0][1] >= len(later) / 2:
        reasons.append(f"{layers.most_common(1)[0][0]} behind {layers.most_common(1)[0][1]} of {len(later)} skips")
    result["reasons"] = reasons
    if reasons:
        result["verdict"] = "trouble"
    elif dynamic:
        result["verdict"] = "normal probing"
    else:
        result["verdict"] = "occasional overflow"
    return result


def describe(verdict: dict) -> str:
    """`normal probing (3 skips: 2 in the descent, scale 2048-65536)`, for the end-of-run table."""
    if verdict["verdict"] == "no overflow":
        return "no overflow"
    low, high = verdict["scale_range"]
    scale = f", scale {low:g}-{high:g}" if low is not None else ""
    detail = f"{verdict['skips']} skips: {verdict['descent_skips']} in the descent{scale}"
    if verdict["reasons"]:
        detail += "; " + "; ".join(verdict["reasons"])
    return f"{verdict['verdict']} ({detail})"


def _range(values):
    known = [v for v in values if v is not None]
    return (min(known), max(known)) if known else (None, None)
