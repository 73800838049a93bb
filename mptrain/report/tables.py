"""The comparison table: per section (model, dataset and any other overrides), one row per arm
(precision mode + its overrides), seeds pooled.

The metric, speed and memory columns pool the runs that completed; a run that failed or
diverged is counted in `status` and never dropped silently. The fp32 row is the control
that every Δ and ratio is taken against.
"""

from __future__ import annotations

import math

import pandas as pd

from mptrain.families import metric as metric_record
from mptrain.report.paired_verdict import VERDICT_COLUMNS, holm_verdicts, margin_for, paired_verdict
from mptrain.report.runs import CONTROL

COLUMNS = ["arm", "control", "runs", "steps", "status", "metric_mean", "metric_std", "delta_vs_fp32", *VERDICT_COLUMNS,
           "verdict_note", "rule_verdict", "exploratory",
           "samples_per_s", "speed_spread", "speedup_vs_fp32", "peak_memory_mb", "memory_ratio_vs_fp32",
           "bytes_per_param", "skipped_steps", "final_loss_scale", "lost_update_frac",
           "nearest_drop_frac", "drop_kept_frac"]  # fmt: skip


SECTION = ["model", "dataset", "setting"]


def comparison(runs: pd.DataFrame, margins: dict[str, float] | None = None,
               control: str | None = None) -> dict[tuple[str, str, str], pd.DataFrame]:
    """Per section, one row per arm; `margins` as `verdict.parse_margins` gives them (None: the defaults); `control`:
    the arm (label or preset) every other is paired with (None: the plan's, else fp32)."""
    tables, chosen = {}, control  # `control` is reused below for the control's row
    families: dict[object, list] = {}  # Holm's family: a plan's judged arms over all its sections, else a section's
    for key, group in runs.groupby(SECTION, sort=True):
        metric = group["metric_name"].dropna().iloc[0] if group["metric_name"].notna().any() else "?"
        higher = bool(group["higher_is_better"].iloc[0])
        plan = section_plan(group)
        # the plan's margin judges the plan's metric at the plan's settings; any other metric, margin, arm or
        # setting is exploratory
        off_plan = off_plan_settings(key[2], plan) if plan is not None else []
        planned = plan is not None and plan.get("metric") == metric and not margins and not off_plan
        arms = dict(list(group.groupby("arm", sort=False)))
        control_arm = _control_arm({"control": chosen} if chosen else plan, arms)
        table = pd.DataFrame([_arm_row(arm, g, control_arm) for arm, g in arms.items()], columns=COLUMNS)
        control = table[table["control"]]
        if len(control):
            ref = control.iloc[0]
            table["delta_vs_fp32"] = table["metric_mean"] - ref["metric_mean"]
            table["speedup_vs_fp32"] = table["samples_per_s"] / ref["samples_per_s"]
            table["memory_ratio_vs_fp32"] = table["peak_memory_mb"] / ref["peak_memory_mb"]
            margin = margin_for(metric, ref["metric_mean"], plan_margins(plan, metric) if planned else margins or {})
            judged = families.setdefault(_family(plan, key), [])
            for i, row in table.iterrows():
                if row["control"]:
                    table.loc[i, "verdict"] = "control"
                    continue
                preset = arms[row["arm"]]["preset"].iloc[0] if "preset" in group else row["arm"]
                table.loc[i, "exploratory"] = plan is not None and not (
                    planned and (not plan.get("arms") or preset in plan["arms"]))
                verdict = paired_verdict(arms[row["arm"]], arms[control_arm], higher, margin)
                note = verdict.get("note", "")
                extra = _extra_seeds(plan, verdict, arms[row["arm"]], arms[control_arm]) if planned else ""
                if extra:
                    table.loc[i, "exploratory"] = True  # seeds added after the plan's runs: optional stopping
                    note = "; ".join(filter(None, [note, extra]))
                if not table.loc[i, "exploratory"]:
                    judged.append((key, i, verdict))
                if planned and plan.get("margin") is not None:
                    table.loc[i, "rule_verdict"] = _rule_verdict(metric, plan["margin"], ref["metric_mean"],
                                                                 arms[row["arm"]], arms[control_arm], higher)
                table.loc[i, "verdict_note"] = note
                for column, value in verdict.items():
                    if column != "note":
                        table.loc[i, column] = value
        table.attrs["metric"], table.attrs["higher_is_better"] = metric, higher
        table.attrs["plan"], table.attrs["control"], table.attrs["off_plan"] = plan, control_arm, off_plan
        tables[key] = table
    for judged in families.values():
        holm_verdicts([v for _, _, v in judged])
        for key, i, v in judged:
            tables[key].loc[i, "holm_p"], tables[key].loc[i, "holm_verdict"] = v["holm_p"], v["holm_verdict"]
    return tables


def _family(plan: dict | None, key: tuple) -> object:
    """Which comparisons Holm's adjustment holds the family-wise error over: every judged arm of one registered
    plan, whatever section (a swept learning rate) it sits in; without a plan, the arms of one section."""
    if plan is None:
        return key
    return (plan.get("claim"), plan.get("registered"), plan.get("metric"))


def plan_margins(plan: dict, metric: str) -> dict[str, float]:
    """The margin a plan judges by, as `margin_for` takes it: its own, else the margin rule's ({} where neither)."""
    given = plan.get("margin")
    if given is None:
        given = metric_record(metric).rule
    return {} if given is None else {metric: given}


def _extra_seeds(plan: dict, verdict: dict, arm: pd.DataFrame, control: pd.DataFrame) -> str:
    """Why a planned verdict rests on seeds the plan did not register ('' if it does not): more seed pairs than its
    count, or seeds outside the ones it names."""
    registered = plan.get("seeds")
    if isinstance(registered, int):
        pairs = verdict.get("pairs", 0)
        return f"{pairs} seed pairs, more than the plan's {registered}" if pairs > registered else ""
    if isinstance(registered, (list, tuple)):
        seen = (set(arm["seed"]) | set(control["seed"])) - set(registered)
        return f"seed{'s' if len(seen) > 1 else ''} {', '.join(map(str, sorted(seen)))} not among the plan's" if seen else ""
    return ""


def _rule_verdict(metric: str, plan_margin: float, control_mean: float, arm: pd.DataFrame, control: pd.DataFrame,
                  higher: bool) -> str:
    """The verdict at the margin rule's δ (families.Metric.rule), where the plan registered another margin; '' where
    the rule gives the plan's margin or has none for this metric."""
    record = metric_record(metric)
    if record.rule is None or math.isclose(record.rule, plan_margin):
        return ""
    return paired_verdict(arm, control, higher, record.margin_value(record.rule, control_mean))["verdict"]


def _control_arm(plan: dict | None, arms: dict[str, pd.DataFrame]) -> str:
    """The arm every other is paired against: the plan's `control` (a preset or an arm's label, e.g. bf16 for a
    block-format study), else fp32."""
    wanted = (plan or {}).get("control") or CONTROL
    if wanted in arms:
        return wanted
    for label, runs in arms.items():
        if "preset" in runs and (runs["preset"] == wanted).any():
            return label
    return CONTROL


def section_plan(group: pd.DataFrame) -> dict | None:
    """The pre-registered plan the runs of a section carry (a repro_* preset's), if any."""
    plans = [p for p in group.get("plan", []) if isinstance(p, dict)]
    return plans[0] if plans else None


def setting_overrides(setting: str) -> list[str]:
    """A section's overrides besides its preset (`experiment=`) and how the CPU ran FP16/BF16 (the machine's, not
    the experiment's): `optim.lr=0.01`."""
    return [o for o in setting.split() if not o.startswith(("experiment=", "precision.cpu_"))]


def off_plan_settings(setting: str, plan: dict) -> list[str]:
    """The overrides of a section that its plan did not register (a plan lists the keys its sweep varies under
    `settings`, e.g. [optim.lr])."""
    allowed = set(plan.get("settings") or [])
    return [o for o in setting_overrides(setting) if o.split("=", 1)[0] not in allowed]


def plan_markdown(plan: dict, metric: str, off_plan: list[str] | None = None) -> str:
    """The plan, as registered, above the verdicts it judges."""
    record = metric_record(metric)
    unit = record.margin_unit
    arms = ", ".join(plan.get("arms") or []) or "every arm"
    if plan.get("margin") is None:
        margin = f"±{record.rule} {unit} (the margin rule: {record.rule_source})" if record.rule is not None else \
            f"±{record.margin} {unit} (the metric's default: the margin rule has none for it)"
    else:
        margin = f"±{plan['margin']} {unit}"
        if record.rule is not None and not math.isclose(record.rule, plan["margin"]):
            margin += f" (the margin rule's ±{record.rule}, {record.rule_source}, judges beside it)"
    seeds = plan.get("seeds")
    seeds = f"seeds {', '.join(map(str, seeds))}" if isinstance(seeds, (list, tuple)) else f"{seeds} seed pairs"
    amended = f", amended {plan['amended']} before its runs" if plan.get("amended") else ""
    lines = [f"**Plan** (registered {plan.get('registered') or 'before the runs'}{amended}): {plan.get('claim')}",
             f"- judged on: held-out {plan.get('metric')}, equivalence margin {margin}, "
             f"two one-sided tests at α = 0.05 (90 % interval inside ±δ), paired by seed against "
             f"{plan.get('control', 'fp32')}",
             f"- arms: {arms}; {seeds}; "
             f"{plan.get('steps') or 'the preset’s'} steps per run",
             f"- refuted if (as registered; a claim that fails it reads \"not reproduced at this scale\"): "
             f"{plan.get('refuted_if')}"]
    if plan.get("metric") != metric:
        lines.append(f"- these verdicts are on {metric}, not the plan's {plan.get('metric')}: **exploratory**")
    if off_plan:
        lines.append(f"- these runs changed what the plan registered ({' '.join(off_plan)}): **exploratory**")
    return "\n".join(lines)


def _arm_row(arm: str, runs: pd.DataFrame, control: str = CONTROL) -> dict:
    done = runs[runs["status"] == "completed"]
    counts = runs["status"].value_counts()
    scales = sorted({str(_short(s)) for s in done["final_loss_scale"].dropna()})
    return {
        "arm": arm,
        "control": arm == control,
        "runs": len(runs),
        "steps": done["steps"].median() if "steps" in done and len(done) else math.nan,
        "status": ", ".join(f"{n} {status}" for status, n in counts.items()),
        "metric_mean": done["metric"].mean(),
        "metric_std": done["metric"].std(ddof=1) if len(done) > 1 else math.nan,
        "delta_vs_fp32": math.nan,
        **dict.fromkeys(VERDICT_COLUMNS, math.nan),
        "differs": "", "signflip_verdict": "", "holm_verdict": "",
        "verdict": "no control" if arm != control else "control",
        "verdict_note": "",
        "rule_verdict": "",
        "exploratory": False,
        # each run's figure is the median of its logging windows; across runs the median again: a stalled run
        # cannot carry the arm, and the spread says when runs disagree (max / min - 1)
        "samples_per_s": done["samples_per_s"].median(),
        "speed_spread": done["samples_per_s"].max() / done["samples_per_s"].min() - 1 if len(done) > 1 else math.nan,
        "speedup_vs_fp32": math.nan,
        "peak_memory_mb": done["peak_memory_mb"].mean(),
        "memory_ratio_vs_fp32": math.nan,
        "bytes_per_param": done["bytes_per_param"].mean(),
        "skipped_steps": runs["skipped_steps"].mean(),
        "final_loss_scale": ", ".join(scales) or "-",
        "lost_update_frac": runs["lost_update_frac"].mean(),  # every run: a diverged fp16_naive run lost them too
        "nearest_drop_frac": runs["nearest_drop_frac"].mean(),
        "drop_kept_frac": runs["drop_kept_frac"].mean(),
    }


def _short(scale) -> str:
    return f"{scale:g}" if isinstance(scale, float) else str(scale)


def to_markdown(table: pd.DataFrame) -> str:
    """A GitHub table; the control row is marked, missing values are '-'."""
    metric = table.attrs.get("metric", "metric")
    better = "higher" if table.attrs.get("higher_is_better", True) else "lower"
    head = ["mode", "runs", "status", f"{metric} (mean ± std, {better} is better)", "paired Δ vs fp32 (95 % CI)",
            "verdict (±δ)", "samples/s", "speed-up", "peak memory (MiB)", "memory ratio", "bytes / param", "skipped steps",
            "final loss scale", "lost updates"]  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for _, r in table.iterrows():
        cells = [
            f"**{r['arm']}** (control)" if r["control"] else r["arm"],
            str(r["runs"]),
            r["status"],
            _pm(r["metric_mean"], r["metric_std"], metric),
            delta_with_ci(r, metric),
            verdict_cell(r, metric),
            speed_cell(r),
            _num(r["speedup_vs_fp32"], "{:.2f}×"),
            _num(r["peak_memory_mb"], "{:.1f}"),
            _num(r["memory_ratio_vs_fp32"], "{:.2f}×"),
            _num(r["bytes_per_param"], "{:.1f}"),
            _num(r["skipped_steps"], "{:.1f}"),
            r["final_loss_scale"],
            lost_cell(r),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def headroom_markdown(per_arm: dict[str, dict[str, float]], rows: int = 12) -> str:
    """The modules with the least FP16 headroom (over every arm), in forward order: each arm's largest |output|
    and its headroom below 65504 in bits (log2(65504 / amax); negative: overflows)."""
    if not per_arm:
        return ""
    layers = list(dict.fromkeys(layer for amax in per_arm.values() for layer in amax))
    worst = sorted(layers, key=lambda layer: -max(a.get(layer, 0.0) for a in per_arm.values()))[:rows]
    head = ["module", *(f"{arm}: max \\|output\\| (headroom)" for arm in per_arm)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for layer in (layer for layer in layers if layer in worst):
        cells = [f"`{layer}`"]
        for amax in per_arm.values():
            value = amax.get(layer)
            if not value:
                cells.append("-")
            elif not math.isfinite(value):  # a diverged run's inf / NaN output
                cells.append(f"{value} (non-finite)")
            else:
                cells.append(f"{value:.4g} ({math.log2(65504 / value):+.1f} bit)")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


SPEED_NOISE = 0.25  # runs of one arm whose samples/s differ more than this disagree beyond a CPU's noise


def speed_cell(r) -> str:
    """Median samples/s over the arm's runs; runs that disagree beyond noise say so and point to the benchmark."""
    cell = _num(r["samples_per_s"], "{:.1f}")
    if not _missing(r.get("speed_spread")) and r["speed_spread"] > SPEED_NOISE:
        cell += f" ⚠ runs differ by {r['speed_spread']:.0%}: measure speed with mptrain-bench"
    return cell


def lost_cell(r) -> str:
    """FP32 weights: the share FP16 would lose. Weights in FP16/bf16: the share that did not move, and of the
    update mass nearest rounding drops, how much was kept (0 % bf16_pure, ~100 % stochastic rounding, Kahan)."""
    cell = _num(100 * r["lost_update_frac"], "{:.2f} %")
    if not _missing(r["nearest_drop_frac"]):
        cell += f" (nearest drops {100 * r['nearest_drop_frac']:.2f} %"
        cell += f"; {100 * r['drop_kept_frac']:.0f} % of it kept)" if not _missing(r["drop_kept_frac"]) else ")"
    return cell


def unit_of(metric: str) -> tuple[float, str]:
    """The scale and unit the tables print a metric in (its family's record: accuracy in points, as the paper and
    README give it; other metrics in their own unit)."""
    record = metric_record(metric)
    return record.scale, record.unit


def delta_with_ci(r, metric: str = "") -> str:
    """`-0.07 pts [-0.59, +0.44] (n=5)`: the paired mean Δ and its 95 % interval over n seeds."""
    if r["control"] or _missing(r["paired_delta"]):
        return "-"
    k, unit = unit_of(metric)
    d = metric_record(metric).digits
    ci = "" if _missing(r["ci_low"]) else f" [{k * r['ci_low']:+.{d}f}, {k * r['ci_high']:+.{d}f}]"
    return f"{k * r['paired_delta']:+.{d}f}{unit}{ci} (n={int(r['pairs'])})"


def verdict_cell(r, metric: str = "") -> str:
    """`**equivalent** (±0.5 pts), differs: worse`; an inconclusive arm says how many seeds its spread needs."""
    if r["control"]:
        return "control"
    k, unit = unit_of(metric)
    margin = "" if _missing(r["margin"]) else f" (±{k * r['margin']:.4g}{unit})"
    verdict = f"**{r['verdict']}**{margin}" if r["verdict"] in ("worse", "better", "equivalent") else r["verdict"] + margin
    if r.get("differs") and r["verdict"] == "equivalent":
        verdict += f", differs: {r['differs']}"
    if r["verdict"] == "no control":
        return ("no control: no fp32 run with these seeds among the runs; add one (mptrain -m precision=fp32,<mode> "
                "seed=0,1,2) or name another arm with --control")
    needed = r.get("seeds_needed")
    if r["verdict"] == "inconclusive" and not _missing(needed):
        verdict += (f"; needs ≈{int(needed)} seed pairs at this spread" if math.isfinite(needed)
                    else f"; more than {1000} seed pairs at this spread")
    elif r["verdict"] == "inconclusive" and not _missing(r.get("pairs")) and r["pairs"] < 2:
        verdict += (f"; {int(r['pairs'])} seed pair{'' if r['pairs'] == 1 else 's'} show no spread: at least 2 are "
                    "needed for any verdict, 3 or more to judge (seed=0,1,2)")
    if r.get("rule_verdict"):
        verdict += f" (by the margin rule: {r['rule_verdict']})"
    if r.get("exploratory") is True:
        verdict = "exploratory: " + verdict
    return verdict + (f": {r['verdict_note']}" if r.get("verdict_note") else "")


def metric_value(value, metric: str = "") -> str:
    """One run's metric in the unit the tables use (accuracy in points), as the comparison table prints a mean."""
    return _pm(value, math.nan, metric)


SHORT_RUN_STEPS = 500  # fewer steps than this: a verdict speaks for the start of training only


def short_run_caution(table: pd.DataFrame, title: str, markdown: bool = True) -> str:
    """A verdict on short runs says what it can: these first steps agree; empty for runs of SHORT_RUN_STEPS or more."""
    steps = table["steps"].dropna() if "steps" in table else pd.Series(dtype=float)
    if not len(steps) or steps.max() >= SHORT_RUN_STEPS:
        return ""
    n = int(steps.max())
    bold = "**" if markdown else ""
    return (f"{bold}Short runs{bold} ({title}): {n} training steps a run. A verdict here says the first {n} steps agree with "
            "the control, not that a full training run will: lost updates accumulate, loss-scale trouble and "
            "divergence show later (the paper's unscaled bigLSTM diverged after ~300k iterations). Train longer "
            "(trainer.max_steps, mptrain-study --steps) before relying on it.")


def _missing(value) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _num(value, fmt: str) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else fmt.format(value)


def _pm(mean, std, metric: str = "") -> str:
    if isinstance(mean, float) and math.isnan(mean):
        return "-"
    k, unit = unit_of(metric)
    digits = metric_record(metric).digits
    return f"{k * mean:.{digits}f}" + ("" if isinstance(std, float) and math.isnan(std) else
                                       f" ± {k * std:.{digits}f}") + unit
