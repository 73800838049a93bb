"""Checkpoint and resume: straight 2N steps == N steps, SIGKILL, resume to 2N, bit for bit; faults and mistakes."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest
import torch

from cli_helpers import TINY, mptrain, read_summary, scalar_tags, sigterm_once_training, train_inprocess
from mptrain import checkpoint

N = 4
RUN = [*TINY, "optim=adam", "optim.eps=1e-4", "dataset.train_size=96", f"trainer.max_steps={2 * N}",
       "trainer.eval_every=3", f"trainer.checkpoint_every={N}", "trainer.log_every=1"]  # 3 batches an epoch


def _load(run: Path) -> dict:
    return torch.load(run / checkpoint.FILENAME, weights_only=True)


def _equal(a, b) -> bool:
    if hasattr(a, "__tensor_flatten__"):  # a quantized optimizer state (optim.state=8bit): its codes and scales
        names = a.__tensor_flatten__()[0]
        return type(a) is type(b) and all(_equal(getattr(a, n), getattr(b, n)) for n in names)
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b))
    return a == b


LM = ["debug=tiny_lm", "model=transformer", "model.heads=2", "model.width=32", "model.context=8", "trainer.device=cpu",
      f"trainer.max_steps={2 * N}", f"trainer.checkpoint_every={N}", "trainer.log_every=1", "trainer.eval_every=3"]


@pytest.mark.e2e
@pytest.mark.parametrize("mode", ["fp32", pytest.param("mixed", marks=pytest.mark.slow),
                                  pytest.param("fp16_naive", marks=pytest.mark.slow),
                                  pytest.param("bf16_sr", marks=pytest.mark.slow),  # torchao's AdamW state
                                  pytest.param("bf16_kahan", marks=pytest.mark.slow),  # optimi's, with Kahan buffers
                                  pytest.param("fp8", marks=pytest.mark.slow),  # torchao Float8Linear layers
                                  # block formats with stochastic gradients (the RNG resumes) and 8-bit Adam moments
                                  pytest.param("mx precision.block_format=mxfp4 precision.grad_rounding=stochastic "
                                               "optim.state=8bit", marks=pytest.mark.slow)])
def test_resume_after_sigkill_continues_bit_identically(tmp_path, mode):
    # the master-weight rivals, fp8 and mx on a tiny transformer: Linear layers FP8 can convert, AdamW
    mode, *extra = mode.split()
    args = [*LM, "optim.weight_decay=0"] if mode in ("bf16_sr", "bf16_kahan", "fp8", "mx") else RUN
    args = [*args, f"precision={mode}", *extra]
    straight, killed, resumed = tmp_path / "straight", tmp_path / "killed", tmp_path / "resumed"
    assert train_inprocess(*args, f"hydra.run.dir={straight}")["status"] == "completed"
    out = mptrain(*args, f"hydra.run.dir={killed}", cwd=tmp_path, env={"MPTRAIN_FAULT_KILL_AFTER_CHECKPOINT": str(N)})
    assert out.returncode == -signal.SIGKILL and _load(killed)["step"] == N  # the kill: a process of its own
    assert train_inprocess(*args, f"trainer.resume={killed}", f"hydra.run.dir={resumed}")["status"] == "completed"

    a, b = _load(straight), _load(resumed)
    assert a["step"] == b["step"] == 2 * N
    for key in ("networks", "steppers", "history", "best", "epoch", "batch_in_epoch"):
        assert _equal(a[key], b[key]), key  # weights, FP32 masters, optimizer, scaler, schedule
    if mode == "mixed":
        assert a["steppers"]["model"]["scaler"]["scale"] == b["steppers"]["model"]["scaler"]["scale"]
    s_a, s_b = read_summary(straight), read_summary(resumed)
    assert s_a["history"] == s_b["history"] and s_b["resumed_from"]["step"] == N
    loss_a = {e.step: e.value for e in scalar_tags(straight / "tb")["train/loss"]}
    loss_b = {e.step: e.value for e in scalar_tags(resumed / "tb")["train/loss"]}
    assert min(loss_b) == N + 1 and all(loss_a[step] == value for step, value in loss_b.items())  # same metrics, step by step


@pytest.mark.e2e
@pytest.mark.slow
def test_language_model_resumes_its_hidden_state_mid_epoch(tmp_path):
    args = ["model=lstm_lm", "dataset=synthetic_text", "model.width=8", "dataset.batch_size=4", "dataset.bptt=8",
            "trainer.max_steps=6", "trainer.checkpoint_every=3", "trainer.log_every=1", "precision=fp32"]
    assert train_inprocess(*args, f"hydra.run.dir={tmp_path / 'a'}")["status"] == "completed"
    mptrain(*args, f"hydra.run.dir={tmp_path / 'k'}", cwd=tmp_path, env={"MPTRAIN_FAULT_KILL_AFTER_CHECKPOINT": "3"})
    assert _load(tmp_path / "k")["task"]["hidden"] is not None
    assert train_inprocess(*args, f"trainer.resume={tmp_path / 'k'}", f"hydra.run.dir={tmp_path / 'b'}")["status"] \
        == "completed"
    assert _equal(_load(tmp_path / "a")["networks"], _load(tmp_path / "b")["networks"])


def test_a_crash_mid_write_leaves_the_previous_checkpoint_whole(tmp_path, monkeypatch):
    path = tmp_path / checkpoint.FILENAME
    checkpoint.save(path, {"step": 1, "weights": torch.ones(3)})

    def crash(obj, f):
        f.write(b"PK\x03\x04 half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError):
        checkpoint.save(path, {"step": 2, "weights": torch.zeros(3)})
    state = torch.load(path, weights_only=True)
    assert state["step"] == 1 and torch.equal(state["weights"], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == [checkpoint.FILENAME]  # no temp file left behind


@pytest.mark.e2e
def test_sigterm_saves_a_checkpoint_and_records_interrupted(tmp_path):
    run = tmp_path / "run"
    done = sigterm_once_training(*TINY, "trainer.max_steps=100000", "trainer.log_every=1", f"hydra.run.dir={run}",
                                 watch=run, cwd=tmp_path)  # fmt: skip
    assert done.returncode == 130 and "Traceback" not in done.stderr
    summary = read_summary(run)
    assert summary["status"] == "interrupted" and "SIGTERM at step" in summary["error"]
    assert _load(run)["step"] == summary["steps"] > 0


@pytest.mark.e2e
def test_sigterm_stops_a_whole_sweep_not_just_its_job(tmp_path):
    done = sigterm_once_training("-m", "seed=0,1,2", *TINY, "trainer.max_steps=100000", "trainer.log_every=1",
                                 f"hydra.sweep.dir={tmp_path / 'sweep'}", watch=tmp_path / "sweep", cwd=tmp_path)
    assert done.returncode == 130
    summaries = sorted((tmp_path / "sweep").rglob("summary.json"))
    assert len(summaries) == 1 and read_summary(summaries[0].parent)["status"] == "interrupted"  # no next job started


@pytest.mark.e2e
def test_resuming_for_a_longer_run_is_refused_or_replans_the_schedule(tmp_path):
    """A finished 4-step cosine run resumed with trainer.max_steps=8: refused in one line (its schedule would
    climb back up), or with trainer.replan_schedule=true rebuilt for 8 steps: the LR then equals, step for step,
    that of a run planned for 8 steps from the start."""
    base = [*TINY, "dataset.train_size=96", "trainer.log_every=1", "trainer.checkpoint_every=4"]
    short = tmp_path / "short"
    assert train_inprocess(*base, "trainer.max_steps=4", f"hydra.run.dir={short}")["status"] == "completed"
    refused = mptrain(*base, "trainer.max_steps=8", f"trainer.resume={short}", f"hydra.run.dir={tmp_path / 'r'}",
                      cwd=tmp_path)
    assert refused.returncode == 2 and len(refused.stderr.strip().splitlines()) == 1
    assert "planned for 4 steps and this one for 8" in refused.stderr and "trainer.replan_schedule=true" in refused.stderr
    extended, planned = tmp_path / "extended", tmp_path / "planned"
    assert train_inprocess(*base, "trainer.max_steps=8", f"trainer.resume={short}", "trainer.replan_schedule=true",
                           f"hydra.run.dir={extended}")["status"] == "completed"
    assert train_inprocess(*base, "trainer.max_steps=8", f"hydra.run.dir={planned}")["status"] == "completed"
    lr = {run: {e.step: e.value for e in scalar_tags(run / "tb")["optim/lr"]} for run in (extended, planned)}
    assert [round(lr[extended][s], 9) for s in range(5, 9)] == [round(lr[planned][s], 9) for s in range(5, 9)]
    assert lr[extended][8] < lr[extended][5]  # still decaying: no warm restart
    assert read_summary(extended)["resumed_from"]["step"] == 4
