"""The bad-input battery: every mistake gets exit code 2, one line `mptrain: error: ...`, no traceback, and
nothing written: a config refused before training leaves no run folder (it made the folder, so it removes it)."""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import pytest
import torch

from cli_helpers import TINY, mptrain
from mptrain import checkpoint

RUN = [*TINY, "trainer.max_steps=2", "trainer.checkpoint_every=2"]
TEXT = ["model=lstm_lm", "model.width=16", "dataset.batch_size=4", "dataset.bptt=8"]


def _checkpoint(inputs: Path, source: Path, change) -> str:
    """A copy of the saved checkpoint in `inputs`, changed by `change(bytes or state)`."""
    path = inputs / "ckpt" / checkpoint.FILENAME
    path.parent.mkdir(exist_ok=True)
    data = source.read_bytes()
    if change is None:
        path.write_bytes(data)
    elif callable(change) and change.__name__.startswith("state_"):
        state = torch.load(source, weights_only=True)
        change(state)
        torch.save(state, path)
    else:
        path.write_bytes(change(data))
    return str(path.parent)


class _CarriesCode:  # a pickled object: torch.load(weights_only=True) refuses to build it
    def __reduce__(self):
        return (os.getcwd, ())


def state_foreign_world(state):
    state["world_size"] = 2


def state_with_code(state):
    state["task"] = _CarriesCode()


def _file(inputs: Path, name: str, data: bytes) -> str:
    path = inputs / name
    path.write_bytes(data)
    return str(path)


# (case id, args (a callable builds them from the inputs folder and the saved checkpoint), what the line says)
CASES = [
    # config values
    ("lr-zero", ["optim.lr=0"], "optim.lr must be a number > 0"),
    ("lr-negative", ["optim.lr=-1"], "optim.lr must be a number > 0"),
    ("batch-zero", ["dataset.batch_size=0"], "dataset.batch_size must be a positive integer"),
    ("batch-negative", ["dataset.batch_size=-4"], "dataset.batch_size must be a positive integer"),
    ("loss-scale-zero", ["precision.loss_scale=0"], "precision.loss_scale must be dynamic, null or a finite number > 0"),
    ("loss-scale-word", ["precision.loss_scale=auto"], "precision.loss_scale must be dynamic, null or a finite number"),
    ("loss-scale-inf", ["precision=mixed", "precision.loss_scale=inf"], "precision.loss_scale must be dynamic, null or"),
    ("growth-factor", ["precision.growth_factor=1"], "precision.growth_factor must be a number > 1"),
    ("backoff-high", ["precision.backoff_factor=1.5"], "precision.backoff_factor must be in (0, 1)"),
    ("backoff-zero", ["precision.backoff_factor=0"], "precision.backoff_factor must be in (0, 1)"),
    ("growth-interval", ["precision.growth_interval=0"], "precision.growth_interval must be a positive integer"),
    ("hysteresis", ["precision.hysteresis=0"], "precision.hysteresis must be a positive integer"),
    ("amp-hysteresis", ["precision=amp", "precision.hysteresis=2"], "torch.amp.GradScaler, which has no hysteresis"),
    ("max-steps", ["trainer.max_steps=0"], "trainer.max_steps must be null or a positive integer"),
    ("epochs", ["trainer.epochs=0"], "trainer.epochs must be a positive integer"),
    ("momentum", ["optim.momentum=1.5"], "optim.momentum must be in [0, 1)"),
    ("devices-zero", ["trainer.devices=0"], "trainer.devices must be a positive integer"),
    ("device-name", ["trainer.device=tpu"], "trainer.device must be auto, cpu, cuda or cuda:N"),
    ("cpu-fp16", ["precision=mixed", "precision.cpu_fp16=fast"], "precision.cpu_fp16 must be auto, emulate or native"),
    ("batch-too-big", [*TINY, "dataset.batch_size=4096"], "larger than the 256-sample training set"),
    ("dcgan-size", ["model=dcgan", "dataset=synthetic", "dataset.image_size=8"], "needs images of base"),
    ("ssd-object-too-big", ["debug=tiny_ssd", "dataset.max_size=30"],
     "objects of up to dataset.max_size=30 px do not fit the 48-px canvas"),
    ("ssd-no-objects", ["debug=tiny_ssd", "dataset.min_objects=0"], "dataset.min_objects must be a positive integer"),
    ("ssd-classes", ["debug=tiny_ssd", "model.num_classes=5"], "model.num_classes=5 does not match"),
    ("ssd-no-boxes", ["debug=tiny", "model=ssd", "dataset=synthetic"], "model=ssd reads boxes data but dataset=synthetic"),
    ("boxes-to-a-classifier", ["debug=tiny_ssd", "model=resnet"], "model=resnet reads image data"),
    ("gan-ddp", ["model=dcgan", "dataset=synthetic", "dataset.image_size=16", "model.width=4", "model.fid.enabled=false",
                 "trainer.device=cpu", "trainer.devices=2", "trainer.max_steps=1"], "the GAN family trains its networks as they are"),
    ("wrong-data-kind", ["model=resnet", "dataset=text"], "reads image data but dataset=text is text"),
    ("compile-emulate", [*TINY, "precision=mixed", "precision.cpu_fp16=emulate", "trainer.compile=true"],
     "trainer.compile with emulated FP16 kernels (precision.cpu_fp16=emulate"),
    ("compile-emulate-bf16", [*TINY, "precision=bf16", "precision.cpu_bf16=emulate", "trainer.compile=true"],
     "trainer.compile with emulated BF16 kernels (precision.cpu_bf16=emulate"),
    ("compile-numerics", ["trainer.compile=true", "telemetry.numerics.every=10"], "trainer.compile with telemetry"),
    ("channels-last-text", [*TEXT, "dataset=synthetic_text", "trainer.channels_last=true"],
     "trainer.channels_last is for image models"),
    ("split-sum", ["dataset=text", "dataset.split=[0.5,0.5,0.5]"], "dataset.split must be three positive fractions"),
    ("betas-length", ["optim=adam", "optim.betas=[0.9]"], "optim.betas must be two numbers in [0, 1)"),
    ("numerics-every", ["telemetry.numerics.every=0"], "telemetry.numerics.every must be null or a positive integer"),
    ("fid-samples", ["model=dcgan", "model.fid.samples=-1"], "model.fid.samples must be a positive integer"),
    ("seed-word", ["seed=abc"], "seed must be an integer"),
    # block formats and optimizer states (precision=mx, optim.state)
    ("nvfp4-block-32", [*RUN, "precision=mx", "precision.block_format=nvfp4", "precision.block_size=32"],
     "NVFP4's blocks are 16 values"),
    ("mx-block-24", [*RUN, "precision=mx", "precision.block_size=24"], "precision.block_size must be null or a power of two"),
    ("mx-format-unknown", [*RUN, "precision=mx", "precision.block_format=mxfp3"],
     "precision.block_format must be mxfp8_e4m3, mxfp8_e5m2"),
    ("mx-knob-without-mx", [*RUN, "precision=bf16", "precision.block_format=mxfp4"],
     "precision.block_format applies to precision=mx"),
    ("state-sgd", [*RUN, "optim=sgd", "optim.state=8bit"], "optim=sgd keeps its momentum in FP32"),
    ("state-own-weights", [*RUN, "optim=adam", "optim.state=4bit", "precision=bf16_pure"],
     "precision=bf16_pure updates its own 16-bit weights"),
    ("state-unknown", [*RUN, "optim=adam", "optim.state=2bit"], "optim.state must be fp32, bf16, 8bit, 4bit or fp8"),
    # wrong types, unknown keys and options: refused while Hydra composes, before the run dir exists
    ("lr-word", ["optim.lr=fast"], "optim.lr must be a number > 0 (got 'fast')"),
    ("batch-float", ["dataset.batch_size=2.5"], "dataset.batch_size must be a positive integer"),
    ("flag-word", ["precision.keep_batchnorm_fp32=maybe"], "precision.keep_batchnorm_fp32 must be true or false"),
    ("devices-word", ["trainer.devices=two"], "trainer.devices must be a positive integer"),
    ("split-item-word", ["dataset=text", "dataset.split=[0.9,a,0.05]"], "dataset.split must be three positive"),
    ("unknown-key", ["trainer.epoch=3"], "trainer.epoch is not a key of trainer; did you mean trainer.epochs?"),
    ("unknown-option", ["precision=fp17"], "precision=fp17 is not an option of precision; choose one of amp,"),
    ("bad-grammar", ["trainer.epochs=[1"], "cannot read that override"),
    # paths
    ("no-mnist", lambda i, c: ["dataset=mnist", f"dataset.root={i / 'nothing'}", "dataset.download=false"], "MNIST"),
    ("no-text", lambda i, c: [*TEXT, "dataset=text", f"dataset.path={i / 'nope.txt'}"], "does not exist"),
    ("no-checkpoint", [*RUN, "trainer.resume=/no/such/run"], "no checkpoint at /no/such/run;"),
    # corrupt files
    ("text-not-utf8", lambda i, c: [*TEXT, "dataset=text", f"dataset.path={_file(i, 'bin.txt', bytes(range(256)) * 64)}"],
     "is not UTF-8 text"),
    ("text-bad-gzip", lambda i, c: [*TEXT, "dataset=text", f"dataset.path={_file(i, 'bad.txt.gz', b'not gzip at all')}"],
     "cannot be read"),
    ("text-too-short", lambda i, c: [*TEXT, "dataset=text", f"dataset.path={_file(i, 'short.txt.gz', gzip.compress(b'hi'))}"],
     "too few for"),
    ("ckpt-truncated", lambda i, c: [*RUN, f"trainer.resume={_checkpoint(i, c, lambda d: d[: len(d) // 2])}"],
     "is unreadable"),
    ("ckpt-garbage", lambda i, c: [*RUN, f"trainer.resume={_checkpoint(i, c, lambda d: os.urandom(4096))}"],
     "is unreadable"),
    ("ckpt-empty", lambda i, c: [*RUN, f"trainer.resume={_checkpoint(i, c, lambda d: b'')}"], "is unreadable"),
    ("ckpt-carries-code", lambda i, c: [*RUN, f"trainer.resume={_checkpoint(i, c, state_with_code)}"], "is unreadable"),
    # incompatible resume
    ("resume-other-mode", lambda i, c: [*RUN, "precision=fp32", f"trainer.resume={_checkpoint(i, c, None)}"],
     "was made with precision=mixed (this run: fp32)"),
    ("resume-other-model", lambda i, c: [*[a for a in RUN if not a.startswith("model.")], "model=mlp",
                                         f"trainer.resume={_checkpoint(i, c, None)}"],
     "model=resnet (this run: mlp)"),
    ("resume-other-world", lambda i, c: [*RUN, f"trainer.resume={_checkpoint(i, c, state_foreign_world)}"],
     "2 data-parallel process(es) (this run: 1)"),
]  # fmt: skip


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Path:
    """A checkpoint of a tiny `precision=mixed` ResNet run, for the resume cases."""
    root = tmp_path_factory.mktemp("saved")
    out = mptrain(*RUN, "precision=mixed", f"hydra.run.dir={root / 'run'}", cwd=root)
    assert out.returncode == 0, out.stderr[-3000:]
    return root / "run" / checkpoint.FILENAME


@pytest.mark.e2e
@pytest.mark.parametrize("case, args, says", CASES, ids=[c[0] for c in CASES])
def test_bad_input_gets_one_line_and_exit_2(saved, tmp_path, case, args, says):
    inputs, cwd = tmp_path / "inputs", tmp_path / "cwd"
    inputs.mkdir()
    cwd.mkdir()
    args = args(inputs, saved) if callable(args) else args
    if "precision=" not in " ".join(args) and any(a.startswith("trainer.resume") for a in args):
        args = [*args, "precision=mixed"]  # the saved checkpoint's mode
    given = sorted(inputs.rglob("*"))
    out = mptrain(*args, f"hydra.run.dir={cwd / 'run'}", cwd=cwd)
    assert out.returncode == 2, out.stderr[-2000:]
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mptrain: error: ") and says in lines[0], out.stderr[-2000:]
    assert "Traceback" not in out.stdout + out.stderr
    assert sorted(inputs.rglob("*")) == given  # the inputs untouched: no cache or temp file beside them
    assert list(cwd.iterdir()) == [], case  # refused at composition, or when built: no folder either way


@pytest.mark.e2e
def test_torchrun_with_a_sweep_is_one_line_and_writes_nothing(tmp_path):
    out = mptrain("-m", "precision=fp32,amp", cwd=tmp_path, env={"WORLD_SIZE": "2", "RANK": "0"})
    assert out.returncode == 2 and out.stderr.strip().startswith("mptrain: error: torchrun runs one job")
    assert len(out.stderr.strip().splitlines()) == 1 and list(tmp_path.iterdir()) == []
