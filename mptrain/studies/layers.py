"""Which layers must stay in high precision under a block format? `mptrain-study --layers mxfp4` runs it:

1. a one-step `precision=mx` run lists the Linear layers the format can take; they are grouped by kind
   (`blocks.*.attn.qkv`: the same layer in every block) or, with `--by layer`, one by one;
2. one run per arm and seed, paired by seed: the bf16 control, every group in the format (`precision=mx`), and
   each group alone in the format (`precision.mx_only=[group]`): how much each costs on its own, ranked;
3. if every group together is not equivalent to bf16, keep-lists grow in that order, worst first
   (`precision.mx_keep=[g1]`, `[g1, g2]`, ...), each run for every seed, until one is equivalent: the smallest
   keep-list this greedy search finds (the groups' costs are taken as adding up; the search says so);
4. `mptrain-report --control bf16` over the runs, in `<out>/report/`.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from mptrain.errors import UserError

CONTROL = "bf16"


@dataclass
class LayerStudyResult:
    block_format: str
    ranking: list[tuple[str, float, str]]  # (group, paired Δ of it alone in the format, verdict), worst first
    keep: list[str] | None  # the smallest equivalent keep-list found (None: none was)
    table: object  # the report's comparison table (pandas), against bf16
    out: Path

    def __str__(self) -> str:
        lines = [f"{self.block_format}: each layer group alone in the format, against bf16 (worst first):"]
        lines += [f"  {group:<40} {delta:+.4g}  {verdict}" for group, delta, verdict in self.ranking]
        if self.keep is None:
            lines.append("no keep-list tried was equivalent to bf16: keep these layers and more, or a wider format")
        else:
            kept = ", ".join(self.keep) or "nothing"
            lines.append(f"smallest keep-list equivalent to bf16: {kept} (precision.mx_keep={_hydra_list(self.keep)})")
        lines.append(f"report: {self.out / 'report' / 'report.md'}")
        return "\n".join(lines)


def group_layers(layers: Sequence[str], by: str) -> list[str]:
    """`kind`: a layer's name with its block indices as `*` (the last part, a layer's own index, stays)."""
    if by == "layer":
        return list(layers)
    groups = []
    for name in layers:
        parts = name.split(".")
        pattern = ".".join(["*" if p.isdigit() and i < len(parts) - 1 else p for i, p in enumerate(parts)])
        if pattern not in groups:
            groups.append(pattern)
    return groups


def run_layer_study(overrides: Sequence[str] = (), block_format: str = "mxfp4", seeds: int = 3,
                    steps: int | None = None, by: str = "kind", out: str | Path | None = None,
                    announce=print, margin: Sequence[str] | None = None) -> LayerStudyResult:
    from mptrain.console import compose
    from mptrain.inprocess import run_overrides
    from mptrain.report.make import build
    from mptrain.report.paired_verdict import parse_margins
    from mptrain.report.runs import load_runs
    from mptrain.report.tables import comparison
    from mptrain.schema import validate

    overrides = [str(o) for o in overrides]
    if any(o.lstrip("+~").split("=")[0] in ("precision", "seed") or o.startswith("precision.") for o in overrides):
        raise UserError("the layer study sets precision and seed itself: give the format (--layers) and --seeds")
    if seeds < 2:
        raise UserError(f"a study needs seeds >= 2 for a paired verdict (got {seeds})")
    margins = parse_margins(margin)  # a bad margin is said before anything runs
    out = Path(out or f"studies/layers_{time.strftime('%Y-%m-%d_%H-%M-%S')}").expanduser().resolve()
    if out.exists() and any(out.iterdir()):
        raise UserError(f"{out} is not empty: give the study a new folder (nothing there is overwritten)")
    length = [f"trainer.max_steps={steps}"] if steps else []
    mx = ["precision=mx", f"precision.block_format={block_format}"]
    validate(compose([*overrides, *length, *mx]))  # a bad override is said here, before anything is written
    out.mkdir(parents=True, exist_ok=True)

    def train(arm: str, extra: list[str]) -> None:
        for seed in range(seeds):
            announce(f"run: {arm} seed={seed}")
            run_overrides([*overrides, *length, *extra, f"seed={seed}", "trainer.progress=false",
                           f"hydra.run.dir='{out / 'runs' / _slug(arm) / f'seed={seed}'}'"])

    announce(f"1/4 layers: one step in {block_format}")
    probe = run_overrides([*overrides, *mx, "trainer.max_steps=1", "trainer.progress=false",
                           f"hydra.run.dir='{out / 'probe'}'"])
    groups = group_layers((probe.get("mx") or {}).get("layers") or [], by)
    if not groups:
        raise UserError(f"no Linear layer of this model fits {block_format}'s blocks: nothing to study")
    announce(f"2/4 runs: bf16, all {len(groups)} group(s) in {block_format}, and each alone")
    train(CONTROL, [f"precision={CONTROL}"])
    train("all", mx)
    for group in groups:
        train(f"only {group}", [*mx, f"precision.mx_only={_hydra_list([group])}"])

    def table():
        tables = comparison(load_runs([out / "runs"]), margins, control=CONTROL)
        return next(iter(tables.values()))

    def row(t, arm: str):
        labels = {f"only {g}": f"mx_only={_hydra_list([g])}" for g in groups}
        wanted = labels.get(arm) or (f"mx_keep={_hydra_list(arm[5:].split(', '))}" if arm.startswith("keep ") else None)
        hits = t[t["arm"].str.contains(wanted, regex=False)] if wanted else t[t["arm"] == f"mx block_format={block_format}"]
        return hits.iloc[0]

    t = table()
    sign = -1 if t.attrs["higher_is_better"] else 1  # a positive cost is worse, whichever way the metric points
    ranking = sorted(((g, float(row(t, f"only {g}")["delta_vs_fp32"]), str(row(t, f"only {g}")["verdict"]))
                      for g in groups), key=lambda r: -sign * r[1])
    keep: list[str] | None = [] if row(t, "all")["verdict"] == "equivalent" else None
    announce("3/4 keep-lists, worst first" if keep is None else "3/4 every group in the format is equivalent")
    for k in range(1, len(groups)) if keep is None else ():
        trial = [g for g, _, _ in ranking[:k]]
        train(f"keep {', '.join(trial)}", [*mx, f"precision.mx_keep={_hydra_list(trial)}"])
        t = table()
        if row(t, f"keep {', '.join(trial)}")["verdict"] == "equivalent":
            keep = trial
            break
    announce("4/4 report")
    build([out / "runs"], out / "report", "md", margin, control=CONTROL)
    (out / "layers.json").write_text(json.dumps({"block_format": block_format, "groups": groups,
                                                 "ranking": ranking, "keep": keep}, indent=2) + "\n")
    return LayerStudyResult(block_format, ranking, keep, t, out)


def _hydra_list(items: Sequence[str]) -> str:
    return "[" + ",".join(f"'{i}'" for i in items) + "]"


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_")
