"""Is precision.cpu_fp16=emulate (cpu_bf16=emulate) faithful to the native CPU FP16 (BF16) path, and how much faster?

    python -m mptrain.scripts.emulation_check speed [model=resnet] [steps=6] [batch=64] [mode=mixed]
    python -m mptrain.scripts.emulation_check numerics <native sweep dir> <emulated sweep dir>
    python -m mptrain.scripts.emulation_check same-state [model=resnet] [warm=20] [batch=64] [dataset=...] [mode=mixed]

`mode`: an FP16 mode (mixed, amp, ...) compares precision.cpu_fp16=native/emulate; a BF16 one (bf16, bf16_pure, ...)
precision.cpu_bf16.

speed: one process, the same seeded model and batch, native and emulated `mode` steps
alternated (`steps` each after one warm-up each); median step times and their ratio.

same-state: `warm` emulated `mode` steps reach a realistic state; from that one checkpoint, the
same next step is taken natively and emulated (weights, masters, scaler, RNG and batch all equal),
with every numerics measurement on. Per layer: FP16 underflow fractions of weight and activation
gradients and lost-update fractions, native vs emulated; relative error of the logits and of each
weight gradient. What differs here is the arithmetic alone.

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


def _policy(mode: str) -> str:
    from mptrain.schema.precision import FP16_ARITHMETIC

    return "precision.cpu_fp16" if mode in FP16_ARITHMETIC else "precision.cpu_bf16"


def speed(model: str = "resnet", steps: int = 6, batch: int = 64, mode: str = "mixed") -> None:
    import torch

    from mptrain.bench.measure import RecordingLogger
    from mptrain.build import build_trainer
    from mptrain.console import compose

    trainers = {}
    with tempfile.TemporaryDirectory() as tmp:
        for way in ("native", "emulate"):
            cfg = compose([f"model={model}", f"precision={mode}", f"{_policy(mode)}={way}", f"dataset.batch_size={batch}",
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
    print(f"{model} {mode}, batch {batch}, {steps} steps each alternated, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads: native {native * 1e3:.0f} ms/step, emulated {emulated * 1e3:.0f} "
          f"ms/step, speed-up {native / emulated:.2f}x")


def same_state(model: str = "resnet", warm: int = 20, batch: int = 64, dataset: str | None = None,
               mode: str = "mixed") -> None:
    import torch

    from mptrain import checkpoint
    from mptrain.bench.measure import RecordingLogger
    from mptrain.build import build_trainer
    from mptrain.console import compose
    from mptrain.speed_check import relative_error
    from mptrain.telemetry.numerics import NumericsProbe

    def config(way: str, steps: int):
        # the one step past the warm state: both ways replan the warm run's schedule alike (checkpoint.restore)
        data = [f"dataset={dataset}"] if dataset else []
        data += ["trainer.replan_schedule=true"] if steps > warm else []
        return compose([f"model={model}", *data, f"precision={mode}", f"{_policy(mode)}={way}",
                        f"dataset.batch_size={batch}", f"trainer.max_steps={steps}", "trainer.progress=false",
                        "trainer.log_every=1"])  # fmt: skip

    with tempfile.TemporaryDirectory() as tmp:
        warmed = build_trainer(config("emulate", warm), torch.device("cpu"), Path(tmp), RecordingLogger(), None, [])
        warmed.fit(evaluate=False)
        state = checkpoint.capture(warmed)
        outcome = {}
        for way in ("native", "emulate"):
            run_dir = Path(tmp) / way
            run_dir.mkdir()
            probe = NumericsProbe(1, run_dir, activations=True)
            trainer = build_trainer(config(way, warm + 1), torch.device("cpu"), run_dir, RecordingLogger(), probe, [])
            checkpoint.restore(trainer, state)
            net = trainer.task.networks()["model"]
            logits = []
            hook = net.register_forward_hook(lambda _m, _i, out: logits.append((out[0] if isinstance(out, tuple)  # noqa: B023
                                                                                  else out).detach().float()))
            start = time.perf_counter()
            trainer.fit(evaluate=False)
            seconds = time.perf_counter() - start
            hook.remove()
            grads = {n: p.grad.detach().float() for n, p in net.named_parameters() if p.grad is not None}
            records = [json.loads(line) for line in (run_dir / "numerics.jsonl").read_text().splitlines()]
            outcome[way] = {"logits": logits[0], "grads": grads, "seconds": seconds,
                            "records": {(r["kind"], r["layer"]): r for r in records}}  # fmt: skip
    a, b = outcome["native"], outcome["emulate"]
    print(f"{model} {mode}, batch {batch}, one step from the state after {warm} steps (step {warm + 1}), "
          f"torch {torch.__version__}: native {a['seconds']:.2f} s, emulated {b['seconds']:.2f} s")
    for kind, field in (("weight", "underflow_frac"), ("activation", "underflow_frac"),
                        ("lost_update", "lost_update_frac")):  # fmt: skip
        keys = [k for k in a["records"] if k[0] == kind and k in b["records"]]
        diffs = [abs(a["records"][k][field] - b["records"][k][field]) for k in keys]
        if diffs:
            worst = keys[diffs.index(max(diffs))]
            print(f"{kind:<11} {field}: {len(keys)} layers, mean native {statistics.mean(a['records'][k][field] for k in keys):.4%}, "
                  f"|native - emulated| max {max(diffs):.4%} ({worst[1]}) mean {statistics.mean(diffs):.5%}")
    by_depth = [(n, relative_error(b["grads"][n], g)) for n, g in a["grads"].items()]  # input side first
    grad_errors = sorted(e for _, e in by_depth)
    grads = "scaled, FP16" if _policy(mode).endswith("fp16") else "BF16"
    print(f"logits: relative error {relative_error(b['logits'], a['logits']):.2e}; weight gradients ({grads}): relative "
          f"error median {statistics.median(grad_errors):.2e}, max {grad_errors[-1]:.2e} over {len(grad_errors)} tensors; "
          f"nearest the output {by_depth[-1][0]} {by_depth[-1][1]:.2e}, nearest the input {by_depth[0][0]} "
          f"{by_depth[0][1]:.2e}")


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
    what, rest = (sys.argv[1], sys.argv[2:]) if len(sys.argv) > 1 else ("", [])
    if what in ("-h", "--help"):
        print(__doc__)
        sys.exit(0)
    if what not in ("speed", "same-state", "numerics") or (what == "numerics" and len(rest) != 2) or any(
            what != "numerics" and "=" not in a for a in rest):  # fmt: skip
        print("usage: python -m mptrain.scripts.emulation_check speed|same-state [key=value ...] | numerics "
              "<native sweep dir> <emulated sweep dir>   (--help: what each does)", file=sys.stderr)
        sys.exit(2)
    if what in ("speed", "same-state"):
        import inspect

        command = speed if what == "speed" else same_state
        known = inspect.signature(command).parameters
        kwargs = dict(a.split("=", 1) for a in rest)
        unknown = [k for k in kwargs if k not in known]
        not_counts = [k for k in kwargs if k in known and k not in ("model", "dataset", "mode")
                      and not kwargs[k].isdigit()]  # fmt: skip
        if unknown or not_counts:
            problem = (f"{unknown[0]} is not one of its settings ({', '.join(f'{k}=' for k in known)})" if unknown
                       else f"{not_counts[0]}={kwargs[not_counts[0]]} must be a whole number, e.g. {not_counts[0]}=6")
            print(f"emulation_check {what}: {problem}", file=sys.stderr)
            sys.exit(2)
        command(**{k: (v if k in ("model", "dataset", "mode") else int(v)) for k, v in kwargs.items()})
    else:
        numerics(*rest)
