"""The loss-scale verdict (telemetry/scale_history.py) for runs made before summary.json carried it, from the
overflow events they kept (exact when every skip was kept: at most telemetry.overflow_events, 20 by default).

    python -m mptrain.scripts.backfill_scale_history <run or sweep dir>... > verdicts.md
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from mptrain.telemetry.scale_history import describe, scale_verdict


def main(dirs: list[str]) -> int:
    print("| run | mode | loss scale | seed | status | steps | skipped | verdict |")
    print("|---|---|---|---|---|---|---|---|")
    for path in sorted(p for d in dirs for p in Path(d).rglob("summary.json") if "report" not in p.parts):
        s = json.loads(path.read_text())
        if s.get("loss_scale") is None:
            continue
        events = s.get("overflow_events") or []
        kept_all = len(events) == (s.get("skipped_steps") or 0)
        history = [(e["step"], e["loss_scale"], e["first_nonfinite_forward"] or (e["nonfinite_grads"] or [None])[0])
                   for e in events]
        final = s.get("final_loss_scale")
        verdict = scale_verdict(history, s.get("steps") or 0, s["loss_scale"] == "dynamic", 2000,
                                final if isinstance(final, float) else None)
        words = describe(verdict) + ("" if kept_all else " (from the kept events only)")
        print(f"| {path.parent.parent.name[:60]} | {s['precision']} | {s['loss_scale']} | {s['seed']} | {s['status']} "
              f"| {s.get('steps')} | {s.get('skipped_steps')} | {words} |")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
