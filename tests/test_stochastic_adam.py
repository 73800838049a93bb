"""bf16_sr's Adam/AdamW: torchao's `single_param_adam(bf16_stochastic_round=True)` arithmetic as multi-tensor ops.
The reference is torchao's own function run eagerly, parameter by parameter, from the same random state."""

from __future__ import annotations

import copy

import pytest
import torch

pytest.importorskip("torchao")
from torchao.optim.adam import single_param_adam  # noqa: E402

from mptrain.precision.rounding import StochasticRoundingAdam  # noqa: E402


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
def test_a_step_equals_torchao_run_eagerly_bit_for_bit(adamw):
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
