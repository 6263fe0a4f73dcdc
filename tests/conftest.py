"""Shared test fixtures. Tests never touch the user's cache unless they say so."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
POLICIES = REPO / "policies"


@pytest.fixture
def run_cli(capsys):
    """Run the attrctl CLI in-process: returns (exit_code, stdout, stderr)."""
    from attrctl.cli import main

    def run(*args: str) -> tuple[int, str, str]:
        code = main([str(a) for a in args])
        out = capsys.readouterr()
        return code, out.out, out.err

    return run


@pytest.fixture
def minimal_policy() -> dict:
    """The smallest valid policy, as data; tests mutate a copy to make it invalid."""
    return {
        "name": "minimal",
        "data": [{"kind": "bundled", "name": "shakespeare", "domain": "general"}],
        "attributes": [{"name": "tox", "oracle": {"kind": "lexicon", "words": ["idiot"]}}],
    }


def _hypothesis_profiles() -> None:
    """Profiles of the input fuzzing (tests/test_fuzz_inputs.py). ``ci``: a fixed seed, so CI runs
    the same cases every time, no example database written into the tree. ``long``: random, with
    a database in .hypothesis/ (its tests are marked ``fuzz_long``; run with -m fuzz_long)."""
    try:
        from hypothesis import HealthCheck, settings
    except ImportError:  # hypothesis is a dev dependency; only the fuzz tests need it
        return
    quiet = [HealthCheck.too_slow, HealthCheck.function_scoped_fixture, HealthCheck.data_too_large,
             HealthCheck.filter_too_much, HealthCheck.large_base_example]  # fmt: skip
    settings.register_profile(
        "ci", derandomize=True, database=None, deadline=None, print_blob=True,
        suppress_health_check=quiet,
    )  # fmt: skip
    settings.register_profile("long", deadline=None, print_blob=True, suppress_health_check=quiet)


def pytest_configure(config):
    _hypothesis_profiles()
    # Keep tests hermetic: no hub access even if a network appeared.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    # Triton reads TRITON_INTERPRET when a kernel is first loaded, so it must be set before any
    # test runs one: without CUDA the kernels run on CPU tensors under the interpreter.
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
