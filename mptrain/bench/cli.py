"""`mptrain-bench`: each precision mode's training speed and memory, beside a bare PyTorch loop.

    mptrain-bench                                       # ResNet-20, synthetic data, fp32 amp bf16 mixed
    mptrain-bench model=resnet50 dataset.image_size=224 --batch-sizes 64,128 --modes fp32,amp,mixed
    mptrain-bench model=lstm_lm --modes fp32,mixed --no-bare

Other arguments are Hydra overrides of mptrain's config (data defaults to synthetic,
on the device). For every mode and batch size, in one process and alternating with the
bare loop `--repeats` times: median throughput over timed windows after warm-up, the
windows' spread, and peak memory; then the ratios ours/bare and vs fp32, and the slope of
peak memory against batch size (activation memory) per mode. Writes a JSON and a
Markdown table under `--out`/<device>_torch<version>/.
"""

from __future__ import annotations

import argparse
import gc
import logging
import re
import sys
from pathlib import Path

from mptrain.console import OneLineParser, compose, positive
from mptrain.errors import UserError
from mptrain.schema.precision import MODES


def _csv(kind, choices=None):
    def parse(text: str):
        try:
            items = [kind(t) for t in text.split(",") if t]
        except ValueError:
            items = []
        bad = [t for t in items if (choices and str(t).split("/")[0] not in choices) or (kind is int and t <= 0)]
        if not items or bad:
            allowed = f"from {', '.join(choices)}" if choices else "of positive integers"
            raise argparse.ArgumentTypeError(f"expected a comma-separated list {allowed} (got {text})")
        return items

    parse.__name__ = "list"
    return parse


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0 (got {text})")
    return value


def parse_args(argv):
    parser = OneLineParser(prog="mptrain-bench", description=__doc__.split("\n\n")[0],
                           epilog="Other arguments: Hydra overrides (model=..., dataset=..., optim=...).")
    parser.add_argument("--modes", type=_csv(str, MODES), default=["fp32", "amp", "bf16", "mixed"],
                        help="arms, comma-separated: a precision mode, optionally with precision.* settings of its "
                             "own after slashes, e.g. fp32,mixed,mixed/accumulate=fp16/accumulate_block=32 "
                             "(default fp32,amp,bf16,mixed)")
    parser.add_argument("--batch-sizes", type=_csv(int), default=[64, 128],
                        help="batch sizes, comma-separated; each arm runs at each (default 64,128)")
    parser.add_argument("--warmup", type=positive(int), default=10, help="untimed steps first (default 10)")
    parser.add_argument("--window", type=positive(int), default=10, help="steps per timed window (default 10)")
    parser.add_argument("--windows", type=positive(int), default=5, help="timed windows per repeat (default 5)")
    parser.add_argument("--repeats", type=positive(int), default=2, help="ours/bare alternations (default 2)")
    parser.add_argument("--pairs", type=_count, default=20,
                        help="paired single steps (ours, bare) for the per-step overhead; 0: none (default 20)")
    parser.add_argument("--no-bare", action="store_true", help="skip the bare PyTorch loop")
    parser.add_argument("--out", type=Path, default=Path("results/bench"), help="folder for the JSON and table")
    args, overrides = parser.split_overrides(argv)
    for key, by in (("precision", "--modes"), ("dataset.batch_size", "--batch-sizes")):
        if any(o.lstrip("+~").split("=")[0] == key for o in overrides):  # precision.<key>=... is a setting: kept
            parser.error(f"{key} is set by {by}; drop the override")
    return args, overrides


def default_data(overrides: list[str]) -> list[str]:
    """On-device synthetic data of the model's kind, unless the user picked a dataset."""
    if any(o.lstrip("+").split("=")[0] == "dataset" for o in overrides):
        return []
    from mptrain.families import TASKS

    base = compose([o for o in overrides if o.lstrip("+").split("=")[0] == "model"])  # the task picks the data
    return [f"dataset={TASKS[base.model.task].bench_dataset}"]


def arm_overrides(arm: str) -> list[str]:
    """`mixed/accumulate=fp16/accumulate_block=32` → precision=mixed precision.accumulate=fp16 ..."""
    mode, *settings = arm.split("/")
    return [f"precision={mode}", *(f"precision.{s}" for s in settings)]


def configs(overrides: list[str], mode: str, batch: int, args):
    """The run's config for ours, and the fp32 one the bare loop builds its model and data from."""
    steps = args.warmup + args.windows * args.window
    forced = [f"dataset.batch_size={batch}", f"trainer.max_steps={steps}", f"trainer.log_every={args.window}",
              f"trainer.perf_warmup_steps={args.warmup}", "trainer.progress=false", "telemetry.numerics.every=null"]
    return (compose([*overrides, *forced, *arm_overrides(mode)]),
            compose([*overrides, *forced, "precision=fp32"]))


def run(args, overrides) -> dict:
    from mptrain.bench.bare import BARE_FOR_MODE, SUPPORTED_TASKS
    from mptrain.bench.measure import Timing, cuda_reset, time_bare, time_trainer
    from mptrain.bench.paired import paired_overhead
    from mptrain.build import resolve_device
    from mptrain.precision import Precision
    from mptrain.schema import validate
    from mptrain.telemetry.env import environment

    rows = []
    with_data = [*overrides, *default_data(overrides)]  # composed once, not per arm
    for batch in args.batch_sizes:
        for mode in args.modes:
            cfg, cfg_fp32 = configs(with_data, mode, batch, args)
            validate(cfg)
            device = resolve_device(cfg.trainer.device)
            bare_kind = BARE_FOR_MODE.get(mode.split("/")[0]) if not args.no_bare and cfg.model.task in SUPPORTED_TASKS else None
            ours, bare = Timing(), Timing()
            kernels = Precision(cfg.precision, device).kernels if bare_kind in ("amp", "bf16") else None  # emulated?
            for _ in range(args.repeats):
                for side in ("ours", "bare"):
                    if side == "bare" and bare_kind is None:
                        continue
                    gc.collect()
                    cuda_reset(device)
                    if side == "ours":
                        ours.merge(time_trainer(cfg, device, args.warmup))
                    else:
                        bare.merge(time_bare(cfg_fp32, device, bare_kind, args.warmup, args.windows, args.window,
                                             kernels))  # fmt: skip
            row = {"mode": mode, "batch": batch, "bare": bare_kind, "ours": ours.summary(),
                   "bare_loop": bare.summary() if bare.step_ms else None, "paired": None}  # fmt: skip
            if bare_kind and args.pairs > 0:
                gc.collect()
                row["paired"] = paired_overhead(cfg, cfg_fp32, device, bare_kind, args.pairs, kernels)
            rows.append(row)
            print(_progress(row), flush=True)
    return {"model": cfg.model.name, "dataset": cfg.dataset.name, "overrides": overrides, "env": environment(device),
            "settings": {k: getattr(args, k) for k in ("warmup", "window", "windows", "repeats")},
            "rows": _with_ratios(rows), "activation_memory": _slopes(rows)}  # fmt: skip


def _progress(row) -> str:
    o, b, p = row["ours"], row["bare_loop"], row["paired"]
    text = f"{row['mode']:>11} batch {row['batch']:>4}: ours {o['samples_per_s']:.1f}/s"
    text += f", bare {row['bare']} {b['samples_per_s']:.1f}/s" if b else ""
    text += f", paired overhead {p['overhead']:+.1%}" if p else ""
    return text + (f", buffer snapshot {p['buffer_snapshot_share']:.3%} of a step" if p and p["buffer_snapshot_ms"] else "")


def _with_ratios(rows: list[dict]) -> list[dict]:
    fp32 = {r["batch"]: r["ours"] for r in rows if r["mode"] == "fp32"}
    for r in rows:
        o, b, ref = r["ours"], r["bare_loop"], fp32.get(r["batch"])
        r["ours_over_bare"] = o["samples_per_s"] / b["samples_per_s"] if b else None
        r["speedup_vs_fp32"] = o["samples_per_s"] / ref["samples_per_s"] if ref else None
        r["memory_vs_fp32"] = o["peak_bytes"] / ref["peak_bytes"] if ref and ref["peak_bytes"] else None
    return rows


def _slopes(rows: list[dict]) -> dict:
    """Per mode, bytes of peak memory per extra sample (least squares over the batch sizes), and vs fp32."""
    import numpy as np

    slopes = {}
    for mode in dict.fromkeys(r["mode"] for r in rows):
        points = [(r["batch"], r["ours"]["peak_bytes"]) for r in rows if r["mode"] == mode]
        if len(points) > 1:
            slopes[mode] = {"bytes_per_sample": float(np.polyfit(*zip(*points), 1)[0])}
    ref = slopes.get("fp32", {}).get("bytes_per_sample")
    for s in slopes.values():
        s["vs_fp32"] = s["bytes_per_sample"] / ref if ref else None
    return slopes


def to_markdown(result: dict) -> str:
    def num(x, fmt):
        return "-" if x is None else fmt.format(x)

    env = result["env"]
    lines = [f"{result['model']} on {result['dataset']} ({' '.join(result['overrides']) or 'defaults'}), "
             f"{env['device_name']}, torch {env['torch']}; windows of {result['settings']['window']} steps after "
             f"{result['settings']['warmup']} warm-up, {result['settings']['windows']} windows x "
             f"{result['settings']['repeats']} repeats, median", "",
             "| mode | batch | samples/s | step ms (IQR %) | bare loop | bare samples/s | ours/bare | paired overhead | "
             "vs fp32 | peak MB | bare peak MB | memory vs fp32 |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in result["rows"]:
        o, b, p = r["ours"], r["bare_loop"] or {}, r.get("paired") or {}
        lines.append(f"| {r['mode']} | {r['batch']} | {o['samples_per_s']:.1f} | {o['step_ms']:.1f} "
                     f"({o['step_ms_iqr_pct']:.1f}) | {r['bare'] or '-'} | {num(b.get('samples_per_s'), '{:.1f}')} | "
                     f"{num(r['ours_over_bare'], '{:.3f}')} | {num(p.get('overhead'), '{:+.1%}')} | "
                     f"{num(r['speedup_vs_fp32'], '{:.2f}x')} | "
                     f"{o['peak_bytes'] / 2**20:.1f} | {num(b.get('peak_bytes') and b['peak_bytes'] / 2**20, '{:.1f}')} | "
                     f"{num(r['memory_vs_fp32'], '{:.3f}')} |")  # fmt: skip
    paired = [r["paired"] for r in result["rows"] if r.get("paired")]
    if paired:
        lines += ["", f"Paired overhead: {paired[0]['pairs']} alternations of one Trainer step and one bare step on one "
                  f"batch, medians' ratio, plus the logging window spread over log_every={paired[0]['log_every']} "
                  "steps."]  # fmt: skip
        lines += [f"- {r['mode']}, batch {r['batch']}: the buffer snapshot (BatchNorm statistics kept for a skipped "
                  f"step) {r['paired']['buffer_snapshot_ms'] * 1e3:.1f} µs, {r['paired']['buffer_snapshot_share']:.3%} "
                  "of the step (median over the pairs)" for r in result["rows"]
                  if r.get("paired") and r["paired"].get("buffer_snapshot_ms")]  # fmt: skip
    if result["activation_memory"]:
        lines += ["", "Activation memory (slope of peak memory vs batch size):", ""]
        lines += [f"- {mode}: {s['bytes_per_sample'] / 2**10:.1f} KiB/sample"
                  + (f", {s['vs_fp32']:.3f} of fp32's" if s["vs_fp32"] is not None else "")
                  for mode, s in result["activation_memory"].items()]  # fmt: skip
    return "\n".join(lines) + "\n"


def file_stem(result: dict) -> str:
    """model_dataset, then the other overrides (e.g. trainer.channels_last=true), so that benches of one model with
    different settings do not overwrite each other."""
    settings = [o for o in result["overrides"] if o.lstrip("+~").split("=")[0] not in ("model", "dataset")]
    slug = re.sub(r"[^A-Za-z0-9_.=-]+", "-", "_".join(settings))[:100]
    return "_".join(filter(None, [result["model"], result["dataset"], slug]))


def output_dir(out: Path, env: dict) -> Path:
    device = re.sub(r"[^a-z0-9]+", "-", env["device_name"].lower()).strip("-")
    return out / f"{device}_torch{env['torch'].split('+')[0]}"


def main(argv=None) -> None:
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    try:
        args, overrides = parse_args(sys.argv[1:] if argv is None else argv)
        result = run(args, overrides)
        from mptrain.telemetry.summary import write_json_atomic

        folder = output_dir(args.out, result["env"])
        folder.mkdir(parents=True, exist_ok=True)
        stem = folder / file_stem(result)  # holds dots (precision.cpu_fp16=...): add to it, never with_suffix
        table = to_markdown(result)
        write_json_atomic(Path(f"{stem}.json"), result)
        Path(f"{stem}.md").write_text(table)
        print(table + f"\nwritten: {stem}.json, {stem}.md")
    except UserError as e:
        print(f"mptrain-bench: error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
