"""The report's PNG plots (matplotlib, Agg): curves per arm, speed and memory bars, the Fig. 3 histogram."""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from mptrain.report.runs import load_numerics, load_scalars  # noqa: E402

FP16_FLUSH, FP16_NORMAL, FP16_MAX_LOG2 = -24, -14, math.log2(65504)


def metric_curves(group: pd.DataFrame, metric: str, path: Path) -> Path | None:
    """Eval metric vs step per arm: the mean over seeds, with a band from the lowest to the highest seed."""
    return _curves(group, f"eval/{metric}", f"eval {metric}", path, log=False)


def train_loss_curves(group: pd.DataFrame, path: Path) -> Path | None:
    """Training loss vs step per arm (logged every `trainer.log_every` steps: denser than the evaluations)."""
    return _curves(group, "train/loss", "train loss", path, log=False)


def lost_update_curves(group: pd.DataFrame, path: Path) -> Path | None:
    """The case for master weights over training, from runs with telemetry.numerics.every: with FP32 weights or
    masters, the share of weight elements whose update FP16 weights would lose; where the weights are updated in
    their own FP16/BF16 (fp16_naive, bf16_pure, bf16_sr, bf16_kahan), the share that did not move."""
    return _curves(group, "numerics/lost_update_frac/all", "share of weight updates lost", path, log=False)


def loss_scale_curves(group: pd.DataFrame, path: Path) -> Path | None:
    """The scale per arm, with a skip timeline: one tick per skipped step under the curves (first seed's run)."""
    def skips(ax):
        low = ax.get_ylim()[0]
        for i, (arm, runs) in enumerate(group.groupby("arm", sort=False)):
            steps = next((s for s in runs["skip_steps"] if isinstance(s, list) and s), [])
            if steps:
                ax.plot(steps, [low * 2 ** (0.3 * i)] * len(steps), "|", markersize=8, color=f"C{i}",
                        label=f"{arm}: skipped steps ({len(steps)})")

    return _curves(group, "scaler/loss_scale", "loss scale", path, log=True, extra=skips)


def _curves(group: pd.DataFrame, prefix: str, label: str, path: Path, log: bool, extra=None) -> Path | None:
    fig, ax = plt.subplots(figsize=(7, 4))
    drawn = False
    for arm, runs in group.groupby("arm", sort=False):
        per_tag: dict[str, list[pd.Series]] = {}
        for run_dir in runs["run_dir"]:
            for tag, series in load_scalars(run_dir, (prefix,)).items():
                if tag == prefix or tag.startswith(prefix + "_"):  # scaler/loss_scale_g, scaler/loss_scale_d
                    per_tag.setdefault(tag, []).append(series)
        for tag, series in sorted(per_tag.items()):
            frame = pd.concat(series, axis=1).sort_index()
            name = arm + tag[len(prefix):].replace("_", " ")
            if len(frame) == 1:  # one evaluation: a point with the seeds' range, not an empty axis
                mean = frame.mean(axis=1)
                err = [mean - frame.min(axis=1), frame.max(axis=1) - mean]
                ax.errorbar(frame.index, mean, yerr=err, fmt="o", capsize=4, label=f"{name} (n={frame.shape[1]})")
                drawn = True
                continue
            line = ax.plot(frame.index, frame.mean(axis=1), label=f"{name} (n={frame.shape[1]})", marker=".")[0]
            if frame.shape[1] > 1:
                ax.fill_between(frame.index, frame.min(axis=1), frame.max(axis=1), alpha=0.2, color=line.get_color())
            drawn = True
    if not drawn:
        plt.close(fig)
        return None
    ax.set(xlabel="step", ylabel=label)
    ax.set_xlim(left=0)  # from the first step: a lone end-of-run point sits at its step, not on a 3-step axis
    if log:
        ax.set_yscale("log", base=2)
    if extra is not None:
        extra(ax)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return _save(fig, path)


def forest(tables: dict, titles: dict, path: Path) -> Path | None:
    """The answer at a glance: per experiment, each arm's paired Δ vs fp32 with its 95 % interval (thin) and the
    90 % interval equivalence is judged on (thick), against the ±δ band; accuracy in points."""
    from mptrain.report.tables import unit_of

    shown = {k: t[~t["control"] & t["paired_delta"].notna()] for k, t in tables.items()}
    shown = {k: t for k, t in shown.items() if len(t)}
    if not shown:
        return None
    heights = [max(1.2, 0.45 * len(t) + 0.8) for t in shown.values()]
    fig, axes = plt.subplots(len(shown), 1, figsize=(10, sum(heights)), squeeze=False,
                             gridspec_kw={"height_ratios": heights})
    for ax, (key, t) in zip(axes[:, 0], shown.items()):
        metric = tables[key].attrs["metric"]
        k, unit = unit_of(metric)
        rows = list(range(len(t)))[::-1]
        margin = t["margin"].dropna()
        if len(margin):
            ax.axvspan(-k * margin.iloc[0], k * margin.iloc[0], color="C2", alpha=0.12, label="±δ (equivalence)")
        ax.axvline(0, color="k", linewidth=0.8)
        for y, (_, r) in zip(rows, t.iterrows()):
            color = {"worse": "C3", "better": "C0", "equivalent": "C2"}.get(r["verdict"], "0.4")
            if pd.notna(r["ci_low"]):
                ax.plot([k * r["ci_low"], k * r["ci_high"]], [y, y], color=color, linewidth=1.2)
                ax.plot([k * r["tost_low"], k * r["tost_high"]], [y, y], color=color, linewidth=4, alpha=0.6)
            ax.plot(k * r["paired_delta"], y, "o", color=color)
        ax.set_yticks(rows, [f"{r['arm']}: {r['verdict']} (n={int(r['pairs'])})" for _, r in t.iterrows()],
                      fontsize=8)
        better = "higher" if tables[key].attrs["higher_is_better"] else "lower"
        ax.set_xlabel(f"paired Δ {metric} vs fp32{' (points)' if unit else ''} ({better} is better)", fontsize=8)
        ax.set_title(titles[key], fontsize=9, loc="left")
        ax.grid(axis="x", alpha=0.3)
        ax.set_ylim(-0.7, len(t) - 0.3)
    axes[0, 0].legend(fontsize=7, loc="lower right")
    return _save(fig, path)


MIN_DOSE_SPAN = 1.0  # percentage points of lost updates between the settings' extremes


def dose_points(tables: dict) -> dict[tuple, list[tuple]]:
    """Per (model, dataset, metric, arm) seen in >= 2 settings: (what the setting changes, lost-update share in %,
    paired Δ, 95 % interval low, high) per setting, by share; Δ in the metric's reading unit (accuracy in points)."""
    from mptrain.report.tables import unit_of

    found: dict[tuple, list] = {}
    for (model, dataset, setting), t in tables.items():
        shown = t[~t["control"] & t["paired_delta"].notna() & t["lost_update_frac"].notna()]
        for _, r in shown.iterrows():
            found.setdefault((model, dataset, t.attrs["metric"], r["arm"]), []).append((setting, r))
    points = {}
    for key, rows in found.items():
        shares = [100 * r["lost_update_frac"] for _, r in rows]
        if len({setting for setting, _ in rows}) < 2 or max(shares) - min(shares) < MIN_DOSE_SPAN:
            continue  # one dose, or settings that barely change it (weight decay off): no dose-response to draw
        k, _ = unit_of(key[2])
        common = set.intersection(*(set(setting.split()) for setting, _ in rows))
        points[key] = sorted(((" ".join(o for o in setting.split() if o not in common) or "-",
                               100 * r["lost_update_frac"], k * r["paired_delta"], k * r["ci_low"], k * r["ci_high"])
                              for setting, r in rows), key=lambda p: p[1])
    return points


def dose_response(tables: dict, path: Path) -> Path | None:
    """Sec. 3.1's dose-response: where one model and dataset ran in several settings (learning rates, say), each arm's
    paired Δ (95 % interval) against the share of its weight updates lost that it measured; one line per arm."""
    from mptrain.report.tables import unit_of

    points = dose_points(tables)
    if not points:
        return None
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for i, ((model, dataset, metric, arm), rows) in enumerate(sorted(points.items())):
        labels, x, y, low, high = zip(*rows)
        err = [[max(0.0, d - lo) if pd.notna(lo) else 0.0 for d, lo in zip(y, low)],
               [max(0.0, hi - d) if pd.notna(hi) else 0.0 for d, hi in zip(y, high)]]
        ax.errorbar(x, y, yerr=err, fmt="o-", color=f"C{i}", capsize=3,
                    label=f"{model} on {dataset}, {arm}: {metric}{' (points)' if unit_of(metric)[1] else ''}")
        for label, xi, yi in zip(labels, x, y):
            ax.annotate(label, (xi, yi), fontsize=7, textcoords="offset points", xytext=(4, 4))
    ax.axhline(0, color="k", linewidth=0.8)
    ax.set_xlabel("share of the arm's weight updates lost (%, its numerics)")
    ax.set_ylabel("paired Δ vs the control (95 % CI)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return _save(fig, path)


def speed_memory_bars(table: pd.DataFrame, path: Path) -> Path | None:
    """Per arm, samples/s (the median run, with the runs' range as an error bar) and peak memory, values written."""
    if table["samples_per_s"].isna().all():
        return None
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for ax, column, label in ((axes[0], "samples_per_s", "samples/s"), (axes[1], "peak_memory_mb", "peak memory (MiB)")):
        colors = ["0.3" if c else "C0" for c in table["control"]]
        values = table[column].fillna(0)
        bars = ax.bar(range(len(table)), values, color=colors)
        ax.bar_label(bars, labels=[f"{v:.4g}" for v in values], fontsize=7)
        ax.set_xticks(range(len(table)), table["arm"], rotation=30, ha="right", fontsize=7)
        ax.set_ylabel(label)
        ax.margins(y=0.15)
        ax.grid(axis="y", alpha=0.3)
    return _save(fig, path)


def exponent_histogram(group: pd.DataFrame, path: Path) -> Path | None:
    """The paper's Fig. 3: activation-gradient exponents of the first run with numerics (fp32 first), with
    FP16's limits drawn and the same histogram shifted by the loss scale of a scaled arm."""
    records, arm = [], None
    for _, run in group.sort_values("mode_rank").iterrows():
        records = load_numerics(run["run_dir"])
        if records:
            arm = run["arm"]
            break
    if not records:
        return None
    bins = next((len(r["log2_hist"]) for r in records if r["kind"] in ("activation", "weight") and "log2_hist" in r), 0)
    if not bins:
        return None
    exponents = np.arange(-64, -64 + bins)
    fig, ax = plt.subplots(figsize=(7.5, 3.8))
    for kind, color in (("activation", "C0"), ("weight", "C2")):
        hist = np.sum([r["log2_hist"] for r in records if r["kind"] == kind], axis=0)
        if np.ndim(hist) and hist.sum():
            ax.bar(exponents, hist / hist.sum(), width=0.9, alpha=0.55, color=color, label=f"{kind} gradients ({arm})")
    scale = _scale_to_show(group)
    if scale:
        hist = np.sum([r["log2_hist"] for r in records if r["kind"] == "activation"], axis=0)
        if np.ndim(hist) and hist.sum():
            ax.step(exponents + math.log2(scale[1]), hist / hist.sum(), where="mid", color="C3",
                    label=f"activation gradients x {scale[1]:g} ({scale[0]} final loss scale)")  # fmt: skip
    for x, text in ((FP16_FLUSH, "2^-24: flushed below"), (FP16_NORMAL, "2^-14: subnormal below"),
                    (FP16_MAX_LOG2, "65504: overflow above")):  # fmt: skip
        ax.axvline(x, color="k", linestyle="--", linewidth=0.8)
        ax.text(x, ax.get_ylim()[1] * 0.95, " " + text, fontsize=7, rotation=90, va="top")
    ax.axvspan(exponents[0], FP16_FLUSH, color="red", alpha=0.06)
    ax.set(xlabel="log2 |gradient|", ylabel="share of non-zero values", xlim=(-60, 20))
    ax.legend(fontsize=7, loc="upper left")
    return _save(fig, path)


def forward_headroom(per_arm: dict[str, dict[str, float]], path: Path) -> Path | None:
    """Per-layer forward amax (`runs.forward_amax`: the largest over the run's numerics steps), one line per arm
    (first seed with numerics), in forward order, against FP16's 65504."""
    if not per_arm:
        return None
    fig, ax = plt.subplots(figsize=(7.5, 3.8))
    layers = list(next(iter(per_arm.values())))
    for arm, amax in per_arm.items():
        ax.semilogy(range(len(layers)), [max(amax.get(layer, np.nan), 1e-8) for layer in layers], marker=".",
                    linewidth=0.8, label=arm)
    ax.axhline(65504, color="k", linestyle="--", linewidth=0.8)
    ax.text(0, 65504, " 65504: FP16 overflows above", fontsize=7, va="bottom")
    step = max(1, len(layers) // 24)
    ax.set_xticks(range(0, len(layers), step), [layers[i].split(".", 1)[-1][-22:] for i in range(0, len(layers), step)],
                  rotation=90, fontsize=6)
    ax.set(ylabel="max |output|", xlabel="module, in forward order")
    ax.legend(fontsize=7)
    return _save(fig, path)


def fp8_operands(group: pd.DataFrame, path: Path) -> Path | None:
    """Fig. 3 for FP8: floor(log2) of each Linear operand once tensorwise-scaled (amax onto the format's max),
    summed over layers and numerics steps, against E4M3 (inputs, weights) and E5M2 (output gradients) limits.
    From the first fp8 run with numerics (else the first run: what FP8 would do to it)."""
    from mptrain.telemetry.fp8_stats import EXPONENTS, FORMATS, OPERANDS

    ordered = group.assign(fp8_first=group["precision"] != "fp8").sort_values(["fp8_first", "mode_rank", "seed"])
    for _, run in ordered.iterrows():
        records = [r for r in load_numerics(run["run_dir"]) if r["kind"] == "fp8" and "log2_hist" in r]
        if records:
            break
    else:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6), sharey=True)
    for ax, fmt in zip(axes, ("e4m3", "e5m2")):
        operands = [o for o, f in OPERANDS.items() if f == fmt]
        for i, operand in enumerate(operands):
            hist = np.sum([r["log2_hist"] for r in records if r["layer"].endswith("." + operand)], axis=0)
            if np.ndim(hist) and hist.sum():
                ax.bar(EXPONENTS.numpy() + 0.45 * i, hist / hist.sum(), width=0.45, align="edge", alpha=0.7,
                       color=f"C{i}", label=operand)  # bin e spans [2^e, 2^(e+1))
        top, tiny, normal = FORMATS[fmt]
        for x, text in ((math.log2(tiny / 2), f"2^{math.log2(tiny / 2):g}: flushed below"),
                        (math.log2(normal), f"2^{math.log2(normal):g}: subnormal below"),
                        (math.log2(top), f"{top:g}: the amax lands here")):  # fmt: skip
            ax.axvline(x, color="k", linestyle="--", linewidth=0.8)
            ax.text(x, 0.97, " " + text, fontsize=7, rotation=90, va="top", transform=ax.get_xaxis_transform())
        ax.axvspan(int(EXPONENTS[0]), math.log2(tiny / 2), color="red", alpha=0.06)
        ax.set(title=f"{fmt.upper()} ({', '.join(operands)})", xlabel="log2 |value x scale|")
        ax.legend(fontsize=7, loc="upper left")
    axes[0].set_ylabel(f"share of non-zero values ({run['arm']})")
    return _save(fig, path)


def mx_operands(group: pd.DataFrame, path: Path) -> Path | None:
    """What each block format does to the operands of each product, per arm (precision=mx runs with numerics):
    the quantisation error and the share of non-zero values flushed inside their block, averaged over the
    layers and measured steps of the arm's first seed."""
    arms = {}
    for _, run in group[group["precision"] == "mx"].sort_values("seed").iterrows():
        records = [r for r in load_numerics(run["run_dir"]) if r["kind"] == "mx"]
        if records and run["arm"] not in arms:
            arms[run["arm"]] = records
    if not arms:
        return None
    operands = sorted({".".join(r["layer"].split(".")[-2:]) for rs in arms.values() for r in rs})  # input.forward, ...
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.2 + 0.3 * len(arms)), sharey=True)
    width = 0.8 / len(operands)
    for ax, (field, title) in zip(axes, (("rel_error", "quantisation error ||q(x) - x|| / ||x||"),
                                         ("flushed_frac", "non-zero values flushed in their block"))):
        for i, operand in enumerate(operands):
            means = [np.mean([r[field] for r in rs if r["layer"].endswith("." + operand)] or [np.nan])
                     for rs in arms.values()]
            ax.barh(np.arange(len(arms)) + i * width, means, height=width, color=f"C{i}", label=operand)
        ax.set(title=title, yticks=np.arange(len(arms)) + 0.4 - width / 2, yticklabels=list(arms))
    axes[1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))  # outside: 4-bit bars fill the panels
    return _save(fig, path)


def _scale_to_show(group: pd.DataFrame) -> tuple[str, float] | None:
    for _, run in group.sort_values("mode_rank").iterrows():
        scale = run["final_loss_scale"]
        if run["status"] == "completed" and isinstance(scale, float) and scale > 1 and math.isfinite(scale):
            return run["arm"], scale
    return None


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
