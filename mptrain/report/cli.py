"""`mptrain-report`: runs and sweeps → comparison tables and plots.

    mptrain-report multirun/2026-11-24_10-00-00
    mptrain-report runs/a runs/b --out my-report
    mptrain-report multirun/... --format csv        # or json, for machines
    mptrain-report multirun/... --margin 0.3        # verdicts against ±0.3 accuracy points (default 0.5)
    mptrain-report multirun/... --export-runs records/   # compact per-run records to commit; report them later
    mptrain-report multirun/... --seeds 5-9         # the verdicts on these seeds alone (ones no exploration saw)
    mptrain-report --check results       # do the committed reports still come out of their committed records?

Reads every run folder (one holding summary.json) under the given folders, with its
TensorBoard scalars (every point) and numerics.jsonl, and writes into `<first dir>/report/`
(or --out): report.md, a self-contained report.html and PNG plots; or comparison.csv +
runs.csv; or report.json. It is not a Hydra app: it makes no output folder of its own.
The report is built beside the target and moved into place, so a failure leaves the
previous report whole.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mptrain.errors import UserError, disk_full_as
from mptrain.report.make import build


class _OneLineParser(argparse.ArgumentParser):
    def error(self, message):
        raise UserError(f"{message} (see mptrain-report --help)")


def parse_args(argv):
    parser = _OneLineParser(prog="mptrain-report", description=__doc__.split("\n\n")[0])
    parser.add_argument("dirs", nargs="+", type=Path, help="run or sweep folders (with --check: folders of reports)")
    parser.add_argument("--out", type=Path, help="where the report goes (default: <first dir>/report)")
    parser.add_argument("--format", choices=("md", "csv", "json"), default="md",
                        help="md: report.md + report.html + PNG (default); csv or json: tables for machines")
    parser.add_argument("--margin", action="append", metavar="[METRIC=]X",
                        help="equivalence margin of the verdicts: accuracy in points (default 0.5), other metrics in "
                             "%% of the control (default 1); repeat for several metrics, e.g. --margin perplexity=2")
    parser.add_argument("--export-runs", type=Path, metavar="DIR",
                        help="write a compact record per run into DIR (summary, the scalars and numerics the report "
                             "reads), small enough to commit; mptrain-report DIR then reproduces the tables")
    parser.add_argument("--metric", choices=("primary", "train_loss"), default="primary",
                        help="what the verdicts compare: each run's primary metric on held-out data (default), or "
                             "train_loss: its training loss over the last 10 %% of its steps (how well each arm "
                             "optimises, apart from how it generalises; the paper's loss-scaling figures)")
    parser.add_argument("--control", metavar="ARM",
                        help="the arm every other is paired with: a mode or an arm's label, e.g. bf16 (default: a "
                             "registered plan's control, else fp32)")
    parser.add_argument("--seeds", metavar="LIST",
                        help="only these seeds' runs, e.g. 5-9 or 0,2,4: a plan's verdict on the seeds no exploration "
                             "ran before it was registered")
    parser.add_argument("--check", action="store_true",
                        help="remake every report.md under the folders from the records and options its header "
                             "names, and compare their tables; exit 1 if one differs")
    return parser.parse_args(argv)


def main(argv=None) -> None:
    try:
        args = parse_args(sys.argv[1:] if argv is None else argv)
        if args.check:
            sys.exit(_check(args))
        if args.export_runs:
            from mptrain.report.export import export_runs

            written = export_runs(args.dirs, args.export_runs)
            print(f"{len(written)} run records in {args.export_runs}")
            return
        out = args.out or args.dirs[0] / "report"
        with disk_full_as(lambda: UserError(f"no space left on the device writing the report to {out} (a report "
                                            "already there is left whole); free space there and run mptrain-report "
                                            "again")):
            written = build(args.dirs, out, args.format, args.margin, args.metric, args.control, seeds=args.seeds)
        for path in written:
            print(path)
    except UserError as e:
        print(f"mptrain-report: error: {e}", file=sys.stderr)
        sys.exit(2)


def _check(args) -> int:
    from mptrain.report.check import check

    given = [flag for flag, value in (("--out", args.out), ("--format", args.format != "md"), ("--margin", args.margin),
                                      ("--metric", args.metric != "primary"), ("--control", args.control),
                                      ("--seeds", args.seeds),
                                      ("--export-runs", args.export_runs)) if value]  # fmt: skip
    if given:
        raise UserError(f"--check remakes each report with the options its own header names; drop {', '.join(given)}")
    results = check(args.dirs)
    if not results:
        raise UserError(f"no report.md written by mptrain-report under {', '.join(map(str, args.dirs))}")
    for checked in results:
        print(f"{checked.status:10} {checked.report}" + (f": {checked.detail}" if checked.detail else ""))
    counts = {s: sum(c.status == s for c in results) for s in ("same", "differs", "no records")}
    print(f"{counts['same']} reports remade the same, {counts['differs']} differ, {counts['no records']} without "
          "their records in the repository")
    return 1 if counts["differs"] else 0


if __name__ == "__main__":
    main()
