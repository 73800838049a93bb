"""mptrain from Python (a notebook, a script): the same run the `mptrain` command makes, in this process.

    import mptrain
    summary = mptrain.train(["model=mlp", "precision=mixed", "trainer.max_steps=100"])
    summary["final"]["accuracy"], summary["status"]
    result = mptrain.study(model="mlp", precisions=["fp32", "mixed", "bf16"], seeds=3, steps=200)
    result.table            # pandas: one row per mode, paired-seed verdicts against fp32
    answer = mptrain.check(my_model, (inputs, targets))
    answer.loss_scale, answer.first_fp16_overflow, answer.fp8_keep_bf16

`train` composes the config as the command line does (the same groups, overrides and checks), runs the job
through Hydra's own `run_job` (the run folder, `.hydra/` and the log as the CLI makes them) and returns the run's
summary.json as a dict, whatever its status; a refused config raises `mptrain.UserError` with the CLI's one line.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path


def train(overrides: Sequence[str] = ()) -> dict:
    """One training run with these overrides (as `mptrain <overrides>`); its summary (mptrain/inprocess.py)."""
    from mptrain.inprocess import run_overrides

    return run_overrides(overrides)


def study(model: str | Sequence[str] | None = None, data: str | Sequence[str] | None = None,
          precisions: Sequence[str] | None = None, seeds: int = 3, steps: int | None = None,
          overrides: Sequence[str] = (), numerics_steps: int = 20, out: str | Path | None = None,
          margin: str | Sequence[str] | None = None):
    """The precision study `mptrain-study` runs (mptrain/studies/study.py): the FP32 numerics scan, one run per precision
    and seed, the report's paired verdicts. `model` and `data` are a group option ("timm", "image_folder") or
    overrides (["model=timm", "model.name=resnet18"]); `overrides` go on top. Returns a StudyResult: `.table`
    (pandas), `.numerics`, `.out` (runs/, report/); print it for the summary. `margin`: the verdicts' equivalence
    margin as mptrain-report's --margin gives it ("0.3", "perplexity=2"; default: its defaults)."""
    from mptrain.studies.study import DEFAULT_MODES, run_study

    def as_overrides(value, group):
        if value is None:
            return []
        return [f"{group}={value}"] if isinstance(value, str) and "=" not in value else \
            [value] if isinstance(value, str) else [str(v) for v in value]  # fmt: skip

    return run_study([*as_overrides(model, "model"), *as_overrides(data, "dataset"), *overrides],
                     list(precisions or DEFAULT_MODES), seeds, steps, numerics_steps, out,
                     margin=[margin] if isinstance(margin, str) else margin)


def check(model, batch, loss_fn=None, coverage: float = 0.999, headroom: float = 8.0, exact_zeros: bool = True):
    """The numerics answer for a network of yours on one batch (mptrain/diagnose/check.py): the loss scale FP16
    needs, the outputs near FP16's limit, the Linear layers FP8 would starve; `answer.answer()` is the answer in a
    few lines, print it for the per-layer table below them. `exact_zeros`: gradient values that FP64 shows are
    rounding noise around an exact zero count as zero (they cannot decide the scale)."""
    from mptrain.diagnose.check import check as numerics_check

    return numerics_check(model, batch, loss_fn, coverage, headroom, exact_zeros)
