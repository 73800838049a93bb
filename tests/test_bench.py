"""`mptrain-bench`: ours beside a bare PyTorch loop, ratios and memory slopes computed from what it measured."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

BENCH = [sys.executable, "-m", "mptrain.bench.cli"]
# debug=tiny's sizes without its trainer settings or batch size (the bench sets its own)
SMALL = ["dataset=synthetic", "dataset.image_size=8", "dataset.channels=3", "dataset.num_classes=4",
         "dataset.train_size=256", "dataset.test_size=64", "model.depth=8", "model.width=4"]
QUICK = ["--warmup", "2", "--window", "2", "--windows", "2", "--repeats", "1", "--pairs", "3"]


def bench(*args, cwd):
    return subprocess.run([*BENCH, *args], cwd=cwd, capture_output=True, text=True, timeout=600)


@pytest.mark.e2e
def test_bench_measures_ours_and_the_bare_loop_and_derives_the_ratios(tmp_path):
    out = bench(*SMALL, "--modes", "fp32,bf16,mixed", "--batch-sizes", "8,16", *QUICK, "--out", str(tmp_path / "b"),
                cwd=tmp_path)  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    [path] = (tmp_path / "b").rglob("resnet_synthetic_*.json")  # the settings follow model and dataset
    assert path.parent.name.endswith(f"_torch{torch.__version__.split('+')[0]}")
    result = json.loads(path.read_text())
    rows = {(r["mode"], r["batch"]): r for r in result["rows"]}
    assert set(rows) == {(mode, batch) for mode in ("fp32", "bf16", "mixed") for batch in (8, 16)}
    for (mode, batch), r in rows.items():
        assert r["bare"] == {"mixed": "amp"}.get(mode, mode) and r["ours"]["windows"] == 2 and r["bare_loop"]["windows"] == 2
        assert r["ours_over_bare"] == pytest.approx(r["ours"]["samples_per_s"] / r["bare_loop"]["samples_per_s"])
        fp32 = rows[("fp32", batch)]["ours"]
        assert r["speedup_vs_fp32"] == pytest.approx(r["ours"]["samples_per_s"] / fp32["samples_per_s"])
        assert r["ours"]["peak_bytes"] > 0 and r["bare_loop"]["peak_bytes"] > 0
        p = r["paired"]  # one Trainer step, one bare step, alternated
        assert p["pairs"] == 3 and p["ours_step_ms"] > 0 and p["bare_step_ms"] > 0 and p["log_every"] == 2
        assert p["overhead"] == pytest.approx((p["ours_step_ms"] + p["log_window_ms"] / 2) / p["bare_step_ms"] - 1)
        if mode == "mixed":  # a scaled step keeps BatchNorm's statistics for a skip: its cost, timed in the pairs
            assert 0 < p["buffer_snapshot_ms"] < p["ours_step_ms"]
            assert p["buffer_snapshot_share"] == pytest.approx(p["buffer_snapshot_ms"] / p["ours_step_ms"])
        else:
            assert p["buffer_snapshot_ms"] is None
    for mode, slope in result["activation_memory"].items():
        small, large = rows[(mode, 8)]["ours"]["peak_bytes"], rows[(mode, 16)]["ours"]["peak_bytes"]
        assert slope["bytes_per_sample"] == pytest.approx((large - small) / 8)
    # the bf16 arm saves bf16 activations: its activation memory is well below fp32's
    assert result["activation_memory"]["bf16"]["vs_fp32"] < 0.75
    assert "| fp32 | 8 |" in path.with_suffix(".md").read_text() and "buffer snapshot" in path.with_suffix(".md").read_text()


@pytest.mark.e2e
@pytest.mark.parametrize("args, says", [
    (["--modes", "fp64"], "--modes"),
    (["--batch-sizes", "0"], "--batch-sizes"),
    (["precision=mixed"], "precision is set by --modes"),
    (["--frobnicate"], "unknown option --frobnicate"),
    (["--pairs", "-1"], "--pairs"),
    (["model=nosuch"], "model"),
])  # fmt: skip
def test_bench_bad_input_gets_one_line(tmp_path, args, says):
    out = bench(*args, "--out", str(tmp_path / "b"), cwd=tmp_path)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mptrain-bench: error:") and says in lines[0], out.stderr
    assert not (tmp_path / "b").exists()


def test_bare_loop_trains_the_language_model_too(compose_cfg):
    from mptrain.bench.measure import time_bare

    cfg = compose_cfg("model=lstm_lm", "dataset=synthetic_text", "model.width=8", "dataset.batch_size=4",
                      "dataset.bptt=8", "precision=fp32")  # fmt: skip
    timing = time_bare(cfg, torch.device("cpu"), "bf16", warmup=2, windows=2, window=2)
    assert len(timing.step_ms) == 2 and all(ms > 0 for ms in timing.step_ms) and timing.peak_bytes > 0


def test_bare_loop_trains_the_transformer_which_carries_no_state(compose_cfg):
    from mptrain.bench.measure import time_bare

    cfg = compose_cfg("model=transformer", "dataset=synthetic_text", "model.width=16", "model.heads=2",
                      "model.layers=1", "model.context=8", "dataset.batch_size=4", "dataset.bptt=8",
                      "precision=fp32")  # fmt: skip
    timing = time_bare(cfg, torch.device("cpu"), "bf16", warmup=2, windows=2, window=2)
    assert len(timing.step_ms) == 2 and all(ms > 0 for ms in timing.step_ms)


@pytest.mark.e2e
def test_bench_times_modes_without_a_bare_loop_alone(tmp_path):
    """The master weights' rivals and fp8 have no plain-PyTorch loop of a few lines: timed, no bare column."""
    out = bench(*SMALL, "--modes", "fp32,bf16_pure,bf16/cpu_bf16=emulate", "--batch-sizes", "8", *QUICK,
                "--out", str(tmp_path / "b"), cwd=tmp_path)  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    [path] = (tmp_path / "b").rglob("resnet_synthetic*.json")
    rows = {r["mode"]: r for r in json.loads(path.read_text())["rows"]}
    assert rows["bf16_pure"]["bare"] is None and rows["bf16_pure"]["ours"]["samples_per_s"] > 0
    assert rows["bf16/cpu_bf16=emulate"]["bare"] == "bf16"  # its bare loop runs in the same emulated kernels
