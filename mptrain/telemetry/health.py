"""Checks on a run's health that end in a warning (summary.json `warnings`), not in a stop."""

from __future__ import annotations

import torch

# dynamic scaling skips about log2(initial / settled scale) steps at the start, then about one per growth
# interval (2000 steps): 5 % is far beyond what probing skips
SKIPPED_SHARE_WARNING = 0.05


def mostly_skipped(network: str, skipped: int, steps: int) -> str | None:
    if not steps or skipped / steps <= SKIPPED_SHARE_WARNING:
        return None
    return (f"{skipped} of {steps} steps ({100 * skipped / steps:.1f} %) of {network} were skipped for inf/NaN "
            f"gradients (more than {100 * SKIPPED_SHARE_WARNING:g} %): the loss scale overflows far more often than "
            "dynamic scaling's probing would")


def nonfinite_buffers(networks: dict) -> list[str]:
    """Names of the floating buffers (BatchNorm's running statistics) that hold inf or NaN; one sync if none."""
    named = [(f"{net_name}.{name}" if len(networks) > 1 else name, b)
             for net_name, net in networks.items() for name, b in net.named_buffers() if b.dtype.is_floating_point]
    if not named or bool(torch.stack([torch.isfinite(b).all() for _, b in named]).all()):
        return []
    return [name for name, b in named if not bool(torch.isfinite(b).all())]


def nonfinite_buffers_warning(step: int, bad: list[str]) -> str:
    return (f"step {step}: {len(bad)} running statistic(s) are no longer finite ({', '.join(bad[:3])}"
            f"{', ...' if len(bad) > 3 else ''}): evaluations from here on are broken; the forward overflowed in a "
            "step that was not skipped (no loss scaler?) or the data holds inf/NaN")
