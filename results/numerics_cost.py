"""What the numerics instruments cost: training step time with them off and with every=N, in one process.

    python results/numerics_cost.py [every=100] [steps=300] [rounds=2] [batch=64]

ResNet-20 (fp32) on synthetic 32x32x3 data through the real Trainer; the arms alternate
(off, on, off, on, ...) so drift on a noisy machine hits both; prints each arm's median step
time and the ratio on/off.
"""

from __future__ import annotations

import statistics
import sys
import tempfile
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir

from mptrain.cli import config_dir
from mptrain.data import build_data
from mptrain.precision import Precision
from mptrain.tasks import build_task
from mptrain.telemetry.numerics import NumericsProbe
from mptrain.telemetry.tensorboard import TensorBoardLogger
from mptrain.trainer import Trainer


def step_time(cfg, every: int | None, out: Path) -> float:
    torch.manual_seed(0)
    device = torch.device("cpu")
    precision = Precision(cfg.precision, device)
    data = build_data(cfg.dataset, device, cfg.seed)
    task = build_task(cfg.model, data, precision)
    tb = TensorBoardLogger(out / "tb")
    probe = NumericsProbe(every, out) if every else None
    trainer = Trainer(cfg, task, data, precision, device, tb, probe)
    results = trainer.fit()
    tb.close()
    return 1.0 / results["steps_per_s"]


def main(every: int = 100, steps: int = 300, rounds: int = 2, batch: int = 64) -> None:
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
    off, on = (statistics.median(v) for v in times.values())  # a disturbed round does not move a median
    print(f"ResNet-20 fp32, batch {batch}, {steps} steps x {rounds} rounds per arm, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    print(f"median step time: off {off * 1e3:.1f} ms, every={every} {on * 1e3:.1f} ms, ratio {on / off:.3f}")


if __name__ == "__main__":
    main(**{k: int(v) for k, v in (a.split("=") for a in sys.argv[1:])})
