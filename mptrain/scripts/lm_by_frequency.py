"""Where a language model's held-out loss differs between precision modes: by how often each target word occurs
in the training split.

    python -m mptrain.scripts.lm_by_frequency RUN_DIR [RUN_DIR ...] [--json F] [--md F]

Each RUN_DIR is a finished language-model run with its final checkpoint (`trainer.checkpoint_every`; a sweep's
job folders are). The run is rebuilt from its own overrides (`.hydra/overrides.yaml`, its precision included),
its checkpoint's networks loaded, and the held-out split run forward once, as its evaluations ran it (carried
state, the run's autocast and kernels); each token's loss is then filed under its target word's training
count. The table gives, per mode (seeds averaged), each frequency band's share of held-out tokens, its mean
loss, and the paired Δ against fp32 (same seeds), with the band's contribution to the whole Δ of the mean loss
(share × Δ): which words a precision mode's held-out perplexity gains or loses on. Beside it, the decoder's
output bias per band (the rarest words' logits are what Adam drifts on tiny gradients: README of
results/.../repro_loss_scaling). A second table follows the word the training split never contains, `<unk>`
(its logit learns only from the softmax's normaliser, a gradient of p(<unk>) / tokens per step): the median of
-log p(<unk>) over all held-out contexts, and where, at the run's final loss scale, that gradient's FP16 value
rounds to zero. Nothing is written except --json / --md.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path

BANDS = (
    (0, 0, "<unk>"),
    (1, 4, "1-4"),
    (5, 19, "5-19"),
    (20, 99, "20-99"),
    (100, 999, "100-999"),
    (1000, None, "≥1000"),
)  # fmt: skip  (training counts; <unk> is its own band whatever its count)


_DATA: dict = {}  # dataset config → its DataModule


def evaluate_run(run_dir: Path) -> dict:
    """One run's held-out loss summed per band, its decoder bias per band, and its identity."""
    import torch
    import torch.nn.functional as F
    from omegaconf import OmegaConf

    from mptrain.build import resolve_device, seed_everything
    from mptrain.console import compose
    from mptrain.data import build_data
    from mptrain.errors import UserError
    from mptrain.precision import Precision
    from mptrain.tasks import build_task

    recorded = run_dir / ".hydra" / "overrides.yaml"
    if not (run_dir / "checkpoint.pt").is_file() or not recorded.is_file():
        raise UserError(f"{run_dir} is not a run dir with a checkpoint (checkpoint.pt and .hydra/overrides.yaml)")
    overrides = [o for o in OmegaConf.load(recorded) if not o.lstrip("+~").startswith(("hydra", "trainer.resume"))]
    cfg = compose([*overrides, "trainer.progress=false"])
    if cfg.model.task != "language_model":
        raise UserError(f"{run_dir} trained {cfg.model.name}, not a language model")
    device = resolve_device("cpu")
    seed_everything(cfg.seed)
    precision = Precision(cfg.precision, device)
    key = OmegaConf.to_yaml(cfg.dataset)  # the held-out split and training counts do not depend on the seed
    if key not in _DATA:  # tokenizing the text is most of a run's time here: once per dataset
        _DATA[key] = build_data(cfg.dataset, device, cfg.seed, augment=False)
    data = _DATA[key]
    task = build_task(cfg.model, data, precision)
    model = task.networks()["model"]
    try:
        state = torch.load(run_dir / "checkpoint.pt", map_location=device, weights_only=True)["networks"]["model"]
        model.load_state_dict(state)
    except Exception as e:
        reason = str(e).splitlines()[0][:160]
        raise UserError(f"{run_dir / 'checkpoint.pt'} does not load into {cfg.model.name}: {reason}") from None
    model.eval()
    counts = torch.bincount(data.train.ids, minlength=data.spec.vocab_size)
    band_of = _bands(counts)
    loss_sum = torch.zeros(len(BANDS), dtype=torch.float64)
    tokens = torch.zeros(len(BANDS), dtype=torch.float64)
    state = None
    unk_logprob = []  # log p(<unk>) in every held-out context, whatever the target
    with torch.no_grad(), precision.kernels():
        for x, y in data.test:
            if state is None:
                state = model.initial_state(x.shape[0], device)
            with precision.autocast():
                logits, state = model(x, state)
            logprob = F.log_softmax(logits.float().flatten(0, 1), dim=-1)  # cross_entropy's own first step
            nll = -logprob.gather(1, y.flatten().unsqueeze(1)).squeeze(1).double()
            unk_logprob.append(logprob[:, 0])
            bands = band_of[y.flatten()]
            loss_sum += torch.zeros(len(BANDS), dtype=torch.float64).index_add_(0, bands, nll)
            tokens += torch.bincount(bands, minlength=len(BANDS)).double()
    bias = getattr(getattr(model, "decoder", None), "bias", None)
    bias_by_band = [float(bias.detach().float()[band_of == i].mean()) if bias is not None and (band_of == i).any() else None
                    for i in range(len(BANDS))]  # fmt: skip
    summary = json.loads((run_dir / "summary.json").read_text()) if (run_dir / "summary.json").is_file() else {}
    unk = torch.cat(unk_logprob)
    scale = summary.get("final_loss_scale")
    per_step = cfg.dataset.batch_size * cfg.dataset.bptt
    flush_below = flush_logprob(per_step, scale) if scale and cfg.precision.mode != "fp32" else None
    return {
        "run_dir": str(run_dir),
        "precision": summary.get("precision_preset") or cfg.precision.mode,
        "seed": int(cfg.seed),
        "loss_sum": loss_sum.tolist(),
        "tokens": tokens.tolist(),
        "perplexity": math.exp(float(loss_sum.sum() / tokens.sum())),
        "reported_perplexity": (summary.get("final") or {}).get("perplexity"),
        "decoder_bias": bias_by_band,
        "unk_nll_median": float(-unk.median()),
        "final_loss_scale": scale,
        "unk_flush_below_nll": None if flush_below is None else -flush_below,
        "unk_flushed_share": None if flush_below is None else float((unk < flush_below).float().mean()),
    }


def flush_logprob(tokens_per_step: int, scale: float) -> float:
    """log p below which a word's logit gradient in one context, p / tokens_per_step (the loss is a mean) times the
    loss scale, rounds to zero in FP16: below half the smallest subnormal, 2^-25 (a tie rounds to the even 0)."""
    return math.log(2.0**-25 * tokens_per_step / scale)


def _bands(counts):
    import torch

    band_of = torch.empty_like(counts)
    for i, (low, high, _) in enumerate(BANDS):
        band_of[(counts >= low) & (counts <= (high if high is not None else counts.max()))] = i
    band_of[0] = 0  # <unk>: id 0 (mptrain/data/text.py), its own band
    return band_of


def table(runs: list[dict], control: str = "fp32") -> str:
    """Per mode and band: token share, mean loss, paired Δ vs the control and its share of the whole Δ."""
    by_mode: dict[str, dict[int, dict]] = {}
    for run in runs:
        by_mode.setdefault(run["precision"], {})[run["seed"]] = run
    if control not in by_mode:
        from mptrain.errors import UserError

        raise UserError(f"no {control} run among these to compare against (--control names the mode)")
    lines = [
        "| mode | band (training count) | share of held-out tokens | mean loss (nats) | paired Δ vs "
        f"{control} (nats) | contribution to Δ mean loss | decoder bias (mean) |",
        "|---|---|---|---|---|---|---|",
    ]
    for mode, seeds in sorted(by_mode.items(), key=lambda kv: (kv[0] != control, kv[0])):
        paired = sorted(set(seeds) & set(by_mode[control]))
        for i, (_, _, name) in enumerate(BANDS):
            share = statistics.mean(r["tokens"][i] / sum(r["tokens"]) for r in seeds.values())
            means = [r["loss_sum"][i] / r["tokens"][i] for r in seeds.values() if r["tokens"][i]]
            bias = [r["decoder_bias"][i] for r in seeds.values() if r["decoder_bias"][i] is not None]
            delta = contribution = "-"
            if mode != control and paired:
                ds = [seeds[s]["loss_sum"][i] / seeds[s]["tokens"][i] - by_mode[control][s]["loss_sum"][i]
                      / by_mode[control][s]["tokens"][i] for s in paired if seeds[s]["tokens"][i]]  # fmt: skip
                if ds:  # a band with no held-out tokens has no Δ
                    delta = f"{statistics.mean(ds):+.4f} (n={len(ds)})"
                    contribution = f"{share * statistics.mean(ds):+.4f}"
            lines.append(
                f"| {mode} | {name} | {share:.3%} | {statistics.mean(means) if means else float('nan'):.4f} "
                f"| {delta} | {contribution} | {statistics.mean(bias) if bias else float('nan'):+.3f} |"
            )
        whole = statistics.mean(math.log(r["perplexity"]) for r in seeds.values())
        delta = "-"
        if mode != control and paired:
            ratios = [math.log(seeds[s]["perplexity"] / by_mode[control][s]["perplexity"]) for s in paired]
            delta = f"{statistics.mean(ratios):+.4f} (n={len(paired)})"
        lines.append(f"| {mode} | **all** | 100 % | {whole:.4f} | {delta} | | |")
    return "\n".join(lines) + "\n\n" + _unk_table(by_mode)


def _unk_table(by_mode: dict) -> str:
    """The never-trained word: how far each mode pushed its probability down, against where its FP16 gradient flushes."""
    lines = ["| mode | −log p(<unk>), median over held-out contexts (nats) | final loss scale | its FP16 logit gradient "
             "rounds to 0 beyond (nats) | held-out contexts beyond it |", "|---|---|---|---|---|"]  # fmt: skip
    for mode, seeds in sorted(by_mode.items()):
        runs = list(seeds.values())
        median = statistics.mean(r["unk_nll_median"] for r in runs)
        scales = sorted({r["final_loss_scale"] for r in runs if r["final_loss_scale"] is not None})
        flush = [r["unk_flush_below_nll"] for r in runs if r["unk_flush_below_nll"] is not None]
        shares = [r["unk_flushed_share"] for r in runs if r["unk_flushed_share"] is not None]
        lines.append(f"| {mode} | {median:.2f} | {', '.join(f'{s:g}' for s in scales) or '-'} | "
                     f"{f'{statistics.mean(flush):.2f}' if flush else '-'} | "
                     f"{f'{statistics.mean(shares):.1%}' if shares else '-'} |")  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from mptrain.errors import UserError

    parser = argparse.ArgumentParser(
        prog="python -m mptrain.scripts.lm_by_frequency", description=__doc__.split("\n")[0]
    )
    parser.add_argument("runs", nargs="+", type=Path, help="language-model run folders with a final checkpoint")
    parser.add_argument("--control", default="fp32", help="the mode every Δ is taken against (default fp32)")
    parser.add_argument("--json", type=Path, help="write every run's sums here")
    parser.add_argument("--md", type=Path, help="write the table here")
    args = parser.parse_args(argv)
    try:
        runs = [evaluate_run(run) for run in args.runs]
        text = table(runs, args.control)
    except UserError as e:
        print(f"lm_by_frequency: error: {e}", file=sys.stderr)
        return 2
    for run in runs:
        print(f"{run['run_dir']}: perplexity {run['perplexity']:.4f} (the run reported {run['reported_perplexity']})",
              file=sys.stderr)  # fmt: skip
    print(text)
    if args.json:
        args.json.write_text(json.dumps(runs, indent=1))
    if args.md:
        args.md.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
