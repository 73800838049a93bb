"""Emulated products computed in the layers (precision/emulated_layers.py): bit for bit the dispatch mode's, and the
dispatch mode left only where an audit saw every product in a layer."""

from __future__ import annotations

import copy
import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mptrain.precision import Precision, emulated_layers, emulation
from mptrain.precision.emulation import EmulatedKernels


class _Transposed(nn.Module):
    """A batch-first view of time-major memory, as a recurrent layer hands its decoder: not contiguous."""

    def forward(self, x):
        return x.transpose(0, 1)


LAYERS = {
    "linear": (lambda: nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8)), (5, 16)),
    "linear_3d_no_bias": (lambda: nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 8, bias=False)), (3, 5, 16)),
    "linear_3d_strided": (lambda: nn.Sequential(_Transposed(), nn.Linear(16, 8)), (5, 3, 16)),  # time-major memory
    "conv2d": (lambda: nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(),
                                     nn.Conv2d(8, 4, 3, stride=2, padding=1, padding_mode="reflect")), (2, 3, 9, 9)),
    "conv1d_groups_dilation": (lambda: nn.Sequential(nn.Conv1d(4, 8, 3), nn.Tanh(), nn.Conv1d(8, 4, 3, dilation=2, groups=2)),
                               (2, 4, 20)),
    "conv_transpose2d": (lambda: nn.Sequential(nn.ConvTranspose2d(6, 4, 4, 2, 1, bias=False), nn.ReLU(),
                                               nn.ConvTranspose2d(4, 3, 3, 2, 1, output_padding=1)), (2, 6, 5, 5)),
}  # fmt: skip


def _step(model, x, dtype, *, layers: bool, dispatch: bool, channels_last=False):
    """Forward and backward once; the output, the input's and every parameter's gradient, and the mode."""
    torch.manual_seed(0)
    model = copy.deepcopy(model).to(dtype)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        x = x.to(memory_format=torch.channels_last)
    if layers:
        emulated_layers.install(model)
    x = x.to(dtype).requires_grad_(True)
    with EmulatedKernels(dtype, weights=list(model.parameters()), dispatch=dispatch) as mode:
        out = model(x)
        (out.float().square().sum() * 64).backward()
    return [out, x.grad, *(p.grad for p in model.parameters())], mode


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", sorted(LAYERS))
def test_layers_compute_the_dispatch_modes_products_bit_for_bit(name, dtype):
    make, shape = LAYERS[name]
    torch.manual_seed(0)
    model, x = make(), torch.randn(shape)
    reference, by_dispatch = _step(model, x, dtype, layers=False, dispatch=True)
    for dispatch in (True, False):  # with the mode entered (an audited step) and without
        got, mode = _step(model, x, dtype, layers=True, dispatch=dispatch)
        assert [t.dtype for t in got] == [t.dtype for t in reference]
        for a, b in zip(got, reference):
            assert torch.equal(a, b)
        assert mode.dispatched == 0 and mode.calls == by_dispatch.calls  # every product, none left to the mode


@pytest.mark.parametrize("name", ["conv2d", "conv_transpose2d", "conv1d_groups_dilation"])
def test_a_frozen_convolution_gives_the_input_gradient_without_reading_its_saved_input(name, monkeypatch):
    """A GAN's generator step through the frozen discriminator: no weight gradient, so the layer passes an
    uninitialised stand-in for the FP32 input; the input gradient must not depend on it (here: all NaN)."""
    make, shape = LAYERS[name]
    torch.manual_seed(0)
    model, x = make(), torch.randn(shape)
    model.requires_grad_(False)
    reference, _ = _step(model, x, torch.float16, layers=False, dispatch=True)
    empty_like = torch.empty_like
    monkeypatch.setattr(torch, "empty_like", lambda t, **kw: empty_like(t, **kw).fill_(float("nan")))
    got, _ = _step(model, x, torch.float16, layers=True, dispatch=False)
    assert got[1] is not None and all(g is None for g in got[2:])
    assert torch.equal(got[0], reference[0]) and torch.equal(got[1], reference[1])


def test_channels_last_convolutions_match_too():
    make, shape = LAYERS["conv2d"]
    torch.manual_seed(0)
    model, x = make(), torch.randn(shape)
    reference, _ = _step(model, x, torch.float16, layers=False, dispatch=True, channels_last=True)
    got, _ = _step(model, x, torch.float16, layers=True, dispatch=False, channels_last=True)
    assert all(torch.equal(a, b) for a, b in zip(got, reference))


def test_a_transposed_convolution_given_its_output_size_matches():
    torch.manual_seed(0)
    layer, x = nn.ConvTranspose2d(4, 2, 3, stride=2).half(), torch.randn(1, 4, 5, 5).half()
    reference = layer(x, output_size=[12, 12])
    emulated_layers.install(layer)
    with EmulatedKernels(dispatch=False) as mode:
        out = layer(x, output_size=[12, 12])
    assert out.shape == reference.shape == (1, 2, 12, 12) and mode.calls == 1
    assert torch.allclose(out.float(), reference.float(), atol=1e-2)  # torch's native FP16 kernel, rounded once


def test_install_leaves_parameters_hooks_and_other_forwards_alone():
    class Scaled(nn.Linear):  # a subclass with its own forward: not ours to replace
        def forward(self, x):
            return super().forward(x) * 2

    model = nn.Sequential(nn.Linear(4, 4), Scaled(4, 4), nn.Conv2d(1, 1, 1), nn.LayerNorm(4))
    state = copy.deepcopy(model.state_dict())
    seen = []
    model[0].register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    assert emulated_layers.install(model) == 2
    assert "forward" in vars(model[0]) and "forward" not in vars(model[1]) and "_conv_forward" in vars(model[2])
    assert model.state_dict().keys() == state.keys()
    model.half()
    with EmulatedKernels(dispatch=False) as mode:
        model[1](model[0](torch.randn(2, 4).half()))
    assert seen == [torch.float16] and mode.calls == 1  # the hook ran; only the plain Linear emulated
    twin = copy.deepcopy(model)  # the installed forward follows the copy, not the original
    assert twin[0].forward.args[0] is twin[0]


def test_a_model_with_installed_layers_pickles_whole():
    model = nn.Sequential(nn.Linear(4, 4), nn.Conv1d(1, 1, 1), nn.ConvTranspose1d(1, 1, 1))
    emulated_layers.install(model)
    buffer = io.BytesIO()
    torch.save(model, buffer)  # the whole module, as a user may save one
    loaded = torch.load(io.BytesIO(buffer.getvalue()), weights_only=False)
    assert loaded[0].forward.args[0] is loaded[0] and loaded[1]._conv_forward.args[0] is loaded[1]
    with EmulatedKernels(dispatch=False) as mode:
        loaded.half()[0](torch.randn(2, 4).half())
    assert mode.calls == 1


def test_without_an_entered_mode_a_layer_runs_torchs_path():
    layer = nn.Linear(4, 3)
    reference = layer(torch.ones(2, 4))
    emulated_layers.install(layer)
    assert torch.equal(layer(torch.ones(2, 4)), reference)  # FP32, no mode: untouched
    with EmulatedKernels(accumulate_block=4, dispatch=True) as mode:  # FP16 accumulation: the mode's job
        layer.half()(torch.ones(2, 4).half())
    assert mode.dispatched == 1


def _precision(compose_cfg, *overrides):
    cfg = compose_cfg("precision=mixed", "precision.cpu_fp16=emulate", *overrides)
    return Precision(cfg.precision, torch.device("cpu"))


class _Functional(nn.Module):
    """A product outside any layer: the audit must keep the dispatch mode for it."""

    def __init__(self):
        super().__init__()
        self.linear, self.w = nn.Linear(4, 4), nn.Parameter(torch.randn(4, 4))

    def forward(self, x):
        return self.linear(x) @ self.w


@pytest.mark.parametrize("model, dispatches", [(nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2)), False),
                                               (_Functional(), True)])
def test_the_audit_leaves_the_dispatch_mode_only_when_every_product_is_a_layers(compose_cfg, model, dispatches):
    precision = _precision(compose_cfg)
    model = precision.prepare(model)
    entered = []
    for _ in range(emulated_layers.REAUDIT_EVERY + 2):
        with precision.kernels() as mode:
            model(torch.randn(3, 4).half()).float().sum().backward()
        entered.append(mode.dispatch)
        assert mode.calls > 0
    first = emulated_layers.AUDITED_FIRST
    if dispatches:
        assert all(entered) and precision.emulation_path == "dispatch mode"
    else:
        assert entered[:first] == [True] * first and not any(entered[first:emulated_layers.REAUDIT_EVERY])
        assert entered[emulated_layers.REAUDIT_EVERY] and precision.emulation_path == "layers"  # the re-audit


def test_fp16_accumulation_and_reductions_always_dispatch(compose_cfg):
    for setting in ("precision.accumulate=fp16", "precision.reductions=fp16"):
        precision = _precision(compose_cfg, setting)
        model = precision.prepare(nn.Linear(4, 4))
        assert "forward" not in vars(model)
        for _ in range(emulated_layers.AUDITED_FIRST + 1):
            with precision.kernels() as mode:
                assert mode.dispatch
        assert precision.emulation_path == "dispatch mode"


def test_a_write_the_version_counter_misses_is_forgotten_by_the_stepper():
    """torch's fused Adam, like a write through `.data`, leaves a weight's version counter alone: with no dispatch
    mode watching the writes, the stepper's forget_weights is what keeps the FP32 copies fresh."""
    torch.manual_seed(0)
    model = nn.Linear(8, 8).half()
    emulated_layers.install(model)
    x = torch.randn(4, 8).half()
    with EmulatedKernels(weights=list(model.parameters()), dispatch=False):
        before = model(x)
        with torch.no_grad():
            model.weight.mul_(0)  # an ordinary in-place write bumps the counter: a fresh copy
        assert torch.equal(model(x), model.bias.expand(4, 8))
        model.weight.data.fill_(1.0)  # a write the counter does not see
        assert torch.equal(model(x), model.bias.expand(4, 8))  # the stale copy, as the test expects of the cache
        emulation.forget_weights()
        assert torch.equal(model(x), F.linear(x.float(), torch.ones(8, 8), model.bias.float()).half())
    assert not torch.equal(before, model(x))


TINY_TRANSFORMER = ["debug=tiny_lm", "model=transformer", "model.heads=2", "model.width=16", "model.context=8"]


@pytest.mark.parametrize("run", [["debug=tiny", "precision=mixed", "precision.init_scale=1e30"],  # step 1: skipped
                                 ["debug=tiny", "precision=fp16_naive", "optim=adam", "optim.eps=1e-4"],  # FP16 weights
                                 ["debug=tiny", "model=dcgan", "dataset.image_size=16", "model.width=4",
                                  "model.fid.enabled=false", "precision=mixed"],  # D read by both networks' steps
                                 ["debug=tiny_lm", "model=lstm_lm", "precision=mixed"],
                                 ["debug=tiny", "model=mlp", "precision=bf16_pure", "precision.cpu_bf16=emulate"],
                                 [*TINY_TRANSFORMER, "precision=mixed"],  # the attention routed (attention.py)
                                 [*TINY_TRANSFORMER, "precision=bf16_pure", "precision.cpu_bf16=emulate"]])
def test_runs_on_the_layers_are_bit_identical_to_runs_on_the_dispatch_mode(compose_cfg, tmp_path, run):
    """Past the audit, across optimizer steps, a skipped step and a resume, the layers' path trains exactly as the
    dispatch mode does."""
    from mptrain.bench.measure import RecordingLogger
    from mptrain.build import build_trainer

    steps = emulated_layers.AUDITED_FIRST + 4
    ends, paths = [], []
    for products in ("auto", "dispatch"):
        run_dir = tmp_path / products
        run_dir.mkdir()
        for max_steps in (steps - 2, steps):  # stop, then resume from the checkpoint
            cfg = compose_cfg(*run, "precision.cpu_fp16=emulate", f"trainer.max_steps={max_steps}",
                              f"precision.emulated_products={products}", "trainer.progress=false",
                              "trainer.checkpoint_every=2", "trainer.resume=auto")
            trainer = build_trainer(cfg, torch.device("cpu"), run_dir, RecordingLogger(), None, [])
            trainer.fit(evaluate=False)
        paths.append(trainer.precision.emulation_path)
        ends.append({f"{n}.{k}": v for n, net in trainer.task.networks().items() for k, v in net.state_dict().items()})
    assert paths == ["layers", "dispatch mode"]
    for key, value in ends[0].items():
        assert torch.equal(value, ends[1][key]), key


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_the_audit_routes_a_fused_attention_without_dropout_in_every_step(compose_cfg, tmp_path, dropout):
    """Without dropout the attention is routed in the audited steps and every later one, and the run leaves the
    dispatch mode; with dropout it is never routed (torch's own path, wherever its products then run)."""
    from mptrain.bench.measure import RecordingLogger
    from mptrain.build import build_trainer

    cfg = compose_cfg(*TINY_TRANSFORMER, "precision=mixed", "precision.cpu_fp16=emulate", f"model.dropout={dropout}",
                      "trainer.progress=false")
    trainer = build_trainer(cfg, torch.device("cpu"), tmp_path, RecordingLogger(), None, [])
    batch = next(iter(trainer.data.train))
    routed, dispatched = [], []
    for _ in range(emulated_layers.AUDITED_FIRST + 2):
        with trainer.precision.kernels() as mode:
            trainer.task.train_step(batch, trainer.steppers, trainer.precision)
        routed.append(mode.attention.caught if mode.attention is not None else 0)
        dispatched.append(mode.dispatch)
    if dropout:
        assert not any(routed)
    else:
        assert all(routed) and trainer.precision.emulation_path == "layers"
        assert dispatched == [True] * emulated_layers.AUDITED_FIRST + [False, False]
