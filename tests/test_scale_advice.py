"""Loss-scale advice from exponent histograms, and the `mptrain-numerics` command."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from mptrain.precision.scale_advice import RangeAdvice, advise, recommend

EXPONENTS = list(range(-64, 18))


def histogram(counts: dict[int, float]) -> list[float]:
    return [counts.get(e, 0.0) for e in EXPONENTS]


def test_flushed_share_and_the_smallest_scale_that_keeps_the_coverage():
    # 1000 values: 2 at 2^-40, 8 at 2^-30, 990 at 2^-10
    advice = advise(EXPONENTS, histogram({-40: 2, -30: 8, -10: 990}), coverage=0.999)
    assert advice.flushed == pytest.approx(0.010)
    # scale 2^6 lifts 2^-30 to 2^-24 (kept); 2^-40 still flushes: 0.2% > 0.1%, so 2^16 is needed
    assert advice.min_scale == 2.0**16
    assert advice.max_scale == 2.0**24  # top bin 2^-10 lands at 2^14 under 2^24
    assert advise(EXPONENTS, histogram({-40: 2, -30: 8, -10: 990}), coverage=0.995).min_scale == 2.0**6


def test_a_range_wider_than_fp16_has_no_scale():
    advice = advise(EXPONENTS, histogram({-50: 10, 10: 10}), coverage=0.9)
    assert advice.min_scale is None and advice.max_scale == 2.0**4


def test_already_representable_gradients_need_no_scaling_and_overflow_lowers_the_ceiling():
    fine = advise(EXPONENTS, histogram({-5: 100}), coverage=0.999)
    assert fine.flushed == 0 and fine.min_scale == 2.0**-19  # could even shrink: the top bin may rise to 2^14
    assert advise(EXPONENTS, histogram({16: 1}), coverage=0.999).max_scale == 2.0**-2


def test_recommendation_takes_headroom_below_the_ceiling_but_never_below_the_need():
    a = RangeAdvice(100, 0.05, 0.1, min_scale=2.0**8, max_scale=2.0**20)
    b = RangeAdvice(100, 0.0, 0.0, min_scale=2.0**2, max_scale=2.0**16)
    rec = recommend({"a": a, "b": b}, headroom=8)
    assert (rec.scale, rec.needed, rec.ceiling) == (2.0**13, 2.0**8, 2.0**16)
    assert recommend({"a": a, "b": b}, headroom=2.0**10).scale == 2.0**8
    clash = RangeAdvice(100, 0.5, 0.1, min_scale=2.0**18, max_scale=2.0**20)
    assert recommend({"a": clash, "b": b}, headroom=8).scale is None


def _numerics(*args, cwd):
    return subprocess.run([sys.executable, "-m", "mptrain.diagnose.cli", *args], capture_output=True, text=True,
                          cwd=cwd, timeout=600)  # fmt: skip


@pytest.mark.e2e
def test_numerics_command_scans_a_tiny_model_and_writes_json(tmp_path):
    out = _numerics("model.depth=8", "dataset=synthetic", "dataset.batch_size=8", "--steps", "2",
                    "--json", str(tmp_path / "scan.json"), cwd=tmp_path)  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    assert "recommended static scale for model" in out.stdout
    scan = json.loads((tmp_path / "scan.json").read_text())
    assert scan["steps"] == 2 and {r["kind"] for r in scan["layers"]} == {"weight", "activation"}
    weights = [r for r in scan["layers"] if r["kind"] == "weight"]
    assert all(r["lost_update_frac"] is not None for r in weights)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["scan.json"]  # no Hydra output folders


@pytest.mark.e2e
@pytest.mark.parametrize("args, says", [
    (["--steps", "0"], "--steps"),
    (["--coverage", "1.5"], "--coverage"),
    (["--bogus"], "unknown option --bogus"),
    (["precision=mixed"], "fp32 by definition"),
    (["model=nonexistent"], "model"),
])  # fmt: skip
def test_numerics_command_bad_input_gets_one_line(tmp_path, args, says):
    out = _numerics(*args, cwd=tmp_path)
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and says in lines[0] and "Traceback" not in out.stderr, out.stderr
    assert list(tmp_path.iterdir()) == []


@pytest.mark.e2e
@pytest.mark.slow
def test_recommended_scale_keeps_the_underflowing_mlps_gradients_in_fp16(tmp_path):
    """On the deep plain MLP (real Fashion-MNIST), unscaled FP16 flushes a few percent of the weight
    gradients to zero. In `mixed` training the FP16 gradients show it: at loss_scale=1 that many more
    of them are exactly zero than at the recommended scale."""
    from cli_helpers import train_inprocess

    scan_path = tmp_path / "scan.json"
    out = _numerics("model=mlp", "--steps", "20", "--json", str(scan_path), cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    scan = json.loads(scan_path.read_text())
    flushed = scan["overall"]["weight"]["flushed_frac"]
    assert flushed > 0.02
    scale = scan["recommended"]["model"]["scale"]
    assert scale is not None and scale >= 2**8 and math.log2(scale).is_integer()
    zero = {}
    for arm in (1, scale):
        run = tmp_path / f"scale{arm:g}"
        done = train_inprocess("model=mlp", "precision=mixed", f"precision.loss_scale={arm:g}", "trainer.max_steps=20",
                               "trainer.eval_max_batches=1", "telemetry.numerics.every=10", f"hydra.run.dir={run}")
        assert done["status"] == "completed", done.get("error")
        records = [json.loads(line) for line in (run / "numerics.jsonl").read_text().splitlines()]
        weights = [r for r in records if r["kind"] == "weight"]
        zero[arm] = sum(r["count"] * r["zero_frac"] for r in weights) / sum(r["count"] for r in weights)
    assert zero[1] - zero[scale] > flushed / 3, (zero, flushed)


def test_a_layer_no_static_scale_fits_makes_the_advice_dynamic_and_names_every_such_layer():
    """`mptrain-numerics model=lstm_lm` recommended 16384 while saying 8 layers could not reach the coverage at any
    scale (and listed 3 of them): one answer now, with every layer it concerns."""
    fits = RangeAdvice(100, 0.0, 0.0, min_scale=2.0**2, max_scale=2.0**16)
    unfit = RangeAdvice(100, 0.4, 0.1, min_scale=None, max_scale=2.0**16)
    rec = recommend({"a": fits, **{f"layer{i}": unfit for i in range(3)}}, headroom=8)
    assert rec.scale is None and "use dynamic scaling" in rec.reason
    assert "3 layer(s) cannot keep the coverage" in rec.reason and "layer0, layer1, layer2" in rec.reason
    many = recommend({f"l{i:02d}": unfit for i in range(11)}, headroom=8)
    assert "l00, l01, l02, l03, l04, l05, l06, l07 and 3 more (--json lists" in many.reason
