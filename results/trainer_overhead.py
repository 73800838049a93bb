"""Trainer overhead per step, paired: one Trainer step, one bare-loop step, alternated on the same batch.

    python results/trainer_overhead.py [model=resnet] [batch=64] [pairs=40] [modes=fp32,bf16,amp] [extra overrides]

mptrain-bench times whole windows on each side, minutes apart on a shared CPU, and its
ratios wander by a few percent between runs. Here each Trainer step (as `fit` runs it,
with the memory measurement every `log_every`-th step, the metric meters and the skip
decision) is followed at once by a bare-loop step (`mptrain/bench/bare.py`) on the same
batch, so slow drifts of the machine hit both sides alike; the medians and their ratio
are printed, with the share of the per-window work (host sync, TensorBoard write) added
at the default `log_every`.
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path


def main(model: str = "resnet", batch: int = 64, pairs: int = 40, modes: str = "fp32,bf16,amp", extra=()) -> None:
    import torch

    from mptrain.bench.bare import BARE_FOR_MODE, BareLoop
    from mptrain.bench.measure import RecordingLogger
    from mptrain.console import compose
    from mptrain.precision import Precision
    from mptrain.run import build_trainer

    print(f"{model}, batch {batch}, {pairs} pairs after 5 warm-up pairs, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, overrides {' '.join(extra) or '-'}")
    for mode in modes.split(","):
        overrides = [f"model={model}", "dataset=synthetic" if model != "lstm_lm" else "dataset=synthetic_text",
                     f"dataset.batch_size={batch}", "trainer.progress=false", *extra]  # fmt: skip
        cfg = compose([*overrides, f"precision={mode}"])
        fp32 = compose([*overrides, "precision=fp32"])
        with tempfile.TemporaryDirectory() as tmp:
            trainer = build_trainer(cfg, torch.device("cpu"), Path(tmp), RecordingLogger(), None, [])
            reference = build_trainer(fp32, torch.device("cpu"), Path(tmp), RecordingLogger(), None, [])
        kind = BARE_FOR_MODE[mode]
        kernels = Precision(cfg.precision, torch.device("cpu")).kernels if kind == "amp" else None
        bare = BareLoop(reference.task.networks()["model"], cfg.model.task, kind, cfg.optim, 10**6,
                        torch.device("cpu"), kernels)  # fmt: skip
        data = next(iter(trainer.data.train))
        ours, theirs = [], []
        for i in range(pairs + 5):
            start = time.perf_counter()
            trainer._train_step(data)
            trainer.train_meter.add({"loss": torch.zeros(())}, batch)  # what _train_epoch adds per step
            trainer.step += 1
            middle = time.perf_counter()
            bare.step(data)
            end = time.perf_counter()
            if i >= 5:
                ours.append(middle - start)
                theirs.append(end - middle)
        start = time.perf_counter()
        trainer._log_window(_NoBar())
        window = time.perf_counter() - start
        o, b = statistics.median(ours), statistics.median(theirs)
        per_step = o + window / cfg.trainer.log_every
        print(f"{mode:>6} vs bare {kind}: ours {o * 1e3:.1f} ms, bare {b * 1e3:.1f} ms, step ratio {o / b:.3f}; "
              f"+ logging window {window * 1e3:.1f} ms every {cfg.trainer.log_every} steps: overhead "
              f"{per_step / b - 1:+.1%}")


class _NoBar:
    disable = True

    def set_postfix(self, **_):
        pass


if __name__ == "__main__":
    known = {"model", "batch", "pairs", "modes"}
    kwargs = {k: (int(v) if k in ("batch", "pairs") else v)
              for k, v in (a.split("=", 1) for a in sys.argv[1:] if a.split("=")[0] in known)}  # fmt: skip
    main(**kwargs, extra=[a for a in sys.argv[1:] if a.split("=")[0] not in known])
