"""report.md, a self-contained report.html (images inlined), or CSV/JSON for machines."""

from __future__ import annotations

import base64
import hashlib
import json
import re
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd

from mptrain.report import plots
from mptrain.report.checks import checks_markdown
from mptrain.report.paired_verdict import CONFIDENCE
from mptrain.report.runs import forward_amax
from mptrain.report.tables import (
    comparison,
    delta_with_ci,
    headroom_markdown,
    metric_value,
    plan_markdown,
    setting_overrides,
    short_run_caution,
    to_markdown,
    verdict_cell,
)

# write_markdown's header line, as `mptrain-report --check` reads it back (report/check.py)
# (a report written before 2026-12-07 names its folders as they were given, without "relative to this report")
HEADER = re.compile(r"runs from (?P<sources>(?:`[^`]+`(?:, )?)+)(?P<relative> \(relative to this report\))?; written by "
                    r"`mptrain-report` on [^.]*\.(?: Options: `(?P<options>[^`]*)`\.)?")  # fmt: skip
RELATIVE = " (relative to this report)"


def write_markdown(runs: pd.DataFrame, sources: list[Path], out: Path, margins: dict | None = None,
                   control: str | None = None, options: str = "", named: list[str] | None = None,
                   with_figures: bool = True) -> Path:
    """`options`: the command-line options that shaped the tables, and `named`: the sources as paths relative to
    the report's own folder, said in the header so that `mptrain-report --check` remakes the report from them
    wherever it is run (and never from a folder of the same name elsewhere). `with_figures=False`: the text and
    tables alone (what `mptrain-report --check` compares), without drawing a plot."""
    tables = comparison(runs, margins, control)
    lines = [
        "# mptrain report",
        "",
        f"{len(runs)} runs from {', '.join(f'`{s}`' for s in (named or sources))}{RELATIVE if named else ''}; "
        "written by `mptrain-report` on "
        f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC." + (f" Options: `{options}`." if options else ""),  # read back by HEADER
        "",
        "## The answer",
        "",
        "Each arm against the control of its experiment (fp32, or the arm its registered plan names), paired by seed "
        "(same initialisation and data order): "
        f"the mean paired Δ of the primary metric with its {CONFIDENCE:.0%} confidence interval (Student t over "
        "seeds), and the verdict against the equivalence margin ±δ (a reproduction's registered plan, or "
        "`mptrain-report --margin`): equivalent when the 90 % interval lies inside ±δ (two one-sided tests at "
        "α = 0.05); better/worse when the 95 % interval excludes 0 otherwise; `differs` marks an equivalent arm "
        "whose 95 % interval excludes 0. A verdict on a metric, margin or arm its plan did not name is "
        "exploratory.",
        "",
        "| experiment | metric | arm | paired Δ vs fp32 (95 % CI) | verdict (±δ) |",
        "|---|---|---|---|---|",
    ]
    plans = [f"{experiment_title(*key)}. " + plan_markdown(table.attrs["plan"], table.attrs["metric"],
                                                          table.attrs.get("off_plan")) + "\n"
             for key, table in tables.items() if table.attrs.get("plan")]
    lines[-2:-2] = plans  # the registered plans above the verdicts they judge
    titles = {key: experiment_title(*key) for key in tables}
    chart = plots.forest(tables, titles, out / "verdicts-forest.png") if with_figures else None
    if chart is not None:  # the answer at a glance, first
        lines[-2:-2] = [f"![each arm's paired Δ vs fp32 with its 95 % (thin) and 90 % (thick) intervals against ±δ]"
                        f"({chart.name})", ""]
    dose = plots.dose_response(tables, out / "dose-response.png") if with_figures else None
    if dose is not None:  # sec. 3.1's mechanism against its cost, across the settings a sweep varied
        lines[-2:-2] = [f"![paired Δ against the share of weight updates each arm lost, one point per setting]"
                        f"({dose.name})", ""]
    for (model, dataset, setting), table in tables.items():
        for _, r in table[~table["control"]].iterrows():
            better = "↑" if table.attrs["higher_is_better"] else "↓"
            lines.append(f"| [{experiment_title(model, dataset, setting)}](#{_anchor(model, dataset, setting)}) | "
                         f"{table.attrs['metric']} {better} | {r['arm']} | {delta_with_ci(r, table.attrs['metric'])} | "
                         f"{verdict_cell(r, table.attrs['metric'])} |")
    checks = checks_markdown(tables, titles)
    if checks:
        lines += ["", "Each verdict beside a distribution-free check, the exact sign-flip permutation test (every "
                  "sign pattern of the seed pairs' Δs; no normality assumed), and after Holm's adjustment over the "
                  "experiment's judged arms (family-wise α = 0.05):", "", checks]
    cautions = [short_run_caution(table, titles[key]) for key, table in tables.items()]
    lines += [text for caution in cautions if caution for text in ("", caution)]
    lines += ["", "Below, per experiment: each row pools the seeds of one precision mode (plus its `precision.*` "
              "overrides); metric, speed and memory average the completed runs; fp32 is the control every Δ and "
              "ratio is taken against."]
    for (model, dataset, setting), table in tables.items():
        group = runs[(runs["model"] == model) & (runs["dataset"] == dataset) & (runs["setting"] == setting)]
        stem = _slug(f"{model}-{dataset}") + (f"-{hashlib.sha1(setting.encode()).hexdigest()[:8]}" if setting else "")
        metric = table.attrs["metric"]
        lines += ["", f'<a id="{_anchor(model, dataset, setting)}"></a>', "",
                  f"## {experiment_title(model, dataset, setting)}", ""]
        if setting:
            lines += [f"Setting: `{setting}`.", ""]
        if table.attrs.get("plan"):
            lines += [plan_markdown(table.attrs["plan"], metric, table.attrs.get("off_plan")), ""]
        if table.attrs.get("control", "fp32") != "fp32":
            lines += [f"Control: **{table.attrs['control']}**: every Δ, ratio and verdict below, the "
                      "columns' \"vs fp32\" included, is against it.", ""]
        lines += [_environment(group), "", to_markdown(table), ""]
        amax = forward_amax(group)  # read once: the chart and the table
        figures = [] if not with_figures else [
            (plots.metric_curves(group, metric, out / f"{stem}-{metric}.png"), f"eval {metric} vs step"),
            (plots.train_loss_curves(group, out / f"{stem}-train-loss.png"), "train loss vs step"),
            (plots.loss_scale_curves(group, out / f"{stem}-loss-scale.png"), "loss scale vs step"),
            (plots.lost_update_curves(group, out / f"{stem}-lost-updates.png"),
             "share of weight updates lost, vs step (the case for FP32 master weights): with FP32 weights or "
             "masters, what FP16 weights would lose; arms that update their own FP16/BF16 weights: what did not move"),
            (plots.speed_memory_bars(table, out / f"{stem}-speed-memory.png"), "throughput and peak memory"),
            (plots.exponent_histogram(group, out / f"{stem}-grad-exponents.png"),
             "gradient exponents with FP16's limits (the paper's Fig. 3)"),
            (plots.forward_headroom(amax, out / f"{stem}-forward-headroom.png"),
             "per-layer forward amax against FP16's 65504 (forward overflow headroom)"),
            (plots.fp8_operands(group, out / f"{stem}-fp8-operands.png"),
             "Linear operands once tensorwise-scaled, against the FP8 formats' limits (Fig. 3 for FP8)"),
            (plots.mx_operands(group, out / f"{stem}-mx-operands.png"),
             "what each block format does to each product's operands: quantisation error and values flushed"),
        ]  # fmt: skip
        lines += [f"![{caption}]({path.name})" for path, caption in figures if path is not None]
        headroom = headroom_markdown(amax)
        if headroom:
            lines += ["", "Forward headroom: the modules whose outputs come closest to FP16's 65504 (the largest "
                      "|output| over the measured steps of each arm's first seed, in forward order; headroom in bits "
                      "below 65504):", "", headroom]
        lines += ["", "| run | mode | seed | status | " + metric + " | loss-scale verdict | note |",
                  "|---|---|---|---|---|---|---|"]
        for _, r in group.iterrows():
            note = "" if pd.isna(r["error"]) else str(r["error"]).replace("|", "\\|")[:160]
            value = metric_value(r["metric"], metric)
            folder = _relative(r["run_dir"], sources)
            lines.append(f'| <span title="{folder}">`{run_id(r)}`</span> | {r["arm"]} | {r["seed"]} | {r["status"]} | '
                         f"{value} | {r['scale_verdict'] or '-'} | {note} |")
        lines += ["", "Run folders: `runs.csv` of `mptrain-report --format csv` (column `run_dir`); hover a run id "
                  "in the HTML report."]
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def write_html(markdown_path: Path) -> Path:
    """report.md as HTML with every image inlined as a data URI, so the one file is the whole report."""
    import markdown

    body = markdown.markdown(markdown_path.read_text(), extensions=["tables"])

    def inline(match):
        image = markdown_path.parent / match.group(1)
        data = base64.b64encode(image.read_bytes()).decode()
        return f'src="data:image/png;base64,{data}"'

    body = re.sub(r'src="([^"/]+\.png)"', inline, body)
    style = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em}"
             "table{border-collapse:collapse;font-size:13px;margin:1em 0}td,th{border:1px solid #ccc;padding:3px 6px}"
             "img{width:100%;display:block;margin:1em 0}")  # fmt: skip
    path = markdown_path.with_suffix(".html")
    path.write_text(f'<!doctype html><html><head><meta charset="utf-8"><title>mptrain report</title>'
                    f"<style>{style}</style></head><body>{body}</body></html>\n")  # fmt: skip
    return path


def write_machine(runs: pd.DataFrame, out: Path, fmt: str, margins: dict | None = None,
                  control: str | None = None) -> list[Path]:
    frames = []
    for (model, dataset, setting), table in comparison(runs, margins, control).items():
        plan = table.attrs.get("plan")
        frames.append(table.assign(model=model, dataset=dataset, setting=setting, metric=table.attrs["metric"],
                                   plan=json.dumps(plan) if plan else None))
    table = pd.concat(frames, ignore_index=True)
    first = ["model", "dataset", "setting", "metric"]
    columns = [*first, *[c for c in table.columns if c not in first]]
    table, runs = table[columns], runs.drop(columns=["mode_rank"])
    runs = runs.assign(plan=runs["plan"].map(lambda p: json.dumps(p) if isinstance(p, dict) else None))
    if fmt == "csv":
        paths = [out / "comparison.csv", out / "runs.csv"]
        table.to_csv(paths[0], index=False)
        runs.to_csv(paths[1], index=False)
        return paths
    path = out / "report.json"
    # pandas writes NaN as null, which plain json.dumps would not
    records = {name: json.loads(frame.to_json(orient="records")) for name, frame in
               (("comparison", table), ("runs", runs))}  # fmt: skip
    path.write_text(json.dumps(records, indent=1))
    return [path]


def _environment(group: pd.DataFrame) -> str:
    envs = {}
    for run_dir in group["run_dir"]:
        try:
            env = json.loads((Path(run_dir) / "summary.json").read_text()).get("env") or {}
        except (OSError, ValueError):
            continue
        envs[(env.get("device_name"), env.get("torch"))] = True
    shown = "; ".join(f"{d or '?'}, torch {t or '?'}" for d, t in envs)
    return f"Device: {shown or 'unknown'}."


def experiment_title(model: str, dataset: str, setting: str) -> str:
    """`resnet on fashion_mnist · repro_cnn_parity`: the experiment preset names it; other overrides stay below."""
    presets = [o.split("=", 1)[1] for o in setting.split() if o.startswith("experiment=")]
    others = setting_overrides(setting) if presets else []
    return f"{model} on {dataset}" + (f" · {', '.join(presets)}" if presets else "") + \
        (f" ({' '.join(others)})" if others else "")


def run_id(r) -> str:
    """A short id of a run in its section: `mixed-s0` (the folder names run to 120 characters)."""
    return f"{_slug(r['arm']).replace('_', '-')}-s{r['seed']}"


def _anchor(model: str, dataset: str, setting: str) -> str:
    return "x-" + hashlib.sha1(f"{model}|{dataset}|{setting}".encode()).hexdigest()[:10]


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text)


def _relative(run_dir: str, sources: list[Path]) -> str:
    for source in sources:
        try:
            return str(Path(run_dir).relative_to(source)) or "."
        except ValueError:
            continue
    return run_dir
