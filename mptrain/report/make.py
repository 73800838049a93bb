"""Build one report (md + html + PNG, or csv/json) from run folders, and say the options that shaped its tables
so that it can be built again (`mptrain-report --check`)."""

from __future__ import annotations

import os
import shlex
import shutil
import tempfile
from pathlib import Path

from mptrain.errors import UserError


def options_said(margin_specs: list[str] | None, metric: str, control: str | None, seeds: str | None = None) -> str:
    """The options that shape a report's tables, as a command line would give them."""
    said = [] if metric == "primary" else ["--metric", metric]
    for spec in margin_specs or []:
        said += ["--margin", spec]
    said += ["--control", control] if control else []
    said += ["--seeds", seeds] if seeds else []
    return shlex.join(said)


def parse_seeds(spec: str | None) -> set[int] | None:
    """`--seeds 5-9` or `5,6,7`: the seeds a report keeps (None: every seed)."""
    if not spec:
        return None
    seeds = set()
    try:
        for part in spec.split(","):
            low, _, high = part.strip().partition("-")
            seeds.update(range(int(low), int(high or low) + 1))
    except ValueError:
        raise UserError(f"--seeds {spec!r}: give seeds as a list and ranges of integers, e.g. --seeds 5-9 or "
                        "--seeds 0,2,4") from None
    if not seeds:
        raise UserError(f"--seeds {spec!r} names no seed (a range runs low-high, e.g. 5-9)")
    return seeds


def sources_said(dirs: list[Path], out: Path) -> list[str]:
    """The run folders as paths relative to the report's folder: how its header names them, so the report and its
    records can move together (a results tree, a clone) and a check never reads a same-named folder elsewhere."""
    return [Path(os.path.relpath(Path(d).resolve(), Path(out).resolve())).as_posix() for d in dirs]


def build(dirs: list[Path], out: Path, fmt: str, margin_specs: list[str] | None = None,
          metric: str = "primary", control: str | None = None, with_figures: bool = True,
          seeds: str | None = None) -> list[Path]:
    """`with_figures=False`: report.md's text and tables alone (no plot, no HTML), as `--check` compares them;
    `seeds` (`5-9`): only those seeds' runs (a verdict on the seeds no exploration saw before a plan)."""
    from mptrain.report.paired_verdict import parse_margins
    from mptrain.report.render import write_html, write_machine, write_markdown
    from mptrain.report.runs import load_runs

    margins = parse_margins(margin_specs)
    runs = load_runs(dirs, metric)
    kept = parse_seeds(seeds)
    if kept is not None:
        runs = runs[runs["seed"].isin(kept)]
        if runs.empty:
            raise UserError(f"no run under {', '.join(map(str, dirs))} has a seed in --seeds {seeds}")
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        if fmt == "md":
            markdown = write_markdown(runs, dirs, staging, margins, control,
                                      options_said(margin_specs, metric, control, seeds), sources_said(dirs, out),
                                      with_figures)
            written = [markdown, write_html(markdown)] if with_figures else [markdown]
        else:
            written = write_machine(runs, staging, fmt, margins, control)
        if out.exists():
            old = out.with_name(f".{out.name}-old")
            shutil.rmtree(old, ignore_errors=True)
            out.rename(old)
            staging.rename(out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            staging.rename(out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return [out / p.name for p in written]


def options_read(said: str) -> tuple[list[str], str, str | None, str | None]:
    """`options_said`'s line back into (margin specs, metric, control, seeds)."""
    words, margins, metric, control, seeds = shlex.split(said), [], "primary", None, None
    if len(words) % 2:
        raise UserError(f"options {said!r}: each option takes one value")
    for flag, value in zip(words[::2], words[1::2]):
        if flag == "--margin":
            margins.append(value)
        elif flag == "--metric":
            metric = value
        elif flag == "--control":
            control = value
        elif flag == "--seeds":
            seeds = value
        else:
            raise UserError(f"options {said!r}: {flag} does not shape a report's tables")
    return margins, metric, control, seeds
