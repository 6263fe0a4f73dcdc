"""Reading policies: bundled names or paths, ``--set`` overrides, and errors people can act on.

Every problem is reported as a :class:`~attrctl.errors.PolicyError` naming the file, the field
path (``attributes[0].oracle.kind``), the line in the file where it can be found, and — for a
misspelt key — the closest valid key. Files are read strictly (:mod:`attrctl.strict_yaml`): a
key written twice is an error naming both lines, and a file over 1 MiB, nested too deeply or
expanding its aliases too far is refused rather than parsed.
"""

from __future__ import annotations

import contextlib
import difflib
import re
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from attrctl.errors import PolicyError
from attrctl.policy.schema import Policy
from attrctl.strict_yaml import YAMLProblem, load_yaml

POLICY_SUFFIXES = (".yaml", ".yml")
MAX_POLICY_BYTES = 2**20  # a policy is a few KiB; a bigger file is almost surely the wrong one
MAX_PROBLEMS = 50  # problems listed per file; a file of 80,000 unknown keys gets a count


# ---------------------------------------------------------------------------- finding a policy
def bundled_policies_dir() -> Path:
    """The folder of policies shipped with attrctl (package data of ``attrctl.policies``)."""
    return Path(str(resources.files("attrctl.policies")))


def bundled_policy_names() -> list[str]:
    return sorted(p.stem for p in bundled_policies_dir().glob("*.yaml"))


def resolve_policy_ref(ref: str | Path) -> Path:
    """A bundled policy name (``toxicity``) or a path → the policy file's path."""
    try:
        path = Path(ref).expanduser()
        is_path = path.suffix in POLICY_SUFFIXES or path.exists() or len(path.parts) > 1
        if is_path and not path.is_file():
            raise PolicyError(str(ref), ["file not found" if not path.exists() else "not a file"])
    except (OSError, RuntimeError, ValueError) as err:  # a name too long, ~nobody, a NUL byte
        raise PolicyError(str(ref), [f"not a usable file name ({err})"]) from None
    if is_path:
        return path
    bundled = bundled_policies_dir() / f"{ref}.yaml"
    with contextlib.suppress(OSError):
        if bundled.is_file():
            return bundled
    names = bundled_policy_names()
    close = difflib.get_close_matches(str(ref), names, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    raise PolicyError(
        str(ref),
        [
            f"no such policy file, and no bundled policy of that name{hint} "
            f"(bundled: {', '.join(names)})"
        ],
    )


# ------------------------------------------------------------------------------------- reading
def _read_yaml(path: Path) -> tuple[Any, yaml.Node | None]:
    try:
        with path.open("rb") as fh:
            raw = fh.read(MAX_POLICY_BYTES + 1)
    except OSError as err:
        raise PolicyError(str(path), [f"cannot read: {err.strerror or err}"]) from None
    if len(raw) > MAX_POLICY_BYTES:
        raise PolicyError(
            str(path),
            [f"the file is larger than {MAX_POLICY_BYTES // 2**20} MiB; a policy is a short "
             "YAML file (is this the right file?)"],
        )  # fmt: skip
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line = raw.count(b"\n", 0, err.start) + 1
        raise PolicyError(
            str(path), [f"not UTF-8 text ({err.reason} at byte {err.start}, line {line})"]
        ) from None
    try:
        data, node = load_yaml(text)
    except YAMLProblem as err:
        prefix = "malformed YAML: " if err.kind == "syntax" else ""
        raise PolicyError(str(path), [f"{prefix}{err}"]) from None
    if data is None:
        raise PolicyError(str(path), ["the file is empty; a policy is a YAML mapping"])
    if not isinstance(data, dict):
        raise PolicyError(
            str(path), [f"a policy is a YAML mapping (key: value), not a {type(data).__name__}"]
        )
    return data, node


# ----------------------------------------------------------------------------------- overrides
def parse_override(text: str, source: str = "") -> tuple[list[str | int], Any]:
    """``a.b.0.c=value`` → (path, value); the value is read as YAML (``2``, ``true``, ``[a, b]``)."""
    label = f"{source} (--set {text})" if source else f"--set {text}"
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise PolicyError(label, ["expected KEY=VALUE, e.g. finetune.steps=100"])
    parts: list[str | int] = []
    for part in key.split("."):
        if not part:
            raise PolicyError(label, [f"empty component in key {key!r}"])
        # ASCII digits only: '²'.isdigit() is true but int('²') fails; an index is short
        index = part.isascii() and part.isdigit() and len(part) <= 9
        parts.append(int(part) if index else part)
    try:
        value = load_yaml(raw)[0] if raw.strip() else None
    except YAMLProblem as err:
        where = f" at column {err.column}" if err.column is not None else ""
        raise PolicyError(
            label, [f"value {_short(raw, 60)} is not valid YAML{where}: {err.problem}"]
        ) from None
    return parts, value


def apply_override(data: dict[str, Any], text: str, source: str = "") -> None:
    """Apply one ``--set`` override in place; unknown keys fail later, in validation.

    Args:
        data: the policy document (parsed YAML) to change.
        text: ``key.sub=value``; list items are addressed by index (``attributes.0.weight=2``).
        source: the policy file, named in error messages.
    """
    label = f"{source} (--set {text})" if source else f"--set {text}"
    path, value = parse_override(text, source)
    node: Any = data
    for i, part in enumerate(path[:-1]):
        nxt = path[i + 1]
        if isinstance(node, list):
            if not isinstance(part, int) or part >= len(node):
                raise PolicyError(
                    label,
                    [
                        f"{_dotted(path[:i])} has {len(node)} item(s); index "
                        f"{_short(part, 40)} is out of range"
                    ],
                )
            node = node[part]
        elif isinstance(node, dict):
            if part not in node or node[part] is None:
                node[part] = [] if isinstance(nxt, int) else {}
            node = node[part]
        else:
            raise PolicyError(label, [f"{_dotted(path[: i + 1])} is not a mapping"])
    last = path[-1]
    if isinstance(node, list):
        if not isinstance(last, int) or last >= len(node):
            raise PolicyError(
                label,
                [
                    f"{_dotted(path[:-1])} has {len(node)} item(s); index "
                    f"{_short(last, 40)} is out of range"
                ],
            )
        node[last] = value
    elif isinstance(node, dict):
        node[last] = value
    else:
        raise PolicyError(label, [f"{_dotted(path[:-1])} is not a mapping"])


# ---------------------------------------------------------------------------------- validation
def load_policy(ref: str | Path, overrides: Sequence[str] = ()) -> Policy:
    """Read, override and validate a policy.

    Args:
        ref: a bundled policy name (``toxicity``) or a path to a YAML file.
        overrides: ``key.sub=value`` strings applied before validation, validated as strictly as
            the file itself.

    Returns:
        The validated, frozen :class:`Policy`; ``policy.source_path`` is the file it came from.

    Raises:
        PolicyError: naming the file, the field path and the line of every problem.
    """
    path = resolve_policy_ref(ref)
    data, node = _read_yaml(path)
    for text in overrides:
        apply_override(data, text, source=str(path))
    return validate_policy(data, source=path, node=node, overrides=overrides)


def validate_policy(
    data: dict[str, Any],
    source: Path,
    node: yaml.Node | None = None,
    overrides: Sequence[str] = (),
) -> Policy:
    base_dir = source.resolve().parent
    try:
        policy = Policy.model_validate(data, context={"base_dir": base_dir})
    except ValidationError as err:
        set_paths = {text: parse_override(text)[0] for text in overrides}
        errors = err.errors()
        problems = [_describe(e, data, node, set_paths) for e in errors[:MAX_PROBLEMS]]
        if len(errors) > MAX_PROBLEMS:
            problems.append(f"... and {len(errors) - MAX_PROBLEMS} more problems")
        label = f"{source} (with --set overrides)" if overrides else str(source)
        raise PolicyError(label, problems) from None
    policy._source_path = source.resolve()
    return policy


def _dotted(loc: Sequence[str | int]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, str) and not _PLAIN_KEY.match(part):
            part = _short(part, 40)  # a key with spaces, newlines or 10,000 characters
            out += f"[{part}]"
        else:
            out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(top level)"


_PLAIN_KEY = re.compile(r"^[A-Za-z0-9_-]{1,60}$")


def _clean_loc(loc: Sequence[str | int], data: Any) -> list[str | int]:
    """Drop union tags (``lexicon``, ``plugin``, ``function-after[...]``) that pydantic puts in
    error locations but that are not keys of the document."""
    out: list[str | int] = []
    node = data
    for i, part in enumerate(loc):
        last = i == len(loc) - 1
        if isinstance(node, dict):
            if part in node:
                out.append(part)
                node = node[part]
            elif last and isinstance(part, str) and not _is_tag(part):
                out.append(part)  # a missing required key
        elif isinstance(node, list) and isinstance(part, int) and part < len(node):
            out.append(part)
            node = node[part]
        elif last and isinstance(part, str) and not _is_tag(part):
            out.append(part)
    return out


def _is_tag(part: str) -> bool:
    """Whether a location part is a union tag pydantic added: a source or oracle ``kind``
    (``plugin`` for entry-point oracles) or a validator name like ``function-after[...]``."""
    import typing

    from attrctl.oracles.specs import BUILTIN_SPECS
    from attrctl.policy.schema import DataSource

    source_kinds = {
        model.model_fields["kind"].default
        for model in typing.get_args(typing.get_args(DataSource)[0])
    }
    return part in BUILTIN_SPECS or part in source_kinds or part == "plugin" or "[" in part


def _line_of(node: yaml.Node | None, loc: Sequence[str | int]) -> int | None:
    """1-based line of the deepest YAML node along ``loc`` (a key's own line when it exists)."""
    line = None
    for part in loc:
        if isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                if key.value == part:
                    line = key.start_mark.line + 1
                    node = value
                    break
            else:
                return line if line is not None else node.start_mark.line + 1
        elif (
            isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value)
        ):
            node = node.value[part]
            line = node.start_mark.line + 1
        else:
            break
    return line


def _fields_at(loc: Sequence[str | int], data: Any) -> list[str]:
    """Valid keys of the model at ``loc`` (used to suggest the closest one to a misspelt key)."""
    import typing

    annotation: Any = Policy
    node: Any = data
    for part in loc:
        if isinstance(part, int):
            args = [a for a in typing.get_args(annotation) if a is not type(None)]
            annotation = args[0] if args else None
            node = node[part] if isinstance(node, list) and part < len(node) else None
            continue
        model = _model_of(annotation, node)
        field = model.model_fields.get(part) if model else None
        if field is None:
            return []
        annotation = field.annotation
        node = node.get(part) if isinstance(node, dict) else None
    model = _model_of(annotation, node)
    return list(model.model_fields) if model else []


def _model_of(annotation: Any, node: Any) -> type[BaseModel] | None:
    """The pydantic model ``annotation`` resolves to for ``node`` (picking a union member by
    the node's ``kind``)."""
    import typing

    from attrctl.oracles import oracle_class

    args = typing.get_args(annotation)
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        if annotation.__name__ == "PluginOracleSpec" and isinstance(node, dict):
            try:
                return oracle_class(node.get("kind")).Spec
            except Exception:
                return None
        return annotation
    kind = node.get("kind") if isinstance(node, dict) else None
    for arg in args:
        found = _model_of(arg, node)
        if found is None:
            continue
        kind_field = found.model_fields.get("kind")
        if kind is None or kind_field is None or kind_field.default == kind:
            return found
    return None


def _describe(
    err: dict[str, Any],
    data: dict[str, Any],
    node: yaml.Node | None,
    set_paths: dict[str, list[str | int]],
) -> str:
    loc = _clean_loc(err["loc"], data)
    where = _dotted(loc)
    from_set = [text for text, path in set_paths.items() if list(loc[: len(path)]) == path]
    line = _line_of(node, loc) if node is not None else None
    at = f" (from --set {from_set[-1]})" if from_set else (f" (line {line})" if line else "")
    kind = err["type"]
    if kind == "extra_forbidden":
        valid = _fields_at(loc[:-1], data)
        close = difflib.get_close_matches(str(loc[-1]), valid, n=1, cutoff=0.5)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        allowed = f" Valid keys here: {', '.join(valid)}." if valid else ""
        return f"{where}{at}: unknown key {_short(loc[-1], 60)}{hint}{allowed}"
    if kind == "missing":
        return f"{where}{at}: required field is missing"
    if kind in ("literal_error", "enum"):
        expected = err.get("ctx", {}).get("expected", "")
        return f"{where}{at}: {_short(err['input'])} is not allowed; allowed values: {expected}"
    if kind == "union_tag_invalid":
        ctx = err.get("ctx", {})
        return (
            f"{where}.kind{at}: {ctx.get('tag')!r} is not allowed; "
            f"allowed values: {ctx.get('expected_tags')}"
        )
    if kind == "union_tag_not_found":
        return f"{where}{at}: `kind` is missing; it selects which kind of entry this is"
    msg = err["msg"].removeprefix("Value error, ")
    given = err.get("input")
    shown = (
        ""
        if isinstance(given, (dict, list)) or kind == "value_error"
        else f" (got {_short(given)})"
    )
    return f"{where}{at}: {msg}{shown}"


def _short(value: Any, limit: int = 80) -> str:
    """``repr(value)``, cut to ``limit`` characters (a 1 MiB string must not become the message)."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"
