"""The policy reference (``attrctl policy reference``), generated from the schema.

Defaults and descriptions live once, on the schema fields; this renders them as Markdown so the
documentation cannot drift from the code (``docs/policy-reference.md`` is this output, and a test
checks that it is current).
"""

from __future__ import annotations

import json
import types
import typing
from typing import Any

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from attrctl.oracles.specs import BUILTIN_SPECS
from attrctl.policy import schema as s

SECTIONS: list[tuple[str, type[BaseModel]]] = [
    ("policy (top level)", s.Policy),
    ("data[] — kind: synth", s.SynthSource),
    ("data[] — kind: bundled", s.BundledSource),
    ("data[] — kind: file", s.FileSource),
    ("data[] — kind: hub", s.HubSource),
    ("data[].template", s.Template),
    ("attributes[]", s.Attribute),
    ("attributes[].target", s.Target),
    ("attributes[].head", s.HeadSpec),
    *[(f"attributes[].oracle — kind: {k}", spec) for k, spec in BUILTIN_SPECS.items()],
    ("regularization", s.Regularization),
    ("regularization.own_samples", s.OwnSamples),
    ("regularizer", s.RegularizerFit),
    ("finetune", s.FineTune),
    ("finetune.lora", s.LoraSpec),
    ("finetune.rl", s.RLSettings),
    ("schedule", s.Schedule),
    ("loss", s.LossSettings),
]


def _type_name(annotation: Any) -> str:
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is typing.Literal:
        return " \\| ".join(f"`{a}`" for a in args)
    if origin is typing.Annotated:
        return _type_name(args[0])
    if origin in (typing.Union, types.UnionType):
        some = [_unannotated(a) for a in args if a is not type(None)]
        null = " or null" if type(None) in args else ""
        if len(some) == 1:  # X | None, where X is itself a union (an oracle spec)
            return _type_name(some[0]) + null
        if all(isinstance(a, type) and issubclass(a, BaseModel) for a in some):
            return "mapping (by `kind`)" + null
        return " or ".join(dict.fromkeys(_type_name(a) for a in some)) + null
    if origin in (list, dict):
        return f"{origin.__name__}[{', '.join(_type_name(a) for a in args)}]"
    if isinstance(annotation, type):
        if issubclass(annotation, BaseModel):
            return "mapping"
        return annotation.__name__
    return str(annotation).replace("typing.", "")


def _unannotated(annotation: Any) -> Any:
    while typing.get_origin(annotation) is typing.Annotated:
        annotation = typing.get_args(annotation)[0]
    return annotation


def _default(info) -> str:
    if info.is_required():
        return "**required**"
    if info.default_factory is not None:
        value = info.default_factory()
        if isinstance(value, BaseModel):
            return "(see below)"
    else:
        value = info.default
    if value is PydanticUndefined:
        return ""
    return f"`{json.dumps(value)}`"


def policy_reference() -> str:
    """Every policy field with its type, default and description, as Markdown."""
    lines = [
        "# Policy reference",
        "",
        "Generated from the schema by `attrctl policy reference`; do not edit by hand.",
        "",
    ]
    for title, model in SECTIONS:
        lines += [f"## {title}", "", " ".join((model.__doc__ or "").split()), ""]
        lines += ["| key | type | default | description |", "|---|---|---|---|"]
        for name, info in model.model_fields.items():
            desc = (info.description or "").replace("|", "\\|")
            lines.append(
                f"| `{name}` | {_type_name(info.annotation)} | {_default(info)} | {desc} |"
            )
        lines.append("")
    return "\n".join(lines)
