"""`mptrain-report --check DIR`: do the committed reports under DIR still come out of their committed records?

Each report.md names the folders it was made from and the options that shape its tables (its header line); the
check remakes it from them, in a scratch folder, with the code of today, and compares every table row. A report
whose records are not in the repository (made from a sweep folder outside it) is listed as not checkable, never
as passing.
"""

from __future__ import annotations

import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

from mptrain.report.make import build, options_read
from mptrain.report.render import HEADER


@dataclass
class Checked:
    report: Path
    status: str  # "same", "differs", "no records"
    detail: str = ""


def recipe(markdown: str) -> tuple[list[str], str, bool] | None:
    """The folders and options a report.md was written from (its header), and whether the folders are named
    relative to the report; None for a file that is no report."""
    match = next((m for m in map(HEADER.search, markdown.splitlines()[:5]) if m), None)
    if match is None:
        return None
    sources = re.findall(r"`([^`]+)`", match["sources"])
    return sources, match["options"] or "", bool(match["relative"])


def _locate(source: str, report_md: Path, relative: bool) -> Path | None:
    """A recorded folder: relative to the report's own folder, never to the working directory (a user's `runs/`
    there is not the report's). A header from before 2026-12-07 named folders as they were given: those are looked
    up from the nearest folder above the report that holds them (the repository's root for `results/...`)."""
    folder = report_md.resolve().parent
    candidates = [folder / source] if relative else [above / source for above in (folder, *folder.parents)]
    return next((c for c in candidates if c.is_dir()), None)


def table_rows(markdown: str) -> list[str]:
    return [line for line in markdown.splitlines() if line.startswith("|")]


def check_report(report_md: Path) -> Checked | None:
    text = report_md.read_text()
    made = recipe(text)
    if made is None:
        return None
    sources, options, relative = made
    found = [_locate(s, report_md, relative) for s in sources]
    if None in found:
        missing = ", ".join(s for s, f in zip(sources, found) if f is None)
        return Checked(report_md, "no records", f"not in the repository: {missing}")
    margins, metric, control, seeds = options_read(options)
    with tempfile.TemporaryDirectory(prefix="mptrain-check-") as scratch:
        out = Path(scratch) / "report"
        build(found, out, "md", margins or None, metric, control, with_figures=False, seeds=seeds)  # the tables are compared
        fresh = table_rows((out / "report.md").read_text())
    committed = table_rows(text)
    if fresh == committed:
        return Checked(report_md, "same")
    first = next((i for i, (a, b) in enumerate(zip(committed, fresh)) if a != b), min(len(committed), len(fresh)))
    was = committed[first] if first < len(committed) else "(no row)"
    now = fresh[first] if first < len(fresh) else "(no row)"
    return Checked(report_md, "differs", f"table row {first + 1}: committed {was[:160]!r}, remade {now[:160]!r}")


def check(dirs: list[Path]) -> list[Checked]:
    reports = sorted({p for d in dirs for p in ([d] if d.name == "report.md" else d.rglob("report.md"))})
    return [c for c in map(check_report, reports) if c is not None]
