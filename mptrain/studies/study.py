"""A precision study of one model in one call: will it train in FP16, BF16, FP8, and with which loss scale and
which layers kept in higher precision? `mptrain-study` and `mptrain.study` run the same three steps, each an
existing part of mptrain, not a new engine:

1. the FP32 numerics scan of `mptrain-numerics` (K steps): the static loss scale FP16 needs (or that none fits),
   the first module whose output overflows FP16, the Linear layers FP8's per-tensor scaling would starve;
2. one run per precision mode and seed, as `mptrain precision=<mode> seed=<s>` makes it (`mptrain.train`'s in-process run), in
   `<out>/runs/<mode>/seed=<s>`;
3. `mptrain-report` over those runs: the paired-seed verdicts against fp32, in `<out>/report/`.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from mptrain.errors import UserError

DEFAULT_MODES = ("fp32", "mixed", "bf16", "fp8")  # the control, FP16 with the paper's three, and the formats after
CURVE_POINTS = 20  # a study's runs log at least this many training points (trainer.log_every from --steps)
SHOWN = ["arm", "runs", "steps", "status", "metric_mean", "metric_std", "delta_vs_fp32", "verdict", "seeds_needed",
         "final_loss_scale", "skipped_steps", "speedup_vs_fp32", "memory_ratio_vs_fp32"]


@dataclass
class StudyResult:
    table: object  # pandas DataFrame: one row per mode, with the report's verdict columns
    numerics: dict  # the FP32 scan's answer: recommended scale, first FP16 overflow, FP8 layers to keep in bf16
    out: Path  # runs/, report/report.md, numerics.json

    def __str__(self) -> str:
        return describe(self)


def run_study(overrides: Sequence[str] = (), modes: Sequence[str] = DEFAULT_MODES, seeds: int = 3,
              steps: int | None = None, numerics_steps: int = 20, out: str | Path | None = None,
              announce=print, margin: Sequence[str] | None = None) -> StudyResult:
    """The study of the model the overrides pick (the command line's and the Python API's one path); `margin`:
    mptrain-report's --margin specs (None: its defaults)."""
    import logging

    import pandas as pd

    from mptrain.console import compose
    from mptrain.diagnose.cli import analyse, compose_scan, scan
    from mptrain.inprocess import run_overrides
    from mptrain.paths import group_options
    from mptrain.report.make import build
    from mptrain.report.paired_verdict import parse_margins
    from mptrain.report.runs import load_runs
    from mptrain.report.tables import comparison
    from mptrain.schema import validate

    overrides = [str(o) for o in overrides]
    if any(o.lstrip("+~").split("=")[0] in ("precision", "seed") for o in overrides):
        raise UserError("the study sets precision and seed itself: give modes (--modes) and seeds (--seeds) instead")
    unknown = [m for m in modes if m not in group_options("precision")]
    if unknown or "fp32" not in modes:
        raise UserError(f"study modes must include fp32 (the control) and be precision options; "
                        f"{'unknown: ' + ', '.join(unknown) if unknown else 'fp32 is missing'} "
                        f"(options: {', '.join(group_options('precision'))})")
    if seeds < 2:
        raise UserError(f"a study needs seeds >= 2 for a paired verdict (got {seeds})")
    margins = parse_margins(margin)  # a bad margin is said before anything runs
    out = Path(out or f"studies/{time.strftime('%Y-%m-%d_%H-%M-%S')}").expanduser().resolve()
    if out.exists() and any(out.iterdir()):
        raise UserError(f"{out} is not empty: give the study a new folder (nothing there is overwritten)")
    length = [f"trainer.max_steps={steps}"] if steps else []
    if steps and not any(o.lstrip("+~").startswith("trainer.log_every=") for o in overrides):
        length.append(f"trainer.log_every={max(1, min(50, steps // CURVE_POINTS))}")  # curves, not one dot
    for mode in modes:  # a bad override, or a mode the model refuses, is said here: before anything is written
        validate(compose([*overrides, *length, f"precision={mode}"]))
    cfg = compose_scan([*overrides, *length], numerics_steps)
    announce(f"1/3 numerics: {numerics_steps} FP32 steps under the instruments")
    scanned = analyse(scan(cfg, numerics_steps), numerics_steps, coverage=0.999, headroom=8.0)
    out.mkdir(parents=True, exist_ok=True)
    numerics = {"recommended": scanned["recommended"], "first_fp16_overflow": scanned["first_fp16_overflow"],
                "fp8_keep_bf16": scanned["fp8_keep_bf16"], "overall": scanned["overall"], "steps": numerics_steps}
    (out / "numerics.json").write_text(json.dumps(numerics, indent=2) + "\n")
    jobs = [(mode, seed) for mode in modes for seed in range(seeds)]
    refused = []
    for i, (mode, seed) in enumerate(jobs, 1):
        announce(f"2/3 run {i}/{len(jobs)}: precision={mode} seed={seed}")
        run_dir = out / "runs" / mode / f"seed={seed}"
        try:
            run_overrides([*overrides, *length, f"precision={mode}", f"seed={seed}", "trainer.progress=false",
                           f"hydra.run.dir='{run_dir}'"])
        except UserError as e:  # the model refused this mode when built: said, and the study goes on
            announce(f"precision={mode} seed={seed} refused: {e}")
            refused.append(f"{mode}: {e}")
    announce("3/3 report")
    logging.getLogger("tensorboard").setLevel(logging.WARNING)  # its reader's per-file notes, under the runs' INFO
    build([out / "runs"], out / "report", "md", margin)
    tables = comparison(load_runs([out / "runs"]), margins)
    table = pd.concat([t.assign(model=k[0], dataset=k[1], setting=k[2]) for k, t in tables.items()],
                      ignore_index=True) if tables else pd.DataFrame(columns=SHOWN)
    table.attrs["metric"] = next(iter(tables.values())).attrs.get("metric") if tables else None
    table.attrs["refused"] = sorted(set(refused))
    return StudyResult(table=table, numerics=numerics, out=out)


def describe(result: StudyResult) -> str:
    """What a person reads at the end: the numerics answer, the verdict table, a caution for short runs, where the
    report is."""
    from mptrain.report.tables import short_run_caution

    n = result.numerics
    lines = []
    for net, rec in n["recommended"].items():
        scale = "no static scale fits: use dynamic scaling" if rec["scale"] is None else \
            f"static precision.loss_scale={rec['scale']:g} would do ({rec['reason']})"  # fmt: skip
        lines.append(f"FP16 loss scale for {net}: {scale}")
    lines.append(f"first module whose FP16 output overflows: {n['first_fp16_overflow'] or 'none'}")
    keep = n["fp8_keep_bf16"]
    lines.append(f"Linear layers to keep in bf16 under FP8: {', '.join(keep) if keep else 'none'}")
    table = result.table
    shown = table[[c for c in SHOWN if c in table.columns]].copy() if len(table) else table
    if len(table) and table.attrs.get("metric") == "accuracy":  # in points, as the report's tables give it
        points = {c: f"{c}_pts" for c in ("metric_mean", "metric_std", "delta_vs_fp32") if c in shown}
        shown[list(points)] = shown[list(points)] * 100
        shown = shown.rename(columns=points)
    lines += ["", f"metric: {table.attrs.get('metric')}", shown.to_string(index=False, float_format="%.4g")]
    caution = short_run_caution(table, "this study", markdown=False) if len(table) else ""
    lines += [f"refused: {r}" for r in table.attrs.get("refused", [])]
    lines += ["", caution] if caution else []
    lines += ["", f"report: {result.out / 'report' / 'report.md'}"]
    return "\n".join(lines)
