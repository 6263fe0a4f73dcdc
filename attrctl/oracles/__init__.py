"""Oracles: score texts to violation probabilities in [0, 1].

Built-in kinds (a closed set, see :mod:`attrctl.oracles.specs`): ``lexicon``, ``regex``,
``profanity_check``, ``jigsaw_bilstm`` and ``vader``. Third-party packages add kinds through the
entry-point group ``attrctl.oracles``; each entry point names an :class:`Oracle` subclass whose
``kind`` equals the entry point's name and whose ``Spec`` validates its parameters::

    [project.entry-points."attrctl.oracles"]
    my_oracle = "my_package.oracles:MyOracle"

A policy only *names* a kind; it never imports code. Implementations are imported when an oracle
is built, so importing this package stays cheap.

:data:`OracleSpec` is what an ``oracle:`` entry may say: a built-in kind's spec
(:mod:`attrctl.oracles.specs`) or a :class:`PluginOracleSpec`, whose parameters the plugin's own
``Spec`` validates. The policy schema (:mod:`attrctl.policy.schema`) uses these; nothing here
imports the policy.
"""

from __future__ import annotations

import importlib
from functools import cache
from importlib.metadata import EntryPoint, entry_points
from pathlib import Path
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Discriminator, Tag, ValidationInfo, model_validator

from attrctl.errors import AttrctlError
from attrctl.oracles.base import Oracle
from attrctl.oracles.specs import (
    BUILTIN_SPECS,
    JigsawBiLSTMSpec,
    LexiconSpec,
    ProfanityCheckSpec,
    RegexSpec,
    VaderSpec,
)
from attrctl.strict import StrictModel

ENTRY_POINT_GROUP = "attrctl.oracles"

_BUILTIN_IMPLS = {
    "lexicon": "attrctl.oracles.lexicon:LexiconOracle",
    "regex": "attrctl.oracles.regex:RegexOracle",
    "profanity_check": "attrctl.oracles.profanity:ProfanityCheckOracle",
    "jigsaw_bilstm": "attrctl.oracles.jigsaw:JigsawBiLSTMOracle",
    "vader": "attrctl.oracles.vader:VaderOracle",
}

__all__ = [
    "ENTRY_POINT_GROUP",
    "Oracle",
    "OracleSpec",
    "PluginOracleSpec",
    "build_oracle",
    "oracle_class",
    "oracle_fingerprint",
    "oracle_kinds",
    "validate_oracle_spec",
]


@cache
def plugin_entry_points() -> dict[str, EntryPoint]:
    """Third-party oracle kinds registered under the ``attrctl.oracles`` entry-point group."""
    return {
        ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP) if ep.name not in BUILTIN_SPECS
    }


def oracle_kinds() -> list[str]:
    """Every oracle kind a policy may name: built-in first, then installed plugins."""
    return [*BUILTIN_SPECS, *sorted(plugin_entry_points())]


def oracle_class(kind: str) -> type[Oracle]:
    """The :class:`Oracle` subclass implementing ``kind``."""
    if kind in _BUILTIN_IMPLS:
        module, _, name = _BUILTIN_IMPLS[kind].partition(":")
        return getattr(importlib.import_module(module), name)
    ep = plugin_entry_points().get(kind)
    if ep is None:
        raise AttrctlError(
            f"unknown oracle kind {kind!r}; known kinds: {', '.join(oracle_kinds())}"
        )
    try:
        cls = ep.load()
    except Exception as err:  # a broken plugin must not look like a bug in attrctl
        raise AttrctlError(f"oracle plugin {kind!r} ({ep.value}) failed to load: {err}") from err
    if not (isinstance(cls, type) and issubclass(cls, Oracle)):
        raise AttrctlError(f"oracle plugin {kind!r} ({ep.value}) is not an attrctl Oracle subclass")
    return cls


def build_oracle(spec: BaseModel | dict[str, Any], base_dir: Path | None = None) -> Oracle:
    """Build an oracle from a validated spec (or a plain dict such as ``{"kind": "vader"}``)."""
    if isinstance(spec, dict):
        spec = validate_oracle_spec(spec, base_dir=base_dir)
    kind = spec.kind  # type: ignore[attr-defined]
    cls = oracle_class(kind)
    if getattr(spec, "plugin_spec", None) is not None:  # plugin: hand it its own validated Spec
        spec = spec.plugin_spec  # type: ignore[attr-defined]
    return cls(spec, base_dir=base_dir)


def oracle_fingerprint(spec: BaseModel) -> dict[str, Any]:
    """What determines the scores of the oracle a validated spec builds, as JSON-able data
    (:meth:`Oracle.fingerprint`; a plugin's distribution version is added). Builds nothing."""
    kind = spec.kind  # type: ignore[attr-defined]
    cls = oracle_class(kind)
    if getattr(spec, "plugin_spec", None) is not None:
        spec = spec.plugin_spec  # type: ignore[attr-defined]
    fingerprint = cls.fingerprint(spec)
    ep = plugin_entry_points().get(kind)
    if ep is not None and ep.dist is not None:
        fingerprint["packages"].setdefault(ep.dist.name, ep.dist.version)
    return fingerprint


# ------------------------------------------------------------------------------------ the specs
class PluginOracleSpec(StrictModel):
    """An oracle kind registered by an installed package (entry-point group ``attrctl.oracles``)."""

    model_config = ConfigDict(extra="allow", frozen=True)
    kind: str

    @property
    def plugin_spec(self) -> StrictModel | None:
        return self.__pydantic_private__.get("_plugin_spec") if self.__pydantic_private__ else None

    @model_validator(mode="after")
    def _validate_with_plugin(self, info: ValidationInfo):
        from difflib import get_close_matches

        if self.kind not in plugin_entry_points():
            kinds = oracle_kinds()
            close = get_close_matches(self.kind, kinds, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(
                f"unknown oracle kind {self.kind!r}{hint}; allowed: {', '.join(kinds)}"
            )
        cls = oracle_class(self.kind)
        params = {"kind": self.kind, **(self.model_extra or {})}
        spec = cls.Spec.model_validate(params, context=info.context)
        object.__setattr__(self, "__pydantic_private__", {"_plugin_spec": spec})
        return self


def _oracle_tag(value: Any) -> str:
    kind = value.get("kind") if isinstance(value, dict) else getattr(value, "kind", None)
    return kind if isinstance(kind, str) and kind in BUILTIN_SPECS else "plugin"  # kind: []


OracleSpec = Annotated[
    Annotated[LexiconSpec, Tag("lexicon")]
    | Annotated[RegexSpec, Tag("regex")]
    | Annotated[ProfanityCheckSpec, Tag("profanity_check")]
    | Annotated[JigsawBiLSTMSpec, Tag("jigsaw_bilstm")]
    | Annotated[VaderSpec, Tag("vader")]
    | Annotated[PluginOracleSpec, Tag("plugin")],
    Discriminator(_oracle_tag),
]


def validate_oracle_spec(data: dict[str, Any], base_dir=None) -> StrictModel:
    """Validate one oracle spec on its own (used by ``attrctl oracle score``)."""
    from pydantic import TypeAdapter

    context = {"base_dir": base_dir} if base_dir else None
    return TypeAdapter(OracleSpec).validate_python(data, context=context)
