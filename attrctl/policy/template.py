"""Commented policy templates (``attrctl policy new``), generated from the schema itself.

Every key in a template carries its field description as a comment, so the template documents
itself and cannot drift from the schema: the descriptions *are* the schema's.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel

from attrctl.errors import AttrctlError
from attrctl.oracles import oracle_class
from attrctl.oracles.specs import BUILTIN_SPECS
from attrctl.paths import atomic_write
from attrctl.policy.schema import (
    Attribute,
    BundledSource,
    FineTune,
    Policy,
    Regularization,
    RegularizerFit,
    Schedule,
    SynthSource,
)

# Example parameters for kinds whose spec has required fields.
_EXAMPLE_ORACLE_PARAMS: dict[str, dict[str, Any]] = {
    "lexicon": {"words": {"example-bad-word": 1.0, "another phrase": 0.5}},
    "regex": {"patterns": {"email": r"[A-Za-z0-9._%+-]+@[A-Za-z0-9.-]+\.[A-Za-z]{2,}"}},
}


def oracle_spec_class(kind: str) -> type[BaseModel]:
    return BUILTIN_SPECS[kind] if kind in BUILTIN_SPECS else oracle_class(kind).Spec


def policy_template(name: str, attribute_kind: str) -> str:
    """A commented YAML policy named ``name`` with one attribute scored by ``attribute_kind``."""
    spec_cls = oracle_spec_class(attribute_kind)
    oracle = {"kind": attribute_kind, **_EXAMPLE_ORACLE_PARAMS.get(attribute_kind, {})}
    for field, info in spec_cls.model_fields.items():
        default = None if info.is_required() else info.get_default(call_default_factory=True)
        if field not in oracle and default is not None:
            oracle[field] = default
    values: dict[str, Any] = {
        "name": name,
        "description": "What this policy enforces, in one or two sentences.",
        "model": Policy.model_fields["model"].default,
        "data": [
            {
                "kind": "synth",
                "domain": "attribute",
                "weight": 0.5,
                "prompts": ["toxic", "neutral"],
            },
            {"kind": "bundled", "name": "shakespeare", "domain": "general", "weight": 0.5},
        ],
        "attributes": [
            {
                "name": "my_attribute",
                "description": "Outputs must not ... (say what a violation is).",
                "oracle": oracle,
                "target": {"max_violation": 0.5, "labels": "hard"},
                "weight": 1.0,
                "head": {"kind": "linear"},
            }
        ],
        "regularization": {"lam": 0.1, "per_domain": {"attribute": 1.0}},
        "regularizer": _defaults(RegularizerFit),
        "finetune": {k: v for k, v in _defaults(FineTune).items() if k not in ("lora", "rl")},
        "schedule": _defaults(Schedule),
        "seed": 0,
    }
    header = (
        f"# Policy {name!r}: one attribute scored by the `{attribute_kind}` oracle.\n"
        "# Every key below is documented by the comment above it; delete what you do not need\n"
        "# (defaults apply). Check it with:  attrctl policy validate <this file>\n\n"
    )
    models = {
        "": Policy,
        "data.0": SynthSource,
        "data.1": BundledSource,
        "attributes.0": Attribute,
        "attributes.0.oracle": spec_cls,
        "regularization": Regularization,
        "regularizer": RegularizerFit,
        "finetune": FineTune,
        "schedule": Schedule,
    }
    return header + "\n".join(_render(values, "", models, 0)) + "\n"


def _defaults(model: type[BaseModel]) -> dict[str, Any]:
    return model().model_dump(mode="json")


def _render(values: dict[str, Any], path: str, models: dict, indent: int) -> list[str]:
    model = models.get(path)
    lines: list[str] = []
    pad = " " * indent
    for key, value in values.items():
        sub = f"{path}.{key}" if path else key
        info = model.model_fields.get(key) if model else None
        if info is not None and info.description:
            lines.append(f"{pad}# {info.description}")
        if isinstance(value, dict) and value and sub in models:
            lines.append(f"{pad}{key}:")
            lines += _render(value, sub, models, indent + 2)
        elif isinstance(value, list) and value and isinstance(value[0], dict):
            lines.append(f"{pad}{key}:")
            for i, item in enumerate(value):
                body = _render(item, f"{sub}.{i}", models, indent + 4)
                first = next(j for j, line in enumerate(body) if not line.lstrip().startswith("#"))
                body[first] = f"{pad}  - " + body[first][indent + 4 :]
                lines += body
        else:
            dumped = yaml.safe_dump({key: value}, default_flow_style=True, width=200).strip()
            lines.append(f"{pad}{dumped[1:-1] if dumped.startswith('{') else dumped}")
    return lines


def write_template(name: str, attribute_kind: str, path: Path, force: bool = False) -> Path:
    """Write :func:`policy_template` to ``path`` (atomically); refuse to overwrite unless ``force``."""
    from attrctl.oracles import oracle_kinds
    from attrctl.policy.schema import check_name

    try:
        check_name(name)
    except ValueError as err:
        raise AttrctlError(f"policy name: {err}") from None
    if attribute_kind not in oracle_kinds():
        raise AttrctlError(
            f"--attribute: unknown oracle kind {attribute_kind!r}; "
            f"allowed: {', '.join(oracle_kinds())}"
        )
    if path.exists() and not force:
        raise AttrctlError(f"{path} already exists; pass --force to overwrite it")
    with atomic_write(path) as fh:
        fh.write(policy_template(name, attribute_kind))
    return path
