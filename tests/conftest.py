"""Shared fixtures: configs composed with Hydra's compose API, as the CLI composes them; each test in a scratch
folder of its own; one thread per worker when pytest-xdist runs the suite in several processes."""

from __future__ import annotations

import os

import pytest
import torch
from hydra import compose, initialize_config_dir

from mptrain.cli import config_dir

if os.environ.get("PYTEST_XDIST_WORKER"):  # `make test` runs one worker per core: a thread each, theirs and
    os.environ["OMP_NUM_THREADS"] = "1"  # the console scripts' they start, so the workers never share a core
    os.environ["MKL_NUM_THREADS"] = "1"
    torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _in_a_scratch_folder(tmp_path, monkeypatch):
    """Every test runs in an empty folder of its own: a run started without hydra.run.dir lands there, never in
    the repository, where a user's own runs/ may sit (make run leaves one)."""
    monkeypatch.chdir(tmp_path)


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
