"""The synth file: its row format, the settings fingerprint each row carries, and its reader.

``attrctl data synth`` (:mod:`attrctl.data.synth`) writes it and the ``synth`` data source
(:mod:`attrctl.data.sources`) and the training jobs read it; this module sits below all of them
and imports neither. One jsonl row per continuation::

    {"prompt_set": "toxic", "prompt_index": 3, "sample": 1, "prompt": "Shut up, you",
     "continuation": " idiot, ...", "score": 0.91, "scores": {"toxicity": 0.91},
     "domain": "toxic", "model": "bundled:smollm2-135m-instruct", "seed": 0,
     "gen": {"max_new_tokens": 24, "temperature": 1.0, "top_p": 1.0}, "new_tokens": 24,
     "labelled_by": {"toxicity": {"oracle": "profanity_check", "oracle_sha256": "3f9c...",
                                  "max_violation": 0.5, "labels": "hard"}},
     "fingerprint": "5d41402abc4b2a76"}

``score`` is the first attribute's violation probability of the *continuation* (as in
RealToxicityPrompts); ``scores`` has one entry per attribute.

**The fingerprint** of a row is a sha256 (16 hex digits) of everything besides the prompt text
that determines it (:func:`row_settings`): model, seed, generation settings, domain, and per
attribute, in order, its name, its oracle's :func:`~attrctl.oracles.oracle_fingerprint` (kind,
parameters, hashes of the files it reads, package versions) and its target. ``labelled_by``
spells the attribute part out, so a refusal can say what differs; the prompt text is in the row.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from attrctl.errors import AttrctlError
from attrctl.paths import writing
from attrctl.policy.schema import Policy, SynthSource


def synth_path(source: SynthSource, policy: Policy) -> Path:
    """Where a synth source's labelled jsonl lives: ``source.path``, else
    ``<run_dir>/data/synth.jsonl`` (relative paths resolve against the working directory, like
    ``output_dir``)."""
    return Path(source.path or Path(policy.run_dir) / "data" / "synth.jsonl").expanduser()


# ------------------------------------------------------------------------------------ the file
#: the fields data synth writes in every row, and their JSON types (``scores``: attribute →
#: number); a row read for its text needs only TEXT_FIELDS
ROW_FIELDS: dict[str, type | tuple[type, ...]] = {
    "prompt_set": str,
    "prompt_index": int,
    "sample": int,
    "prompt": str,
    "continuation": str,
    "scores": dict,
}
TEXT_FIELDS = ("prompt", "continuation")


def read_rows(
    path: str | os.PathLike, *, repair: bool = False, required: Iterable[str] = TEXT_FIELDS
) -> list[dict[str, Any]]:
    """Rows of a synth (or ``samples/iter_<i>``) jsonl file. A partially written last line (no
    newline) is ignored, and with ``repair=True`` also cut off the file.

    Args:
        required: the fields every row must have (default: the text, ``prompt`` and
            ``continuation``; :data:`ROW_FIELDS` for everything data synth writes). Every field
            of :data:`ROW_FIELDS` a row has must be of its type.

    Raises:
        AttrctlError: the file cannot be read, or a complete line is not a row: not UTF-8, not
            a JSON object, or a field missing or of the wrong type (named with its line).
    """
    path = Path(path)
    rows, partial = numbered_rows(path, required)
    if repair and partial:
        drop_partial_line(path)
    return [row for _, row in rows]


def numbered_rows(
    path: Path, required: Iterable[str] = tuple(ROW_FIELDS)
) -> tuple[list[tuple[int, dict[str, Any]]], bool]:
    """(line number, row) of each non-blank complete line, and whether a partial last line
    follows them; see :func:`read_rows`."""
    try:
        data = path.read_bytes()
    except OSError as err:
        raise AttrctlError(f"{path}: cannot read ({err.strerror or err})") from None
    end = data.rfind(b"\n") + 1  # bytes up to and including the last newline
    rows = []
    # split on b"\n" only: str.splitlines() would also split inside a row at U+2028 or U+0085,
    # which json.dumps(ensure_ascii=False) writes unescaped when a continuation holds them
    for lineno, raw in enumerate(data[:end].split(b"\n")[:-1], 1):
        if not raw.strip():
            continue
        try:
            row = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError as err:
            raise AttrctlError(
                f"{path}:{lineno}: corrupt row (not UTF-8: {err.reason} at byte {err.start})"
            ) from None
        except (ValueError, RecursionError) as err:  # JSONDecodeError; ints past the digit limit
            msg = err.msg if isinstance(err, json.JSONDecodeError) else type(err).__name__
            raise AttrctlError(f"{path}:{lineno}: corrupt row ({msg})") from None
        problem = _row_problem(row, required)
        if problem:
            raise AttrctlError(f"{path}:{lineno}: corrupt row ({problem})")
        rows.append((lineno, row))
    return rows, end < len(data)


def _row_problem(row: Any, required: Iterable[str]) -> str | None:
    """What makes ``row`` unusable as a row, or None."""
    if not isinstance(row, dict):
        return "not a JSON object"
    for name in required:
        if name not in row:
            return f"no `{name}`"
    for name, kind in ROW_FIELDS.items():
        if name not in row:
            continue
        value = row[name]
        if not isinstance(value, kind) or isinstance(value, bool):
            return f"`{name}` is {_json_type(value)}, not {_json_type(kind())}"
        if kind is int and value < 0:
            return f"`{name}` is negative"
    for name, value in row.get("scores", {}).items():
        if not is_number(value):
            return f"`scores.{name}` is {_json_type(value)}, not a finite number"
    return None


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _json_type(value: Any) -> str:
    names = {str: "text", int: "an integer", float: "a number", dict: "an object",
             list: "a list", bool: "true/false", type(None): "null"}  # fmt: skip
    return names.get(type(value), type(value).__name__)


def drop_partial_line(path: Path) -> None:
    """Cut a partially written last line (a kill mid-append) off ``path``."""
    with writing(path), path.open("r+b") as fh:
        data_end = fh.seek(0, os.SEEK_END)
        step = min(data_end, 1 << 20)
        # find the last newline from the end, a MiB at a time
        pos, keep = data_end, 0
        while pos > 0:
            pos = max(0, pos - step)
            fh.seek(pos)
            chunk = fh.read(min(step, data_end - pos))
            idx = chunk.rfind(b"\n")
            if idx >= 0:
                keep = pos + idx + 1
                break
        fh.truncate(keep)
        fh.flush()
        os.fsync(fh.fileno())


# ----------------------------------------------------------------------------- the fingerprint
def row_settings(
    policy: Policy, source: SynthSource, model_spec: str | None = None
) -> dict[str, Any]:
    """Everything besides the prompt text that determines a row, as JSON-able data.

    Args:
        policy: its seed and attributes (oracle and target: ``score``/``scores`` depend on both).
        source: the synth settings: generation settings and domain.
        model_spec: the model sampled from (default: the policy's).
    """
    from attrctl.oracles import oracle_fingerprint

    return {
        "model": model_spec or policy.model,
        "seed": policy.seed,
        "gen": {
            "max_new_tokens": source.max_new_tokens,
            "temperature": source.temperature,
            "top_p": source.top_p,
        },
        "domain": source.domain,
        "attributes": [
            {
                "name": a.name,
                "oracle": oracle_fingerprint(a.oracle),
                "target": a.target.model_dump(mode="json"),
            }
            for a in policy.attributes
        ],
    }


def _sha16(data: Any) -> str:
    canonical = json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:16]


def settings_stamp(settings: dict[str, Any]) -> dict[str, Any]:
    """The row fields that record ``settings``: the plain ones, ``labelled_by``, ``fingerprint``."""
    return {
        "domain": settings["domain"],
        "model": settings["model"],
        "seed": settings["seed"],
        "gen": settings["gen"],
        "labelled_by": {
            a["name"]: {
                "oracle": a["oracle"]["kind"],
                "oracle_sha256": _sha16(a["oracle"]),
                **a["target"],
            }
            for a in settings["attributes"]
        },
        "fingerprint": _sha16(settings),
    }


def _differences(row: dict[str, Any], stamp: dict[str, Any]) -> list[str]:
    """What differs between a row's recorded settings and ``stamp``, for people."""
    diff = [
        f"{k}: {row.get(k)!r} in the file vs {stamp[k]!r} now"
        for k in ("model", "seed", "gen", "domain")
        if row.get(k) != stamp[k]
    ]
    was, now = row.get("labelled_by"), stamp["labelled_by"]
    if not isinstance(was, dict) or list(was) != list(now):
        names = lambda d: ", ".join(map(repr, d)) if isinstance(d, dict) else repr(d)  # noqa: E731
        diff.append(f"attributes: {names(was)} in the file vs {names(now)} now")
        return diff
    for name, new in now.items():
        old = was[name] if isinstance(was[name], dict) else {}
        if old.get("oracle") != new["oracle"]:
            diff.append(
                f"oracle of attribute {name!r}: {old.get('oracle')} in the file vs "
                f"{new['oracle']} now"
            )
        elif old.get("oracle_sha256") != new["oracle_sha256"]:
            diff.append(
                f"oracle of attribute {name!r}: {new['oracle']} with other parameters, word "
                f"list or package version (oracle_sha256 {old.get('oracle_sha256')} in the "
                f"file vs {new['oracle_sha256']} now)"
            )
        target = {k: v for k, v in new.items() if k not in ("oracle", "oracle_sha256")}
        old_target = {k: old.get(k) for k in target}
        if old_target != target:
            diff.append(f"target of attribute {name!r}: {old_target} in the file vs {target} now")
    return diff


def check_compatible(
    path: Path,
    rows: list[tuple[int, dict[str, Any]]],
    stamp: dict[str, Any],
    prompts: dict[str, tuple[str, ...]],
) -> None:
    """Refuse to extend ``path`` unless every row was made under ``stamp`` from the current text
    of its prompt. ``prompts``: each current prompt set's name → its prompts."""
    for lineno, row in rows:
        if "fingerprint" not in row:
            raise AttrctlError(
                f"{path}:{lineno}: the file was written before synth rows recorded their "
                f"settings fingerprint (the oracles and targets that labelled them are unknown); "
                f"pass another --out, or delete the file to start over"
            )
        diff = _differences(row, stamp)
        if not diff and row["fingerprint"] != stamp["fingerprint"]:
            diff = [f"fingerprint: {row['fingerprint']} in the file vs {stamp['fingerprint']} now"]
        pset, index = row.get("prompt_set"), row.get("prompt_index")
        current = prompts.get(pset)
        if current is not None and isinstance(index, int):
            now = current[index] if 0 <= index < len(current) else None
            if row.get("prompt") != now:
                label = Path(pset).name
                diff.append(
                    f"prompt {index} of set {label!r}: {row.get('prompt')!r} in the file vs "
                    + (f"{now!r} now" if now is not None else f"none now ({len(current)} prompts)")
                )
        if diff:
            raise AttrctlError(
                f"{path}:{lineno}: the file was written with other settings ({'; '.join(diff)}); "
                f"pass another --out, or delete the file to start over"
            )
