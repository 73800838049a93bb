"""The paper's arguments, proven on tiny tensors through the real precision engine."""

from __future__ import annotations

import io

import pytest
import torch
from torch import nn

from mptrain.precision import MODES, GradScalerAdapter, Precision
from mptrain.tasks.classification import ClassificationTask

CPU = torch.device("cpu")


def _engine(compose_cfg, mode: str, *overrides: str) -> Precision:
    return Precision(compose_cfg(f"precision={mode}", *overrides).precision, CPU)


def _sgd(lr: float):
    return lambda params: torch.optim.SGD(params, lr=lr)


def _unit_weight_model() -> nn.Module:
    model = nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(1.0)
    return model


def _train_scalar(precision: Precision, x: float, steps: int, lr: float = 1.0, upstream: float = 1.0):
    """Minimise upstream * w * x: the gradient w.r.t. w is exactly upstream * x."""
    model = precision.prepare(_unit_weight_model())
    stepper = precision.stepper(model, _sgd(lr))
    for _ in range(steps):
        stepper.zero_grad()
        loss = model(torch.tensor([[x]])).float().sum() * upstream
        stepper.backward(loss)
        stepper.step()
    return model, stepper


# (a) technique 1: an update below 2^-11 of its weight is lost in FP16, kept by the FP32 master
def test_small_update_is_lost_by_fp16_naive(compose_cfg):
    model, _ = _train_scalar(_engine(compose_cfg, "fp16_naive"), x=2.0**-12, steps=16)
    assert model.weight.dtype == torch.float16
    assert model.weight.item() == 1.0  # 1 - 2^-12 rounds back to 1 in FP16, sixteen times


def test_small_update_is_kept_by_fp16_master(compose_cfg):
    model, stepper = _train_scalar(_engine(compose_cfg, "fp16_master"), x=2.0**-12, steps=16)
    master = stepper.masters.master_params[0]
    assert master.dtype == torch.float32
    assert master.item() == 1.0 - 16 * 2.0**-12  # every update accumulated in FP32
    assert model.weight.dtype == torch.float16
    assert model.weight.item() == 1.0 - 2.0**-8  # and the FP16 copy rounded from it


# (b) technique 2: gradients below 2^-24 flush to zero unscaled, survive a large enough scale
def test_tiny_gradient_flushes_to_zero_without_scaling(compose_cfg):
    _, stepper = _train_scalar(_engine(compose_cfg, "fp16_master"), x=2.0**-13, steps=1, upstream=2.0**-13, lr=0.0)
    assert stepper.masters.master_params[0].grad.item() == 0.0  # 2^-26 < 2^-25: rounds to 0 in FP16


def test_tiny_gradient_survives_loss_scaling(compose_cfg):
    engine = _engine(compose_cfg, "mixed", "precision.loss_scale=1024")
    _, stepper = _train_scalar(engine, x=2.0**-13, steps=1, upstream=2.0**-13, lr=0.0)
    assert stepper.masters.master_params[0].grad.item() == 2.0**-26  # exact after unscaling in FP32
    assert stepper.skipped_steps == 0


def test_overflow_skips_the_step_and_the_lr_schedule(compose_cfg):
    engine = _engine(compose_cfg, "mixed", "precision.loss_scale=dynamic")
    model = engine.prepare(_unit_weight_model())
    stepper = engine.stepper(
        model, _sgd(0.5), lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    )
    stepper.zero_grad()
    stepper.backward(model(torch.tensor([[1000.0]])).float().sum())  # 1000 * 2^16 overflows FP16
    assert stepper.step() is False
    assert model.weight.item() == 1.0 and stepper.masters.master_params[0].item() == 1.0
    assert stepper.lr() == 0.5  # schedule not advanced
    assert stepper.skipped_steps == 1 and float(stepper.current_scale) == 2.0**15
    stepper.zero_grad()
    stepper.backward(model(torch.tensor([[1.0]])).float().sum())
    assert stepper.step() is True
    assert model.weight.item() == 0.5 and stepper.lr() == 0.25


def test_torch_amp_mode_counts_skipped_steps(compose_cfg):
    engine = _engine(compose_cfg, "amp")
    model = engine.prepare(_unit_weight_model())
    stepper = engine.stepper(model, _sgd(0.1))
    assert isinstance(stepper.scaler, GradScalerAdapter)  # torch.amp.GradScaler behind the Scaler interface
    stepper.zero_grad()
    stepper.backward(model(torch.tensor([[float("inf")]])).float().sum())
    assert stepper.step() is False and stepper.skipped_steps == 1
    assert model.weight.item() == 1.0 and float(stepper.current_scale) == 2.0**15  # GradScaler backed off
    stepper.zero_grad()
    stepper.backward(model(torch.tensor([[1.0]])).float().sum())
    assert stepper.step() is True
    assert model.weight.item() == pytest.approx(0.9) and stepper.skipped_steps == 1


def _tiny_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, stride=2), nn.BatchNorm2d(8), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4),
    )


def test_batchnorm_kept_fp32_in_fp16_modes(compose_cfg):
    model = _engine(compose_cfg, "mixed").prepare(_tiny_cnn())
    assert model[0].weight.dtype == torch.float16 and model[1].weight.dtype == torch.float32
    assert model[1].running_mean.dtype == torch.float32
    assert model(torch.randn(2, 3, 8, 8)).dtype == torch.float16  # FP32 input cast on the way in
    model = _engine(compose_cfg, "mixed", "precision.keep_batchnorm_fp32=false").prepare(_tiny_cnn())
    assert model[1].weight.dtype == torch.float16


def test_batchnorm_statistics_accumulate_in_fp32(compose_cfg):
    """FP16 activations with a large mean and tiny spread: FP16 sums would lose them."""
    model = _engine(compose_cfg, "mixed").prepare(nn.Sequential(nn.BatchNorm2d(4)))
    reference = nn.BatchNorm2d(4)
    x = (300 + 0.01 * torch.randn(16, 4, 8, 8)).half()
    out = model(x)
    assert out.dtype == torch.float16
    torch.testing.assert_close(out.float(), reference(x.float()).half().float())
    torch.testing.assert_close(model[0].running_var, reference.running_var)


def test_master_weights_share_fp32_params_without_copying(compose_cfg):
    model = _engine(compose_cfg, "mixed").prepare(_tiny_cnn())
    stepper = _engine(compose_cfg, "mixed").stepper(model, _sgd(0.1))
    bn_weight = model[1].weight
    assert any(m is bn_weight for m in stepper.masters.master_params)
    assert all(m.dtype == torch.float32 for m in stepper.masters.master_params)


# (d) every mode trains a tiny CNN on learnable synthetic data
@pytest.mark.parametrize("mode", list(MODES))
def test_every_mode_trains_a_tiny_cnn(compose_cfg, mode):
    torch.manual_seed(0)
    engine = _engine(compose_cfg, mode)
    task = ClassificationTask(engine.prepare(_tiny_cnn()))
    stepper = engine.stepper(task.model, lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9))
    templates = torch.randn(4, 3, 8, 8)
    g = torch.Generator().manual_seed(1)
    losses = []
    for _ in range(30):
        y = torch.randint(0, 4, (32,), generator=g)
        x = templates[y] + 0.5 * torch.randn(32, 3, 8, 8, generator=g)
        losses.append(task.train_step((x, y), {"model": stepper}, engine)["loss"].item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-5:]) / 5 < 0.7 * sum(losses[:5]) / 5, losses
    expected = MODES[mode].param_dtype
    assert task.model[0].weight.dtype == expected


def test_native_fp16_on_a_cpu_without_fp16_units_carries_a_slowness_note(compose_cfg, monkeypatch):
    from mptrain.precision import emulation

    monkeypatch.setattr(emulation, "cpu_has_fp16_units", lambda: False)
    native = "precision.cpu_fp16=native"
    assert _engine(compose_cfg, "mixed", native).notes and "slow" in _engine(compose_cfg, "fp16_naive", native).notes[0]
    assert not _engine(compose_cfg, "mixed").notes  # the default emulates: nothing slow to warn about
    assert not _engine(compose_cfg, "bf16", native).notes


def test_losses_are_computed_in_fp32(compose_cfg):
    engine = _engine(compose_cfg, "mixed")
    task = ClassificationTask(engine.prepare(_tiny_cnn()))
    loss, _ = task._loss_and_accuracy(torch.randn(2, 3, 8, 8), torch.tensor([0, 1]), engine)
    assert loss.dtype == torch.float32


def test_stepper_state_round_trips_and_continues_identically(compose_cfg):
    """Masters, optimizer, schedule and scaler state restored → the same next steps, bit for bit."""
    engine = _engine(compose_cfg, "mixed", "precision.growth_interval=2")
    torch.manual_seed(0)
    data = [(torch.randn(4, 3, 8, 8), torch.randint(0, 4, (4,))) for _ in range(5)]

    def make(seed_model):
        task = ClassificationTask(engine.prepare(seed_model))
        stepper = engine.stepper(
            task.model, lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9),
            lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.9),
        )
        return task, stepper

    torch.manual_seed(1)
    task_a, stepper_a = make(_tiny_cnn())
    for batch in data[:3]:
        task_a.train_step(batch, {"model": stepper_a}, engine)
    torch.manual_seed(2)  # a different initialisation, overwritten by the restore
    task_b, stepper_b = make(_tiny_cnn())
    buffer = io.BytesIO()  # through a file, as a checkpoint would go: no live tensors shared
    torch.save({"model": task_a.model.state_dict(), "stepper": stepper_a.state_dict()}, buffer)
    buffer.seek(0)
    restored = torch.load(buffer, weights_only=True)  # plain tensors and numbers only
    task_b.model.load_state_dict(restored["model"])
    stepper_b.load_state_dict(restored["stepper"])
    assert stepper_b.scaler.state_dict() == stepper_a.scaler.state_dict()
    assert stepper_b.lr() == stepper_a.lr()
    for batch in data[3:]:
        task_a.train_step(batch, {"model": stepper_a}, engine)
        task_b.train_step(batch, {"model": stepper_b}, engine)
    for a, b in zip(stepper_a.masters.master_params, stepper_b.masters.master_params):
        assert torch.equal(a, b)
    assert float(stepper_a.current_scale) == float(stepper_b.current_scale) == 2.0**18  # grew twice, interval 2


def test_the_fp16_and_bf16_arithmetic_lists_are_the_modes_with_that_dtype():
    from mptrain.schema.precision import BF16_ARITHMETIC, FP16_ARITHMETIC

    for dtype, listed in ((torch.float16, FP16_ARITHMETIC), (torch.bfloat16, BF16_ARITHMETIC)):
        with_dtype = {name for name, spec in MODES.items() if dtype in (spec.param_dtype, spec.autocast_dtype)}
        assert with_dtype == set(listed)
        assert all(MODES[name].arithmetic_dtype == dtype for name in listed)
