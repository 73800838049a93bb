"""What FP16 accumulation and FP16 reductions (sec. 3.3) do to one step's gradients, beside the gradients' own noise.

    python -m mptrain.scripts.accumulation_error +experiment=repro_accumulation_transformer \\
        [--weights RUN/checkpoint.pt] [--arms mixed,mixed_accum16_seq,mixed_accum16,mixed_reduce16] [--md FILE]

Any argument that is not an option is a Hydra override, as for `mptrain`. From one state (a run's checkpoint:
its weights only; else the seeded initialisation) and one training batch, each arm takes one step and its
gradients are read before the update: unscaled, in FP32 (the masters' gradients where there are masters). Each
arm's error is measured against fp32's gradient on the same batch: relative L2 error over the whole gradient,
its median and worst over the weight tensors, and the cosine; the loss's difference. The yardstick is the
gradient's own sampling noise, fp32's gradient on the next batch against the first: an error far below it is
noise SGD never notices. An arm that overflows (a skipped step) is reported as such.
"""

from __future__ import annotations

import statistics
import sys
import tempfile
from pathlib import Path

ARMS = ("mixed", "mixed_accum16_seq", "mixed_accum16", "mixed_reduce16")


def _gradients(overrides: list[str], arm: str, weights: dict | None, batch, tmp: Path):
    """One step of `arm` from `weights` on `batch` (None: the first): its {name: unscaled FP32 gradient}, loss,
    whether it was applied, the batch, and (for batch=None) the batch after it."""
    import torch

    from mptrain.bench.measure import RecordingLogger
    from mptrain.build import build_trainer
    from mptrain.console import compose
    from mptrain.errors import UserError
    from mptrain.schema import validate

    cfg = compose([*overrides, f"precision={arm}", "trainer.progress=false", "telemetry.numerics.every=null"])
    validate(cfg)
    run_dir = tmp / arm
    run_dir.mkdir(parents=True, exist_ok=True)
    trainer = build_trainer(cfg, torch.device("cpu"), run_dir, RecordingLogger(), None, [])
    networks = trainer.task.networks()
    if len(networks) != 1:
        raise UserError(f"{cfg.model.name} trains {len(networks)} networks; this compares one network's gradients")
    (name, net), = networks.items()
    if weights is not None:  # cast into the arm's weights (the gradients never read the masters)
        net.load_state_dict(weights[name])
    stepper = trainer.steppers[name]
    names = [n for n, _ in net.named_parameters()]
    seen = {}

    def capture(grads):
        scale = stepper.current_scale
        seen["grads"] = {n: g.detach().float() / (scale if scale is not None else 1) for n, g in zip(names, grads)}

    stepper.grad_hooks.append(capture)
    following = None
    if batch is None:  # the training split's first batch, and the one after it (the noise's yardstick)
        batches = iter(trainer.data.train)
        batch, following = next(batches), next(batches)
    metrics = trainer._train_step(batch)
    applied = stepper.steps_applied == 1
    return seen["grads"], float(metrics["loss"]), applied, batch, following


def compare(overrides: list[str], arms: list[str], weights_path: str | None) -> list[str]:
    import torch

    from mptrain import checkpoint
    from mptrain.speed_check import relative_error

    weights = None
    if weights_path:
        remedy = "give --weights a run's checkpoint.pt, or leave it out (the seeded initialisation)"
        weights = checkpoint.read(Path(weights_path), torch.device("cpu"), remedy)["networks"]
    with tempfile.TemporaryDirectory(prefix="mptrain-accum-") as tmp:
        ref, ref_loss, _, batch, following = _gradients(overrides, "fp32", weights, None, Path(tmp))
        noise, _, _, _, _ = _gradients(overrides, "fp32", weights, following, Path(tmp) / "next")
        flat = lambda g: torch.cat([t.reshape(-1) for t in g.values()]).double()  # noqa: E731  (an exact cosine)
        rows = [("fp32, the next batch (sampling noise)", noise, ref_loss, True)]
        for arm in arms:
            grads, loss, applied, _, _ = _gradients(overrides, arm, weights, batch, Path(tmp))
            rows.append((arm, grads, loss, applied))
    lines = [f"state: {weights_path or 'the seeded initialisation'}; loss on the batch, fp32: {ref_loss:.5f}; "
             f"torch {torch.__version__}", "",
             "| gradient | relative L2 error vs fp32 | per tensor: median, worst (tensor) | cosine | loss Δ |",
             "|---|---|---|---|---|"]
    whole_ref = flat(ref)
    for label, grads, loss, applied in rows:
        if not applied:
            lines.append(f"| {label} | step skipped (overflow) | | | |")
            continue
        per = {n: relative_error(grads[n], ref[n]) for n in ref}
        worst = max(per, key=per.get)
        whole = flat(grads)
        cosine = float(torch.nn.functional.cosine_similarity(whole, whole_ref, dim=0))
        delta = "" if label.startswith("fp32") else f"{loss - ref_loss:+.2e}"
        lines.append(f"| {label} | {relative_error(whole, whole_ref):.2e} | {statistics.median(per.values()):.2e}, "
                     f"{per[worst]:.2e} ({worst}) | {cosine:.6f} | {delta} |")
    return lines


def main(argv: list[str] | None = None) -> int:
    from mptrain.console import OneLineParser
    from mptrain.errors import UserError

    parser = OneLineParser(prog="python -m mptrain.scripts.accumulation_error", description=__doc__.split("\n")[0])
    parser.add_argument("--weights", help="a run's checkpoint.pt: its weights are the state (default: the init)")
    parser.add_argument("--arms", default=",".join(ARMS), help="FP16 modes to compare with fp32")
    parser.add_argument("--md", help="also write the table to this file")
    try:
        args, overrides = parser.split_overrides(sys.argv[1:] if argv is None else argv)
        if args.weights and not Path(args.weights).is_file():
            raise UserError(f"--weights {args.weights}: no such file (a run's checkpoint.pt)")
        lines = compare(overrides, [a for a in args.arms.split(",") if a], args.weights)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print("\n".join(lines))
    if args.md:
        Path(args.md).write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
