"""Data parallelism on torch.distributed (gloo, two CPU processes): the overflow vote, batch equivalence, the CLI."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from omegaconf import OmegaConf

from cli_helpers import TINY, mptrain, read_summary, sigterm_once_training

SMALL = ["model=mlp", "model.depth=3", "model.width=32", "dataset=synthetic", "dataset.image_size=8",
         "dataset.channels=1", "dataset.num_classes=4", "dataset.train_size=512", "dataset.test_size=64",
         "trainer.device=cpu", "trainer.log_every=1", "trainer.perf_warmup_steps=0"]  # fmt: skip


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank(rank: int, world: int, port: int, cfg_yaml: str, out: str, env: dict) -> None:
    """One replica: join the group as torchrun would set it up, train with the real Trainer, save what it ended with."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), **env)  # fmt: skip
    torch.set_num_threads(1)
    if env.get("UNCACHED"):  # the reference: every product, in the dispatch mode, casts its FP16 weights itself
        from mptrain.precision import emulated_layers
        from mptrain.precision.emulation import WeightCache

        WeightCache.up = lambda self, t: t.float()
        emulated_layers.install = lambda model: 0
    from mptrain.bench.measure import RecordingLogger
    from mptrain.build import build_trainer
    from mptrain.replicas import join
    from mptrain.testing import install_faults

    replicas = join("cpu")
    tb = RecordingLogger()
    trainer = build_trainer(OmegaConf.create(cfg_yaml), torch.device("cpu"), Path(out), tb, None, [], replicas)
    install_faults(trainer)  # as a run does (run.py): the env's fault, if any
    trainer.fit(evaluate=False)
    stepper = trainer.steppers["model"]
    masters = stepper.masters.master_params if stepper.masters else []
    torch.save({"weights": trainer.task.model.state_dict(), "masters": [m.detach() for m in masters],
                "skipped": stepper.skipped_steps, "scale": float(stepper.current_scale or 1),
                "loss": [v["train/loss"] for _, v in tb.points if "train/loss" in v]}, f"{out}/rank{rank}.pt")  # fmt: skip
    replicas.close()


def _train(world: int, cfg, out: Path, env: dict | None = None) -> list[dict]:
    out.mkdir(exist_ok=True)
    args = (world, _free_port(), OmegaConf.to_yaml(cfg), str(out), env or {})
    if world == 1:
        _rank(0, *args)
    else:
        mp.start_processes(_rank, args=args, nprocs=world, start_method="spawn")
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(world)]


@pytest.fixture(autouse=True)
def _restore_env(monkeypatch):
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "MPTRAIN_FAULT_OVERFLOW"):
        monkeypatch.delenv(key, raising=False)
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("mode", ["mixed", "amp"])
def test_an_overflow_on_one_rank_skips_the_step_on_every_rank(compose_cfg, tmp_path, mode):
    cfg = compose_cfg(*SMALL, f"precision={mode}", "trainer.max_steps=6", "dataset.batch_size=16",
                      "precision.cpu_fp16=emulate")  # fmt: skip
    ranks = _train(2, cfg, tmp_path, {"MPTRAIN_FAULT_OVERFLOW": "1:3"})  # rank 1's gradients go inf at step 3
    assert [r["skipped"] for r in ranks] == [1, 1]
    assert ranks[0]["scale"] == ranks[1]["scale"] == 2.0**15  # backed off once, together
    for name, weight in ranks[0]["weights"].items():
        assert torch.equal(weight, ranks[1]["weights"][name]), name
        assert torch.isfinite(weight).all(), name
    for a, b in zip(ranks[0]["masters"], ranks[1]["masters"]):
        assert torch.equal(a, b)


def test_the_weight_cache_under_ddp_and_a_skipped_step_trains_bit_identically_to_no_cache(compose_cfg, tmp_path):
    """Steps 3-5 run on the layers' emulated products (past the audit), the reference on the dispatch mode."""
    cfg = compose_cfg(*SMALL, "precision=mixed", "trainer.max_steps=5", "dataset.batch_size=16",
                      "precision.cpu_fp16=emulate")  # fmt: skip
    fault = {"MPTRAIN_FAULT_OVERFLOW": "1:2"}  # step 2 is skipped on both ranks
    cached = _train(2, cfg, tmp_path / "cached", fault)
    uncached = _train(2, cfg, tmp_path / "uncached", {**fault, "UNCACHED": "1"})
    assert cached[0]["skipped"] == uncached[0]["skipped"] == 1
    for name, weight in cached[0]["weights"].items():
        assert torch.equal(weight, uncached[0]["weights"][name]), name
    for a, b in zip(cached[0]["masters"], uncached[0]["masters"]):
        assert torch.equal(a, b)


def test_two_ranks_of_batch_b_train_as_one_process_of_batch_2b(compose_cfg, tmp_path):
    steps = ["trainer.max_steps=8", "precision=fp32", "dataset.augment=true"]
    two = _train(2, compose_cfg(*SMALL, *steps, "dataset.batch_size=16"), tmp_path / "two")
    one = _train(1, compose_cfg(*SMALL, *steps, "dataset.batch_size=32"), tmp_path / "one")[0]
    assert len(two[0]["loss"]) == len(one["loss"]) == 8
    torch.testing.assert_close(torch.tensor(two[0]["loss"]), torch.tensor(one["loss"]), rtol=1e-5, atol=1e-6)
    assert one["loss"][-1] < one["loss"][0]  # it trained
    for name, weight in one["weights"].items():
        torch.testing.assert_close(two[0]["weights"][name], weight, rtol=1e-4, atol=1e-6)


@pytest.mark.e2e
def test_cli_trainer_devices_2_runs_ddp_and_rank_0_reports(tmp_path):
    run_dir = tmp_path / "run"
    done = mptrain(*TINY, "model=resnet", "trainer.device=cpu", "trainer.devices=2", "precision=amp",
                   "trainer.max_steps=4", f"hydra.run.dir={run_dir}", cwd=tmp_path,
                   env={"MPTRAIN_FAULT_OVERFLOW": "1:2"})  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    summary = read_summary(run_dir)
    assert summary["status"] == "completed"
    assert summary["env"]["world_size"] == 2
    assert summary["skipped_steps"] == 1  # rank 0 skipped rank 1's overflow
    assert summary["epochs"] == pytest.approx(4 / (256 // 64))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # the other rank wrote nothing anywhere


@pytest.mark.e2e
def test_cli_refuses_a_gan_on_two_devices(tmp_path):
    done = mptrain("model=dcgan", "dataset=synthetic", "dataset.image_size=16", "model.width=4", "model.fid.enabled=false",
                   "trainer.device=cpu", "trainer.devices=2", "trainer.max_steps=2", f"hydra.run.dir={tmp_path / 'run'}",
                   cwd=tmp_path)  # fmt: skip
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1].startswith("mptrain: error: the GAN family trains its networks as they are")
    assert "Traceback" not in done.stderr


@pytest.mark.e2e
@pytest.mark.slow
def test_torchrun_starts_the_ranks_and_only_rank_0_writes(tmp_path):
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "mptrain"]
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    lm = [a for a in SMALL if not a.startswith(("model", "dataset"))]
    done = subprocess.run([*torchrun, *lm, "model=lstm_lm", "dataset=synthetic_text", "model.width=16",
                           "dataset.batch_size=4", "dataset.bptt=8", "trainer.max_steps=4", "precision=amp"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300, env=env)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    summaries = list(tmp_path.rglob("summary.json"))
    assert len(summaries) == 1 and [p.name for p in tmp_path.iterdir()] == ["runs"]  # one run dir, rank 0's
    summary = read_summary(summaries[0].parent)
    assert summary["status"] == "completed" and summary["env"]["world_size"] == 2 and summary["steps"] == 4


def test_a_signal_landing_just_after_the_stop_vote_waits_for_the_next_vote():
    """Every rank must act on the vote's result: a rank that re-read its own flag after the vote stopped alone
    and left the others waiting in DDP's next all-reduce (a hang found by signalling at random moments)."""
    from types import SimpleNamespace

    from mptrain.signals import StopRequest
    from mptrain.trainer import Trainer

    stop = StopRequest()

    class SignalAfterTheVote:
        enabled = True

        def any(self, flag, _device):
            stop.signal = "SIGTERM"  # the handler runs between the all-reduce and the return
            return flag

    trainer = SimpleNamespace(replicas=SignalAfterTheVote(), stop=stop, device=torch.device("cpu"))
    assert Trainer._stop_requested(trainer, logged=True) is False  # the others voted to go on, so does this rank
    assert Trainer._stop_requested(trainer, logged=True) is True  # and every rank stops at the next vote


@pytest.mark.e2e
@pytest.mark.slow
def test_sigterm_to_the_launcher_checkpoints_every_rank_and_records_interrupted(tmp_path):
    run = tmp_path / "run"
    done = sigterm_once_training(*SMALL, "trainer.devices=2", "trainer.max_steps=100000", f"hydra.run.dir={run}",
                                 watch=run, cwd=tmp_path, after=2.0)  # fmt: skip
    assert done.returncode == 130 and "Traceback" not in done.stderr, done.stderr[-3000:]
    summary = read_summary(run)
    assert summary["status"] == "interrupted" and "SIGTERM at step" in summary["error"]
    state = torch.load(run / "checkpoint.pt", weights_only=True)
    assert state["step"] == summary["steps"] > 0 and state["world_size"] == 2


@pytest.mark.e2e
@pytest.mark.slow
def test_a_sweep_of_ddp_jobs_through_submitit(tmp_path):
    """hydra/launcher=submitit_local: the Slurm launcher's code path, with submitit's local executor."""
    done = mptrain("-m", "hydra/launcher=submitit_local", "hydra.launcher.timeout_min=10", *SMALL, "trainer.devices=2",
                   "trainer.max_steps=3", "precision=fp32,amp", f"hydra.sweep.dir={tmp_path / 'sweep'}", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    summaries = [read_summary(p.parent) for p in (tmp_path / "sweep").rglob("summary.json")]
    assert sorted(s["precision"] for s in summaries) == ["amp", "fp32"]
    assert all(s["status"] == "completed" and s["env"]["world_size"] == 2 for s in summaries)


def test_the_slurm_ddp_launcher_asks_for_one_gpu_per_rank():
    from hydra import compose, initialize_config_dir

    from mptrain.cli import config_dir

    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose(config_name="config", overrides=["hydra/launcher=slurm_ddp", "trainer.devices=4"],
                      return_hydra_config=True)  # fmt: skip
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher")
    assert (launcher.gpus_per_node, launcher.tasks_per_node, launcher.max_num_timeout) == (4, 1, 3)
