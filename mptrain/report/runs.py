"""Runs on disk → one pandas row per run, and their TensorBoard scalars.

A run is a folder holding `summary.json` (written however the run ended). Scalars are
read with TensorBoard's own reader, every point kept (its default samples 10,000).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd

from mptrain.errors import UserError
from mptrain.schema.precision import MODES, preset_name

CONTROL = "fp32"
ARM_OPTIM = ("optim.state",)  # optim.* overrides that make an arm (not a setting)
EXECUTION = ("cpu_fp16", "cpu_bf16")  # how the CPU runs FP16/BF16, the same for every arm: part of the setting
MODE_ORDER = list(MODES)


def find_runs(dirs: list[Path]) -> list[Path]:
    runs = []
    for d in dirs:
        if not d.is_dir():
            raise UserError(f"{d} is not a directory; give the folder of a run or a sweep (e.g. multirun/<date>)")
        runs += sorted(p.parent for p in d.rglob("summary.json") if "report" not in p.relative_to(d).parts[:-1])
    if not runs:
        shown = ", ".join(str(d) for d in dirs)
        raise UserError(f"no runs under {shown}: a run folder holds summary.json; run mptrain (or mptrain -m) first")
    return runs


def arm_label(summary: dict) -> str:
    """The precision mode, its loss scale and any other precision.* override: `fp32`, `mixed loss_scale=1`."""
    extra = [o.lstrip("+~").split(".", 1)[1] for o in summary.get("overrides", []) if o.lstrip("+~").startswith("precision.")]
    extra = [o for o in extra if not o.startswith(EXECUTION)]  # str.startswith takes the tuple
    # the optimizer state's precision is a precision technique too (optim.state=8bit): an arm, not a setting
    extra += [o.lstrip("+~").removeprefix("optim.") for o in summary.get("overrides", [])
              if o.lstrip("+~").startswith(ARM_OPTIM)]
    if "loss_scale" in summary:  # the resolved scale, however it was chosen (a mode's default, an experiment, the CLI)
        scale = summary["loss_scale"]
        extra = [o for o in extra if not o.startswith("loss_scale=")]
        if scale is not None:
            extra.insert(0, f"loss_scale={scale:g}" if isinstance(scale, (int, float)) else f"loss_scale={scale}")
    arithmetic = summary.get("arithmetic") or {}  # a preset (mixed_accum16) switches sec. 3.3 off unseen in overrides
    for key, value in (("accumulate", "fp16"), ("accumulate_block", arithmetic.get("accumulate_block")),
                       ("reductions", "fp16")):
        if arithmetic.get(key) == value and value is not None and f"{key}={value}" not in extra:
            extra.append(f"{key}={value}")
    if arithmetic.get("norms") == "fp16" and not any(o.startswith(("keep_norm_fp32", "keep_batchnorm")) for o in extra):
        extra.append("keep_norm_fp32=false")  # a preset (fp16_naive_norm16) puts the norms in FP16 unseen too
    return " ".join([summary.get("precision") or "?", *extra])


def setting_label(summary: dict) -> str:
    """The overrides that make runs different experiments (besides model, dataset, mode and seed): `model.depth=14`,
    and on a CPU how FP16 and BF16 ran (`precision.cpu_fp16=emulate`), which a sweep's fp32 control shares with its
    low-precision arms."""
    keep = []
    for override in summary.get("overrides", []):
        override = override.lstrip("+~")
        key = override.split("=", 1)[0]
        if key in ("model", "dataset", "seed") + RUN_HANDLING or key.startswith("hydra."):
            continue
        if key in ARM_OPTIM:
            continue
        name = key.removeprefix("precision.")
        if key.startswith("precision") and not (name in EXECUTION and name not in summary):
            continue  # summaries written before `cpu_fp16`/`cpu_bf16` were recorded: the override says it
        keep.append(override)
    keep += [f"precision.{name}={summary[name]}" for name in EXECUTION if summary.get(name)]  # as resolved
    return " ".join(sorted(keep))


def drop_unused_policies(runs: pd.DataFrame) -> pd.DataFrame:
    """A CPU policy (`precision.cpu_fp16=...`) keeps runs apart only where it decided something: where no run of an
    experiment ran FP16 (BF16) kernels, its cpu_fp16 (cpu_bf16) is dropped from the setting, so the seeds one machine
    added to another's sweep (whose CPU resolves `auto` differently) pool with them."""
    if runs.empty:
        return runs
    base = runs["setting"].map(lambda s: " ".join(o for o in s.split() if not o.startswith("precision.cpu_")))
    for name in ("fp16", "bf16"):
        unused = runs.groupby([runs["model"], runs["dataset"], base])[f"{name}_kernels"].transform(
            lambda kernels: kernels.isna().all())  # None: the mode ran none (UNKNOWN: a summary too old to say)
        policy = f"precision.cpu_{name}="
        runs.loc[unused, "setting"] = runs.loc[unused, "setting"].map(
            lambda s, policy=policy: " ".join(o for o in s.split() if not o.startswith(policy)))
    return runs


UNKNOWN = "unknown"
SCALARS_FILE = "scalars.json"  # an exported run's TensorBoard scalars
# how a run was handled, not what it computed: a resumed run is the same experiment as its first part
RUN_HANDLING = ("trainer.progress", "trainer.resume", "trainer.checkpoint_every")
TRAIN_LOSS = "train_loss"  # `--metric train_loss`: the mean training loss over the last 10 % of a run's steps
TRAIN_TAIL = 0.1


def load_runs(dirs: list[Path], metric_choice: str = "primary") -> pd.DataFrame:
    """One row per run; `metric` is the run's primary metric (final, held-out), or with `metric_choice="train_loss"`
    its training loss over the last 10 % of its steps (read from TensorBoard)."""
    rows = []
    for run_dir in find_runs(dirs):
        try:
            summary = json.loads((run_dir / "summary.json").read_text())
        except (OSError, ValueError) as e:
            raise UserError(f"{run_dir / 'summary.json'} cannot be read ({e}); delete the run or rerun it") from None
        metric = summary.get("primary_metric")
        final = summary.get("final") or {}
        if metric_choice == TRAIN_LOSS:
            metric, final = TRAIN_LOSS, {TRAIN_LOSS: train_loss_tail(run_dir)}
        scale = summary.get("final_loss_scale")
        rows.append({
            "run_dir": str(run_dir),
            "model": summary.get("model"),
            "dataset": summary.get("dataset"),
            "family": summary.get("family"),
            "setting": setting_label(summary),
            "precision": summary.get("precision"),
            "preset": preset_name(summary.get("precision_preset"), summary.get("precision")),  # a plan names arms by preset
            "arm": arm_label(summary),
            "plan": summary.get("plan"),
            "seed": summary.get("seed"),
            "status": summary.get("status"),
            "metric_name": metric,
            "higher_is_better": metric != TRAIN_LOSS and summary.get("higher_is_better", _higher_is_better(metric)),
            "metric": _finite(final.get(metric)),
            "steps": summary.get("steps"),
            "samples_per_s": _finite(summary.get("samples_per_s")),
            "peak_memory_mb": _finite((summary.get("peak_memory_bytes") or math.nan) / 2**20),
            "bytes_per_param": _bytes_per_param(summary.get("bytes_per_parameter")),
            "skipped_steps": summary.get("skipped_steps"),
            "final_loss_scale": per_network(scale) if isinstance(scale, dict) else scale,
            "scale_verdict": scale_verdicts(summary.get("loss_scale_verdict")),
            "skip_steps": sorted(s for v in (summary.get("loss_scale_verdict") or {}).values()
                                 for s in v.get("skip_steps", [])),
            **lost_updates(load_numerics(run_dir)),
            "wall_time_s": summary.get("wall_time_s"),
            "error": summary.get("error"),
            **{f"{name}_kernels": summary.get(f"{name}_kernels", UNKNOWN) for name in ("fp16", "bf16")},
        })  # fmt: skip
    runs = drop_unused_policies(pd.DataFrame(rows))
    runs["mode_rank"] = runs["precision"].map(lambda m: MODE_ORDER.index(m) if m in MODE_ORDER else len(MODE_ORDER))
    return runs.sort_values(["model", "dataset", "setting", "mode_rank", "arm", "seed"], ignore_index=True)


def _higher_is_better(metric: str | None) -> bool:
    """For summaries written before `higher_is_better`: the metric's family record (mptrain/families.py)."""
    from mptrain.families import METRICS

    return METRICS[metric].higher_is_better if metric in METRICS else True


def _bytes_per_param(per_network: dict | None) -> float:
    """Weights + gradients + masters + optimizer state per parameter, the mean over a run's networks."""
    totals = [v["total"] for v in (per_network or {}).values() if isinstance(v, dict) and "total" in v]
    return sum(totals) / len(totals) if totals else math.nan


def scale_verdicts(verdicts: dict | None) -> str:
    """`normal probing`, or per network `g normal probing / d trouble` (empty: no scaler)."""
    if not verdicts:
        return ""
    if len(verdicts) == 1:
        return next(iter(verdicts.values()))["verdict"]
    return " / ".join(f"{name} {v['verdict']}" for name, v in verdicts.items())


def per_network(values: dict) -> str:
    """A GAN's per-network loss scales as `g 4096 / d 2048`."""
    return " / ".join(f"{name} {value:g}" if isinstance(value, (int, float)) else f"{name} {value}"
                      for name, value in values.items())


def _finite(value):
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else math.nan


# tags as runs before 2026-12-07 wrote them (`amp/` in every scaled mode, AMP or not), read under today's names
RENAMED_TAGS = {"amp/loss_scale": "scaler/loss_scale", "amp/skipped_steps": "scaler/skipped_steps"}


def current_tag(tag: str) -> str:
    """A tag under today's name: `amp/loss_scale_g` reads as `scaler/loss_scale_g`."""
    for old, new in RENAMED_TAGS.items():
        if tag.startswith(old):
            return new + tag[len(old):]
    return tag


def load_scalars(run_dir: str | Path, prefixes: tuple[str, ...]) -> dict[str, pd.Series]:
    """Every point of the scalar tags starting with one of `prefixes`, as step-indexed Series, under today's tag
    names (an older run's `amp/loss_scale` is `scaler/loss_scale`)."""
    return {current_tag(tag): values for tag, values in _read_scalars(run_dir, prefixes).items()}


def _read_scalars(run_dir: str | Path, prefixes: tuple[str, ...]) -> dict[str, pd.Series]:
    from tensorboard.backend.event_processing.event_accumulator import SCALARS, EventAccumulator

    tb = Path(run_dir) / "tb"
    if not tb.is_dir():  # an exported record (mptrain-report --export-runs) keeps the scalars the report reads
        exported = Path(run_dir) / SCALARS_FILE
        if not exported.is_file():
            return {}
        points = json.loads(exported.read_text())
        return {tag: _by_step(tag, [s for s, _ in values], [v for _, v in values])
                for tag, values in points.items() if current_tag(tag).startswith(prefixes)}
    acc = EventAccumulator(str(tb), size_guidance={SCALARS: 0})
    acc.Reload()
    series = {}
    for tag in acc.Tags()["scalars"]:
        if current_tag(tag).startswith(prefixes):
            events = acc.Scalars(tag)
            series[tag] = _by_step(tag, [e.step for e in events], [e.value for e in events])
    return series


def _by_step(tag: str, steps: list[int], values: list[float]) -> pd.Series:
    """One value per step, the last written: a run resumed from a checkpoint logs again the steps it had logged
    after that checkpoint before it was cut off, and the resumed values are the ones its later steps follow."""
    series = pd.Series(values, index=steps, name=tag)
    return series[~series.index.duplicated(keep="last")].sort_index()


def train_loss_tail(run_dir: str | Path) -> float:
    """Mean `train/loss` over the last 10 % of the logged steps (NaN where the task logs none, e.g. a GAN)."""
    series = load_scalars(run_dir, ("train/loss",)).get("train/loss")
    if series is None or series.empty:
        return math.nan
    return _finite(float(series[series.index >= (1 - TRAIN_TAIL) * series.index.max()].mean()))


def lost_updates(records: list[dict]) -> dict[str, float]:
    """Over every measured step: the share of weight elements whose update FP16 would lose (FP32 weights or
    masters) or did not move (weights in FP16/bf16); for the latter, the share nearest rounding drops and the
    share of that update mass the weights kept (stochastic rounding, Kahan summation)."""
    lost = [r for r in records if r["kind"] == "lost_update"]
    total = sum(r["count"] for r in lost)

    def share(key: str) -> float:
        return sum(r["count"] * r[key] for r in lost) / total if total and all(key in r for r in lost) else math.nan

    dropped = sum(r.get("dropped_mass", 0.0) for r in lost)
    kept = sum(r.get("kept_mass", 0.0) for r in lost) / dropped if dropped > 0 else math.nan
    return {"lost_update_frac": share("lost_update_frac"), "nearest_drop_frac": share("nearest_drop_frac"),
            "drop_kept_frac": kept}  # fmt: skip


def forward_amax(group: pd.DataFrame) -> dict[str, dict[str, float]]:
    """Per arm (its first seed with numerics), each module's largest forward |output| over the measured steps,
    in forward order."""
    per_arm = {}
    for arm, runs in group.sort_values(["mode_rank", "seed"]).groupby("arm", sort=False):
        records = next((r for r in (load_numerics(d) for d in runs["run_dir"]) if r), [])
        amax: dict[str, float] = {}
        for r in records:
            if r["kind"] == "forward":
                amax[r["layer"]] = max(amax.get(r["layer"], 0.0), r["amax"])
        if amax:
            per_arm[arm] = amax
    return per_arm


def load_numerics(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / "numerics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
