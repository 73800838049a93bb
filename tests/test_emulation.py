"""precision.cpu_fp16=emulate: the same FP16 tensors as the native CPU path, FP32 arithmetic inside the kernels."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cli_helpers import TINY, mptrain, read_summary
from mptrain.precision.emulation import EmulatedFP16Kernels


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.ConvTranspose2d(8, 4, 4, 2, 1), nn.ReLU(),
                         nn.Flatten(), nn.Linear(4 * 16 * 16, 10))  # fmt: skip


def _grads(model, x, y, emulate: bool, saved: list | None = None):
    model.zero_grad()
    mode = EmulatedFP16Kernels() if emulate else None
    pack = (lambda t: saved.append(t.dtype) or t) if saved is not None else (lambda t: t)
    with mode or torch.autocast("cpu", enabled=False), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(x)
        (F.cross_entropy(out.float(), y) * 256).backward()
    return out, [p.grad.clone() for p in model.parameters()], mode


def test_small_integers_give_bit_identical_results():
    """With integer values every FP32 sum is exact, so emulated and native kernels must agree to the bit."""
    model = _model().half()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randint(-2, 3, p.shape))
    x = torch.randint(-2, 3, (2, 3, 8, 8)).half()
    native = model(x)
    with EmulatedFP16Kernels() as mode:
        emulated = model(x)
    assert mode.calls == 3 and emulated.dtype == torch.float16
    assert torch.equal(native, emulated)


def test_gradients_match_native_fp16_within_its_own_rounding_noise():
    model16 = _model().half()
    ref = copy.deepcopy(model16).float()  # FP32 on the same (FP16-rounded) weights
    x, y = torch.randn(4, 3, 8, 8).half(), torch.randint(0, 10, (4,))
    out_native, native, _ = _grads(model16, x, y, emulate=False)
    out_emulated, emulated, mode = _grads(model16, x, y, emulate=True)
    _, exact, _ = _grads(ref, x.float(), y, emulate=False)
    assert mode.calls >= 6  # forward and backward kernels both ran emulated
    assert all(g.dtype == torch.float16 for g in emulated) and out_emulated.dtype == torch.float16
    for n, e, x32 in zip(native, emulated, exact):
        def rel(a, b):
            return ((a.float() - b.float()).norm() / b.float().norm()).item()
        # emulated sits as close to native as native sits to FP32, never further than rounding allows
        assert rel(e, n) <= max(rel(n, x32), 2 ** -10) * 2


def test_emulation_saves_the_same_dtypes_for_backward():
    model16 = _model().half()
    x, y = torch.randn(4, 3, 8, 8).half(), torch.randint(0, 10, (4,))
    native, emulated = [], []
    _grads(model16, x, y, emulate=False, saved=native)
    _grads(model16, x, y, emulate=True, saved=emulated)
    assert emulated == native  # FP16 activations and weights saved as FP16 either way


def test_lstm_under_autocast_is_emulated_too():
    torch.manual_seed(0)
    cell = nn.Linear(8, 32)
    x = torch.randn(5, 8)
    with EmulatedFP16Kernels() as mode, torch.autocast("cpu", dtype=torch.float16):
        out = cell(x)
    assert mode.calls == 1 and out.dtype == torch.float16


def test_emulated_run_through_the_cli(tmp_path):
    run = tmp_path / "run"
    out = mptrain("precision=mixed", "precision.cpu_fp16=emulate", *TINY, "trainer.max_steps=3",
                  f"hydra.run.dir={run}", cwd=tmp_path)  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    summary = read_summary(run)
    assert summary["status"] == "completed" and not any("is slow" in w for w in summary["warnings"])


def test_unknown_cpu_fp16_value_gets_one_line(tmp_path):
    out = mptrain("precision=mixed", "precision.cpu_fp16=fast", *TINY, "trainer.max_steps=1",
                  f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)  # fmt: skip
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "precision.cpu_fp16='fast'; choose one of native, emulate" in out.stderr


@pytest.mark.parametrize("mode", ["fp16_naive", "amp"])
def test_every_fp16_mode_takes_the_emulated_path(compose_cfg, mode):
    from mptrain.precision import Precision

    precision = Precision(compose_cfg(f"precision={mode}", "precision.cpu_fp16=emulate").precision,
                          torch.device("cpu"))  # fmt: skip
    assert precision.emulate and isinstance(precision.kernels(), EmulatedFP16Kernels)
    fp32 = Precision(compose_cfg("precision=fp32", "precision.cpu_fp16=emulate").precision, torch.device("cpu"))
    assert not fp32.emulate

