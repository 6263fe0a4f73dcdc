"""Shared building blocks of the policy schema: the strict base model and path types.

Paths inside a policy resolve against the policy file's folder. The folder travels in the pydantic
validation context (``{"base_dir": Path}``); without a context, the current directory is used.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

from pydantic import AfterValidator, BaseModel, ConfigDict, ValidationInfo


class StrictModel(BaseModel):
    """Frozen, and every unknown key is an error (a misspelt key must never be silently ignored)."""

    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)


def base_dir_of(info: ValidationInfo) -> Path:
    ctx = info.context or {}
    return Path(ctx.get("base_dir") or Path.cwd())


def _existing_path(value: str, info: ValidationInfo) -> str:
    path = Path(value).expanduser()
    if not path.is_absolute():
        path = base_dir_of(info) / path
    path = path.resolve()
    if not path.exists():
        raise ValueError(f"path does not exist: {path}")
    return str(path)


#: A file or folder that must exist; relative paths resolve against the policy's folder.
InputPath = Annotated[str, AfterValidator(_existing_path)]
