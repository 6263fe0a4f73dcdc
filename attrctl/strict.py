"""Shared building blocks of the policy schema: the strict base model and path types.

Paths inside a policy resolve against the policy file's folder. The folder travels in the pydantic
validation context (``{"base_dir": Path}``); without a context, the current directory is used.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

from pydantic import AfterValidator, BaseModel, ConfigDict, ValidationInfo


class StrictModel(BaseModel):
    """Frozen, and every unknown key is an error (a misspelt key must never be silently ignored).
    No number may be infinite or NaN (YAML spells them ``.inf`` and ``.nan``): a NaN passes no
    range check, and an infinite learning rate passes ``gt=0``."""

    model_config = ConfigDict(
        extra="forbid", frozen=True, validate_default=True, allow_inf_nan=False
    )


def base_dir_of(info: ValidationInfo) -> Path:
    ctx = info.context or {}
    return Path(ctx.get("base_dir") or Path.cwd())


def user_path(value: str, info: ValidationInfo) -> Path:
    """A path from a policy, ``~`` expanded and relative to the policy's folder, not resolved.

    Raises:
        ValueError: ``~user`` of an unknown user, or a NUL byte (pydantic reports it on the field).
    """
    try:
        path = Path(value).expanduser()
    except RuntimeError as err:  # Path("~nobody").expanduser()
        raise ValueError(f"{value!r}: {err}") from None
    if "\0" in value:
        raise ValueError(f"{value!r}: a path cannot hold a NUL character")
    return path if path.is_absolute() else base_dir_of(info) / path


def path_test(path: Path, test: str = "exists") -> bool:
    """``path.exists()`` (or ``is_dir``/``is_file``) that reports an unusable name (too long, say)
    as a ValueError pydantic puts on the field, instead of an OSError that escapes validation."""
    try:
        return bool(getattr(path, test)())
    except OSError as err:
        raise ValueError(f"{path}: {err.strerror or err}") from None


def resolved(path: Path) -> Path:
    """``path.resolve()``, or the absolute path where resolving fails (a symlink loop)."""
    try:
        return path.resolve()
    except (OSError, RuntimeError):
        return Path(os.path.abspath(path))


def _existing_path(value: str, info: ValidationInfo) -> str:
    path = user_path(value, info)
    if not path_test(path):
        raise ValueError(f"path does not exist: {resolved(path)}")
    return str(resolved(path))


#: A file or folder that must exist; relative paths resolve against the policy's folder.
InputPath = Annotated[str, AfterValidator(_existing_path)]
