"""Is precision.cpu_fp16=emulate faithful to the native CPU FP16 path, and how much faster is it?

    python results/emulation_check.py speed [model=resnet] [steps=6] [batch=64]
    python results/emulation_check.py numerics <native sweep dir> <emulated sweep dir>

speed: one process, the same seeded model and batch, native and emulated `mixed` steps
alternated (`steps` each after one warm-up each); median step times and their ratio.

numerics: two sweeps made with telemetry.numerics.every=N that differ only in
precision.cpu_fp16; for each seed present in both, per layer at the first measured step,
the FP16 underflow fraction of gradients and the lost-update fraction, native vs emulated
(maximum and mean absolute difference), and the final primary metric per seed.
"""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
import time
from pathlib import Path


def speed(model: str = "resnet", steps: int = 6, batch: int = 64) -> None:
    import torch

    from mptrain.console import compose
    from mptrain.run import build_trainer
    from mptrain.bench.measure import RecordingLogger

    trainers = {}
    with tempfile.TemporaryDirectory() as tmp:
        for way in ("native", "emulate"):
            cfg = compose([f"model={model}", "precision=mixed", f"precision.cpu_fp16={way}", f"dataset.batch_size={batch}",
                           "trainer.progress=false"])  # fmt: skip
            trainers[way] = build_trainer(cfg, torch.device("cpu"), Path(tmp), RecordingLogger(), None, [])
        batch_data = next(iter(trainers["native"].data.train))
        times = {way: [] for way in trainers}
        for i in range(steps + 1):
            for way, trainer in trainers.items():
                start = time.perf_counter()
                trainer._train_step(batch_data)
                if i:  # the first step of each warms up
                    times[way].append(time.perf_counter() - start)
    native, emulated = (statistics.median(times[w]) for w in ("native", "emulate"))
    print(f"{model} mixed, batch {batch}, {steps} steps each alternated, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads: native {native * 1e3:.0f} ms/step, emulated {emulated * 1e3:.0f} "
          f"ms/step, speed-up {native / emulated:.2f}x")


def _runs(sweep: Path) -> dict[int, Path]:
    return {json.loads((p.parent / "summary.json").read_text())["seed"]: p.parent
            for p in sweep.rglob("numerics.jsonl")}  # fmt: skip


def _first_step(run: Path) -> dict[tuple[str, str], dict]:
    records = [json.loads(line) for line in (run / "numerics.jsonl").read_text().splitlines()]
    first = min(r["step"] for r in records)
    return {(r["kind"], r["layer"]): r for r in records if r["step"] == first}


def numerics(native_dir: str, emulated_dir: str) -> None:
    native, emulated = _runs(Path(native_dir)), _runs(Path(emulated_dir))
    for seed in sorted(set(native) & set(emulated)):
        a, b = _first_step(native[seed]), _first_step(emulated[seed])
        for kind, field in (("weight", "underflow_frac"), ("activation", "underflow_frac"),
                            ("lost_update", "lost_update_frac")):  # fmt: skip
            diffs = [abs(a[k][field] - b[k][field]) for k in a if k[0] == kind and k in b]
            means = [a[k][field] for k in a if k[0] == kind and k in b]
            if diffs:
                print(f"seed {seed} {kind:<11} {field}: {len(diffs)} layers, mean native {statistics.mean(means):.4%}, "
                      f"|native - emulated| max {max(diffs):.4%} mean {statistics.mean(diffs):.4%}")
        for name, run in (("native", native[seed]), ("emulated", emulated[seed])):
            s = json.loads((run / "summary.json").read_text())
            metric = s.get("primary_metric")
            print(f"seed {seed} {name}: {metric} {(s.get('final') or {}).get(metric)}, status {s['status']}")


if __name__ == "__main__":
    what, rest = sys.argv[1], sys.argv[2:]
    if what == "speed":
        speed(**{k: (v if k == "model" else int(v)) for k, v in (a.split("=") for a in rest)})
    else:
        numerics(*rest)
