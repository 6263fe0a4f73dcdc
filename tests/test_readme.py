"""The README's Python examples run as written; the documentation's references hold.

- every relative Markdown link in README.md and docs/ points to a file that exists (and, when it
  names an anchor in a Markdown file, to a heading that exists);
- no tracked file cites a design document outside the repository: the design document is
  ``docs/design.md``;
- the README's policy example is ``policies/toxicity.yaml`` as shipped.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
#: Strings no tracked file may contain: citations of the brief the project was started from,
#: which is not part of the repository (written split so that this file does not contain them).
FORBIDDEN = ("DESIGN" + ".md", "DESIGN" + " §", ".." + "/shared")


def test_readme_python_examples_run(capsys):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "the README should show the library API in at least one Python example"
    for block in blocks:
        exec(compile(block, str(README), "exec"), {"__name__": "readme"})
    assert "loss" in capsys.readouterr().out


def _tracked_files() -> list[Path]:
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    out = subprocess.run(
        ["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True
    ).stdout.decode("utf-8", "surrogateescape")
    return [ROOT / name for name in out.split("\0") if name]


def test_no_tracked_file_cites_a_design_document_outside_the_repository():
    found = []
    for path in _tracked_files():
        try:
            data = path.read_bytes()
        except (FileNotFoundError, IsADirectoryError):  # deleted in the working tree, a submodule
            continue
        if b"\0" in data[:8192]:  # binary (images, ...)
            continue
        text = data.decode("utf-8", "replace")
        for lineno, line in enumerate(text.splitlines(), 1):
            found += [
                f"{path.relative_to(ROOT)}:{lineno}: {bad!r}" for bad in FORBIDDEN if bad in line
            ]
    assert not found, "cite docs/design.md instead:\n" + "\n".join(found)


def _markdown_files() -> list[Path]:
    return [README, *sorted((ROOT / "docs").rglob("*.md"))]


def _slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip())  # a link keeps its text
    return re.sub(r"[^\w\- ]", "", text.lower()).replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    anchors = set()
    for heading in re.findall(r"^#{1,6}\s+(.+?)\s*#*\s*$", _prose(path.read_text()), flags=re.M):
        slug = _slug(heading)
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        anchors.add(slug if n == 0 else f"{slug}-{n}")
    return anchors


def _prose(text: str) -> str:
    """The Markdown without fenced code blocks (their lines are not headings or links)."""
    return re.sub(r"^(```|~~~).*?^\1", "", text, flags=re.M | re.S)


def test_relative_markdown_links_point_to_existing_files():
    files = _markdown_files()
    assert (ROOT / "docs" / "design.md") in files
    broken = []
    for md in files:
        prose = re.sub(r"`[^`\n]*`", "", _prose(md.read_text()))  # inline code is not a link
        for target in re.findall(r"\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)", prose):
            if re.match(r"^[a-z][a-z0-9+.-]*:", target, flags=re.I):  # http:, https:, mailto:
                continue
            name, _, anchor = target.partition("#")
            dest = (md.parent / name).resolve() if name else md
            where = f"{md.relative_to(ROOT)}: ({target})"
            if not dest.exists():
                broken.append(f"{where}: no such file")
            elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
                broken.append(f"{where}: no heading with the anchor #{anchor}")
    assert not broken, "\n".join(broken)


def test_readme_policy_example_is_the_shipped_default():
    block = re.search(r"## A policy, walked through.*?```yaml\n(.*?)```", README.read_text(), re.S)
    assert block, "README.md should show the default policy under 'A policy, walked through'"
    shown = yaml.safe_load(block.group(1))
    shipped = yaml.safe_load((ROOT / "policies" / "toxicity.yaml").read_text())
    shipped.pop("description", None)  # the README leaves descriptions out, and says so
    for attribute in shipped.get("attributes", []):
        attribute.pop("description", None)
    assert shown == shipped
