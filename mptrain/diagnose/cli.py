"""`mptrain-numerics`: what FP16 would do to a model's gradients, from K training steps in FP32.

    mptrain-numerics model=lstm_lm --steps 50
    mptrain-numerics model=resnet --coverage 0.999 --json scan.json
    mptrain-numerics model=dcgan --kind weight

Any argument that is not an option is a Hydra override of mptrain's config, as for
`mptrain` (precision excepted: the scan is FP32 by definition). Per layer it prints the
share of non-zero gradients FP16 would flush to zero, the smallest loss scale keeping
`--coverage` of them representable with no overflow, the largest scale without overflow,
and the updates FP16 weights would lose; then one recommended static scale per network.
Nothing is written except `--json`; no Hydra output folder is made.
"""

from __future__ import annotations

import argparse
import logging
import math
import re
import sys
import tempfile
from pathlib import Path

from mptrain.console import OneLineParser, compose, overridden, positive
from mptrain.errors import UserError
from mptrain.schema.precision import BLOCK_FORMATS, SCALE_ROUNDINGS

log = logging.getLogger("mptrain")


def _fraction(text: str) -> float:
    value = float(text)
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"must lie strictly between 0 and 1, e.g. 0.999 (got {text})")
    return value


def parse_args(argv):
    parser = OneLineParser(prog="mptrain-numerics", description=__doc__.split("\n\n")[0],
                            epilog="Other arguments: Hydra overrides (model=..., dataset=..., optim=..., seed=...).")
    parser.add_argument("--steps", type=positive(int), default=50, help="FP32 training steps measured (default 50)")
    parser.add_argument("--coverage", type=_fraction, default=0.999,
                        help="share of non-zero gradients a scale must keep above 2^-24 (default 0.999)")
    parser.add_argument("--headroom", type=positive(float), default=8.0,
                        help="recommend this factor below the overflow ceiling (default 8)")
    parser.add_argument("--kind", choices=("all", "weight", "activation"), default="all", help="rows to print")
    parser.add_argument("--block-format", choices=BLOCK_FORMATS,
                        help="also: what this block format (precision=mx) would do to each Linear layer's operands, "
                             "and the layers it hurts most")
    parser.add_argument("--scale-rounding", choices=SCALE_ROUNDINGS, default="floor",
                        help="--block-format's scale rounding (default floor, the OCP spec's)")
    parser.add_argument("--json", type=Path, help="also write the full scan (histograms included) here")
    parser.add_argument("--checkpoint", type=Path, metavar="RUN_DIR",
                        help="instead of a scan: is this trained run (any mode) safe in FP16? Its held-out batches "
                             "forward in FP16, per-layer headroom, and the modules to keep in FP32")
    parser.add_argument("--batches", type=positive(int), default=8, help="held-out batches of --checkpoint (8)")
    args, overrides = parser.split_overrides(argv)
    if overridden(overrides, "precision"):
        parser.error("the scan runs in fp32 by definition; drop the precision override")
    return args, overrides


def compose_scan(overrides: list[str], steps: int):
    forced = ["precision=fp32", f"trainer.max_steps={steps}", "trainer.progress=false",
              f"trainer.log_every={steps}", "telemetry.numerics.activations=true"]  # fmt: skip
    return compose([*overrides, *forced])


def scan(cfg, steps: int, block_format: str | None = None, scale_rounding: str = "floor"):
    """Train `steps` FP32 steps with every step measured; return {(kind, layer): summed stats}."""
    from mptrain.build import build_trainer, resolve_device
    from mptrain.schema import validate
    from mptrain.telemetry import headroom
    from mptrain.telemetry.numerics import NumericsProbe
    from mptrain.telemetry.tensorboard import TensorBoardLogger

    recipe = None
    if block_format is not None:
        from mptrain.precision.mx import Recipe
        from mptrain.schema import typed

        recipe = Recipe.from_config(typed("precision", {"mode": "mx", "block_format": block_format,
                                                        "scale_rounding": scale_rounding}))

    class Accumulate(NumericsProbe):
        def __init__(self, run_dir):
            super().__init__(every=1, run_dir=run_dir, activations=True, observe_mx=recipe)
            self.sums: dict[tuple[str, str], list[float]] = {}

        def flush(self, tb, step):
            for key, v in self.take().items():
                old = self.sums.get(key)
                if old is None:
                    self.sums[key] = v
                elif key[0] in ("forward", "fp8"):  # amax is a maximum, not a sum
                    self.sums[key] = headroom.merge_lists(old, v)
                elif key[0] == "mx":  # the last entry names the format
                    self.sums[key] = [a + b for a, b in zip(old[:-1], v[:-1])] + v[-1:]
                else:
                    self.sums[key] = [a + b for a, b in zip(old, v)]

    validate(cfg)
    with tempfile.TemporaryDirectory(prefix="mptrain-numerics-") as tmp:
        probe = Accumulate(Path(tmp))
        tb = TensorBoardLogger(Path(tmp) / "tb")
        try:
            trainer = build_trainer(cfg, resolve_device(cfg.trainer.device), Path(tmp), tb, probe, [])
            trainer.fit(evaluate=False)
        finally:
            tb.close()
    return probe.sums


def analyse(sums, steps: int, coverage: float, headroom: float) -> dict:
    from mptrain.precision.scale_advice import advise, recommend
    from mptrain.telemetry import fp8_stats, mx_stats
    from mptrain.telemetry import headroom as forward_headroom
    from mptrain.telemetry.numerics import EXPONENTS, NumericsProbe

    exponents = EXPONENTS.tolist()
    lost = {layer: v[1] / v[0] for (kind, layer), v in sums.items() if kind == "lost_update" and v[0]}
    rows, by_network, totals = [], {}, {}
    forward = [forward_headroom.to_record(layer, None, v) for (kind, layer), v in sums.items() if kind == "forward"]
    fp8 = [fp8_stats.to_record(layer, None, v) for (kind, layer), v in sums.items() if kind == "fp8"]
    block = [mx_stats.to_record(layer, None, v) for (kind, layer), v in sums.items() if kind == "mx"]
    for (kind, layer), v in sums.items():
        if kind in ("lost_update", "forward", "fp8", "mx"):
            continue
        record = NumericsProbe.to_record(kind, layer, None, v)
        advice = advise(exponents, record["log2_hist"], coverage)
        by_network.setdefault(layer.split(".")[0], {})[f"{kind}/{layer}"] = advice
        total = totals.setdefault(kind, [0.0] * len(v))
        totals[kind] = [a + b for a, b in zip(total, v)]
        rows.append({"kind": kind, "layer": layer, "values_per_step": record["count"] / steps,
                     "zero_frac": record["zero_frac"], "flushed_frac": advice.flushed, "subnormal_frac": advice.subnormal,
                     "min_scale": advice.min_scale, "max_scale": advice.max_scale,
                     "lost_update_frac": lost.get(layer) if kind == "weight" else None,
                     "log2_hist": record["log2_hist"]})  # fmt: skip
    overall = {}
    for kind, v in totals.items():
        record = NumericsProbe.to_record(kind, "all", None, v)
        nonzero = sum(record["log2_hist"]) or 1.0
        overall[kind] = {"zero_frac": record["zero_frac"], "flushed_frac": record["underflow_frac"] * v[0] / nonzero,
                         "subnormal_frac": record["subnormal_frac"] * v[0] / nonzero}  # fmt: skip
    rows.sort(key=lambda r: (r["kind"] != "weight", _natural(r["layer"])))  # model order, not backward's
    recommended = {net: recommend(advice, headroom).__dict__ for net, advice in by_network.items()}
    return {"exponents": exponents, "layers": rows, "overall": overall, "recommended": recommended,
            "forward": forward, "first_fp16_overflow": forward_headroom.first_overflow(forward) if forward else None,
            "fp8": fp8, "fp8_keep_bf16": fp8_stats.unhealthy(fp8), "mx": block,
            "mx_hurt_most": mx_stats.harmful(block)}


def _natural(name: str) -> list:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def print_report(result: dict, kind: str, out=sys.stdout) -> None:
    def pct(x):
        return "-" if x is None else f"{100 * x:.2f}%"

    def pow2(x):
        return "none" if x is None else f"2^{int(math.log2(x))}"

    header = f"{'gradient':<48} {'zero':>8} {'flushed':>8} {'subnorm':>8} {'min scale':>9} {'max scale':>9} {'lost upd':>8}"
    print(header, file=out)
    for r in result["layers"]:
        if kind in ("all", r["kind"]):
            name = f"{r['kind'][:3]} {r['layer']}"[:48]
            print(f"{name:<48} {pct(r['zero_frac']):>8} {pct(r['flushed_frac']):>8} {pct(r['subnormal_frac']):>8} "
                  f"{pow2(r['min_scale']):>9} {pow2(r['max_scale']):>9} {pct(r['lost_update_frac']):>8}", file=out)
    for k, o in result["overall"].items():
        print(f"all {k} gradients: {pct(o['zero_frac'])} zero; of the non-zero, {pct(o['flushed_frac'])} flush to "
              f"zero in FP16 and {pct(o['subnormal_frac'])} are subnormal (unscaled)", file=out)
    print_headroom(result["forward"], result["first_fp16_overflow"], out)
    print_fp8(result["fp8"], result["fp8_keep_bf16"], out)
    print_mx(result["mx"], result["mx_hurt_most"], out)
    for net, rec in result["recommended"].items():
        scale = "none: use precision.loss_scale=dynamic" if rec["scale"] is None else \
            f"precision.loss_scale={rec['scale']:g} (2^{int(math.log2(rec['scale']))})"  # fmt: skip
        print(f"recommended static scale for {net}: {scale}: {rec['reason']}", file=out)


def _check_checkpoint(args, overrides: list[str]) -> None:
    from mptrain.build import resolve_device
    from mptrain.diagnose.fp16_checkpoint import check, compose_from_run, load_fp16_model

    cfg = compose_from_run(args.checkpoint, overrides)
    task, precision, loader, state = load_fp16_model(cfg, args.checkpoint, resolve_device(cfg.trainer.device))
    result = check(task, precision, loader, args.batches, state)
    result.update(run_dir=str(args.checkpoint), model=cfg.model.name, dataset=cfg.dataset.name,
                  fp16_kernels=precision.fp16_kernels)
    print(f"{cfg.model.name} from {args.checkpoint}: {args.batches} held-out batches forward with FP16 weights "
          f"({precision.fp16_kernels} FP16 kernels)")
    print_check(result, sys.stdout)
    _write_json(args.json, result, "full check")


def _write_json(path: Path | None, result: dict, what: str) -> None:
    if path is not None:
        from mptrain.telemetry.summary import write_json_atomic

        write_json_atomic(path, result)
        print(f"{what}: {path}")


def print_check(result: dict, out) -> None:
    print_headroom(result["layers"], result["overflowing"][0] if result["overflowing"] else None, out)
    if not result["overflowing"]:
        print(f"safe in FP16: no output of {result['batches']} held-out batches exceeds 65504", file=out)
        return
    print(f"{len(result['overflowing'])} module output(s) overflow FP16: {', '.join(result['overflowing'][:8])}"
          f"{' ...' if len(result['overflowing']) > 8 else ''}", file=out)
    print(f"keep in FP32 (or bf16) for FP16 inference / fine-tuning: {', '.join(result['keep_fp32'])}; with them "
          f"the largest output is {result['amax_after']:.4g} ({result['headroom_bits_after']:.1f} bits of headroom)",
          file=out)


def print_fp8(records: list[dict], keep: list[str], out=sys.stdout, rows: int = 6) -> None:
    """What tensorwise FP8 (torchao's default recipe) would do to each Linear's operands."""
    if not records:
        return
    worst = sorted(records, key=lambda r: -r["underflow_frac"])[:rows]
    print(f"\n{'FP8 operand (tensorwise scaling)':<48} {'format':>6} {'amax':>10} {'underflow':>9} {'subnorm':>8}",
          file=out)
    for r in worst:
        print(f"{r['layer'][:48]:<48} {r['format']:>6} {r['amax']:>10.4g} {100 * r['underflow_frac']:>8.2f}% "
              f"{100 * r['subnormal_frac']:>7.2f}%", file=out)
    layers = len({r["layer"].rsplit(".", 1)[0] for r in records})
    verdict = f"keep in bf16 for precision=fp8: {', '.join(keep)}" if keep else "every operand keeps > 99 % of its values"
    print(f"{layers} Linear layers under tensorwise FP8: {verdict}", file=out)


def print_mx(records: list[dict], ranked: list[tuple[str, float]], out=sys.stdout, rows: int = 8) -> None:
    """What a block format would do to each Linear's operands, worst first, and the layers it hurts most."""
    if not records:
        return
    worst = sorted(records, key=lambda r: -r["rel_error"])[:rows]
    print(f"\n{'block-format operand (layer.operand.product)':<56} {'format':>10} {'error':>7} {'flushed':>8} "
          f"{'clamped':>8} {'scale lo':>8}", file=out)
    for r in worst:
        print(f"{r['layer'][-56:]:<56} {r['format']:>10} {r['rel_error']:>7.4f} {100 * r['flushed_frac']:>7.2f}% "
              f"{100 * r['saturated_frac']:>7.2f}% {100 * r['scale_underflow_frac']:>7.2f}%", file=out)
    shown = ", ".join(f"{layer.removeprefix('model.')} ({err:.3f})" for layer, err in ranked[:5])
    print(f"{len(ranked)} Linear layers in {records[0]['format']}; hurt most (worst operand's relative error): {shown}; "
          "candidates for precision.mx_keep", file=out)


def print_headroom(forward: list[dict], first: str | None, out=sys.stdout, rows: int = 10) -> None:
    """The module outputs closest to FP16's 65504 (amax, headroom in bits, shares over and within 2x)."""
    if not forward:
        return
    closest = sorted(forward, key=lambda r: -r["amax"])[:rows]
    print(f"\n{'forward output (closest to 65504)':<48} {'amax':>10} {'headroom':>9} {'> max':>8} {'> max/2':>8}",
          file=out)
    for r in closest:
        bits = r["headroom_bits_fp16"]
        shown = f"{bits:.1f} bit" if math.isfinite(bits) else ("none" if bits < 0 else "-")
        print(f"{r['layer'][:48]:<48} {r['amax']:>10.4g} {shown:>9} {100 * r['over_fp16_frac']:>7.3f}% "
              f"{100 * r['within2x_fp16_frac']:>7.3f}%", file=out)
    least = min(r["headroom_bits_fp16"] for r in forward)
    verdict = f"first FP16 overflow in the forward: {first}" if first else \
        f"no forward output exceeds FP16's 65504 (least headroom {least:.1f} bits)"  # fmt: skip
    print(verdict, file=out)


def main(argv=None) -> None:
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    try:
        args, overrides = parse_args(sys.argv[1:] if argv is None else argv)
        if args.checkpoint is not None:
            return _check_checkpoint(args, overrides)
        cfg = compose_scan(overrides, args.steps)
        sums = scan(cfg, args.steps, args.block_format, args.scale_rounding)
        result = analyse(sums, args.steps, args.coverage, args.headroom)
        result.update(steps=args.steps, coverage=args.coverage, headroom=args.headroom, overrides=overrides,
                      model=cfg.model.name, dataset=cfg.dataset.name)  # fmt: skip
        print(f"{cfg.model.name} on {cfg.dataset.name}: gradients of {args.steps} FP32 training steps, as FP16 "
              f"would hold them (coverage {args.coverage:g}, no overflow)")
        print_report(result, args.kind)
        _write_json(args.json, result, "full scan")
    except UserError as e:
        print(f"mptrain-numerics: error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
