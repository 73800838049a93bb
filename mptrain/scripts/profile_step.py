"""Where a training step's time goes: torch.profiler over N Trainer steps on one batch, the ops by self time.

    python -m mptrain.scripts.profile_step model=transformer precision=bf16 [--steps 10] [--warmup 3] [--rows 15]

Any argument that is not an option is a Hydra override, as for `mptrain`. The step is the one `mptrain-bench`'s
paired overhead times (Trainer._train_step: forward, backward, the precision stepper), on the first batch of
the training split, after `--warmup` untimed steps. Prints the top ops by self CPU time and how the step splits
into casts (aten::_to_copy, copy_), matrix products and the rest: the figures behind a bench ratio.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

CASTS = ("aten::_to_copy", "aten::copy_", "aten::to")
PRODUCTS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::linear", "aten::convolution",
            "aten::mkldnn_convolution", "aten::_scaled_dot_product_flash_attention_for_cpu",
            "aten::_scaled_dot_product_flash_attention_for_cpu_backward", "aten::convolution_backward",
            "aten::_lstm_cell", "aten::lstm")  # fmt: skip


def profile(overrides: list[str], steps: int, warmup: int):
    import torch

    from mptrain.bench.measure import RecordingLogger
    from mptrain.build import build_trainer, resolve_device
    from mptrain.console import compose
    from mptrain.schema import validate

    cfg = compose([*overrides, "trainer.progress=false"])
    validate(cfg)
    device = resolve_device(cfg.trainer.device)
    with tempfile.TemporaryDirectory(prefix="mptrain-profile-") as tmp:
        trainer = build_trainer(cfg, device, Path(tmp), RecordingLogger(), None, [])
    batch = next(iter(trainer.data.train))
    for _ in range(warmup):
        trainer._train_step(batch)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            trainer._train_step(batch)
    return prof.key_averages()


def split(averages, steps: int) -> dict[str, float]:
    """ms per step: casts, matrix products, everything else (self times, so nothing counts twice)."""
    casts = sum(a.self_cpu_time_total for a in averages if a.key in CASTS)
    products = sum(a.self_cpu_time_total for a in averages if a.key in PRODUCTS)
    total = sum(a.self_cpu_time_total for a in averages)
    return {name: us / 1e3 / steps for name, us in
            (("total", total), ("casts", casts), ("products", products), ("other", total - casts - products))}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m mptrain.scripts.profile_step", description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--rows", type=int, default=15)
    args, overrides = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    averages = profile(overrides, args.steps, args.warmup)
    print(averages.table(sort_by="self_cpu_time_total", row_limit=args.rows))
    parts = split(averages, args.steps)
    print(f"per step: {parts['total']:.1f} ms of op self time: casts {parts['casts']:.1f} ms "
          f"({parts['casts'] / parts['total']:.0%}), matrix products {parts['products']:.1f} ms "
          f"({parts['products'] / parts['total']:.0%}), other {parts['other']:.1f} ms")


if __name__ == "__main__":
    main()
