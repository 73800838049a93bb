"""Tabulate the summary.json files under a sweep folder as Markdown (until mptrain-report lands).

    python results/tabulate_summaries.py multirun/<time> > results/<device>_torch<version>/<name>.md
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

MODES = ["fp32", "fp16_naive", "fp16_master", "mixed", "amp", "bf16"]


def main(sweep_dir: str) -> None:
    runs = [json.loads(p.read_text()) for p in sorted(Path(sweep_dir).rglob("summary.json"))]
    runs.sort(key=lambda s: MODES.index(s["precision"]) if s["precision"] in MODES else len(MODES))
    control = next((s for s in runs if s["precision"] == "fp32"), None)
    env = runs[0]["env"]
    print(f"device: {env['device_name']} ({env['cpu_threads']} threads), torch {env['torch']}\n")
    print(f"batch size {runs[0]['batch_size']}\n")
    print("| mode | status | steps | steps/s | samples/s | vs fp32 | peak memory | vs fp32 | eval accuracy | skipped | loss scale |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for s in runs:
        sps = s["samples_per_s"]
        speed = f"{sps / control['samples_per_s']:.2f}x" if control else "-"
        mem = f"{s['peak_memory_bytes'] / control['peak_memory_bytes']:.2f}x" if control else "-"
        accuracy = (s.get("final") or {}).get("accuracy")
        print(
            f"| {s['precision']}{' (control)' if s is control else ''} | {s['status']} | {s['steps']} "
            f"| {s['steps_per_s']:.3f} | {sps:.1f} | {speed} | {s['peak_memory_bytes'] / 2**20:.1f} MiB | {mem} "
            f"| {accuracy if accuracy is None else f'{accuracy:.4f}'} | {s['skipped_steps']} | {s['final_loss_scale']} |"
        )
    print(f"\npeak memory method: {runs[0]['peak_memory_method']}")


if __name__ == "__main__":
    main(sys.argv[1])
