"""A built wheel holds every package of the source tree: pyproject's explicit ``packages`` list
once left out ``attrctl.models`` (editable installs hid it; a wheel install could not load a
model)."""

from __future__ import annotations

from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")  # Python 3.11+

REPO = Path(__file__).resolve().parents[1]


def test_every_package_folder_is_listed_in_pyproject():
    tool = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed, mapped = set(tool["packages"]), tool["package-dir"]
    on_disk = {
        ".".join(init.parent.relative_to(REPO).parts)
        for init in (REPO / "attrctl").rglob("__init__.py")
        if "__pycache__" not in init.parts
    }
    for name, folder in mapped.items():  # kernels/, cli/, policies/ install inside attrctl
        assert (REPO / folder).is_dir(), (name, folder)
        on_disk.add(name)
    assert on_disk - listed == set(), f"packages missing from pyproject.toml: {on_disk - listed}"
    assert listed - on_disk == set(), f"listed packages with no folder: {listed - on_disk}"
