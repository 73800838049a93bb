"""Running means kept on the device, read once per logging window (no per-step sync)."""

from __future__ import annotations

import torch


class MeanMeter:
    """Batch-weighted means of scalar device tensors; non-finite values are counted, not averaged."""

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self._sums: dict[str, torch.Tensor] = {}
        self._counts: dict[str, torch.Tensor] = {}
        self._nonfinite: dict[str, torch.Tensor] = {}

    def add(self, metrics: dict[str, torch.Tensor], n: int) -> None:
        for key, value in metrics.items():
            value = value.detach().float()
            finite = torch.isfinite(value)
            weighted = torch.where(finite, value * n, torch.zeros_like(value))
            if key in self._sums:
                self._sums[key] += weighted
                self._counts[key] += finite * n
                self._nonfinite[key] += ~finite
            else:
                self._sums[key] = weighted
                self._counts[key] = finite.float() * n
                self._nonfinite[key] = (~finite).float()

    def read(self, reduce=None) -> tuple[dict[str, float], dict[str, int]]:
        """(means, non-finite counts): one host sync for every metric together. `reduce` sums the
        stacked sums and counts over data-parallel ranks first (every rank must call it, with the same keys)."""
        if not self._sums:
            return {}, {}
        keys = list(self._sums)
        stacked = torch.stack(
            [self._sums[k] for k in keys] + [self._counts[k] for k in keys] + [self._nonfinite[k] for k in keys]
        )
        stacked = (reduce(stacked) if reduce else stacked).tolist()
        k = len(keys)
        means = {key: (stacked[i] / stacked[k + i] if stacked[k + i] else float("nan")) for i, key in enumerate(keys)}
        nonfinite = {key: int(stacked[2 * k + i]) for i, key in enumerate(keys)}
        return means, nonfinite
