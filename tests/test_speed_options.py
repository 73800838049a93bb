"""Speed options of the trainer: fused optimizer kernels, channels_last, torch.compile — same training, faster,
or refused with one line where this machine's kernels for them compute wrong gradients."""

from __future__ import annotations

import platform
import tempfile
from pathlib import Path

import pytest
import torch
from torch import nn

from cli_helpers import TINY, mptrain, read_summary
from mptrain.bench.measure import RecordingLogger
from mptrain.build import build_trainer
from mptrain.errors import UserError
from mptrain.optim import kernel_choice

TINY_RESNET = ["model=resnet", "model.depth=8", "model.width=4", "dataset=synthetic", "dataset.image_size=8",
               "dataset.train_size=128", "dataset.batch_size=32", "trainer.device=cpu", "trainer.max_steps=4",
               "trainer.log_every=1", "precision=fp32"]  # fmt: skip
SHORTCUT = "stages.1.shortcut.0"  # the tiny ResNet's 1x1 stride-2 convolution, 4 -> 8 channels
# this CPU as an AVX2-only one; two threads, as an unpinned run has here: single-threaded (a pytest-xdist worker's
# setting), the faulty AVX2 kernel corrupts the heap ("corrupted size vs. prev_size", SIGABRT) instead of
# returning a wrong gradient, and the process dies before mptrain can say anything
AVX2_ONLY = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "OMP_NUM_THREADS": "2", "MKL_NUM_THREADS": "2"}


def _train(cfg):
    tb = RecordingLogger()
    with tempfile.TemporaryDirectory() as tmp:
        trainer = build_trainer(cfg, torch.device("cpu"), Path(tmp), tb, None, [])
        trainer.fit(evaluate=False)
    return trainer, [v["train/loss"] for _, v in tb.points if "train/loss" in v]


def shortcut_conv_fault(tries: int = 4) -> float:
    """The largest relative error vs FP64, over `tries` calls, of the weight gradient of a 4 -> 8, 1x1 stride-2
    convolution in channels_last, measured directly on this machine's kernels (the faulty AVX2 kernel is right on
    its first call in a process and wrong after; ../shared/repro/channels_last_conv_grad.py)."""
    torch.manual_seed(0)
    conv, x = nn.Conv2d(4, 8, 1, stride=2, bias=False), torch.randn(32, 4, 8, 8)
    g = torch.randn(conv(x).shape)

    def weight_grad(dtype, fmt):
        c = nn.Conv2d(4, 8, 1, stride=2, bias=False).to(dtype).to(memory_format=fmt)
        c.weight.data.copy_(conv.weight.data)
        (c(x.to(dtype).contiguous(memory_format=fmt)) * g.to(dtype)).sum().backward()
        return c.weight.grad.double()

    exact = weight_grad(torch.float64, torch.contiguous_format)
    return max(float((weight_grad(torch.float32, torch.channels_last) - exact).norm() / exact.norm())
               for _ in range(tries))


def test_fused_kernels_update_fp32_weights_and_fp16_updates_stay_fp16():
    assert kernel_choice([torch.nn.Parameter(torch.zeros(2))]) == {"fused": True}
    # fp16_naive's update must do its arithmetic in FP16, as the paper's naive baseline does
    assert kernel_choice([torch.nn.Parameter(torch.zeros(2, dtype=torch.float16))]) == {"foreach": True}


def test_channels_last_trains_as_the_default_layout_does_or_is_refused_where_its_kernel_is_wrong(compose_cfg):
    cfg = compose_cfg(*TINY_RESNET, "trainer.channels_last=true")
    if shortcut_conv_fault() > 1e-2:  # e.g. torch 2.14.1 on an AVX2-only CPU
        with pytest.raises(UserError, match=f"layer {SHORTCUT} .*weight gradient"):
            _train(cfg)
        return
    default, losses = _train(compose_cfg(*TINY_RESNET))
    nhwc, nhwc_losses = _train(cfg)
    convs = [p for p in nhwc.task.model.parameters() if p.dim() == 4]
    assert convs and all(p.is_contiguous(memory_format=torch.channels_last) for p in convs)
    assert nhwc.results()["speed_options_check"]["max_rel_diff_vs_plain"] < 1e-3
    torch.testing.assert_close(torch.tensor(nhwc_losses), torch.tensor(losses), rtol=1e-4, atol=1e-5)


def test_a_wrong_gradient_in_the_fast_layout_refuses_the_run_naming_the_layer(compose_cfg, monkeypatch):
    """A fault injected into every channels_last convolution with 4 input channels, on any CPU."""

    class Doubled(torch.autograd.Function):
        forward = staticmethod(lambda ctx, w: w.view_as(w))
        backward = staticmethod(lambda ctx, g: 2 * g)

    conv = nn.Conv2d._conv_forward

    def faulty(self, x, weight, bias):
        if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous() and x.shape[1] == 4:
            weight = Doubled.apply(weight)
        return conv(self, x, weight, bias)

    monkeypatch.setattr(nn.Conv2d, "_conv_forward", faulty)
    with pytest.raises(UserError) as refused:
        _train(compose_cfg(*TINY_RESNET, "trainer.channels_last=true"))
    line = str(refused.value)
    assert "\n" not in line and "trainer.channels_last=true computes wrong gradients" in line
    # the first layer (in parameter order) fed 4 channels is named, with its doubled gradient's error
    assert "layer stages.0.conv1 (Conv2d(4, 4, kernel_size=(3, 3)" in line and "100.0% off an FP64" in line, line
    assert line.endswith("run without trainer.channels_last")
    _train(compose_cfg(*TINY_RESNET))  # the contiguous layout is untouched by the fault: it still trains


@pytest.mark.e2e
@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="AVX2 dispatch is x86 only")
def test_on_an_avx2_only_cpu_the_command_refuses_channels_last_with_one_line(tmp_path):
    """This CPU limited to AVX2 (torch's and oneDNN's dispatch), through the real command: where the shortcut's
    kernel is wrong there (as on a 2-core AMD EPYC), exit 2 and one line naming it; else a completed run."""
    import subprocess
    import sys

    probe = subprocess.run([sys.executable, "-c", "import test_speed_options as t; print(t.shortcut_conv_fault())"],
                           cwd=Path(__file__).parent, env={**__import__("os").environ, **AVX2_ONLY},
                           capture_output=True, text=True, check=True)  # fmt: skip
    faulty = float(probe.stdout.split()[-1]) > 1e-2
    run = tmp_path / "run"
    out = mptrain(*TINY, "trainer.channels_last=true", "trainer.max_steps=2", f"hydra.run.dir={run}", cwd=tmp_path,
                  env=AVX2_ONLY)  # fmt: skip
    if faulty:
        assert out.returncode == 2 and "Traceback" not in out.stderr
        errors = [line for line in out.stderr.splitlines() if line.startswith("mptrain: error:")]
        assert len(errors) == 1 and f"layer {SHORTCUT} (Conv2d(4, 8" in errors[0], out.stderr[-2000:]
        assert not run.exists()  # refused before training: no run folder
    else:
        assert out.returncode == 0, out.stderr[-2000:]
        assert read_summary(run)["speed_options_check"]["options"] == ["trainer.channels_last=true"]


@pytest.mark.slow
def test_compile_trains_as_eager_does_or_is_refused_where_its_kernel_is_wrong(compose_cfg):
    cfg = compose_cfg(*TINY_RESNET, "trainer.compile=true")
    try:
        compiled, losses = _train(cfg)
    except UserError as refused:  # compile's layout optimisation picked a wrong kernel: it must be a real one
        assert "trainer.compile=true computes wrong gradients" in str(refused) and shortcut_conv_fault() > 1e-2
        return
    _, eager = _train(compose_cfg(*TINY_RESNET))
    assert type(compiled.task.trained).__name__ == "OptimizedModule"
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(eager), rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("family", [
    ["model=dcgan", "model.fid.enabled=false", "model.width=4", "dataset=synthetic", "dataset.image_size=16",
     "dataset.channels=1", "dataset.train_size=64", "dataset.batch_size=16", "trainer.channels_last=true"],
    ["model=lstm_lm", "model.width=16", "dataset=synthetic_text", "dataset.batch_size=8", "dataset.bptt=8"],
])
def test_every_family_gives_the_check_one_steps_gradients(compose_cfg, family):
    """The GAN under channels_last (both networks' gradients, mixed precision) and the LM (its fresh-state loss):
    the check compares them with plain copies and leaves the networks exactly as they were."""
    from mptrain.speed_check import verify_speed_options

    cfg = compose_cfg(*family, "trainer.device=cpu", "trainer.max_steps=2", "precision=mixed")
    with tempfile.TemporaryDirectory() as tmp:
        trainer = build_trainer(cfg, torch.device("cpu"), Path(tmp), RecordingLogger(), None, [])
    before = {n: {k: v.clone() for k, v in net.state_dict().items()} for n, net in trainer.task.networks().items()}
    result = verify_speed_options(trainer.task, next(iter(trainer.data.train)), trainer.precision, ["trainer.x=true"])
    assert result["max_rel_diff_vs_plain"] < 1e-2  # FP16 rounding apart at most (the same kernels here)
    for name, net in trainer.task.networks().items():
        assert all(torch.equal(v, before[name][k]) for k, v in net.state_dict().items())
        assert all(p.grad is None for p in net.parameters())
