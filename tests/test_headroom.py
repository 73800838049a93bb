"""Forward activation headroom: exact shares on constructed outputs, the first overflowing module named."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from mptrain.telemetry import headroom
from mptrain.telemetry.numerics import NumericsProbe


def test_shares_above_and_within_each_limit_are_exact():
    # 10 values: 2 above 65504, 1 in (32752, 65504], 1 in (16376, 32752], 1 in (4094, 16376], 5 small
    x = torch.tensor([1e5, -7e4, 4e4, -2e4, 5e3, 1.0, -2.0, 3.0, 500.0, 0.0])
    r = headroom.to_record("m", 0, headroom.headroom_stats(x).tolist())
    assert r["count"] == 10 and r["amax"] == 1e5
    assert r["over_fp16_frac"] == pytest.approx(0.2) and r["within2x_fp16_frac"] == pytest.approx(0.3)
    assert r["within4x_fp16_frac"] == pytest.approx(0.4) and r["within16x_fp16_frac"] == pytest.approx(0.5)
    assert r["headroom_bits_fp16"] == pytest.approx(math.log2(65504 / 1e5))  # negative: it overflows
    assert r["over_e4m3_frac"] == pytest.approx(0.6)  # 448: 500 and everything larger
    assert r["over_bf16_frac"] == 0 and r["headroom_bits_bf16"] > 100


def test_nan_counts_as_beyond_every_limit_and_merging_keeps_the_max():
    a = headroom.headroom_stats(torch.tensor([float("nan"), 1.0]))
    b = headroom.headroom_stats(torch.tensor([3.0, 2.0, 1.0]))
    r = headroom.to_record("m", 0, headroom.merge(a, b).tolist())
    assert r["count"] == 5 and r["amax"] == math.inf and r["over_bf16_frac"] == pytest.approx(0.2)
    assert headroom.merge_lists(a.tolist(), b.tolist()) == headroom.merge(a, b).tolist()


class _Planted(nn.Module):
    """Linear → ×1e5 (a planted overflow) → Linear: the scaling module's output is the first beyond 65504."""

    def __init__(self):
        super().__init__()
        self.first = nn.Linear(4, 4)
        self.boost = nn.Identity()
        self.last = nn.Linear(4, 2)

    def forward(self, x):
        return self.last(self.boost(self.first(x)) * 1.0)


class _Boost(nn.Module):
    def forward(self, x):
        return x * 1e5


def test_the_probe_names_the_first_module_that_overflows_fp16(tmp_path):
    torch.manual_seed(0)
    model = _Planted()
    model.boost = _Boost()

    class Stepper:  # what capture() reads of a stepper
        params, masters, current_scale = list(model.parameters()), None, None

    probe = NumericsProbe(1, tmp_path)
    with probe.capture({"model": model}, {"model": Stepper()}):
        model(torch.ones(3, 4)).sum().backward()

    class TB:
        scalars = histograms_raw = staticmethod(lambda *a, **k: None)

    probe.flush(TB(), 1)
    records = [json.loads(line) for line in (tmp_path / "numerics.jsonl").read_text().splitlines()]
    forward = {r["layer"]: r for r in records if r["kind"] == "forward"}
    assert list(forward) == ["model.first", "model.boost", "model.last"]  # in the order the forward ran
    assert forward["model.first"]["over_fp16_frac"] == 0 and forward["model.boost"]["amax"] > 65504
    (first,) = [r for r in records if r["kind"] == "forward_first_overflow"]
    assert first["layer"] == "model.boost"


def test_an_overflowed_output_reads_as_infinite():
    r = headroom.to_record("m", 0, headroom.headroom_stats(torch.tensor([float("inf"), 1.0]).half()).tolist())
    assert r["amax"] == math.inf and r["headroom_bits_fp16"] == -math.inf and r["over_fp16_frac"] == 0.5


def test_fp8_tensorwise_underflow_behind_an_outlier_is_exact():
    from mptrain.telemetry import fp8_stats

    x = torch.cat([torch.tensor([1000.0]), torch.full((99,), 1e-3)])  # scaled by 448/1000: 1e-3 -> 4.5e-4 < 2^-10
    r = fp8_stats.to_record("m.fc.input", 0, fp8_stats.operand_stats(x, "e4m3").tolist())
    assert r["amax"] == 1000.0 and r["scale"] == pytest.approx(0.448) and r["underflow_frac"] == pytest.approx(0.99)
    healthy = fp8_stats.to_record("m.fc.weight", 0, fp8_stats.operand_stats(torch.linspace(0.1, 1, 50), "e4m3").tolist())
    assert healthy["underflow_frac"] == 0 and fp8_stats.unhealthy([r, healthy]) == ["m.fc"]


def test_the_probe_records_each_linears_fp8_operands(tmp_path):
    torch.manual_seed(0)
    model = _Planted()

    class Stepper:
        params, masters, current_scale = list(model.parameters()), None, None

    probe = NumericsProbe(1, tmp_path)
    with probe.capture({"model": model}, {"model": Stepper()}):
        model(torch.ones(3, 4)).sum().backward()
    stats = probe.take()
    fp8 = {layer for kind, layer in stats if kind == "fp8"}
    assert fp8 == {f"model.{m}.{o}" for m in ("first", "last") for o in ("input", "weight", "grad_output")}


def test_fp8_operand_histogram_counts_scaled_exponents_exactly():
    """amax 1 onto E4M3's 448: 1 -> 448 (2^8.8), 0.5 -> 224, 2^-10 -> 0.4375 (2^-1.2); zero is not counted."""
    from mptrain.telemetry import fp8_stats

    v = fp8_stats.operand_stats(torch.tensor([1.0, -0.5, 2.0**-10, 0.0]), "e4m3").tolist()
    hist = dict(zip(fp8_stats.EXPONENTS.tolist(), fp8_stats.to_record("m.fc.input", 0, v)["log2_hist"]))
    assert {e: n for e, n in hist.items() if n} == {8: 1.0, 7: 1.0, -2: 1.0}
    assert fp8_stats.merge(torch.tensor(v), torch.tensor(v)).tolist()[5:] == [2 * n for n in v[5:]]
