"""BIG-bench multiple-choice tasks for measuring utility (evaluation only).

**Never train on these tasks.** They exist to measure how much general ability a fine-tuned model
keeps (utility preservation: docs/design.md, "What attrctl promises"); a model that saw them in
training makes the measurement meaningless. Nothing in attrctl's data path reads them.

The data ship in the PyPI sdist ``bigbench==1.0.0`` (358 MB, Apache-2.0). Installing it would pull
TensorFlow, so :func:`fetch_bigbench` only downloads the archive (``pip download --no-deps
--no-binary :all:``) and stream-reads it once, keeping just the chosen tasks' ``task.json`` in
``cache_dir("bigbench")/<task>/task.json``. :func:`load_task` parses one into
:class:`BigBenchTask`; its :meth:`BigBenchTask.prompt` reproduces BIG-bench's default
multiple-choice formatting (``bigbench/api/json_task.py::default_format_fn``).
"""

from __future__ import annotations

import contextlib
import json
import re
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from attrctl.errors import AssetError, AttrctlError
from attrctl.paths import atomic_write, cache_dir

BIGBENCH_REQUIREMENT = "bigbench==1.0.0"
BIGBENCH_SDIST = "bigbench-1.0.0.tar.gz"
#: Tasks on which SmolLM2-135M scores clearly above chance (docs/design.md, "The embedded offline
#: default").
DEFAULT_TASKS = ("movie_recommendation", "general_knowledge", "date_understanding", "social_iqa")
FETCH_HINT = "attrctl assets fetch bigbench"
_TASK_NAME = re.compile(r"^[a-z0-9_]+(/[a-z0-9_]+)?$")  # task or task/subtask; no traversal


@dataclass(frozen=True)
class MCExample:
    """One multiple-choice question.

    Attributes:
        input: the question text, unformatted.
        choices: the answer options, in the file's order.
        scores: one score per choice (BIG-bench ``target_scores``; the best is correct).
    """

    input: str
    choices: tuple[str, ...]
    scores: tuple[float, ...]

    @property
    def answer(self) -> int:
        """Index of the correct choice (the first one with the highest score, as BIG-bench)."""
        return self.scores.index(max(self.scores))


@dataclass(frozen=True)
class BigBenchTask:
    """A BIG-bench JSON task restricted to its multiple-choice examples. Evaluation only."""

    name: str
    description: str
    examples: tuple[MCExample, ...]
    task_prefix: str = ""
    input_prefix: str = "\nQ: "
    output_prefix: str = "\nA: "
    choice_prefix: str = "\n  choice: "
    append_choices_to_input: bool = True
    metadata: dict[str, Any] = field(default_factory=dict, compare=False)

    @property
    def chance(self) -> float:
        """Expected accuracy of guessing uniformly among the choices."""
        return sum(1 / len(ex.choices) for ex in self.examples) / len(self.examples)

    def prompt(self, example: MCExample, seed: int = 42) -> str:
        """The text a model continues; each choice is then scored as a continuation of it.

        Like BIG-bench, the choices listed in the prompt (when the task appends them) are the
        sorted choices in a permutation seeded by ``seed``, so the listing gives the answer's
        position away no more than chance.
        """
        text = example.input
        if self.append_choices_to_input:
            import numpy as np

            order = np.random.RandomState(seed=seed).permutation(sorted(example.choices))
            text = text + self.choice_prefix + self.choice_prefix.join(str(c) for c in order)
        return self.task_prefix + self.input_prefix + text + self.output_prefix


# ------------------------------------------------------------------------------------- loading
def parse_task(data: dict[str, Any], source: str) -> BigBenchTask:
    """Build a :class:`BigBenchTask` from parsed ``task.json`` data.

    Args:
        data: the JSON object.
        source: the file name, for error messages.

    Raises:
        AttrctlError: the task has no multiple-choice examples, or an example is malformed.
    """
    if not isinstance(data, dict) or not isinstance(data.get("examples"), list):
        hint = " (it has subtasks: name one as task/subtask)" if data.get("subtasks") else ""
        raise AttrctlError(f"{source}: not a BIG-bench task with 'examples'{hint}")
    examples = []
    for i, ex in enumerate(data["examples"]):
        scores = ex.get("target_scores") if isinstance(ex, dict) else None
        if not isinstance(scores, dict):
            continue  # a generative example (``target`` only): not multiple choice
        if not isinstance(ex.get("input"), str) or len(scores) < 2:
            raise AttrctlError(f"{source}: examples[{i}] needs a string 'input' and >= 2 choices")
        values = tuple(float(v) for v in scores.values())
        if max(values) <= min(values):
            raise AttrctlError(f"{source}: examples[{i}] has no choice scored above the others")
        examples.append(MCExample(ex["input"], tuple(scores), values))
    if not examples:
        raise AttrctlError(f"{source}: no multiple-choice examples (with 'target_scores')")
    return BigBenchTask(
        name=str(data.get("name", Path(source).parent.name)),
        description=str(data.get("description", "")),
        examples=tuple(examples),
        task_prefix=str(data.get("task_prefix", "")),
        input_prefix=data.get("example_input_prefix", "\nQ: "),
        output_prefix=data.get("example_output_prefix", "\nA: "),
        choice_prefix=data.get("choice_prefix", "\n  choice: "),
        append_choices_to_input=bool(data.get("append_choices_to_input", True)),
        metadata={k: data[k] for k in ("keywords", "metrics", "preferred_score") if k in data},
    )


def task_path(name: str, root: Path | None = None) -> Path:
    """Where a fetched task's ``task.json`` lives (``root`` defaults to the cache)."""
    _check_name(name)
    return (root or cache_dir("bigbench")) / name / "task.json"


def load_task(name: str, root: Path | None = None) -> BigBenchTask:
    """Load a fetched BIG-bench task by name. **Evaluation only — never train on it.**

    Raises:
        AssetError: the task has not been fetched (the message says how to fetch it).
    """
    path = task_path(name, root)
    if not path.is_file():
        extra = "" if name in DEFAULT_TASKS else f" --tasks {name}"
        raise AssetError(
            f"BIG-bench task {name!r} is not fetched (looked in {path.parent}); run:\n"
            f"  {FETCH_HINT}{extra}"
        )
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as err:
        raise AttrctlError(f"{path}: not valid JSON ({err}); refetch with --force") from err
    return parse_task(data, str(path))


def fetched_tasks(root: Path | None = None) -> list[str]:
    """Names of the tasks present in the cache, sorted."""
    root = root or cache_dir("bigbench")
    return sorted(str(p.parent.relative_to(root)) for p in root.glob("**/task.json"))


# ------------------------------------------------------------------------------------ fetching
@dataclass
class FetchReport:
    """What :func:`fetch_bigbench` did."""

    dest: Path
    extracted: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # already present
    seconds: float = 0.0


def fetch_bigbench(
    tasks: Iterable[str] = DEFAULT_TASKS,
    *,
    force: bool = False,
    archive: Path | None = None,
    root: Path | None = None,
    progress: bool = False,
) -> FetchReport:
    """Make the chosen tasks available offline; download only if one is missing.

    Args:
        tasks: task names (``benchmark_tasks/<name>/task.json`` in the sdist).
        force: re-extract even tasks already present.
        archive: a ``bigbench-1.0.0.tar.gz`` already on disk, instead of downloading.
        root: destination folder (default ``cache_dir("bigbench")``).
        progress: show pip's download progress and an extraction progress bar.

    Raises:
        AttrctlError: pip failed, or a task is not in the archive (the others are kept).
    """
    start = time.perf_counter()
    names = list(dict.fromkeys(tasks))
    for name in names:
        _check_name(name)
    root = root or cache_dir("bigbench")
    report = FetchReport(dest=root)
    wanted = [n for n in names if force or not task_path(n, root).is_file()]
    report.skipped = [n for n in names if n not in wanted]
    if wanted:
        if archive is not None:
            report.extracted = extract_tasks(archive, wanted, root, progress=progress)
        else:
            with tempfile.TemporaryDirectory(prefix="attrctl-bigbench-") as tmp:
                sdist = download_sdist(Path(tmp), progress=progress)
                report.extracted = extract_tasks(sdist, wanted, root, progress=progress)
    report.seconds = time.perf_counter() - start
    return report


def download_sdist(folder: Path, *, progress: bool = False) -> Path:
    """``pip download`` the BIG-bench sdist into ``folder`` and return the archive's path."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:"]
    cmd += [BIGBENCH_REQUIREMENT, "-d", str(folder)]
    # With progress the user sees pip's own download bar; without, keep its output for errors.
    proc = subprocess.run(cmd, capture_output=not progress, text=True, check=False)
    sdist = folder / BIGBENCH_SDIST
    if proc.returncode != 0 or not sdist.is_file():
        tail = "\n".join((proc.stderr or proc.stdout or "").strip().splitlines()[-5:])
        raise AttrctlError(
            f"could not download {BIGBENCH_REQUIREMENT} with pip (exit {proc.returncode}); "
            f"it needs access to PyPI.\n  command: {' '.join(cmd)}" + (f"\n{tail}" if tail else "")
        )
    return sdist


def extract_tasks(
    archive: Path, names: Iterable[str], root: Path, *, progress: bool = False
) -> list[str]:
    """Stream ``archive`` once and write ``<root>/<name>/task.json`` for each wanted task.

    The archive is read in streaming mode ('r|gz'): a 358 MB sdist is never unpacked, and the
    loop stops as soon as every wanted task is found. Each file is parsed before it is written
    (atomically), so the cache never holds a partial or non-JSON task.

    Returns:
        The names written, in archive order.

    Raises:
        AttrctlError: some names were not in the archive (the found ones are written first).
    """
    wanted = {f"{name}/task.json": name for name in names}
    found: list[str] = []
    archive = Path(archive)
    with open(archive, "rb") as raw, _progress(archive, raw, progress) as counted:
        try:
            with tarfile.open(fileobj=counted, mode="r|gz") as tar:
                for member in tar:
                    name = wanted.get(_task_relpath(member.name))
                    if name is None or not member.isfile() or name in found:
                        continue
                    payload = tar.extractfile(member).read()
                    try:
                        json.loads(payload)
                    except ValueError as err:
                        raise AttrctlError(f"{archive}:{member.name}: not JSON ({err})") from err
                    with atomic_write(root / name / "task.json", "wb") as fh:
                        fh.write(payload)
                    found.append(name)
                    if len(found) == len(wanted):
                        break
        except (tarfile.TarError, EOFError, OSError) as err:
            raise AttrctlError(f"{archive}: not a readable .tar.gz ({err})") from err
    missing = [n for n in wanted.values() if n not in found]
    if missing:
        raise AttrctlError(
            f"not in {archive.name}: {', '.join(missing)} (task names are the folders of "
            "bigbench/benchmark_tasks/ in the BIG-bench repository)"
            + (f"; extracted {', '.join(found)}" if found else "")
        )
    return found


def _task_relpath(member_name: str) -> str:
    """``<top>/bigbench/benchmark_tasks/a/b/task.json`` -> ``a/b/task.json`` ('' if not a task)."""
    _, sep, rest = member_name.partition("/benchmark_tasks/")
    return rest if sep else ""


def _check_name(name: str) -> None:
    if not _TASK_NAME.match(name):
        raise AttrctlError(
            f"invalid BIG-bench task name {name!r}: use lower-case letters, digits and '_' "
            "(or task/subtask)"
        )


class _CountingReader:
    """A read-only file wrapper that reports compressed bytes consumed to a tqdm bar."""

    def __init__(self, raw: IO[bytes], bar: Any):
        self._raw, self._bar = raw, bar

    def read(self, size: int = -1) -> bytes:
        data = self._raw.read(size)
        self._bar.update(len(data))
        return data


@contextlib.contextmanager
def _progress(archive: Path, raw: IO[bytes], enabled: bool) -> Iterator[Any]:
    """``raw`` itself, or (with progress) a wrapper that advances a bar as it is read."""
    if not enabled:
        yield raw
        return
    from tqdm import tqdm

    with tqdm(
        total=archive.stat().st_size, unit="B", unit_scale=True, desc="extracting tasks"
    ) as bar:
        yield _CountingReader(raw, bar)
