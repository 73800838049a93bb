"""The paper's loss-scaling claim, checked with `mptrain-numerics` on a model whose gradients underflow.

    python -m mptrain.scripts.numerics_paper_check [depth=14] [steps=468] [seeds=3] [out=DIR]
    python -m mptrain.scripts.numerics_paper_check table=DIR/check.json      # the table again, from a finished check

1. `mptrain-numerics model=mlp model.depth=D` (50 FP32 steps) measures what FP16 flushes
   and recommends a static loss scale.
2. The same model trains `steps` steps per seed in fp32, in `mixed` at the recommended
   scale and in `mixed` with loss_scale=1 (no scaling), as separate `mptrain` runs.
3. Prints each arm's eval loss and accuracy (mean ± std over seeds), the train loss at
   the first logging points (where an underflowing run lags), and how far each arm's train
   loss curve strays from the fp32 run of the same seed (same init, same batches): the mean
   |Δ| over all logged points. Writes `check.json`.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path


def _run(args: list[str]) -> None:
    out = subprocess.run([sys.executable, *args], capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit(f"failed: {' '.join(args)}\n{out.stderr[-3000:]}")


def train_loss_curve(run_dir: Path) -> dict[str, float]:
    from tensorboard.backend.event_processing.event_accumulator import SCALARS, EventAccumulator

    acc = EventAccumulator(str(run_dir / "tb"), size_guidance={SCALARS: 0})
    acc.Reload()
    return {str(e.step): e.value for e in acc.Scalars("train/loss")}  # str keys, as JSON keeps them


def check(depth: int = 14, steps: int = 468, seeds: int = 3, out: str | None = None) -> dict:
    out_dir = Path(out or tempfile.mkdtemp(prefix="paper-check-"))
    out_dir.mkdir(parents=True, exist_ok=True)
    model = ["model=mlp", f"model.depth={depth}"]
    scan_path = out_dir / "scan.json"
    _run(["-m", "mptrain.diagnose.cli", *model, "--steps", "50", "--json", str(scan_path)])
    scan = json.loads(scan_path.read_text())
    scale = scan["recommended"]["model"]["scale"]
    if scale is None:
        sys.exit(f"mptrain-numerics recommends no static scale for depth {depth}: {scan['recommended']}")
    arms = {
        "fp32": ["precision=fp32"],
        f"mixed, loss_scale={scale:g} (recommended)": ["precision=mixed", f"precision.loss_scale={scale:g}"],
        "mixed, loss_scale=1": ["precision=mixed", "precision.loss_scale=1"],
    }
    results = {}
    for name, overrides in arms.items():
        runs = []
        for seed in range(seeds):
            run_dir = out_dir / f"{overrides[-1].replace('=', '_')}-seed{seed}"
            _run(["-m", "mptrain", *model, *overrides, f"seed={seed}", f"trainer.max_steps={steps}",
                  "trainer.progress=false", f"hydra.run.dir={run_dir}"])  # fmt: skip
            summary = json.loads((run_dir / "summary.json").read_text())
            runs.append({"seed": seed, **summary["final"], "skipped_steps": summary["skipped_steps"],
                         "train_loss": train_loss_curve(run_dir)})  # fmt: skip
            print(f"{name} seed {seed}: eval loss {runs[-1]['loss']:.4f}, accuracy {runs[-1]['accuracy']:.4f}",
                  flush=True)
        results[name] = runs
    report = {"depth": depth, "steps": steps, "seeds": seeds, "recommended_scale": scale,
              "flushed_weight_frac": scan["overall"]["weight"]["flushed_frac"],
              "flushed_activation_frac": scan["overall"]["activation"]["flushed_frac"], "arms": results}  # fmt: skip
    (out_dir / "check.json").write_text(json.dumps(report, indent=1))
    print(format_table(report))
    return report


def _mean_std(values: list[float]) -> str:
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.4f} ± {spread:.4f}"


def format_table(report: dict) -> str:
    first = sorted(next(iter(report["arms"].values()))[0]["train_loss"], key=int)[:3]
    lines = [
        f"MLP depth {report['depth']}, Fashion-MNIST, {report['steps']} steps, {report['seeds']} seeds; FP32 scan: "
        f"{100 * report['flushed_weight_frac']:.2f}% of non-zero weight gradients and "
        f"{100 * report['flushed_activation_frac']:.2f}% of activation gradients flush to zero in FP16",
        "",
        "| arm | eval loss | eval accuracy | " + " | ".join(f"train loss @{s}" for s in first) + " | skipped |",
        "|---|---|---|" + "---|" * len(first) + "---|",
    ]
    control = next(iter(report["arms"].values()))
    for name, runs in report["arms"].items():
        curve = [_mean_std([r["train_loss"][s] for r in runs]) for s in first]
        lines.append(f"| {name} | {_mean_std([r['loss'] for r in runs])} | {_mean_std([r['accuracy'] for r in runs])} "
                     f"| {' | '.join(curve)} | {sum(r['skipped_steps'] for r in runs)} |")
    lines += ["", "Train loss vs the fp32 run of the same seed (same init and batches), mean |Δ| over every logged "
              f"step, per seed; and Δ at step {first[0]}:", ""]
    for name, runs in list(report["arms"].items())[1:]:
        strays = [statistics.mean(abs(r["train_loss"][s] - c["train_loss"][s]) for s in c["train_loss"])
                  for r, c in zip(runs, control)]  # fmt: skip
        early = [r["train_loss"][first[0]] - c["train_loss"][first[0]] for r, c in zip(runs, control)]
        lines.append(f"- {name}: mean |Δ| {', '.join(f'{x:.4f}' for x in strays)}; "
                     f"Δ at step {first[0]} {', '.join(f'{x:+.4f}' for x in early)}")
    return "\n".join(lines)


if __name__ == "__main__":
    kwargs = dict(a.split("=", 1) for a in sys.argv[1:])
    if "table" in kwargs:
        print(format_table(json.loads(Path(kwargs["table"]).read_text())))
    else:
        check(**{k: (v if k == "out" else int(v)) for k, v in kwargs.items()})
