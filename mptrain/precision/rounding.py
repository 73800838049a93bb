"""Updating BF16 weights without an FP32 master copy: the optimizers of the bf16_sr and bf16_kahan modes.

- `stochastic`: the update is computed in FP32 and rounded to BF16 stochastically (up with probability equal to
  the remainder), so updates below half a BF16 ulp survive in expectation. Adam/AdamW: torchao's `_AdamW(
  bf16_stochastic_round=True)`; SGD: `StochasticRoundingSGD` below, which rounds with torchao's own
  `_fp32_to_bf16_sr`.
- `kahan`: torch-optimi's SGD/Adam/AdamW with `kahan_sum=True`: a BF16 compensation buffer per weight carries what
  rounding dropped into the next step.
Both libraries are optional (`pip install 'mptrain[lowp]'`); without them the mode refuses in one line.
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


def stochastic_optimizer(cfg, groups):
    if cfg.name == "sgd":
        return StochasticRoundingSGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=bool(cfg.nesterov))
    optim = _need("torchao.optim", "bf16_sr", "torchao")
    return optim._AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, bf16_stochastic_round=True)


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
        from torchao.optim.quant_utils import _fp32_to_bf16_sr

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
                p.copy_(_fp32_to_bf16_sr(new) if p.dtype == torch.bfloat16 else new)
        return None
