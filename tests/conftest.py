"""Shared fixtures: configs composed with Hydra's compose API, as the CLI composes them."""

from __future__ import annotations

import pytest
import torch
from hydra import compose, initialize_config_dir

from mptrain.cli import config_dir


@pytest.fixture
def compose_cfg():
    def _compose(*overrides: str):
        with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
            return compose(config_name="config", overrides=list(overrides))

    return _compose


def pytest_collection_modifyitems(config, items):
    """Skip `gpu` tests without CUDA. (`e2e`, a test that runs a console script in a subprocess as a user does,
    is marked by hand on the test: `-m "not e2e"` keeps the in-process unit tests.)"""
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip)
