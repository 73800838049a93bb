"""Loss scaling (the paper's technique 2) for fp16 *and* fp32 gradients, behind one interface (`Scaler`).

torch.amp.GradScaler refuses fp16 gradients, so the paper's fp16 modes need their
own scaler. This one is built on the same fused primitives GradScaler uses
(`_amp_foreach_non_finite_check_and_unscale_`, `_amp_update_scale_`), so with
hysteresis=1 its scale trajectory is GradScaler's. On top it offers a static
scale, hysteresis (tolerate N overflows before backing off, as Megatron and
DeepSpeed do), a floor (`min_scale`) that stops a run whose scale collapses,
and a count of skipped steps. The only host sync is the caller's skip decision.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Protocol

import torch

from mptrain.errors import Diverged


class LossScaleCollapsed(Diverged):
    """The dynamic scale fell below its floor (gradients overflow even unscaled), or a static scale overflowed
    `max_consecutive_skips` steps in a row (no update is being applied)."""


class Scaler(Protocol):
    """What a stepper needs of a loss scaler (as timm gives NativeScaler and ApexScaler one interface): mptrain's
    `LossScaler` and `GradScalerAdapter` (torch.amp.GradScaler, for precision=amp) both provide it."""

    dynamic: bool
    skipped_steps: int
    growth_interval: int  # clean steps between growths (the scale-history verdict reads it)

    def scale(self, loss: torch.Tensor) -> torch.Tensor: ...

    def unscale_(self, grads: list[torch.Tensor], optimizer: torch.optim.Optimizer) -> torch.Tensor:
        """Unscale in place; the found-inf flag as a device tensor (no host sync)."""

    def update(self, found_inf: bool) -> None:
        """Advance after the caller's skip decision (which rules, e.g. agreed across data-parallel ranks)."""

    @property
    def scale_tensor(self) -> torch.Tensor: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


def group_by_device_and_dtype(tensors):
    groups = defaultdict(list)
    for t in tensors:
        groups[(t.device, t.dtype)].append(t)
    return groups.values()


class LossScaler:
    def __init__(
        self,
        init_scale: float = 2.0**16,
        dynamic: bool = True,
        growth_factor: float = 2.0,
        backoff_factor: float = 0.5,
        growth_interval: int = 2000,
        hysteresis: int = 1,
        min_scale: float = 1e-4,
        device: torch.device | str = "cpu",
        max_consecutive_skips: int | None = None,
    ):
        self.dynamic = dynamic
        self.growth_factor = growth_factor
        self.backoff_factor = backoff_factor
        self.growth_interval = growth_interval
        self.hysteresis = hysteresis
        self.min_scale = min_scale
        self._scale = torch.full((), float(init_scale), dtype=torch.float32, device=device)
        self._growth_tracker = torch.zeros((), dtype=torch.int32, device=device)
        self._found_inf = torch.zeros((), dtype=torch.float32, device=device)
        self._hysteresis_left = hysteresis
        self._clean_run = 0  # host mirror of the growth tracker, needed only for hysteresis
        self.skipped_steps = 0
        self.consecutive_skips = 0  # a static scale does not adapt: a long run of skips means it never will
        self.max_consecutive_skips = max_consecutive_skips

    @property
    def scale_tensor(self) -> torch.Tensor:
        """The current scale as a device tensor (read it without a host sync)."""
        return self._scale

    def scale(self, loss: torch.Tensor) -> torch.Tensor:
        return loss * self._scale.to(loss.dtype)

    def unscale_(self, grads: list[torch.Tensor], optimizer: torch.optim.Optimizer | None = None) -> torch.Tensor:
        """Divide `grads` by the scale in place; return the found-inf flag (device tensor)."""
        self._found_inf.zero_()
        inv_scale = self._scale.double().reciprocal().float()
        for group in group_by_device_and_dtype(grads):
            torch._amp_foreach_non_finite_check_and_unscale_(group, self._found_inf, inv_scale)
        return self._found_inf

    def update(self, found_inf: bool) -> None:
        """Advance the scale after the skip decision; raise if the scale collapses."""
        if found_inf:
            self.skipped_steps += 1
        self.consecutive_skips = self.consecutive_skips + 1 if found_inf else 0
        if not self.dynamic:
            limit = self.max_consecutive_skips
            if limit and self.consecutive_skips >= limit:
                raise LossScaleCollapsed(
                    f"the static loss scale {self.get_scale():g} overflowed {self.consecutive_skips} steps in a row "
                    f"(precision.max_consecutive_skips={limit}): no update is being applied; use a smaller "
                    "precision.loss_scale, or precision.loss_scale=dynamic"
                )
            return
        backoff = self.backoff_factor
        if self.hysteresis > 1:
            if found_inf:
                self._clean_run = 0
                self._hysteresis_left -= 1
                if self._hysteresis_left > 0:
                    backoff = 1.0  # tolerated: the step is still skipped, the scale kept
            else:
                self._clean_run += 1
                if self._clean_run % self.growth_interval == 0:
                    self._hysteresis_left = self.hysteresis  # reset on growth, as Megatron does
        self._found_inf.fill_(float(found_inf))  # the caller's decision (e.g. global across ranks) rules
        torch._amp_update_scale_(
            self._scale,
            self._growth_tracker,
            self._found_inf,
            self.growth_factor,
            backoff,
            self.growth_interval,
        )
        if found_inf and backoff != 1.0:
            scale = self._scale.item()  # only on an overflow step, never on the hot path
            if scale < self.min_scale:
                raise LossScaleCollapsed(
                    f"loss scale fell to {scale:g}, below precision.min_scale={self.min_scale:g}: "
                    "gradients overflow even unscaled"
                )

    def get_scale(self) -> float:
        return float(self._scale.item())

    def state_dict(self) -> dict:
        return {
            "scale": self.get_scale(),
            "growth_tracker": int(self._growth_tracker.item()),
            "hysteresis_left": self._hysteresis_left,
            "clean_run": self._clean_run,
            "skipped_steps": self.skipped_steps,
            "consecutive_skips": self.consecutive_skips,
            "dynamic": self.dynamic,
            "growth_factor": self.growth_factor,
            "backoff_factor": self.backoff_factor,
            "growth_interval": self.growth_interval,
            "hysteresis": self.hysteresis,
            "min_scale": self.min_scale,
        }

    def load_state_dict(self, state: dict) -> None:
        self._scale.fill_(state["scale"])
        self._growth_tracker.fill_(state["growth_tracker"])
        self._hysteresis_left = state["hysteresis_left"]
        self._clean_run = state["clean_run"]
        self.skipped_steps = state["skipped_steps"]
        self.consecutive_skips = state.get("consecutive_skips", 0)  # checkpoints before it was kept: 0
        for key in ("dynamic", "growth_factor", "backoff_factor", "growth_interval", "hysteresis", "min_scale"):
            setattr(self, key, state[key])


class GradScalerAdapter:
    """torch.amp.GradScaler behind the `Scaler` interface: the only place mptrain reads its private fields.

    GradScaler.step would sync again for a decision the stepper already made once; so the stepper unscales,
    decides, steps the optimizer itself, and `update` writes that decision into the flags GradScaler recorded
    (so a decision agreed across ranks rules here too) before GradScaler updates its scale."""

    dynamic = True

    def __init__(self, grad_scaler: torch.amp.GradScaler):
        self.grad_scaler = grad_scaler
        self.skipped_steps = 0
        self._optimizer: torch.optim.Optimizer | None = None

    def scale(self, loss: torch.Tensor) -> torch.Tensor:
        return self.grad_scaler.scale(loss)

    def unscale_(self, grads: list[torch.Tensor], optimizer: torch.optim.Optimizer) -> torch.Tensor:
        self._optimizer = optimizer
        self.grad_scaler.unscale_(optimizer)
        flags = list(self._flags().values())
        return sum(flags[1:], flags[0]) if flags else torch.zeros((), device=self.scale_tensor.device)

    def update(self, found_inf: bool) -> None:
        for flag in self._flags().values():
            flag.fill_(float(found_inf))
        self.grad_scaler.update()
        self.skipped_steps += int(found_inf)

    @property
    def growth_interval(self) -> int:
        return self.grad_scaler.get_growth_interval()

    def _flags(self) -> dict:
        return self.grad_scaler._found_inf_per_device(self._optimizer)

    @property
    def scale_tensor(self) -> torch.Tensor:
        """The current scale (GradScaler makes it lazily, at the first scale(): its initial scale until then)."""
        if self.grad_scaler._scale is None:
            return torch.tensor(float(self.grad_scaler._init_scale))
        return self.grad_scaler._scale

    def state_dict(self) -> dict:
        return {**self.grad_scaler.state_dict(), "skipped_steps": self.skipped_steps}

    def load_state_dict(self, state: dict) -> None:
        self.skipped_steps = state.get("skipped_steps", 0)
        self.grad_scaler.load_state_dict({k: v for k, v in state.items() if k != "skipped_steps"})
