"""A statistical verdict per arm: the paired difference to the fp32 control, judged by two one-sided tests.

Runs of different arms with the same seed start from the same initialisation and see the same data in the
same order, so they are compared pair by pair: Δ_i = metric(arm, seed i) − metric(fp32, seed i), and Student-t
intervals of the mean Δ over the seeds both completed (scipy's `ttest_1samp` on the Δs: a paired t-test).
Against an equivalence margin ±δ (a reproduction's plan, or `mptrain-report --margin`):
- `equivalent`: the two one-sided tests (TOST) at α = 0.05 both reject, i.e. the 90 % interval lies inside ±δ;
- `worse` / `better`: not equivalent, and the 95 % interval excludes 0 on the metric's bad / good side; or, for
  `worse`, the arm diverged in some seed where the control did not;
- `inconclusive`: anything else (fewer than 2 pairs, or an interval too wide for either); it carries how many
  seed pairs its observed mean and spread would need to reach a verdict (`seeds_needed`).
An arm whose 95 % interval excludes 0 carries `differs` (better or worse) even when it is equivalent: a real,
measurable difference smaller than the margin.

Worked example (accuracy, δ = 0.5 points, 5 seeds): Δ = −0.20, −0.10, −0.30, −0.15, −0.25 points; mean −0.20,
sd 0.079; 90 % interval −0.20 ± 2.132·0.079/√5 = [−0.275, −0.125], inside ±0.5: equivalent; 95 % interval
−0.20 ± 2.776·0.079/√5 = [−0.298, −0.102] excludes 0: differs (worse). The arm is equivalent at this margin,
and measurably (0.1-0.3 points) below fp32.

δ defaults per metric: 0.5 points for accuracy (a metric in [0, 1]), 1 % of the control's mean for perplexity,
bits per character, FID and losses.

Beside the t-test, which leans on the Δs being normal (with n = 3 that assumption carries everything), a
distribution-free check: the exact sign-flip permutation test (scipy's `permutation_test` over all 2^n sign
patterns of the Δs: under "no difference" each Δ is as likely negative as positive), for Δ = 0 (two-sided) and
for equivalence (two one-sided sign-flip tests of Δ + δ > 0 and Δ − δ < 0). It cannot reject below its smallest
attainable p (2 / 2^n two-sided, 1 / 2^n one-sided: n = 3 gives 0.25 and 0.125), which the report says plainly.
Across the arms of one experiment the verdicts' p-values (TOST's for an equivalent arm, the two-sided t-test's
otherwise) are adjusted by Holm's step-down method, which holds the family-wise error at α over the arms.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
from scipy import stats

CONFIDENCE = 0.95  # the interval shown, and the `differs` flag
TOST_CONFIDENCE = 0.90  # two one-sided tests at α = 0.05: the 90 % two-sided interval inside ±δ
ALPHA = 0.05
MAX_SEEDS = 1000
VERDICT_COLUMNS = ["pairs", "paired_delta", "ci_low", "ci_high", "tost_low", "tost_high", "margin", "verdict",
                   "differs", "seeds_needed", "t_p", "tost_p", "signflip_p", "signflip_tost_p", "signflip_verdict",
                   "holm_p", "holm_verdict"]


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
    """δ in the metric's units from a margin in its margin unit (mptrain/families.py): accuracy points given as
    points (0.5 → 0.005), others as % of the control; the metric's default when none is given."""
    from mptrain.families import metric as metric_record

    record = metric_record(metric)
    if not record.absolute and not math.isfinite(control_mean):
        return math.nan
    return record.margin_value(margins.get(metric, margins.get("*")), control_mean)


def paired_verdict(arm: pd.DataFrame, control: pd.DataFrame, higher_is_better: bool, margin: float) -> dict:
    """`arm` and `control`: one row per run (seed, status, metric) of one section."""
    done = lambda runs: runs[(runs["status"] == "completed") & runs["metric"].notna()].drop_duplicates("seed")  # noqa: E731
    pairs = done(arm).merge(done(control), on="seed", suffixes=("", "_control"))
    diverged = set(arm.loc[arm["status"] == "diverged", "seed"]) - set(control.loc[control["status"] == "diverged", "seed"])
    result = {"pairs": len(pairs), "paired_delta": math.nan, "ci_low": math.nan, "ci_high": math.nan,
              "tost_low": math.nan, "tost_high": math.nan, "margin": margin, "verdict": "inconclusive",
              "differs": "", "seeds_needed": math.nan, "t_p": math.nan, "tost_p": math.nan, "signflip_p": math.nan,
              "signflip_tost_p": math.nan, "signflip_verdict": "", "holm_p": math.nan, "holm_verdict": ""}  # fmt: skip
    deltas = (pairs["metric"] - pairs["metric_control"]).to_numpy()
    if len(pairs):
        result["paired_delta"] = float(deltas.mean())
    if len(pairs) >= 2:
        low, high = _interval(deltas, CONFIDENCE)
        tost_low, tost_high = _interval(deltas, TOST_CONFIDENCE)
        verdict = _classify(low, high, tost_low, tost_high, margin, higher_is_better)
        result.update(ci_low=low, ci_high=high, tost_low=tost_low, tost_high=tost_high, verdict=verdict,
                      t_p=t_test_p(deltas), tost_p=tost_p(deltas, margin))
        flip, flip_tost = sign_flip_p(deltas), sign_flip_tost_p(deltas, margin)
        result.update(signflip_p=flip, signflip_tost_p=flip_tost,
                      signflip_verdict=_classify_p(flip, flip_tost, float(deltas.mean()), higher_is_better))
        if low > 0 or high < 0:
            result["differs"] = "better" if (low > 0) == higher_is_better else "worse"
    if result["verdict"] == "inconclusive" and not diverged:
        result["seeds_needed"] = seeds_needed(deltas, margin)
    if diverged:
        result["verdict"] = "worse"
        result["note"] = f"diverged in {len(diverged)} seed(s) where fp32 did not"
    return result


def t_test_p(deltas) -> float:
    """Two-sided p of the paired t-test of mean Δ = 0 (Δs all alike: 0 if they are not 0, else 1)."""
    if (deltas == deltas[0]).all():
        return 0.0 if deltas[0] != 0 else 1.0
    return float(stats.ttest_1samp(deltas, 0.0).pvalue)


def tost_p(deltas, margin: float) -> float:
    """TOST's p: the larger of the one-sided t-tests of mean Δ > −δ and mean Δ < +δ."""
    if not math.isfinite(margin):
        return math.nan
    if (deltas == deltas[0]).all():
        return 0.0 if abs(deltas[0]) < margin else 1.0
    return float(max(stats.ttest_1samp(deltas, -margin, alternative="greater").pvalue,
                     stats.ttest_1samp(deltas, margin, alternative="less").pvalue))


def sign_flip_p(deltas, shift: float = 0.0, alternative: str = "two-sided") -> float:
    """The exact sign-flip permutation test of mean(Δ − shift) = 0, over all 2^n sign patterns (scipy)."""
    x = np.asarray(deltas, dtype=float) - shift
    if not np.any(x):
        return 1.0
    result = stats.permutation_test((x,), lambda v, axis: np.mean(v, axis=axis), vectorized=True,
                                    permutation_type="samples", alternative=alternative, n_resamples=np.inf)
    return float(result.pvalue)


def sign_flip_tost_p(deltas, margin: float) -> float:
    """Equivalence by two one-sided sign-flip tests: mean Δ > −δ and mean Δ < +δ; the larger p."""
    if not math.isfinite(margin):
        return math.nan
    return max(sign_flip_p(deltas, -margin, "greater"), sign_flip_p(deltas, margin, "less"))


def smallest_p(n: int, two_sided: bool = True) -> float:
    """The smallest p the sign-flip test can give with n pairs (every Δ on one side)."""
    return (2.0 if two_sided else 1.0) / 2**n


def _classify_p(p_difference: float, p_equivalence: float, mean: float, higher_is_better: bool) -> str:
    """A verdict from p-values at α: equivalent, else better / worse, else inconclusive."""
    if p_equivalence < ALPHA:
        return "equivalent"
    if p_difference < ALPHA:
        return "better" if (mean > 0) == higher_is_better else "worse"
    return "inconclusive"


def holm(p_values: list[float]) -> list[float]:
    """Holm's step-down adjustment: the i-th smallest of m p-values times (m − i + 1), made monotone, capped at 1;
    NaN stays NaN and is not counted."""
    indexed = sorted((p, i) for i, p in enumerate(p_values) if not math.isnan(p))
    adjusted, running, m = [math.nan] * len(p_values), 0.0, len(indexed)
    for rank, (p, i) in enumerate(indexed):
        running = max(running, min(1.0, (m - rank) * p))
        adjusted[i] = running
    return adjusted


def holm_verdicts(verdicts: list[dict]) -> None:
    """Across one experiment's arms: each verdict's p (TOST's for equivalent, the t-test's for better / worse, the
    smaller of the two for inconclusive) Holm-adjusted, and the verdict that survives the adjustment (an arm worse
    by divergence keeps its verdict: no test is involved). In place."""
    def verdict_p(v: dict) -> float:
        if v.get("note"):
            return 0.0
        if v["verdict"] == "equivalent":
            return v["tost_p"]
        if v["verdict"] in ("better", "worse"):
            return v["t_p"]
        return min(v["t_p"], v["tost_p"]) if not math.isnan(v["tost_p"]) else v["t_p"]

    adjusted = holm([verdict_p(v) for v in verdicts])
    for v, p in zip(verdicts, adjusted):
        v["holm_p"] = p
        if math.isnan(p):
            continue
        if v["verdict"] in ("equivalent", "better", "worse"):
            v["holm_verdict"] = v["verdict"] if p < ALPHA else "inconclusive"
        else:
            v["holm_verdict"] = "inconclusive"


def _interval(deltas, confidence: float) -> tuple[float, float]:
    """The Student-t interval of the mean paired Δ (scipy's ttest_rel against zero differences)."""
    if (deltas == deltas[0]).all():  # every pair differs alike: a zero-width interval (scipy: NaN or a warning)
        return float(deltas[0]), float(deltas[0])
    ci = stats.ttest_1samp(deltas, 0.0).confidence_interval(confidence)
    return float(ci.low), float(ci.high)


def _classify(low: float, high: float, tost_low: float, tost_high: float, margin: float,
              higher_is_better: bool) -> str:
    if math.isfinite(margin) and -margin < tost_low and tost_high < margin:
        return "equivalent"
    if low > 0 or high < 0:
        return "better" if (low > 0) == higher_is_better else "worse"
    return "inconclusive"


def seeds_needed(deltas, margin: float) -> float:
    """Seed pairs an inconclusive arm would need, were its observed mean Δ and spread the truth: enough for the
    90 % interval to fit inside ±δ (|mean| < δ), or for the 95 % interval to exclude 0 (|mean| >= δ). NaN: no
    spread to go on (fewer than 2 pairs); inf: more than MAX_SEEDS."""
    if len(deltas) < 2 or not math.isfinite(margin):
        return math.nan
    mean, sd = abs(float(deltas.mean())), float(deltas.std(ddof=1))
    room, confidence = (margin - mean, TOST_CONFIDENCE) if mean < margin else (mean, CONFIDENCE)
    for n in range(2, MAX_SEEDS + 1):
        if stats.t.ppf(0.5 + confidence / 2, n - 1) * sd / math.sqrt(n) < room:
            return float(n)
    return math.inf
