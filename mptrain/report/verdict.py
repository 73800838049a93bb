"""A statistical verdict per arm: the paired difference to the fp32 control, with a 95 % confidence interval.

Runs of different arms with the same seed start from the same initialisation and see the same data in the
same order, so they are compared pair by pair: Δ_i = metric(arm, seed i) − metric(fp32, seed i), and the
Student-t interval of the mean Δ over the seeds both completed (scipy's `ttest_rel`). Against an equivalence
margin ±δ (`mptrain-report --margin`):
- `equivalent`: the whole interval lies inside ±δ (a real but negligible difference is still equivalent);
- `worse` / `better`: the interval excludes 0 on the metric's bad / good side (and is not inside ±δ), or, for
  `worse`, the arm diverged in some seed where the control did not;
- `inconclusive`: anything else: too few pairs (fewer than 2), or an interval wider than the margin around 0.

δ defaults per metric: 0.5 points for accuracy (a metric in [0, 1]), 1 % of the control's mean for perplexity,
bits per character, FID and losses.
"""

from __future__ import annotations

import math

import pandas as pd
from scipy import stats

CONFIDENCE = 0.95
ABSOLUTE_MARGINS = {"accuracy": 0.005}  # in the metric's own units: 0.5 accuracy points
RELATIVE_MARGIN = 0.01  # every other metric: 1 % of the control's mean
VERDICT_COLUMNS = ["pairs", "paired_delta", "ci_low", "ci_high", "margin", "verdict"]


def parse_margins(specs: list[str] | None) -> dict[str, float]:
    """`--margin 0.3` (every metric, in its unit: points for accuracy, % of the control otherwise) or
    `--margin perplexity=2`; returns {metric or '*': value in the metric's unit or per cent}."""
    from mptrain.errors import UserError

    margins = {}
    for spec in specs or []:
        key, _, value = spec.rpartition("=")
        try:
            number = float(value)
        except ValueError:
            number = math.nan
        if not (math.isfinite(number) and number > 0):
            raise UserError(f"--margin {spec!r}: give a number > 0, optionally for one metric (e.g. --margin 0.5 or "
                            "--margin perplexity=2)")
        margins[key or "*"] = number
    return margins


def margin_for(metric: str, control_mean: float, margins: dict[str, float]) -> float:
    """δ in the metric's units: accuracy points given as points (0.5 → 0.005), others as % of the control."""
    given = margins.get(metric, margins.get("*"))
    if metric in ABSOLUTE_MARGINS:
        return ABSOLUTE_MARGINS[metric] if given is None else given / 100
    share = RELATIVE_MARGIN if given is None else given / 100
    return share * abs(control_mean) if math.isfinite(control_mean) else math.nan


def paired_verdict(arm: pd.DataFrame, control: pd.DataFrame, higher_is_better: bool, margin: float) -> dict:
    """`arm` and `control`: one row per run (seed, status, metric) of one section."""
    done = lambda runs: runs[(runs["status"] == "completed") & runs["metric"].notna()].drop_duplicates("seed")  # noqa: E731
    pairs = done(arm).merge(done(control), on="seed", suffixes=("", "_control"))
    diverged = set(arm.loc[arm["status"] == "diverged", "seed"]) - set(control.loc[control["status"] == "diverged", "seed"])
    result = {"pairs": len(pairs), "paired_delta": math.nan, "ci_low": math.nan, "ci_high": math.nan,
              "margin": margin, "verdict": "inconclusive"}  # fmt: skip
    if len(pairs):
        result["paired_delta"] = float((pairs["metric"] - pairs["metric_control"]).mean())
    if len(pairs) >= 2:
        low, high = _interval(pairs["metric"].to_numpy(), pairs["metric_control"].to_numpy())
        result.update(ci_low=low, ci_high=high, verdict=_classify(low, high, margin, higher_is_better))
    if diverged:
        result["verdict"] = "worse"
        result["note"] = f"diverged in {len(diverged)} seed(s) where fp32 did not"
    return result


def _interval(values, control) -> tuple[float, float]:
    deltas = values - control
    if (deltas == deltas[0]).all():  # every pair differs alike: a zero-width interval (scipy: NaN or a warning)
        return float(deltas[0]), float(deltas[0])
    ci = stats.ttest_rel(values, control).confidence_interval(CONFIDENCE)
    return float(ci.low), float(ci.high)


def _classify(low: float, high: float, margin: float, higher_is_better: bool) -> str:
    if math.isfinite(margin) and -margin < low and high < margin:
        return "equivalent"
    if low > 0 or high < 0:
        return "better" if (low > 0) == higher_is_better else "worse"
    return "inconclusive"
