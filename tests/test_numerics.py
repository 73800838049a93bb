"""Numerics instruments: FP16 range fractions, exponent histograms, lost updates, and zero cost when off."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from cli_helpers import TINY, mptrain, scalar_tags
from mptrain.precision import Precision
from mptrain.telemetry.numerics import EXPONENTS, NumericsProbe, gradient_stats, half_ulp_fp16

CPU = torch.device("cpu")


def test_range_fractions_and_histogram_of_known_gradients():
    unscaled = torch.tensor([0.0, 2.0**-30, 2.0**-20, 2.0**-10, 1.0, 2.0**17])
    stats = gradient_stats(unscaled * 1024, torch.tensor(1024.0)).tolist()
    count, zero, under, sub, over, under_s, sub_s, over_s = stats[:8]
    assert count == 6 and (zero, under, sub, over) == (1, 1, 1, 1)  # 0; 2^-30 flushes; 2^-20 subnormal; 2^17 > 65504
    assert (under_s, sub_s, over_s) == (0, 1, 1)  # x1024: 2^-20 now subnormal, 2^-10 normal, 2^27 overflows
    histogram = stats[8:]
    assert [int(EXPONENTS[i]) for i, c in enumerate(histogram) if c] == [-30, -20, -10, 0, 17]


def test_inf_and_nan_gradients_count_as_overflow_in_the_top_bin():
    stats = gradient_stats(torch.tensor([float("inf"), float("nan"), 0.5]), 1.0).tolist()
    assert stats[4] == 2 and stats[7] == 2  # overflow, unscaled and scaled
    assert stats[8:][-1] == 2 and stats[8:][int(-1 - EXPONENTS[0])] == 1  # 0.5 = 2^-1


@pytest.mark.parametrize("scale", [1.0, 1024.0, 1000.0])
def test_fractions_match_a_direct_count_on_random_magnitudes(scale):
    torch.manual_seed(0)
    g = torch.randn(10_000) * torch.exp2(torch.randint(-45, 25, (10_000,)).float())
    g[::97] = 0.0
    stats = gradient_stats(g * scale, torch.tensor(scale)).tolist()
    a, s = g.abs(), (g * scale).abs()

    def bands(x):
        return [int(((x > 0) & (x < 2.0**-24)).sum()), int(((x >= 2.0**-24) & (x < 2.0**-14)).sum()), int((x > 65504).sum())]

    assert stats[:8] == [len(g), int((a == 0).sum()), *bands(a), *bands(s)]
    exponent = torch.floor(torch.log2(a[a > 0])).clamp(int(EXPONENTS[0]), int(EXPONENTS[-1]))
    assert stats[8:] == torch.bincount((exponent - EXPONENTS[0]).long(), minlength=len(EXPONENTS)).tolist()


def test_half_ulp_of_fp16_weights():
    w = torch.tensor([1.0, 0.0, 2.0**-20, 1000.0, -3.0])
    # FP16 has 10 mantissa bits: ulp(w) = 2^(floor(log2 w) - 10), subnormals 2^-24
    assert half_ulp_fp16(w).tolist() == [2.0**-11, 2.0**-25, 2.0**-25, 0.25, 2.0**-10]


@pytest.mark.parametrize("mode", ["fp32", "fp16_naive", "fp16_master"])
@pytest.mark.parametrize("lr, lost", [(2.0**-12, 1.0), (2.0**-8, 0.0)])
def test_lost_updates_are_the_papers_2_to_the_minus_12(compose_cfg, tmp_path, mode, lr, lost):
    """w = 1, update 2^-12 (< half an FP16 ulp of 1, 2^-11): lost in FP16; 2^-8 is not."""
    cfg = compose_cfg(f"precision={mode}", "optim.momentum=0", "optim.weight_decay=0", "optim.nesterov=false")
    precision = Precision(cfg.precision, CPU)
    model = precision.prepare(nn.Linear(4, 1, bias=False))
    with torch.no_grad():
        model.weight.fill_(1.0)
    stepper = precision.stepper(model, lambda p: torch.optim.SGD(p, lr=lr))
    probe = NumericsProbe(every=1, run_dir=tmp_path, activations=False)
    with probe.capture({"model": model}, {"model": stepper}):
        stepper.zero_grad()
        stepper.backward(model(torch.ones(1, 4, dtype=model.weight.dtype)).float().sum())  # grad = 1 per weight
        stepper.step()
    tb = _Recorder()
    probe.flush(tb, 1)
    assert tb.values["numerics/lost_update_frac/all"] == lost
    assert tb.values["numerics/underflow_frac/weight/all"] == 0.0
    assert "numerics/grad_log2/weight/all" in tb.histograms
    # per layer: one histogram tag per instrument (how many layers at each share), not one scalar per layer
    assert not any(tag.endswith("model.weight") for tag in [*tb.values, *tb.histograms])
    assert sum(tb.histograms["numerics/by_layer/underflow_frac/weight"]) == 1  # one layer, at 0 %
    assert tb.histograms["numerics/by_layer/lost_update_frac"][int(100 * lost) if lost < 1 else 100] == 1
    assert (tmp_path / "numerics.jsonl").read_text().count('"kind": "lost_update"') == 1


class _Recurrent(nn.Module):
    def __init__(self):
        super().__init__()
        self.rnn = nn.LSTM(3, 4, batch_first=True)
        self.head = nn.Linear(4, 1)

    def forward(self, x):
        out, _state = self.rnn(x)
        return self.head(out)


def test_activation_gradient_of_a_recurrent_layer_is_its_output_sequence(compose_cfg, tmp_path):
    """An LSTM returns (sequence, state); the sequence's gradient is the layer's activation gradient."""
    model = _Recurrent()
    stepper = Precision(compose_cfg("precision=fp32").precision, CPU).stepper(model, lambda p: torch.optim.SGD(p, lr=0.1))
    probe = NumericsProbe(every=1, run_dir=tmp_path)
    with probe.capture({"model": model}, {"model": stepper}):
        stepper.backward(model(torch.randn(2, 5, 3)).sum())
        stepper.step()
    taken = probe.take()
    assert taken[("activation", "model.rnn")][0] == 2 * 5 * 4  # count: batch x time x hidden
    assert ("activation", "model.head") in taken and ("weight", "model.rnn.weight_hh_l0") in taken


class _Recorder:
    def __init__(self):
        self.values, self.histograms = {}, {}

    def scalars(self, values, step):
        self.values.update(values)

    def histograms_raw(self, histograms, bins, step):
        self.histograms.update(histograms)


@pytest.mark.e2e
def test_numerics_through_the_cli_and_nothing_when_off(tmp_path):
    on, off = tmp_path / "on", tmp_path / "off"
    for run, extra in ((on, ["telemetry.numerics.every=2"]), (off, [])):
        out = mptrain("precision=mixed", *TINY, "trainer.max_steps=4", *extra, f"hydra.run.dir={run}", cwd=tmp_path)
        assert out.returncode == 0, out.stderr[-2000:]
    records = [json.loads(line) for line in (on / "numerics.jsonl").read_text().splitlines()]
    kinds = {"weight", "activation", "lost_update", "forward", "forward_first_overflow", "fp8"}
    assert {r["step"] for r in records} == {2, 4} and {r["kind"] for r in records} == kinds
    tags = scalar_tags(on / "tb")
    assert {"numerics/underflow_frac/weight/all", "numerics/overflow_scaled_frac/activation/all",
            "numerics/lost_update_frac/all"} <= tags.keys()
    shown = [t for t in tags if t.startswith("numerics/")]
    assert len(shown) < 40, len(shown)  # totals only: per-layer figures are histograms (1,350 scalars before)
    assert not (off / "numerics.jsonl").exists() and not any(t.startswith("numerics/") for t in scalar_tags(off / "tb"))
