"""Shared fixtures: configs composed with Hydra's compose API, as the CLI composes them."""

from __future__ import annotations

import ast
import functools
import inspect

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


# calls that start a console script in a subprocess (cli_helpers' and the subprocess module's)
SUBPROCESS_CALLS = {"mptrain", "sigterm_once_training", "run", "Popen", "check_call", "check_output"}


@functools.cache
def _subprocess_functions(module) -> frozenset[str]:
    """The module's functions that start a subprocess, directly or through another of its functions."""
    tree = ast.parse(inspect.getsource(module))
    defs = {n.name: n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))}

    def called(node) -> set[str]:
        names = set()
        for call in (n for n in ast.walk(node) if isinstance(n, ast.Call)):
            f = call.func
            names.add(f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else "")
        return names

    calls = {name: called(node) for name, node in defs.items()}
    found = {name for name, names in calls.items() if names & SUBPROCESS_CALLS - {"run"} or
             ("run" in names and "subprocess" in ast.unparse(defs[name]))}  # fmt: skip
    while True:
        more = {name for name, names in calls.items() if names & found} - found
        if not more:
            return frozenset(found)
        found |= more


def pytest_collection_modifyitems(config, items):
    """Mark `e2e` every test that runs a console script in a subprocess (as a user does), so that
    `-m "not e2e"` keeps the in-process unit tests; skip `gpu` tests without CUDA."""
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        function = getattr(item, "function", None)
        if function is not None and function.__name__ in _subprocess_functions(inspect.getmodule(function)):
            item.add_marker(pytest.mark.e2e)
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip)
