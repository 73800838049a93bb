"""The `telemetry` group's schema: what the run measures beyond loss and accuracy."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from mptrain.schema.rules import POSITIVE_INT, check_fields, knob


@dataclass
class NumericsConfig:
    every: Optional[int] = knob(None, "gradient exponent ranges and lost updates every N steps (null: off, no hooks)",
                                POSITIVE_INT, example=100)
    activations: bool = knob(True, "also activation gradients (one hook per leaf module's output)")


@dataclass
class TelemetryConfig:
    numerics: NumericsConfig = field(default_factory=NumericsConfig)
    overflow_events: int = knob(20, "skipped steps kept in summary.json with the gradients and first layer behind "
                                    "them", POSITIVE_INT)


SCHEMAS = {"telemetry_schema": TelemetryConfig}


def check(cfg) -> None:
    check_fields(cfg.telemetry, TelemetryConfig, "telemetry")
