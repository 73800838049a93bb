"""The paper's Fig. 2b for runs of mptrain: the histogram of weight-gradient exponents, and the share that FP16 cannot
hold (below 2^-24, its smallest subnormal), beside the paper's "approximately 5 %" for its Mandarin DeepSpeech 2.

    python -m mptrain.scripts.weight_grad_exponents DIR [DIR ...] [--arm fp32] [--png F] [--md F]

DIR holds runs with numerics (`telemetry.numerics.every`): a sweep's folder or its exported records. Per arm (the
precision preset a run ran) the weight-gradient exponent histograms are summed over layers, numerics steps and
seeds (FP32 values, unscaled: floor(log2 |g|) of every non-zero element; zeros counted apart); the table gives
each arm's share of non-zero weight gradients below 2^-24 and below 2^-14 (FP16's subnormals), the share exactly
zero, and the share of updates lost (FP16 weights: updates below half an FP16 ulp of the weight). Where the records
are per step (a sweep's own numerics.jsonl, not exported records), the share below 2^-24 is also given per step of
the first arm. --png draws the first arm's histogram with FP16's limits, as Fig. 2b does.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np

from mptrain.errors import UserError

FIRST_BIN = -64  # log2_hist's first bin: floor(log2 |g|) = -64 (mptrain/telemetry/numerics.py EXPONENTS)
PAPER_SHARE = 0.05  # Fig. 2b: "approximately 5 % of weight gradient values have exponents smaller than -24"


def shares(hist: np.ndarray) -> dict[str, float]:
    exponents = np.arange(FIRST_BIN, FIRST_BIN + len(hist))
    total = hist.sum()
    return {"below_2^-24": float(hist[exponents < -24].sum() / total) if total else float("nan"),
            "below_2^-14": float(hist[exponents < -14].sum() / total) if total else float("nan")}


def collect(dirs: list[Path]) -> dict[str, dict]:
    """arm -> summed weight histogram, zero and total counts, lost-update counts, seeds, per-step shares."""
    from mptrain.report.runs import find_runs, load_numerics

    arms: dict[str, dict] = {}
    for run_dir in find_runs(dirs):
        summary = json.loads((run_dir / "summary.json").read_text())
        arm = summary.get("precision_preset") or summary.get("precision")
        records = load_numerics(run_dir)
        weights = [r for r in records if r["kind"] == "weight" and "log2_hist" in r]
        if not weights:
            continue
        a = arms.setdefault(arm, {"hist": 0, "zero": 0.0, "count": 0.0, "lost": 0.0, "updates": 0.0, "seeds": set(),
                                  "by_step": defaultdict(lambda: 0), "lost_by_step": defaultdict(lambda: [0.0, 0.0])})
        a["seeds"].add(summary.get("seed"))
        for r in weights:
            hist = np.asarray(r["log2_hist"], dtype=float)
            a["hist"] = a["hist"] + hist
            a["zero"] += r.get("zero_frac", 0.0) * r["count"]
            a["count"] += r["count"]
            a["by_step"][r["step"]] = a["by_step"][r["step"]] + hist
        for r in records:
            if r["kind"] == "lost_update":
                a["lost"] += r["lost_update_frac"] * r["count"]
                a["updates"] += r["count"]
                a["lost_by_step"][r["step"]][0] += r["lost_update_frac"] * r["count"]
                a["lost_by_step"][r["step"]][1] += r["count"]
    if not arms:
        raise UserError(f"no runs with weight-gradient numerics under {', '.join(map(str, dirs))}; train with "
                        "telemetry.numerics.every=N")
    return arms


def markdown(arms: dict[str, dict], first: str) -> str:
    lines = ["| arm | seeds | non-zero weight gradients below 2^-24 (FP16 flushes them) | below 2^-14 (FP16 subnormal) "
             "| exactly zero | updates FP16 weights lose |", "|---|---|---|---|---|---|"]
    for arm, a in arms.items():
        s = shares(a["hist"])
        lost = f"{100 * a['lost'] / a['updates']:.1f} %" if a["updates"] else "-"
        lines.append(f"| {arm} | {len(a['seeds'])} | {100 * s['below_2^-24']:.3f} % | {100 * s['below_2^-14']:.2f} % | "
                     f"{100 * a['zero'] / a['count']:.3f} % | {lost} |")
    lines.append(f"\nThe paper (Fig. 2b, Mandarin DeepSpeech 2): about {100 * PAPER_SHARE:.0f} % below 2^-24.")
    steps, lost = arms[first]["by_step"], arms[first]["lost_by_step"]
    if len(steps) > 1:
        lines += ["", f"{first}, through training (seeds summed):", "",
                  "| step | weight gradients below 2^-24 | updates FP16 weights would lose |", "|---|---|---|"]
        lines += [f"| {step} | {100 * shares(hist)['below_2^-24']:.3f} % | "
                  f"{100 * lost[step][0] / lost[step][1]:.1f} % |" if lost[step][1] else
                  f"| {step} | {100 * shares(hist)['below_2^-24']:.3f} % | - |" for step, hist in sorted(steps.items())]
    return "\n".join(lines) + "\n"


def draw(arm: str, a: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    hist = a["hist"]
    exponents = np.arange(FIRST_BIN, FIRST_BIN + len(hist))
    fig, ax = plt.subplots(figsize=(7.5, 3.8))
    ax.bar(exponents, hist / hist.sum(), width=0.9, color="C2", alpha=0.7,
           label=f"weight gradients, {arm} ({len(a['seeds'])} seeds, every numerics step)")
    below = shares(hist)["below_2^-24"]
    ax.axvspan(exponents[0] - 0.5, -24.5, color="red", alpha=0.08)
    for x, text in ((-24.5, f"2^-24: {100 * below:.2f} % below (paper: ~5 %)"), (-14.5, "2^-14: subnormal below")):
        ax.axvline(x, color="k", linestyle="--", linewidth=0.8)
        ax.text(x - 0.3, ax.get_ylim()[1] * 0.95, text + " ", fontsize=7, rotation=90, va="top", ha="right")
    ax.set(xlabel="floor(log2 |weight gradient|)", ylabel="share of non-zero values", xlim=(-50, 5),
           title="Weight-gradient exponents (the paper's Fig. 2b)")
    ax.legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mptrain.scripts.weight_grad_exponents", description=__doc__.split("\n")[0])
    parser.add_argument("dirs", nargs="+", type=Path)
    parser.add_argument("--arm", default="fp32", help="the arm the histogram and the per-step shares are drawn for")
    parser.add_argument("--png", type=Path)
    parser.add_argument("--md", type=Path)
    args = parser.parse_args(argv)
    try:
        arms = collect(args.dirs)
        if args.arm not in arms:
            raise UserError(f"no {args.arm} runs with numerics; arms found: {', '.join(arms)} (--arm picks one)")
    except UserError as e:
        print(f"weight_grad_exponents: error: {e}", file=sys.stderr)
        return 2
    text = markdown({args.arm: arms[args.arm], **arms}, args.arm)
    print(text, end="")
    if args.md:
        args.md.write_text(text)
    if args.png:
        draw(args.arm, arms[args.arm], args.png)
    return 0


if __name__ == "__main__":
    sys.exit(main())
