"""Rendering policies for people and machines (``attrctl policy show / ls / validate``)."""

from __future__ import annotations

from typing import Any

import yaml

from attrctl.errors import PolicyError
from attrctl.policy.load import bundled_policies_dir, load_policy
from attrctl.policy.schema import Policy

_FIRST_KEYS = ("kind", "name")


def resolved_dict(policy: Policy) -> dict[str, Any]:
    """The policy with every default filled in, as plain data (``kind``/``name`` keys first)."""
    return _reorder(policy.model_dump(mode="json"))


def resolved_yaml(policy: Policy) -> str:
    header = f"# resolved from {policy.source_path}\n" if policy.source_path else ""
    body = yaml.safe_dump(resolved_dict(policy), sort_keys=False, allow_unicode=True, width=100)
    return header + body


def _reorder(value: Any) -> Any:
    if isinstance(value, dict):
        first = {k: value[k] for k in _FIRST_KEYS if k in value}
        rest = {k: v for k, v in value.items() if k not in first}
        return {k: _reorder(v) for k, v in {**first, **rest}.items()}
    if isinstance(value, list):
        return [_reorder(v) for v in value]
    return value


def list_bundled() -> list[dict[str, str]]:
    """Bundled policies: name, description (first sentence) and path."""
    rows = []
    for path in sorted(bundled_policies_dir().glob("*.yaml")):
        try:
            desc = load_policy(path).description
        except PolicyError as err:  # a broken bundled policy is a bug; show it, don't hide it
            desc = f"INVALID: {err}"
        rows.append({"name": path.stem, "description": " ".join(desc.split()), "path": str(path)})
    return rows


def validate_files(refs: list[str]) -> list[dict[str, Any]]:
    """Validate each policy file (or bundled name); one result each: ``{"file", "valid",
    "problems"}``."""
    results = []
    for ref in refs:
        try:
            load_policy(ref)
            results.append({"file": ref, "valid": True, "problems": []})
        except PolicyError as err:
            results.append({"file": ref, "valid": False, "problems": err.problems})
    return results
