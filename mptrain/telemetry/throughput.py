"""Training throughput from device-synchronised segments (eval time excluded)."""

from __future__ import annotations

import time

import torch


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Throughput:
    """Times training segments; the mean excludes segments ending within the warm-up."""

    def __init__(self, device: torch.device, warmup_steps: int):
        self.device = device
        self.warmup_steps = warmup_steps
        self._t0: float | None = None
        self._seg_steps = self._seg_samples = 0
        self._steady_time = 0.0
        self._steady_samples = self._steady_steps = 0
        self._all_time = 0.0
        self._all_samples = self._all_steps = 0
        self._steps_done = 0
        self._steady_windows: list[tuple[float, float]] = []  # (samples/s, steps/s) of each steady segment

    def begin(self) -> None:
        synchronize(self.device)
        self._t0 = time.perf_counter()
        self._seg_steps = self._seg_samples = 0

    def count(self, samples: int) -> None:
        self._seg_steps += 1
        self._seg_samples += samples

    def end(self) -> tuple[float, float] | None:
        """Close the segment; return (samples/s, ms/step) for it, or None if it was empty."""
        if self._t0 is None or self._seg_steps == 0:
            self._t0 = None
            return None
        synchronize(self.device)
        elapsed = time.perf_counter() - self._t0
        self._t0 = None
        self._steps_done += self._seg_steps
        self._all_time += elapsed
        self._all_samples += self._seg_samples
        self._all_steps += self._seg_steps
        if self._steps_done - self._seg_steps >= self.warmup_steps:
            self._steady_time += elapsed
            self._steady_samples += self._seg_samples
            self._steady_steps += self._seg_steps
            self._steady_windows.append((self._seg_samples / elapsed, self._seg_steps / elapsed))
        return self._seg_samples / elapsed, 1000.0 * elapsed / self._seg_steps

    @property
    def at_warmup_boundary(self) -> bool:
        return self.warmup_steps > 0 and self._steps_done + self._seg_steps == self.warmup_steps

    def median_rates(self) -> tuple[float | None, float | None, list[float] | None]:
        """Steady-state (samples/s, steps/s) as the median over the logging windows after warm-up, robust to a
        one-off stall that would dominate a mean, and the windows' samples/s quartiles [p25, p75]; the mean over
        all steps when the run never left warm-up (no spread then)."""
        if not self._steady_windows:
            samples, steps = self.mean_rates()
            return samples, steps, None
        import statistics

        rates = sorted(r for r, _ in self._steady_windows)
        steps = statistics.median(s for _, s in self._steady_windows)
        quartiles = statistics.quantiles(rates, n=4) if len(rates) > 1 else [rates[0]] * 3
        return statistics.median(rates), steps, [quartiles[0], quartiles[2]]

    def mean_rates(self) -> tuple[float | None, float | None]:
        """Steady-state (samples/s, steps/s); all steps when the run never left warm-up."""
        if self._steady_time > 0:
            return self._steady_samples / self._steady_time, self._steady_steps / self._steady_time
        if self._all_time > 0:
            return self._all_samples / self._all_time, self._all_steps / self._all_time
        return None, None
