"""The master weights' rivals: BF16 weights updated with nearest rounding (bf16_pure), stochastic rounding
(bf16_sr: torchao's rounding arithmetic) and Kahan summation (bf16_kahan: torch-optimi)."""

from __future__ import annotations

import contextlib

import pytest
import torch
from omegaconf import OmegaConf

from mptrain.optim import build_optimizer

pytest.importorskip("torchao")
pytest.importorskip("optimi")

STEP = 2.0**-10  # a relative update of 2^-10 on a weight of 1: below half a BF16 ulp (2^-8)
SGD = OmegaConf.create({"name": "sgd", "lr": STEP, "momentum": 0.0, "nesterov": False, "weight_decay": 0.0,
                        "decay_norm_and_bias": False})


def _thousand_steps(update: str, n: int = 4096) -> torch.Tensor:
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.ones(n, dtype=torch.bfloat16))
    opt = build_optimizer(SGD, [w], update=update)
    for _ in range(1000):
        w.grad = torch.ones_like(w)
        opt.step()
    return w.detach().float()


def test_nearest_rounding_loses_every_small_update():
    assert torch.equal(_thousand_steps("nearest"), torch.ones(4096))  # bf16_pure: all 1000 updates lost


def test_stochastic_rounding_keeps_them_in_expectation():
    exact = 1 - 1000 * STEP
    w = _thousand_steps("stochastic")
    assert abs(w.mean().item() - exact) < 2e-3 and w.std().item() > 0  # unbiased, with the rounding's spread


def test_kahan_summation_keeps_them_to_fp32_level():
    exact = 1 - 1000 * STEP
    w = _thousand_steps("kahan")
    assert (w - exact).abs().max().item() < 4e-3  # within a BF16 ulp of the exact sum; no spread
    assert w.std().item() == 0


def test_bytes_per_parameter_by_hand(compose_cfg, tmp_path):
    from mptrain.bench.measure import RecordingLogger
    from mptrain.build import build_trainer

    expected = {"fp32": 4 + 4 + 4, "mixed": 2 + 2 + 8 + 4, "bf16_pure": 2 + 2 + 2, "bf16_kahan": 2 + 2 + 2 + 2}
    for mode, total in expected.items():  # SGD with momentum: one state tensor per weight (+ Kahan's buffer)
        cfg = compose_cfg("debug=tiny", f"precision={mode}", "trainer.device=cpu", "optim.nesterov=false")
        trainer = build_trainer(cfg, torch.device("cpu"), tmp_path, RecordingLogger(), None, [])
        trainer.fit(evaluate=False)
        got = trainer.results()["bytes_per_parameter"]["model"]
        assert got["total"] == pytest.approx(total, rel=0.05), (mode, got)  # FP32 BatchNorm weights: a few %


@pytest.mark.parametrize("mode", ["bf16_pure", "bf16_sr", "bf16_kahan"])
def test_each_mode_trains_end_to_end(compose_cfg, tmp_path, mode):
    from mptrain.bench.measure import RecordingLogger
    from mptrain.build import build_trainer

    cfg = compose_cfg("debug=tiny", f"precision={mode}", "trainer.device=cpu", "optim.nesterov=false")
    trainer = build_trainer(cfg, torch.device("cpu"), tmp_path, RecordingLogger(), None, [])
    results = trainer.fit()
    assert results["steps"] == 8 and results["final"]["loss"] < 10
    assert trainer.task.model.fc.weight.dtype == torch.bfloat16 if hasattr(trainer.task.model, "fc") else True


def test_kahan_with_nesterov_is_refused_in_one_line(compose_cfg):
    from mptrain.errors import UserError
    from mptrain.schema import validate

    with pytest.raises(UserError, match="no Nesterov momentum; set optim.nesterov=false"):
        validate(compose_cfg("precision=bf16_kahan"))


@pytest.mark.parametrize("update, kept", [("nearest", 0.0), ("stochastic", 1.0), ("kahan", 1.0)])
@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_the_probe_counts_what_nearest_rounding_drops_and_what_was_kept(tmp_path, update, kept, optimizer):
    """The numerics probe on a 2^-10 relative update: nearest rounding would drop every element's; bf16_pure
    keeps none of it, bf16_sr all of it in expectation (each weight moves down to 1 - 2^-8, the next BF16
    number, with probability 1/4),
    bf16_kahan all of it (in its compensation buffer). SGD and AdamW (torchao's, optimi's, torch's)."""
    from mptrain.precision.stepper import PrecisionStepper
    from mptrain.telemetry.numerics import NumericsProbe

    torch.manual_seed(0)
    model = torch.nn.Linear(1, 4096, bias=False).to(torch.bfloat16)
    with torch.no_grad():
        model.weight.fill_(1.0)
    cfg = SGD if optimizer == "sgd" else OmegaConf.create({"name": "adamw", "lr": STEP, "betas": [0.9, 0.999],
                                                           "eps": 1e-8, "weight_decay": 0.0, "decay_norm_and_bias": False})
    stepper = PrecisionStepper(model, lambda p: build_optimizer(cfg, p, update=update))
    probe = NumericsProbe(every=1, run_dir=tmp_path, activations=False)
    with probe.capture({"model": model}, {"model": stepper}):
        stepper.zero_grad()
        stepper.backward(model(torch.ones(1, 1, dtype=torch.bfloat16)).float().sum())  # grad = 1 per weight
        stepper.step()
    v = probe.take()[("lost_update", "model.weight")]
    record = NumericsProbe.to_record("lost_update", "model.weight", 1, v)
    assert record["nearest_drop_frac"] == 1.0  # |u| = 2^-10 (Adam's first step: lr) < half a BF16 ulp of 1
    assert record["drop_kept_frac"] == pytest.approx(kept, abs=0.1 if update == "stochastic" else 1e-3)
    assert record["lost_update_frac"] == pytest.approx({"nearest": 1.0, "stochastic": 3 / 4, "kahan": 0.0}[update],
                                                       abs=0.03)
    assert not stepper.pre_update_hooks  # the probe leaves the stepper as it found it


@pytest.mark.parametrize("update", ["nearest", "stochastic", "kahan"])
def test_the_probes_fp32_twin_changes_nothing(tmp_path, update):
    """Three AdamW steps measured by the probe end bit for bit where three unmeasured ones do: the twin copies
    the optimizer's state (never steps it) and draws no random numbers (its FP32 weights round nowhere). With an
    FP32 parameter beside the BF16 ones (as LayerNorm stays FP32): the twin copies its gradient too, which
    torch-optimi's step uses as scratch (shared, it changed the real step's gradient)."""
    from mptrain.precision.stepper import PrecisionStepper
    from mptrain.telemetry.numerics import NumericsProbe

    cfg = OmegaConf.create({"name": "adamw", "lr": 1e-3, "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 0.1,
                            "decay_norm_and_bias": False})
    ends = []
    for measured in (False, True):
        torch.manual_seed(0)
        model = torch.nn.Linear(8, 16).to(torch.bfloat16)
        model.gain = torch.nn.Parameter(torch.ones(16))  # FP32
        # with an LR schedule, as the trainer runs it (LambdaLR wraps the optimizer's step)
        stepper = PrecisionStepper(model, lambda p: build_optimizer(cfg, p, update=update),
                                   lambda o: torch.optim.lr_scheduler.LambdaLR(o, _decay))
        probe = NumericsProbe(every=1, run_dir=tmp_path, activations=False)
        for step in range(3):
            x = torch.randn(4, 8, generator=torch.Generator().manual_seed(step)).to(torch.bfloat16)
            with probe.capture({"model": model}, {"model": stepper}) if measured else contextlib.nullcontext():
                stepper.zero_grad()
                stepper.backward((model(x).float() * model.gain).pow(2).mean())
                stepper.step()
        state = [v for s in stepper.optimizer.state.values() for v in s.values() if torch.is_tensor(v)]
        ends.append([p.detach().clone() for p in model.parameters()] + [v.clone() for v in state])
        if measured:  # the weights moved along the twin's update, never against it (as when the twin stepped the
            kept = [NumericsProbe.to_record("lost_update", "w", 3, v)  # real optimizer through LambdaLR's wrapper)
                    for (kind, _), v in probe.take().items() if kind == "lost_update"]
            assert kept and all(r.get("drop_kept_frac", 0.0) > -0.25 for r in kept)
    assert len(ends[0]) == len(ends[1]) and all(torch.equal(a, b) for a, b in zip(*ends))


def _decay(step: int) -> float:
    return 1 / (1 + step)


@pytest.mark.parametrize("name", ["sgd", "adamw"])
def test_optim_library_optimi_is_torchs_update_without_kahan(name):
    """bf16_kahan's control (`optim.library=optimi`): torch-optimi's optimizer, Kahan summation off even on BF16
    weights (optimi turns it on for them by default); on FP32 weights it steps as torch's own optimizer does."""
    import optimi

    cfg = OmegaConf.create({"name": name, "lr": 1e-2, "momentum": 0.9, "nesterov": False, "weight_decay": 0.1,
                            "decay_norm_and_bias": True, "betas": [0.9, 0.999], "eps": 1e-8, "library": "optimi"})
    torch.manual_seed(0)
    ours = torch.nn.Parameter(torch.randn(64, 16))
    theirs = torch.nn.Parameter(ours.detach().clone())
    opt = build_optimizer(cfg, [ours])
    reference = build_optimizer(OmegaConf.merge(cfg, {"library": "torch"}), [theirs])
    assert isinstance(opt, optimi.SGD if name == "sgd" else optimi.AdamW)
    assert all(not group["kahan_sum"] for group in opt.param_groups)
    for _ in range(5):
        grad = torch.randn_like(ours)
        ours.grad, theirs.grad = grad.clone(), grad.clone()
        opt.step()
        reference.step()
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    bf16 = torch.nn.Parameter(torch.ones(8, dtype=torch.bfloat16))
    on_bf16 = build_optimizer(cfg, [bf16])
    bf16.grad = torch.ones_like(bf16)
    on_bf16.step()  # optimi decides at its first step
    assert all(not group["kahan_sum"] for group in on_bf16.param_groups)


def test_optimi_library_with_stochastic_rounding_is_refused_in_one_line(compose_cfg):
    from mptrain.errors import UserError
    from mptrain.schema import validate

    with pytest.raises(UserError, match="^precision=bf16_sr updates with mptrain's stochastic-rounding"):
        validate(compose_cfg("precision=bf16_sr", "optim.library=optimi"))
    with pytest.raises(UserError, match="^optim.library=optimi updates with torch-optimi's SGD, which has no Nesterov"):
        validate(compose_cfg("precision=fp32", "optim.library=optimi"))
    validate(compose_cfg("precision=fp32", "optim.library=optimi", "optim.nesterov=false"))
