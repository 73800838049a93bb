"""Tabulate the summary.json files under a sweep folder as Markdown (until mptrain-report lands).

    python results/tabulate_summaries.py multirun/<time> > results/<device>_torch<version>/<name>.md

One table per (model, dataset); each family's own primary metric; fp32 is the control.
"""

from __future__ import annotations

import json
import sys
from itertools import groupby
from pathlib import Path

MODES = ["fp32", "fp16_naive", "fp16_master", "mixed", "amp", "bf16"]


def _num(value, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def _ratio(a, b) -> str:
    return f"{a / b:.2f}x" if a and b else "-"


def _table(runs: list[dict]) -> None:
    runs.sort(key=lambda s: MODES.index(s["precision"]) if s["precision"] in MODES else len(MODES))
    control = next((s for s in runs if s["precision"] == "fp32"), {})
    metric = runs[0].get("primary_metric") or "accuracy"
    print(f"### {runs[0]['model']} on {runs[0]['dataset']} (batch size {runs[0].get('batch_size')})\n")
    print(f"| mode | status | steps | steps/s | samples/s | vs fp32 | peak memory | vs fp32 | eval {metric} "
          "| skipped | loss scale |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for s in runs:
        sps, mem = s.get("samples_per_s"), s.get("peak_memory_bytes")
        value = (s.get("final") or {}).get(metric)
        print(
            f"| {s['precision']}{' (control)' if s is control else ''} | {s['status']} | {s.get('steps')} "
            f"| {_num(s.get('steps_per_s'), '.3f')} | {_num(sps, '.1f')} | {_ratio(sps, control.get('samples_per_s'))} "
            f"| {_num(mem and mem / 2**20, '.1f')} MiB | {_ratio(mem, control.get('peak_memory_bytes'))} "
            f"| {_num(value, '.4f')} | {s.get('skipped_steps')} | {s.get('final_loss_scale')} |"
        )
    errors = [f"- {s['precision']}: {s['error']}" for s in runs if s.get("error")]
    print("\n" + "\n".join(errors) + "\n" if errors else "")


def main(sweep_dir: str) -> None:
    runs = [json.loads(p.read_text()) for p in sorted(Path(sweep_dir).rglob("summary.json"))]
    env = runs[0]["env"]
    print(f"device: {env['device_name']} ({env['cpu_threads']} threads), torch {env['torch']}\n")
    key = lambda s: (s["model"], s["dataset"])  # noqa: E731
    for _, group in groupby(sorted(runs, key=key), key=key):
        _table(list(group))
    print(f"peak memory method: {runs[0]['peak_memory_method']}")


if __name__ == "__main__":
    main(sys.argv[1])
