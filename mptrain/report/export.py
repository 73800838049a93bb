"""`mptrain-report --export-runs DIR`: a compact record per run, small enough to commit beside its report.

A record keeps what the report reads and nothing bulky: summary.json as written; `scalars.json`, the TensorBoard
scalars the tables and charts use (eval metrics, training loss, loss scale, lost-update share); and
numerics.jsonl cut to the records the tables read (lost updates whole, each module's largest forward output, FP8
operand records) with the gradient-exponent histograms summed over layers and steps (the chart sums them
anyway). `mptrain-report DIR` on the records alone reproduces the report's tables exactly.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np

from mptrain.report.runs import SCALARS_FILE, find_runs, load_numerics, load_scalars

SCALAR_PREFIXES = ("eval/", "train/loss", "scaler/loss_scale", "numerics/lost_update_frac/all")
KEPT_WHOLE = ("lost_update", "fp8", "mx", "optimizer_state", "forward_first_overflow")
SUMMED = ("activation", "weight")  # gradient-exponent histograms: one record per kind


def export_runs(dirs: list[Path], out: Path) -> list[Path]:
    """Write one record folder per run under `out`, mirroring each run's path below the folder given."""
    written = []
    for source in dirs:
        for run_dir in find_runs([source]):
            relative = run_dir.relative_to(source)
            target = out / (source.name if len(dirs) > 1 else "") / relative
            if target.resolve() == run_dir.resolve():
                continue  # exporting a record onto itself
            staging = target.with_name(f".{target.name}.tmp")
            shutil.rmtree(staging, ignore_errors=True)
            staging.mkdir(parents=True)
            shutil.copy2(run_dir / "summary.json", staging / "summary.json")
            scalars = load_scalars(run_dir, SCALAR_PREFIXES)
            points = {tag: [[int(step), float(value)] for step, value in series.items()]
                      for tag, series in sorted(scalars.items())}
            (staging / SCALARS_FILE).write_text(json.dumps(points, separators=(",", ":")) + "\n")
            records = compact_numerics(load_numerics(run_dir))
            if records:
                (staging / "numerics.jsonl").write_text("".join(json.dumps(r, separators=(",", ":")) + "\n"
                                                                for r in records))
            shutil.rmtree(target, ignore_errors=True)
            staging.rename(target)
            written.append(target)
    return written


def compact_numerics(records: list[dict]) -> list[dict]:
    kept = [r for r in records if r["kind"] in KEPT_WHOLE]
    amax: dict[str, float] = {}
    for r in records:
        if r["kind"] == "forward":
            amax[r["layer"]] = max(amax.get(r["layer"], 0.0), r["amax"])
    kept += [{"kind": "forward", "layer": layer, "amax": value} for layer, value in amax.items()]
    for kind in SUMMED:
        hists = [r["log2_hist"] for r in records if r["kind"] == kind and "log2_hist" in r]
        if hists:
            kept.append({"kind": kind, "layer": "(all layers, all steps)", "log2_hist": np.sum(hists, axis=0).tolist()})
    return kept
