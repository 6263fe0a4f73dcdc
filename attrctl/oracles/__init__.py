"""Oracles: score texts to violation probabilities in [0, 1].

Built-in kinds (a closed set, see :mod:`attrctl.oracles.specs`): ``lexicon``, ``regex``,
``profanity_check``, ``jigsaw_bilstm`` and ``vader``. Third-party packages add kinds through the
entry-point group ``attrctl.oracles``; each entry point names an :class:`Oracle` subclass whose
``kind`` equals the entry point's name and whose ``Spec`` validates its parameters::

    [project.entry-points."attrctl.oracles"]
    my_oracle = "my_package.oracles:MyOracle"

A policy only *names* a kind; it never imports code. Implementations are imported when an oracle
is built, so importing this package stays cheap.
"""

from __future__ import annotations

import importlib
from functools import cache
from importlib.metadata import EntryPoint, entry_points
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from attrctl.errors import AttrctlError
from attrctl.oracles.base import Oracle
from attrctl.oracles.specs import BUILTIN_SPECS

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
    "build_oracle",
    "oracle_class",
    "oracle_fingerprint",
    "oracle_kinds",
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
        from attrctl.policy.schema import validate_oracle_spec

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
