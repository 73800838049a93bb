"""A reproduction's plan, stated before its runs (`plan:` in a `conf/experiment/repro_*` preset).

A verdict is only as good as the promise made before the data: the claim, the held-out metric it is judged on,
the equivalence margin in that metric's own unit, the seeds and steps, and what result would refute the claim.
Every run of the preset records the plan in summary.json; `mptrain-report` prints it above the verdicts, judges
on its metric with its margin, and labels exploratory a verdict on any other metric, at settings it did not
register, or on more seeds than it registered.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, List, Optional

from mptrain.errors import UserError
from mptrain.families import METRICS as FAMILY_METRICS
from mptrain.schema.rules import POSITIVE, POSITIVE_INT, Rule, check_fields, is_int, knob

TEXT = Rule(lambda v: isinstance(v, str) and v.strip() != "", "a non-empty text")
SEEDS = Rule(lambda v: (is_int(v) and v > 0) or (isinstance(v, (list, tuple)) and len(v) > 0 and len(set(v)) == len(v)
                                                  and all(is_int(s) and s >= 0 for s in v)),
             "a positive count, or a list of distinct non-negative seeds ([5, 6, 7])")
METRICS = tuple(FAMILY_METRICS)  # held-out metrics a plan may name: each family's (mptrain/families.py)


@dataclass
class PlanConfig:
    claim: str = knob("???", "the paper's claim under test, in one sentence", TEXT)
    metric: str = knob("???", "the held-out primary metric the verdict is judged on (accuracy, perplexity, fid, ...)",
                       Rule(lambda v: v in METRICS, "one of " + ", ".join(METRICS)))
    margin: Optional[float] = knob(None, "equivalence margin ±δ in the metric's margin unit (accuracy, CER and BLEU in "
                                         "points, the others in % of the control's mean); null: the margin rule's "
                                         "(docs/runs-and-reports.md). Another margin is judged, and the rule's verdict "
                                         "shown beside it", POSITIVE, example=0.5)
    control: str = knob("fp32", "the arm every other arm is paired against, by seed", TEXT)
    arms: List[str] = knob([], "the arms (precision presets) the plan judges")
    seeds: Any = knob(3, "the seeds the verdict is read at, named ([5, 6, 7]: none run at these settings before the "
                         "plan; a run of any other seed is exploratory), or a count of completed seed pairs (older "
                         "plans; more: exploratory)", SEEDS)
    steps: Optional[int] = knob(None, "optimizer steps per run (null: the preset's epochs decide)", POSITIVE_INT)
    settings: List[str] = knob([], "override keys the plan's sweep varies besides mode and seed (e.g. optim.lr): "
                                   "each value is a section it judges; any other override makes a section exploratory")
    refuted_if: str = knob("???", "the result that would refute the claim", TEXT)
    registered: Optional[str] = knob(None, "when the plan was committed (a date), before its first run", TEXT)
    amended: Optional[str] = knob(None, "when the plan was changed (a date), still before its first run; the preset's "
                                        "comment says what and why", TEXT)


SCHEMAS = {"plan_schema": PlanConfig}


def check(cfg) -> None:
    plan = cfg.get("plan")
    if plan is None:
        return
    from omegaconf import OmegaConf

    merged = OmegaConf.merge(OmegaConf.structured(PlanConfig), plan)
    missing = [k for k in ("claim", "metric", "refuted_if") if OmegaConf.is_missing(merged, k)]
    if missing:
        raise UserError(f"plan.{missing[0]} is missing: a reproduction's plan states claim, metric and refuted_if "
                        "before its runs (conf/experiment/repro_*.yaml)")
    check_fields(merged, PlanConfig, "plan")
