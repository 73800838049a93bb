"""What the console scripts beside `mptrain` share: argument errors in one line, positive
numbers, and Hydra composition of mptrain's config without an output folder."""

from __future__ import annotations

import argparse
import math

from mptrain.errors import UserError


class OneLineParser(argparse.ArgumentParser):
    """argparse that raises UserError (one line, exit 2 by the caller) instead of printing usage."""

    def error(self, message):
        raise UserError(f"{message} (see {self.prog} --help)")

    def split_overrides(self, argv) -> tuple[argparse.Namespace, list[str]]:
        """Options, and the rest as Hydra overrides; a dash-led leftover is an unknown option."""
        args, overrides = self.parse_known_args(argv)
        unknown = [o for o in overrides if o.startswith("-")]
        if unknown:
            self.error(f"unknown option {unknown[0]}")
        return args, overrides


def positive(kind):
    def parse(text: str):
        value = kind(text)
        if not value > 0 or (kind is float and not math.isfinite(value)):
            raise argparse.ArgumentTypeError(f"must be a positive {kind.__name__} (got {text})")
        return value

    return parse


def overridden(overrides: list[str], key: str) -> bool:
    """Whether `key` (a group or a dotted key) is set by the overrides, with or without +/~."""
    return any(o.lstrip("+~").split("=")[0] == key or o.lstrip("+~").startswith(key + ".") for o in overrides)


def compose(overrides: list[str], hint: str = "model=lstm_lm dataset=text"):
    """mptrain's config with these overrides, composed without Hydra's run folder."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from mptrain.paths import config_dir
    from mptrain.schema import describe_composition_error, refuse_schema_choices

    refuse_schema_choices(overrides)
    try:
        with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
            return hydra_compose(config_name="config", overrides=overrides)
    except (HydraException, OmegaConfBaseException) as e:  # worded as the training CLI words it
        raise UserError(f"{describe_composition_error(e)} (overrides are as for mptrain, e.g. {hint})") from None
