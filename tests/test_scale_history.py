"""The verdict on a loss-scale history: each verdict from constructed histories, and a real run made to
overflow in one named layer."""

from __future__ import annotations

import pytest

from cli_helpers import mptrain, read_summary
from mptrain.telemetry.scale_history import scale_verdict

DESCENT = [(1, 65536.0, "model.fc.weight"), (2, 32768.0, "model.fc.weight"), (3, 16384.0, "model.fc.weight")]


@pytest.mark.parametrize("events, dynamic, final, verdict, says", [
    ([], True, 65536.0, "no overflow", None),
    (DESCENT + [(2400, 16384.0, "a"), (5100, 16384.0, "b")], True, 16384.0, "normal probing", None),  # ~1 per interval
    (DESCENT + [(3000, 8192.0, "a"), (3010, 4096.0, "b"), (3020, 2048.0, "c")], True, 2048.0, "trouble",
     "3 or more skips within 200 steps"),
    (DESCENT + [(s, 2.0 ** (13 - i), f"l{i}") for i, s in enumerate(range(1000, 9000, 1000))], True, 32.0, "trouble",
     "the scale fell from 8192 to 64"),
    (DESCENT + [(s, 16384.0, "model.blocks.0.mlp.2") for s in range(1000, 9000, 700)], True, 16384.0, "trouble",
     "model.blocks.0.mlp.2 behind"),
    ([(500, 128.0, "x"), (4000, 128.0, "y")], False, 128.0, "occasional overflow", None),
    ([(i, 0.5, "x") for i in range(1, 5)] + [(100, 0.25, "x")], True, 0.25, "trouble", "below 1"),
])  # fmt: skip
def test_each_verdict_from_a_constructed_history(events, dynamic, final, verdict, says):
    v = scale_verdict(events, 10_000, dynamic, 2000, final)
    assert v["verdict"] == verdict and v["skips"] == len(events)
    if says:
        assert any(says in reason for reason in v["reasons"]), v["reasons"]
    if events and dynamic and events[0][0] == 1:
        assert v["descent_skips"] >= 3  # the scale coming down at the start is not held against it


@pytest.mark.e2e
def test_a_run_overflowing_in_one_named_layer_gets_trouble_naming_it(tmp_path):
    """A tiny MLP whose output layer's gradients overflow at a static 2^24 every few steps (lr tiny so the
    weights barely move): the verdict names that layer."""
    run = tmp_path / "run"
    out = mptrain("debug=tiny", "model=mlp", "model.depth=3", "precision=mixed", "precision.loss_scale=1e9",
                  "precision.max_consecutive_skips=100", "trainer.max_steps=12", "optim.lr=1e-9",
                  f"hydra.run.dir={run}", cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    s = read_summary(run)
    v = s["loss_scale_verdict"]["model"]
    assert v["verdict"] == "trouble" and v["skips"] == s["skipped_steps"] > 0
    assert v["layers"] and v["layers"][0].startswith("model.")
    assert "loss scale" in out.stdout and "trouble" in out.stdout


def test_verdicts_for_runs_made_before_the_verdict_existed(tmp_path, capsys):
    import json

    from mptrain.scripts.backfill_scale_history import main

    run = tmp_path / "mixed" / "seed=0"
    run.mkdir(parents=True)
    events = [{"step": s, "loss_scale": 65536.0 / 2 ** i, "first_nonfinite_forward": None,
               "nonfinite_grads": ["model.fc.weight"]} for i, s in enumerate((1, 2, 3))]
    run.joinpath("summary.json").write_text(json.dumps({
        "precision": "mixed", "loss_scale": "dynamic", "seed": 0, "status": "completed", "steps": 500,
        "skipped_steps": 3, "final_loss_scale": 8192.0, "overflow_events": events}))
    assert main([str(tmp_path)]) == 0
    assert "normal probing (3 skips: 3 in the descent" in capsys.readouterr().out
