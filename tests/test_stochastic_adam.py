"""bf16_sr's Adam/AdamW: torchao's `single_param_adam(bf16_stochastic_round=True)` arithmetic as multi-tensor ops,
and its rounding (`stochastic_round_bf16`). The reference is torchao's own function run eagerly, parameter by
parameter, from the same random bits: our draw (`uniform16`) is replaced by torchao's where bits must match."""

from __future__ import annotations

import copy
import sys

import pytest
import torch

pytest.importorskip("torchao")
from torchao.optim.adam import single_param_adam  # noqa: E402
from torchao.optim.quant_utils import _fp32_to_bf16_sr  # noqa: E402

from mptrain.precision import rounding  # noqa: E402
from mptrain.precision.rounding import StochasticRoundingAdam  # noqa: E402


@pytest.fixture
def torchaos_random_bits(monkeypatch):
    """Our rounding drawing torchao's bits: its torch.randint r, as the u = 0xFFFF - r our carry test adds."""
    monkeypatch.setattr(rounding, "uniform16", lambda n, device: 0xFFFF - torch.randint(
        0, 1 << 16, (n,), dtype=torch.int32, device=device))


def test_the_rounding_equals_torchaos_for_the_same_random_bits(torchaos_random_bits):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(50_000, generator=g) * torch.logspace(-44, 38, 50_000)  # subnormals to near FP32's top
    special = [float("inf"), -float("inf"), float("nan"), 3.3999e38, -3.3999e38, 0.0, -0.0, 1e-45, -1e-45, 1.0]
    x = torch.cat([x, torch.tensor(special)])
    torch.manual_seed(1)
    ref = _fp32_to_bf16_sr(x.clone())
    torch.manual_seed(1)
    ours = rounding.stochastic_round_bf16(x.clone())
    assert ours.dtype == torch.bfloat16
    assert torch.equal(ours.view(torch.int16), ref.view(torch.int16))
    assert ours[-7].isinf() and ours[-7] > 0  # above BF16's largest finite value, rounded away: infinity


def test_the_draw_is_uniform_over_16_bits_in_each_of_the_four_lanes_of_a_64_bit_word():
    torch.manual_seed(0)
    u = rounding.uniform16(400_003)
    assert u.dtype == torch.int32 and u.numel() == 400_003 and u.min() >= 0 and u.max() <= 0xFFFF
    for lane in range(4):
        counts = torch.bincount(u[lane::4] >> 10, minlength=64).double()  # 64 bins of ~1,560
        chi2 = ((counts - counts.mean()) ** 2 / counts.mean()).sum().item()
        assert chi2 < 120  # 63 degrees of freedom: p < 1e-5 above this
        assert (u[lane::4] & 1).double().mean().item() == pytest.approx(0.5, abs=0.01)  # low bits random too


def test_bf16_sr_needs_no_torchao(monkeypatch):
    monkeypatch.setitem(sys.modules, "torchao", None)  # importing torchao now fails
    w = torch.nn.Parameter(torch.ones(8, dtype=torch.bfloat16))
    cfg = type("Optim", (), {"name": "adamw", "lr": 1e-2, "betas": (0.9, 0.99), "eps": 1e-8})
    optimizer = rounding.stochastic_optimizer(cfg, [{"params": [w], "weight_decay": 0.0}])
    w.grad = torch.ones_like(w)
    optimizer.step()
    assert w.dtype == torch.bfloat16 and (w < 1).all()


def _params(seed: int = 0) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    shapes = [(64, 33), (33,), (7, 3, 3, 3), (1,), (300,)]
    params = [torch.nn.Parameter(torch.randn(s, generator=g).bfloat16()) for s in shapes]
    params.append(torch.nn.Parameter(torch.randn(5, 4, generator=g)))  # an FP32 weight beside them: plain copy
    return params


def _set_grads(params, step: int) -> None:
    g = torch.Generator().manual_seed(100 + step)
    for i, p in enumerate(params):
        # the scalar (index 3) has no gradient on odd steps: its step count falls behind the others'
        p.grad = None if (i == 3 and step % 2) else torch.randn(p.shape, generator=g).to(p.dtype) * 1e-2


def _torchao_eager(params, groups, steps: int, adamw: bool) -> None:
    """torchao's _AdamW.step, uncompiled: group by group, parameter by parameter."""
    state = {}
    for step in range(steps):
        _set_grads(params, step)
        torch.manual_seed(step)
        for group in groups:
            for p in group["params"]:
                if p.grad is not None:
                    _torchao_step(p, state, group["lr"], group["weight_decay"], adamw)


def _torchao_step(p, state, lr, decay, adamw):
    s = state.setdefault(p, {"step": torch.tensor(0.0), "m": torch.zeros_like(p), "v": torch.zeros_like(p)})
    s["step"] += 1
    single_param_adam(p.detach(), p.grad, s["step"], s["m"], s["v"], None, torch.tensor(lr), 0.9, 0.99, decay,
                      1e-6, adamw, p.dtype is torch.bfloat16)


def _ours(params, groups, steps: int, adamw: bool, optimizer=None):
    optimizer = optimizer or StochasticRoundingAdam(groups, lr=1e-3, betas=(0.9, 0.99), eps=1e-6, adamw=adamw)
    for step in range(steps):
        _set_grads(params, step)
        torch.manual_seed(step)
        optimizer.step()
    return optimizer


@pytest.mark.parametrize("adamw", [True, False])
def test_a_step_equals_torchao_run_eagerly_bit_for_bit(adamw, torchaos_random_bits):
    ref, ours = _params(), _params()
    # two groups as build_optimizer makes them: decayed matrices, undecayed vectors, each its own LR
    def groups(params):
        return [{"params": [p for p in params if p.ndim > 1], "lr": 3e-3, "weight_decay": 0.1},
                {"params": [p for p in params if p.ndim <= 1], "lr": 1e-3, "weight_decay": 0.0}]

    _torchao_eager(ref, groups(ref), steps=6, adamw=adamw)
    _ours(ours, groups(ours), steps=6, adamw=adamw)
    for a, b in zip(ref, ours):
        assert a.dtype == b.dtype
        assert torch.equal(a, b)


def test_the_rounding_is_stochastic_and_keeps_small_updates_in_expectation():
    w = torch.nn.Parameter(torch.ones(20000, dtype=torch.bfloat16))
    optimizer = StochasticRoundingAdam([w], lr=2**-10)  # Adam's first update is lr: a quarter of the ulp below 1
    torch.manual_seed(0)
    w.grad = torch.ones_like(w)
    optimizer.step()
    moved = (w < 1).float().mean().item()
    assert moved == pytest.approx(0.25, abs=0.02)  # down to 1 - 2^-8 a quarter of the time; nearest: never
    assert w.float().mean().item() == pytest.approx(1 - 2**-10, abs=6e-5)


def test_a_resumed_optimizer_continues_bit_for_bit():
    whole, cut = _params(), _params()
    _ours(whole, [{"params": whole}], steps=6, adamw=True)
    first = _ours(cut, [{"params": cut}], steps=3, adamw=True)
    saved = copy.deepcopy(first.state_dict())
    resumed = StochasticRoundingAdam([{"params": cut}], lr=1e-3, betas=(0.9, 0.99), eps=1e-6)
    resumed.load_state_dict(saved)
    for step in range(3, 6):
        _set_grads(cut, step)
        torch.manual_seed(step)
        resumed.step()
    for a, b in zip(whole, cut):
        assert torch.equal(a, b)
    state = resumed.state[cut[0]]
    assert state["exp_avg"].dtype == torch.bfloat16 and state["step"].item() == 6  # torchao's state, its dtypes
