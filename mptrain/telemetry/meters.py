"""Running means kept on the device, read once per logging window (no per-step sync)."""

from __future__ import annotations

import torch


class MeanMeter:
    """Batch-weighted means of scalar device tensors; non-finite values are counted, not averaged.

    `add` only stacks the step's metrics (one op): the weighting, the finite mask and the sums run once per window
    in `read`, as a handful of ops over all the window's steps, instead of ~10 tiny ops per metric per step (the
    trainer's per-step overhead on small, fast models)."""

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        # per set of metric names (a task may log different metrics on some steps): stacked rows, batch sizes
        self._rows: dict[tuple[str, ...], tuple[list[torch.Tensor], list[int]]] = {}

    def add(self, metrics: dict[str, torch.Tensor], n: int) -> None:
        if not metrics:
            return
        keys = tuple(metrics)
        rows, sizes = self._rows.setdefault(keys, ([], []))
        rows.append(torch.stack([v.detach().float() for v in metrics.values()]))
        sizes.append(n)

    def _totals(self) -> dict[str, torch.Tensor]:
        """Per metric name: [weighted sum of finite values, their batch count, non-finite count], on the device."""
        totals: dict[str, torch.Tensor] = {}
        for keys, (rows, sizes) in self._rows.items():
            values = torch.stack(rows)  # steps x metrics
            weights = torch.tensor(sizes, dtype=values.dtype, device=values.device).unsqueeze(1)
            finite = torch.isfinite(values)
            stacked = torch.stack(
                [
                    torch.where(finite, values * weights, 0.0).sum(0),
                    (finite * weights).sum(0),
                    (~finite).sum(0).to(values.dtype),
                ]
            )  # 3 x metrics
            for i, key in enumerate(keys):
                totals[key] = totals[key] + stacked[:, i] if key in totals else stacked[:, i]
        return totals

    def read(self, reduce=None) -> tuple[dict[str, float], dict[str, int]]:
        """(means, non-finite counts): one host sync for every metric together. `reduce` sums the
        stacked sums and counts over data-parallel ranks first (every rank must call it, with the same keys)."""
        totals = self._totals()
        if not totals:
            return {}, {}
        keys = list(totals)
        stacked = torch.stack([totals[k] for k in keys])  # metrics x [sum, count, non-finite]
        stacked = (reduce(stacked) if reduce else stacked).tolist()
        means = {key: (s / c if c else float("nan")) for key, (s, c, _) in zip(keys, stacked)}
        nonfinite = {key: int(bad) for key, (_, _, bad) in zip(keys, stacked)}
        return means, nonfinite
