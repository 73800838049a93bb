"""The loss scaler: GradScaler's trajectory, hysteresis, floor, static scale, state."""

from __future__ import annotations

import math

import pytest
import torch

from mptrain.precision import LossScaleCollapsed, LossScaler

# clean/overflow steps chosen to cross several growth intervals and back-offs
PATTERN = [False] * 3 + [True] + [False] * 6 + [True, True] + [False] * 7 + [True] + [False] * 4


def _grads(overflow: bool, dtype=torch.float16):
    return [torch.tensor([math.inf if overflow else 1.0, 2.0], dtype=dtype), torch.ones(3, dtype=dtype)]


def _ours(scaler: LossScaler, pattern):
    trajectory = []
    for overflow in pattern:
        found = scaler.unscale_(_grads(overflow))
        scaler.update(bool(found.item()))
        trajectory.append(scaler.get_scale())
    return trajectory


def test_dynamic_trajectory_equals_torch_gradscaler():
    """Same overflow/clean sequence → the same scales as torch.amp.GradScaler itself."""
    torch_scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16, growth_factor=2.0, backoff_factor=0.5, growth_interval=3)
    param = torch.nn.Parameter(torch.ones(2))
    optimizer = torch.optim.SGD([param], lr=0.0)
    theirs = []
    for overflow in PATTERN:
        torch_scaler.scale(torch.ones(()))  # GradScaler creates its state on the first scale()
        param.grad = torch.tensor([math.inf if overflow else 1.0, 2.0])
        torch_scaler.step(optimizer)
        torch_scaler.update()
        theirs.append(torch_scaler.get_scale())
    ours = _ours(LossScaler(init_scale=2.0**16, growth_interval=3), PATTERN)
    assert ours == theirs
    # the pattern really exercised growth and back-off
    assert any(b > a for a, b in zip(ours, ours[1:])) and any(b < a for a, b in zip(ours, ours[1:]))


def test_unscale_divides_fp16_grads_and_flags_inf():
    scaler = LossScaler(init_scale=8.0)
    grads = [torch.tensor([8.0, 16.0], dtype=torch.float16)]
    found = scaler.unscale_(grads)
    assert found.item() == 0.0 and grads[0].tolist() == [1.0, 2.0]
    assert scaler.unscale_(_grads(True)).item() == 1.0


def test_static_scale_skips_but_never_changes():
    scaler = LossScaler(init_scale=128.0, dynamic=False)
    trajectory = _ours(scaler, PATTERN)
    assert set(trajectory) == {128.0}
    assert scaler.skipped_steps == sum(PATTERN)


def test_hysteresis_tolerates_overflows_before_backing_off():
    scaler = LossScaler(init_scale=1024.0, hysteresis=2, growth_interval=3)
    # 1st overflow tolerated, 2nd backs off, and every later one until growth resets the count
    assert _ours(scaler, [True, True, True]) == [1024.0, 512.0, 256.0]
    # growth after 3 clean steps resets the hysteresis: one overflow is tolerated again
    assert _ours(scaler, [False, False, False, True, True]) == [256.0, 256.0, 512.0, 512.0, 256.0]
    assert scaler.skipped_steps == 5


def test_collapse_below_min_scale_stops():
    scaler = LossScaler(init_scale=4.0, min_scale=1.0)
    _ours(scaler, [True, True])  # 2, 1: at the floor, not below
    with pytest.raises(LossScaleCollapsed, match="min_scale=1"):
        _ours(scaler, [True])


def test_state_dict_round_trip_continues_identically():
    a = LossScaler(init_scale=2.0**10, growth_interval=3, hysteresis=2)
    _ours(a, PATTERN[:11])
    b = LossScaler()
    b.load_state_dict(a.state_dict())
    assert b.state_dict() == a.state_dict()
    assert _ours(b, PATTERN[11:]) == _ours(a, PATTERN[11:])
    assert b.skipped_steps == a.skipped_steps > 0


def test_grad_scaler_behind_the_scaler_interface_follows_torchs_own_protocol():
    """The adapter decides once and steps the optimizer itself; its scale and skips match GradScaler.step's."""
    from mptrain.precision import GradScalerAdapter

    def run(adapted: bool):
        torch.manual_seed(0)
        w = torch.nn.Parameter(torch.ones(3))
        opt = torch.optim.SGD([w], lr=0.1)
        gs = torch.amp.GradScaler("cpu", init_scale=2.0**4, growth_interval=2)
        adapter = GradScalerAdapter(gs)
        scales = []
        for poison in [False, True, False, False, False]:
            opt.zero_grad()
            loss = (w * (float("inf") if poison else 1.0)).sum()
            (adapter.scale(loss) if adapted else gs.scale(loss)).backward()
            if adapted:
                overflow = bool(adapter.unscale_([w.grad], opt).item())
                if not overflow:
                    opt.step()
                adapter.update(overflow)
            else:
                gs.step(opt)
                gs.update()
            scales.append(float(adapter.scale_tensor))
        return scales, w.detach().clone(), adapter.skipped_steps

    (ours, w_ours, skipped), (theirs, w_theirs, _) = run(True), run(False)
    assert ours == theirs and torch.equal(w_ours, w_theirs) and skipped == 1
