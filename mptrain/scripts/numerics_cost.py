"""What the numerics instruments cost: training step time with them off and with every=N, in one process.

    python -m mptrain.scripts.numerics_cost [every=100] [steps=300] [rounds=2] [batch=64] [pairs=10]

ResNet-20 (fp32) on synthetic 32x32x3 data through the real Trainer, two ways:
1. whole runs: the arms alternate (off, on, off, on, ...) so drift on a noisy machine hits
   both; each arm's median step time and the ratio on/off;
2. paired steps: a plain step and a measured step back to back on the same batch, `pairs`
   times; the median extra time of a measured step, spread over `every` steps, gives the
   ratio at every=N with the machine's drift cancelled pair by pair.
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir

from mptrain.build import build_trainer
from mptrain.paths import config_dir
from mptrain.telemetry.numerics import NumericsProbe
from mptrain.telemetry.tensorboard import TensorBoardLogger
from mptrain.trainer import Trainer


def make_trainer(cfg, probe: NumericsProbe | None, out: Path) -> tuple[Trainer, TensorBoardLogger]:
    """The real Trainer, built the way `mptrain` builds it (seeded, CPU)."""
    tb = TensorBoardLogger(out / "tb")
    return build_trainer(cfg, torch.device("cpu"), out, tb, probe, []), tb


def step_time(cfg, every: int | None, out: Path) -> float:
    trainer, tb = make_trainer(cfg, NumericsProbe(every, out) if every else None, out)
    results = trainer.fit()
    tb.close()
    return 1.0 / results["steps_per_s"]


def paired_extra_time(cfg, pairs: int, out: Path) -> tuple[float, float]:
    """Median plain step time and median extra time of a measured step, from back-to-back pairs."""
    probe = NumericsProbe(1, out)
    trainer, tb = make_trainer(cfg, None, out)
    batch = next(iter(trainer.data.train))
    plain, extra = [], []
    for i in range(pairs + 2):  # the first two pairs warm up
        times = []
        for numerics in (None, probe):
            trainer.numerics = numerics
            start = time.perf_counter()
            trainer._train_step(batch)
            times.append(time.perf_counter() - start)
        if i >= 2:
            plain.append(times[0])
            extra.append(times[1] - times[0])
    tb.close()
    return statistics.median(plain), statistics.median(extra)


def main(every: int = 100, steps: int = 300, rounds: int = 2, batch: int = 64, pairs: int = 10) -> None:
    overrides = ["dataset=synthetic", f"dataset.batch_size={batch}", f"trainer.max_steps={steps}",
                 f"trainer.log_every={steps}", "trainer.progress=false", "trainer.eval_max_batches=1"]
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides)
    times: dict[str, list[float]] = {"off": [], f"every={every}": []}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(rounds):
            for arm, n in (("off", None), (f"every={every}", every)):
                times[arm].append(step_time(cfg, n, Path(tmp) / f"{arm}-{r}"))
                print(f"round {r} {arm}: {times[arm][-1] * 1e3:.1f} ms/step", flush=True)
    print(f"ResNet-20 fp32, batch {batch}, {steps} steps x {rounds} rounds per arm, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    if rounds:
        off, on = (statistics.median(v) for v in times.values())  # a disturbed round does not move a median
        print(f"median step time: off {off * 1e3:.1f} ms, every={every} {on * 1e3:.1f} ms, ratio {on / off:.3f}")
    with tempfile.TemporaryDirectory() as tmp:
        plain, extra = paired_extra_time(cfg, pairs, Path(tmp))
    print(f"paired steps ({pairs} pairs): plain {plain * 1e3:.1f} ms, a measured step costs {extra * 1e3:.1f} ms more; "
          f"at every={every} that is a ratio of {1 + extra / every / plain:.3f}")


if __name__ == "__main__":
    main(**{k: int(v) for k, v in (a.split("=") for a in sys.argv[1:])})
