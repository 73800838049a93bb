"""Lost updates of weights kept in their own low precision (fp16_naive, bf16_pure, bf16_sr, bf16_kahan).

On a numerics step, just before the real update, the optimizer is stepped once more on a throwaway FP32 copy
(weights, gradients and state upcast; the same optimizer class and settings): its change is the update the
weights were meant to get, `u`. Against it, per weight element:

- nearest drop: u != 0, and rounding w + u to nearest in the weights' dtype gives w back (what the paper's
  §3.1 measures, and what pure bf16 / fp16 weights do);
- lost: u != 0 and the weight did not move this step (with its Kahan compensation, where there is one);
- kept: of the update mass nearest rounding drops, the share that reached the weights (sum of the weight's
  move along u over the sum of |u|): 0 for nearest rounding, 1 in expectation for stochastic rounding,
  about 1 for Kahan summation, whose compensation buffer holds it until it adds up.
"""

from __future__ import annotations

import collections
import copy

import torch

LOW = (torch.float16, torch.bfloat16)
SIZE = 5  # count, lost, nearest drop, dropped mass, kept mass


def fp32_update(optimizer: torch.optim.Optimizer, params: list[torch.Tensor]) -> list[torch.Tensor]:
    """The update `optimizer` would make to `params` now if weights, gradients and its state were FP32; the real
    optimizer and weights are left as they are."""
    shadows = []
    for p in params:
        shadow = p.detach().float().clone()
        # a copy even where the gradient is FP32 already: an optimizer may use it as scratch space
        shadow.grad = None if p.grad is None else p.grad.detach().to(torch.float32, copy=True)
        shadows.append(shadow)
    twin = _twin(optimizer, {id(p): s for p, s in zip(params, shadows)})
    twin.step()
    return [s.detach() - p.detach().float() for s, p in zip(shadows, params)]


def _twin(optimizer: torch.optim.Optimizer, shadow_of: dict[int, torch.Tensor]) -> torch.optim.Optimizer:
    """A copy of `optimizer` over the shadow weights, its state copied and upcast. Not `copy.deepcopy`: an
    optimizer pickles only its defaults, state and groups, and torchao's keeps settings in attributes too."""
    twin = object.__new__(type(optimizer))
    # settings only: an LR scheduler wraps the instance's `step` around the real optimizer, so callables stay
    # behind (the class's own `step` steps the twin)
    twin.__dict__.update({key: value for key, value in optimizer.__dict__.items() if not callable(value)})
    twin.param_groups = [{**{key: _upcast(value) for key, value in group.items() if key != "params"},
                          "params": [shadow_of[id(p)] for p in group["params"]]}
                         for group in optimizer.param_groups]  # fmt: skip (optimi counts steps in the group)
    twin.state = collections.defaultdict(dict)
    for p, state in optimizer.state.items():
        if id(p) in shadow_of:
            twin.state[shadow_of[id(p)]] = {key: _upcast(value) for key, value in state.items()}
    for group in twin.param_groups:
        if "kahan_sum" in group:  # torch-optimi: FP32 weights need no compensation
            group["kahan_sum"] = False
    return twin


def _upcast(value):
    if hasattr(value, "dequantize") and hasattr(value, "__tensor_flatten__"):  # torchao's 8-bit/4-bit/FP8 state
        return value.dequantize().float()
    if torch.is_tensor(value):
        return value.float() if value.dtype in LOW else value.clone()
    return copy.deepcopy(value)


def low_precision_state(optimizer: torch.optim.Optimizer | None) -> bool:
    """Whether the optimizer holds a moment below FP32 (optim.state=bf16/8bit/4bit/fp8) for FP32 weights."""
    return optimizer is not None and any(torch.is_tensor(v) and v.numel() > 1 and (hasattr(v, "__tensor_flatten__") or v.dtype in LOW)
               for state in optimizer.state.values() for v in state.values())


def fp32_moments(optimizer: torch.optim.Optimizer, params: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
    """The moments `optimizer` would hold after stepping now from its state dequantized to FP32 and kept in FP32
    (an FP32 twin's; the real optimizer is left as it is). torchao's step updates with the moments it has just
    computed in FP32 and rounds only what it stores: the rounding reaches the next step's update, through these."""
    shadows = []
    for p in params:
        shadow = p.detach().float().clone()
        shadow.grad = None if p.grad is None else p.grad.detach().to(torch.float32, copy=True)
        shadows.append(shadow)
    twin = _twin(optimizer, {id(p): s for p, s in zip(params, shadows)})
    twin.step()
    return [{k: v for k, v in twin.state[s].items() if torch.is_tensor(v) and v.numel() > 1} for s in shadows]


def moment_stats(stored: dict, exact: dict[str, torch.Tensor]) -> torch.Tensor:
    """[values, sum of (stored - exact)^2, sum of exact^2] over a weight's moments: what storing them in low
    precision rounded away this step."""
    pairs = [(_upcast(stored[k]), v) for k, v in exact.items() if k in stored]
    count = sum(v.numel() for _, v in pairs)
    device = next(iter(exact.values())).device if exact else None
    return torch.stack([torch.tensor(float(count), device=device),
                        sum(((s - v).square().sum() for s, v in pairs), torch.zeros((), device=device)),
                        sum((v.square().sum() for _, v in pairs), torch.zeros((), device=device))])


def effective_weights(optimizer: torch.optim.Optimizer, params: list[torch.Tensor]) -> list[torch.Tensor]:
    """Each weight in FP32 plus what its Kahan compensation buffer still owes it (torch-optimi's `kahan_comp`)."""
    out = []
    for p in params:
        comp = optimizer.state.get(p, {}).get("kahan_comp")
        weight = p.detach().float()
        out.append(weight + comp.float() if torch.is_tensor(comp) and comp.shape == p.shape else weight.clone())
    return out


def update_stats(weight_before: torch.Tensor, effective_before: torch.Tensor, effective_after: torch.Tensor,
                 intended: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[count, lost, nearest drop, dropped mass, kept mass] of one weight tensor's step, on its device."""
    wanted = intended != 0
    dropped = wanted & ((weight_before + intended).to(dtype).float() == weight_before)
    moved = effective_after - effective_before
    lost = wanted & (moved == 0)
    mask = dropped.float()  # products, not boolean indexing: no host sync on a GPU
    return torch.stack([torch.tensor(float(intended.numel()), device=intended.device), lost.sum().float(),
                        mask.sum(), (intended.abs() * mask).sum(), (moved * intended.sign() * mask).sum()])  # fmt: skip


def to_fields(v: list[float]) -> dict:
    """The record's fields beyond the lost share: what nearest rounding would drop, and how much of it was kept."""
    if len(v) < SIZE:
        return {}
    fields = {"nearest_drop_frac": v[2] / (v[0] or 1.0), "dropped_mass": v[3], "kept_mass": v[4]}
    if v[3] > 0:
        fields["drop_kept_frac"] = v[4] / v[3]
    return fields
