"""Helpers shared by the tests that train tiny runs through the CLI."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

TINY_EVAL = ("-k", "2", "--max-new-tokens", "4", "--ppl-tokens", "100", "--mc-examples", "0",
             "-q")  # fmt: skip


def set_fields(policy: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """Apply ``section__field=value`` (or ``section=value``) keyword overrides to a policy dict."""
    for key, value in extra.items():
        section, _, field = key.partition("__")
        if field:
            policy[section][field] = value
        else:
            policy[section] = value
    return policy


def tiny_eval(run_cli, run: Path, tmp: Path) -> dict[str, Any]:
    """``attrctl eval`` of ``run`` on two prompts, k 2, 4 tokens; its ``eval.json``."""
    (tmp / "p.txt").write_text("You are such a\nThe weather today is\n")
    code, _, err = run_cli("eval", run, "--prompts", tmp / "p.txt", *TINY_EVAL)
    assert code == 0, err
    return json.loads((run / "eval.json").read_text())
