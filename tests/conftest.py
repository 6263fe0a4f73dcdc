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


def pytest_configure(config):
    # Keep tests hermetic: no hub access even if a network appeared.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    # Triton reads TRITON_INTERPRET when a kernel is first loaded, so it must be set before any
    # test runs one: without CUDA the kernels run on CPU tensors under the interpreter.
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
