"""precision.cpu_fp16=emulate: the same FP16 tensors as the native CPU path, FP32 arithmetic inside the kernels."""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cli_helpers import TINY, mptrain, read_summary
from mptrain.precision import emulation
from mptrain.precision.emulation import EmulatedKernels


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.ConvTranspose2d(8, 4, 4, 2, 1), nn.ReLU(),
                         nn.Flatten(), nn.Linear(4 * 16 * 16, 10))  # fmt: skip


def _grads(model, x, y, emulate: bool, saved: list | None = None):
    model.zero_grad()
    mode = EmulatedKernels() if emulate else None
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
    with EmulatedKernels() as mode:
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
    with EmulatedKernels() as mode, torch.autocast("cpu", dtype=torch.float16):
        out = cell(x)
    assert mode.calls == 1 and out.dtype == torch.float16


@pytest.mark.e2e
def test_emulated_run_through_the_cli(tmp_path):
    run = tmp_path / "run"
    out = mptrain("precision=mixed", *TINY, "trainer.max_steps=3", f"hydra.run.dir={run}", cwd=tmp_path)  # default: auto
    assert out.returncode == 0, out.stderr[-3000:]
    summary = read_summary(run)
    assert summary["status"] == "completed" and not any("is slow" in w for w in summary["warnings"])
    assert summary["fp16_kernels"] == "emulated" and summary["cpu_fp16"] == "emulate"  # on every CPU
    assert "fp16 kernels      emulated" in out.stdout
    assert summary["emulation"] == "layers" and "computed in the Linear/conv layers" in out.stdout  # ResNet-20's all


@pytest.mark.e2e
def test_unknown_cpu_fp16_value_gets_one_line(tmp_path):
    out = mptrain("precision=mixed", "precision.cpu_fp16=fast", *TINY, "trainer.max_steps=1",
                  f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)  # fmt: skip
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "precision.cpu_fp16 must be auto, emulate or native (got 'fast')" in out.stderr


@pytest.mark.parametrize("mode", ["fp16_naive", "amp"])
def test_every_fp16_mode_takes_the_emulated_path(compose_cfg, mode):
    from mptrain.precision import Precision

    precision = Precision(compose_cfg(f"precision={mode}", "precision.cpu_fp16=emulate").precision,
                          torch.device("cpu"))  # fmt: skip
    assert precision.emulate and isinstance(precision.kernels(), EmulatedKernels)
    fp32 = Precision(compose_cfg("precision=fp32", "precision.cpu_fp16=emulate").precision, torch.device("cpu"))
    assert not fp32.emulate



def test_auto_emulates_on_a_cpu_without_fp16_units_and_says_so(compose_cfg, monkeypatch):
    from mptrain.precision import Precision, emulation

    cpu = torch.device("cpu")
    monkeypatch.setattr(emulation, "cpu_has_fp16_units", lambda: False)
    for mode in ("fp16_naive", "fp16_master", "mixed", "amp"):
        p = Precision(compose_cfg(f"precision={mode}").precision, cpu)  # the default: auto
        assert p.emulate and p.fp16_kernels == "emulated" and p.cpu_fp16 == "emulate" and not p.notes
    native = Precision(compose_cfg("precision=mixed", "precision.cpu_fp16=native").precision, cpu)
    assert not native.emulate and native.fp16_kernels == "native" and native.cpu_fp16 == "native"
    assert len(native.notes) == 1 and "is slow" in native.notes[0]  # the slow-kernel warning: only when chosen
    for mode in ("fp32", "bf16"):
        p = Precision(compose_cfg(f"precision={mode}").precision, cpu)
        assert p.fp16_kernels is None and p.cpu_fp16 == "emulate" and not p.notes  # the setting its sweep shares


def test_auto_emulates_fp16_even_where_the_cpu_has_fp16_units(compose_cfg, monkeypatch):
    """AVX512-FP16 speeds torch's FP16 matrix products, not its convolutions (ResNet-20 106x slower than the
    emulation on such a Xeon): auto emulates there too, and native still warns, saying why."""
    from mptrain.precision import Precision, emulation

    monkeypatch.setattr(emulation, "cpu_has_fp16_units", lambda: True)
    p = Precision(compose_cfg("precision=mixed").precision, torch.device("cpu"))
    assert p.emulate and p.fp16_kernels == "emulated" and not p.notes
    native = Precision(compose_cfg("precision=mixed", "precision.cpu_fp16=native").precision, torch.device("cpu"))
    assert not native.emulate and "speed torch's FP16 matrix products but not its convolutions" in native.notes[0]


def test_an_fp16_lstm_is_emulated_whole_fp16_at_its_boundaries_fp32_inside():
    from mptrain.models.rnn import run_recurrent

    torch.manual_seed(0)
    rnn = nn.LSTM(8, 16, 2, batch_first=True).half()
    x = torch.randn(4, 12, 8).half().requires_grad_(True)
    exact = copy.deepcopy(rnn).double()  # the same FP16 values, computed exactly
    out64, _ = exact(x.detach().double())
    out64.sum().backward()
    exact_grads = [p.grad for p in exact.parameters()]

    results = {}
    for name, mode in (("native", None), ("emulated", EmulatedKernels())):
        rnn.zero_grad()
        with mode if mode else contextlib.nullcontext():
            out, (h, c) = run_recurrent(rnn, x, None)
            out.float().sum().backward()
        assert out.dtype == h.dtype == c.dtype == torch.float16  # FP16 leaves the layer
        assert all(p.grad.dtype == torch.float16 for p in rnn.parameters())
        results[name] = (out.detach().double(), [p.grad.double() for p in rnn.parameters()])

    def err(a, b):
        return float(((a - b).norm() / b.norm()).detach())

    (out_e, grads_e), (out_n, grads_n) = results["emulated"], results["native"]
    # FP32 inside, rounded once at the boundary: within one FP16 rounding of exact, and no further than op by op
    assert err(out_e, out64) < 1e-3 and err(out_e, out64) <= err(out_n, out64) + 1e-4
    for e, n, r in zip(grads_e, grads_n, exact_grads):
        assert err(e, r) < 2e-3 and err(e, r) <= 1.5 * err(n, r) + 1e-4


# precision.cpu_bf16: the same emulation for BF16 products (bf16, bf16_pure, bf16_sr, bf16_kahan, fp8's bf16 parts)

def _bf16_rounding_trap():
    """Products whose exact sums BF16 can hold only once: 1 + 256 terms of 2^-9 is 1.5 in FP32, but a running BF16
    sum (8-bit significand) stays at 1, so a kernel that rounds partial sums fails this."""
    a = torch.cat([torch.ones(4, 1), torch.full((4, 256), 2.0**-9)], dim=1).bfloat16()
    b = torch.ones(257, 3).bfloat16()
    return a, b


def test_emulated_bf16_equals_fp32_arithmetic_rounded_to_bf16():
    a, b = _bf16_rounding_trap()
    bias = torch.tensor([0.0, 2.0**-8, -1.0]).bfloat16()
    torch.manual_seed(0)
    x, w = torch.randn(2, 3, 9, 9).bfloat16(), torch.randn(5, 3, 3, 3).bfloat16()
    with EmulatedKernels(torch.bfloat16) as mode:
        products = [a @ b, torch.addmm(bias, a, b), torch.bmm(a[None], b[None])[0], F.conv2d(x, w, padding=1)]
    exact = [a.float() @ b.float(), torch.addmm(bias.float(), a.float(), b.float()),
             a.float() @ b.float(), F.conv2d(x.float(), w.float(), padding=1)]  # fmt: skip
    assert mode.calls == 4
    for got, want in zip(products, exact):
        assert got.dtype == torch.bfloat16 and torch.equal(got, want.bfloat16())
    assert torch.equal(products[0], torch.full((4, 3), 1.5).bfloat16())  # rounded once, not per partial sum


def test_emulated_bf16_covers_autocast_and_bf16_weights_forward_and_backward():
    torch.manual_seed(0)
    lin = nn.Linear(16, 8)
    x = torch.randn(4, 16, requires_grad=True)
    with EmulatedKernels(torch.bfloat16) as mode, torch.autocast("cpu", dtype=torch.bfloat16):
        lin(x).float().sum().backward()  # autocast casts, then the emulated kernels see BF16 products
    assert mode.calls == 3  # forward, input gradient, weight gradient
    pure = copy.deepcopy(lin).bfloat16()
    with EmulatedKernels(torch.bfloat16) as mode:
        out = pure(x.detach().bfloat16())
    with EmulatedKernels(torch.float16) as fp16_mode:
        pure(x.detach().bfloat16())  # an FP16 emulation leaves BF16 products alone
    assert mode.calls == 1 and out.dtype == torch.bfloat16 and fp16_mode.calls == 0


@pytest.mark.parametrize("mode", ["bf16", "bf16_pure", "bf16_sr", "bf16_kahan", "fp8"])
def test_every_bf16_mode_takes_the_emulated_path_and_native_keeps_torchs(compose_cfg, mode):
    from mptrain.precision import Precision

    cpu = torch.device("cpu")
    emulated = Precision(compose_cfg(f"precision={mode}", "precision.cpu_bf16=emulate").precision, cpu)
    kernels = emulated.kernels()
    assert isinstance(kernels, EmulatedKernels) and kernels.dtype == torch.bfloat16
    assert emulated.bf16_kernels == "emulated" and emulated.fp16_kernels is None and emulated.cpu_bf16 == "emulate"
    native = Precision(compose_cfg(f"precision={mode}", "precision.cpu_bf16=native").precision, cpu)
    assert not native.emulate and native.bf16_kernels == "native"
    assert isinstance(native.kernels(), contextlib.nullcontext)  # torch's own BF16 kernels


def test_cpu_bf16_auto_follows_the_cpus_bf16_units(compose_cfg, monkeypatch):
    from mptrain.precision import Precision

    cpu = torch.device("cpu")
    monkeypatch.setattr(emulation, "cpu_has_bf16_units", lambda: False)
    p = Precision(compose_cfg("precision=bf16").precision, cpu)
    assert p.emulate and p.bf16_kernels == "emulated" and not p.notes
    native = Precision(compose_cfg("precision=bf16_pure", "precision.cpu_bf16=native").precision, cpu)
    assert len(native.notes) == 1 and "cpu_bf16=native is slow" in native.notes[0]
    monkeypatch.setattr(emulation, "cpu_has_bf16_units", lambda: True)  # AVX512-BF16 / AMX: oneDNN's kernels are fast
    p = Precision(compose_cfg("precision=bf16").precision, cpu)
    assert not p.emulate and p.bf16_kernels == "native" and p.cpu_bf16 == "native" and not p.notes


def test_a_bf16_lstm_is_emulated_whole_under_autocast():
    from mptrain.models.rnn import run_recurrent

    torch.manual_seed(0)
    rnn = nn.LSTM(8, 16, batch_first=True)
    x = torch.randn(3, 5, 8)
    with EmulatedKernels(torch.bfloat16), torch.autocast("cpu", dtype=torch.bfloat16):
        out, (h, c) = run_recurrent(rnn, x, None)
    weights = {n: p.bfloat16().float() for n, p in rnn.named_parameters()}  # the BF16 copies autocast makes, in FP32
    want, _ = torch.func.functional_call(rnn, weights, (x.bfloat16().float(), None))
    assert out.dtype == h.dtype == torch.bfloat16 and torch.equal(out, want.bfloat16())


def test_a_bf16_run_with_emulated_kernels_trains_and_says_so(tmp_path):
    from cli_helpers import train_inprocess

    run = tmp_path / "run"
    train_inprocess("precision=bf16_pure", "precision.cpu_bf16=emulate", *TINY, "trainer.max_steps=3",
                    f"hydra.run.dir={run}")  # fmt: skip
    summary = read_summary(run)
    assert summary["status"] == "completed" and summary["bf16_kernels"] == "emulated"
    assert summary["cpu_bf16"] == "emulate" and summary["fp16_kernels"] is None


# the weight cache: FP32 copies of the FP16/BF16 weights, made once per step instead of once per product

def test_the_weight_cache_casts_each_weight_once_and_never_serves_a_stale_one():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4)).half()
    x = torch.randn(8, 16).half().requires_grad_(True)

    def step(mode):
        model.zero_grad()
        x.grad = None
        with mode:
            out = model(x)
            out.float().sum().backward()
        return [out, x.grad, *(p.grad for p in model.parameters())]

    cached = EmulatedKernels(weights=list(model.parameters()))
    with cached:
        first = step(contextlib.nullcontext())
        assert cached.cache.made == 4  # each weight and bias once, though the weights are read twice
        with torch.no_grad():  # an update, as the master weights' copy makes one, inside the same kernels
            torch._foreach_copy_(list(model.parameters()), [p * 0.5 for p in model.parameters()])
        second = step(contextlib.nullcontext())
        assert cached.cache.made == 8  # the changed weights were cast again
    reference = step(EmulatedKernels())  # no cache: every product casts for itself
    for a, b in zip(second, reference):
        assert torch.equal(a, b)
    assert not torch.equal(first[0], second[0])


def test_the_weight_cache_serves_views_and_channels_last_weights():
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 8, 3).half().to(memory_format=torch.channels_last)
    x = torch.randn(2, 3, 9, 9).half().requires_grad_(True)
    outs = []
    for weights in ((), list(conv.parameters())):
        conv.zero_grad()
        with EmulatedKernels(weights=weights) as mode:
            out = conv(x)
            out.float().square().sum().backward()
        outs.append([out, conv.weight.grad.clone()])
    assert mode.cache.made == 2 and all(torch.equal(a, b) for a, b in zip(*outs))


@pytest.mark.parametrize("run", [["debug=tiny", "precision=mixed", "precision.init_scale=1e30"],  # step 1: skipped
                                 ["debug=tiny", "model=dcgan", "dataset.image_size=16", "model.width=4", "model.fid.enabled=false",
                                  "precision=mixed"],  # D's weights read by both networks' steps
                                 ["debug=tiny_lm", "model=lstm_lm", "precision=mixed"]])  # the LSTM emulated whole
def test_runs_with_the_weight_cache_are_bit_identical_to_runs_without(compose_cfg, tmp_path, monkeypatch, run):
    from mptrain.bench.measure import RecordingLogger
    from mptrain.build import build_trainer

    cfg = compose_cfg(*run, "precision.cpu_fp16=emulate", "trainer.max_steps=3",
                      "trainer.progress=false")  # fmt: skip
    ends = []
    for cached in (True, False):
        if not cached:
            monkeypatch.setattr(emulation.WeightCache, "up", lambda self, t: t.float())
        (run_dir := tmp_path / str(cached)).mkdir()
        trainer = build_trainer(cfg, torch.device("cpu"), run_dir, RecordingLogger(), None, [])
        trainer.fit(evaluate=False)
        ends.append({f"{n}.{k}": v for n, net in trainer.task.networks().items() for k, v in net.state_dict().items()})
    assert ends[0].keys() == ends[1].keys()
    for key, value in ends[0].items():
        assert torch.equal(value, ends[1][key]), key


@pytest.mark.parametrize("is_causal", [True, False])
def test_bf16_attention_in_fp32_is_the_emulated_bf16_attention_bit_for_bit(is_causal):
    """cpu_bf16=auto on a CPU with BF16 units: torch's BF16 kernels, but the attention as the emulated BF16 kernels
    compute it (FP32 flash attention on the BF16 values, outputs rounded): output and input gradients equal."""
    from mptrain.precision.attention import FP32Attention

    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 4, 16, 8).to(torch.bfloat16).requires_grad_() for _ in range(3))
    grad = torch.randn(2, 4, 16, 8).to(torch.bfloat16)
    results = []
    for context in (FP32Attention(), EmulatedKernels(torch.bfloat16)):
        for t in (q, k, v):
            t.grad = None
        with context:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=is_causal)
            out.backward(grad)
        results.append([out.detach(), q.grad, k.grad, v.grad])
    assert all(a.dtype == torch.bfloat16 and torch.equal(a, b) for a, b in zip(*results))
    native = F.scaled_dot_product_attention(q, k, v, is_causal=is_causal)
    assert (native.float() - results[0][0].float()).abs().max() < 0.05  # torch's BF16 kernel: within its rounding


def test_only_plain_bf16_attention_is_routed(monkeypatch):
    from mptrain.precision import attention

    calls = []
    monkeypatch.setattr(attention._Attention, "apply", lambda *a: calls.append(a) or a[0])
    q = torch.randn(1, 2, 4, 8)
    mask = torch.ones(4, 4, dtype=torch.bool)
    with attention.FP32Attention():
        F.scaled_dot_product_attention(q, q, q)  # FP32: torch's own
        F.scaled_dot_product_attention(q.bfloat16(), q.bfloat16(), q.bfloat16(), mask)  # a mask: torch's own
        F.scaled_dot_product_attention(q.bfloat16(), q.bfloat16(), q.bfloat16(), None, 0.0, True)  # routed
    assert len(calls) == 1 and calls[0][3] is True


def test_cpu_bf16_auto_routes_the_attention_only_where_bf16_runs_natively(compose_cfg, monkeypatch):
    from mptrain.precision import Precision
    from mptrain.precision.attention import FP32Attention

    def make(*overrides):
        return Precision(compose_cfg("trainer.device=cpu", *overrides).precision, torch.device("cpu"))

    monkeypatch.setattr(emulation, "cpu_has_bf16_units", lambda: True)
    assert isinstance(make("precision=bf16").kernels(), FP32Attention)
    assert not isinstance(make("precision=bf16", "precision.cpu_bf16=native").kernels(), FP32Attention)
    assert not isinstance(make("precision=fp32").kernels(), FP32Attention)
    monkeypatch.setattr(emulation, "cpu_has_bf16_units", lambda: False)
    assert isinstance(make("precision=bf16").kernels(), EmulatedKernels)


@pytest.mark.parametrize("args, says", [
    ([], "usage: python -m mptrain.scripts.emulation_check"),
    (["speed", "foo=1"], "foo is not one of its settings"),
    (["same-state", "warm=x"], "warm=x must be a whole number"),
    (["numerics", "one-dir"], "usage: "),
])
def test_emulation_check_usage_mistakes_are_one_line(args, says):
    """The script behind results/*/emulation_check.md: a mistyped setting is one line and exit 2, no traceback."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "mptrain.scripts.emulation_check", *args], capture_output=True,
                          text=True, timeout=120)
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == 2 and len(lines) == 1 and says in lines[0], done.stderr
