"""Updating BF16 weights without an FP32 master copy: the optimizers of the bf16_sr and bf16_kahan modes.

- `stochastic`: the update is computed in FP32 and rounded to BF16 stochastically (up with probability equal to
  the remainder), so updates below half a BF16 ulp survive in expectation. Adam/AdamW: `StochasticRoundingAdam`
  below, torchao's `_AdamW(bf16_stochastic_round=True)` arithmetic as multi-tensor ops; SGD:
  `StochasticRoundingSGD`. Both round with `stochastic_round_bf16`: torchao's `_fp32_to_bf16_sr`, bit for bit
  for the same random bits, drawn 3x faster on a CPU. torchao is the tests' reference, not a need.
- `kahan`: torch-optimi's SGD/Adam/AdamW with `kahan_sum=True`: a BF16 compensation buffer per weight carries what
  rounding dropped into the next step.
torch-optimi is optional (`pip install 'mptrain[lowp]'`); without it bf16_kahan refuses in one line.
`optim.library=optimi` runs torch-optimi's optimizer without Kahan summation in any mode: bf16_kahan's control.
"""

from __future__ import annotations

import torch

from mptrain.errors import UserError


def _need(module: str, mode: str, package: str):
    try:
        return __import__(module, fromlist=["_"])
    except ImportError:
        raise UserError(f"precision={mode} needs {package}: pip install 'mptrain[lowp]' (or {package})") from None


def uniform16(n: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """n random integers uniform in [0, 2^16), as int32: four to each 64-bit draw of torch's generator. torch.randint
    (torchao's draw) spends a 32-bit draw on each, and on a CPU that serial draw is half the rounding's time: for the
    transformer's 1.2 M weights 4.9 ms against 1.5 ms here."""
    words = torch.empty((n + 3) // 4, dtype=torch.int64, device=device).random_(-(2**63), None)  # every 64-bit value
    return words.view(torch.int16)[:n].to(torch.int32).bitwise_and_(0xFFFF)


def stochastic_round_bf16(x: torch.Tensor) -> torch.Tensor:
    """FP32 to BF16, away from zero with probability equal to the 16 dropped bits' share of an ulp (as uint16 / 2^16),
    else towards zero. Adding u uniform in [0, 2^16) to the bits carries into the kept half iff u >= 2^16 - dropped:
    that probability, with no compare-and-select; with u = 0xFFFF - r it is torchao's `_fp32_to_bf16_sr` for its random
    r, bit for bit (tests/test_stochastic_adam.py), infinities and NaN included. `x` is consumed (rounded in place)."""
    bits = x.contiguous().view(torch.int32)
    bits.add_(uniform16(bits.numel(), bits.device).view(bits.shape)).bitwise_and_(-(1 << 16))
    return bits.view(torch.float32).bfloat16()


def stochastic_optimizer(cfg, groups):
    if cfg.name == "sgd":
        return StochasticRoundingSGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=bool(cfg.nesterov))
    return StochasticRoundingAdam(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, adamw=cfg.name == "adamw")


def optimi_optimizer(cfg, groups, kahan_sum: bool):
    """torch-optimi's optimizer; `kahan_sum` explicit: optimi would otherwise turn it on for any BF16 weights."""
    optimi = _need("optimi", "bf16_kahan" if kahan_sum else "optim.library=optimi", "torch-optimi")
    common = {"lr": cfg.lr, "kahan_sum": kahan_sum, "foreach": True}
    if cfg.name == "sgd":
        return optimi.SGD(groups, momentum=cfg.momentum, **common)
    if cfg.name == "adam":
        return optimi.Adam(groups, betas=tuple(cfg.betas), eps=cfg.eps, **common)
    return optimi.AdamW(groups, betas=tuple(cfg.betas), eps=cfg.eps, **common)


class StochasticRoundingSGD(torch.optim.Optimizer):
    """torch's SGD (momentum, Nesterov, coupled weight decay) computed in FP32, its result rounded to the BF16
    weights stochastically; the momentum buffer is FP32."""

    def __init__(self, params, lr: float, momentum: float = 0.0, nesterov: bool = False, weight_decay: float = 0.0):
        super().__init__(params, {"lr": lr, "momentum": momentum, "nesterov": nesterov, "weight_decay": weight_decay})

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            lr, momentum, decay = group["lr"], group["momentum"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                weight, grad = p.float(), p.grad.float()
                if decay:
                    grad = grad.add(weight, alpha=decay)
                if momentum:
                    state = self.state[p]
                    buf = state.get("momentum_buffer")
                    buf = state.setdefault("momentum_buffer", grad.clone()) if buf is None else buf.mul_(momentum).add_(grad)
                    grad = grad.add(buf, alpha=momentum) if group["nesterov"] else buf
                new = weight.add_(grad, alpha=-lr)
                p.copy_(stochastic_round_bf16(new) if p.dtype == torch.bfloat16 else new)
        return None


class StochasticRoundingAdam(torch.optim.Optimizer):
    """Adam (coupled weight decay) or AdamW computed in FP32 and rounded to the BF16 weights stochastically: the
    arithmetic of torchao's `single_param_adam(bf16_stochastic_round=True)`, op for op, so a step equals torchao's
    run eagerly bit for bit (tests/test_stochastic_adam.py), and the same state (`step`, and the moments in the
    weights' dtype, rounded to nearest). torchao steps each parameter through its own compiled call, whose guards
    cost more than the update on a CPU (15.5 of a 26 ms transformer step); here every parameter of a group goes
    through one chain of multi-tensor (`torch._foreach_*`) ops and one rounding pass over them all."""

    def __init__(self, params, lr: float, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0,
                 adamw: bool = True):
        super().__init__(params, {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay})
        self.adamw = adamw

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if params:
                self._step_group(group, params)
        return None

    def _step_group(self, group: dict, params: list[torch.Tensor]) -> None:
        lr = torch.as_tensor(group["lr"], dtype=torch.float32)  # a tensor, as torchao keeps it
        beta1, beta2 = group["betas"]
        decay, eps = group["weight_decay"], group["eps"]
        states = [self._state(p) for p in params]
        steps = [s["step"] for s in states]
        torch._foreach_add_(steps, 1.0)
        weights = [p.float() for p in params]
        grads = [p.grad.float() for p in params]
        if decay and self.adamw:
            torch._foreach_sub_(weights, torch._foreach_mul(weights, lr * decay))
        elif decay:
            torch._foreach_add_(grads, torch._foreach_mul(weights, decay))
        exp_avgs = [s["exp_avg"].float() for s in states]
        exp_avg_sqs = [s["exp_avg_sq"].float() for s in states]
        torch._foreach_lerp_(exp_avgs, grads, 1 - beta1)
        torch._foreach_lerp_(exp_avg_sqs, torch._foreach_mul(grads, grads), 1 - beta2)
        torch._foreach_copy_([s["exp_avg"] for s in states], exp_avgs)
        torch._foreach_copy_([s["exp_avg_sq"] for s in states], exp_avg_sqs)
        corrections = {n: _bias_corrections(s, beta1, beta2) for n, s in {float(s): s for s in steps}.items()}
        correction1 = [corrections[float(s)][0] for s in steps]
        root_correction2 = [corrections[float(s)][1] for s in steps]
        denoms = torch._foreach_div(torch._foreach_sqrt(exp_avg_sqs), root_correction2)
        torch._foreach_add_(denoms, eps)
        updates = torch._foreach_div(exp_avgs, correction1)
        torch._foreach_mul_(updates, lr)
        torch._foreach_div_(updates, denoms)
        torch._foreach_sub_(weights, updates)
        low = [p for p, w in zip(params, weights) if p.dtype == torch.bfloat16]
        if low:  # one rounding pass over every BF16 weight: one draw of random bits, in parameter order
            flat = torch.cat([w.reshape(-1) for p, w in zip(params, weights) if p.dtype == torch.bfloat16])
            rounded = stochastic_round_bf16(flat).split([p.numel() for p in low])
            torch._foreach_copy_(low, [r.view_as(p) for r, p in zip(rounded, low)])
        high = [(p, w) for p, w in zip(params, weights) if p.dtype != torch.bfloat16]
        if high:
            torch._foreach_copy_([p for p, _ in high], [w for _, w in high])

    def _state(self, p: torch.Tensor) -> dict:
        state = self.state[p]
        if not state:
            state["step"] = torch.tensor(0.0)
            state["exp_avg"] = torch.zeros_like(p)
            state["exp_avg_sq"] = torch.zeros_like(p)
        return state


def _bias_corrections(step: torch.Tensor, beta1: float, beta2: float) -> tuple[float, float]:
    """Adam's 1 - beta1^t and sqrt(1 - beta2^t) as torchao computes them: FP32 arithmetic on the FP32 step count."""
    return (1 - beta1**step).item(), (1 - beta2**step).sqrt().item()
