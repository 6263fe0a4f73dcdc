"""BIG-bench tasks: the loader on a synthetic task.json, extraction from a synthetic sdist, fetch."""

from __future__ import annotations

import io
import json
import shutil
import tarfile
from pathlib import Path

import pytest

from attrctl import tasks
from attrctl.errors import AssetError, AttrctlError

FIXTURE = Path(__file__).parent / "fixtures" / "bigbench" / "tiny_mc_task.json"
TOP = "bigbench-1.0.0/bigbench/benchmark_tasks"


@pytest.fixture
def task_root(tmp_path) -> Path:
    root = tmp_path / "bigbench"
    (root / "tiny_mc").mkdir(parents=True)
    shutil.copy(FIXTURE, root / "tiny_mc" / "task.json")
    return root


def make_sdist(path: Path, members: dict[str, bytes]) -> Path:
    """A .tar.gz laid out like the bigbench sdist, holding ``members`` (name -> bytes)."""
    with tarfile.open(path, "w:gz") as tar:
        for name, payload in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    return path


def _task(name: str) -> bytes:
    return json.dumps(
        {"name": name, "examples": [{"input": "q?", "target_scores": {"a": 1, "b": 0}}]}
    ).encode()


@pytest.fixture
def sdist(tmp_path) -> Path:
    return make_sdist(
        tmp_path / "bigbench-1.0.0.tar.gz",
        {
            "bigbench-1.0.0/setup.py": b"# not a task",
            f"{TOP}/alpha/task.json": _task("alpha"),
            f"{TOP}/alpha/README.md": b"# alpha",
            f"{TOP}/beta/task.json": _task("beta"),
            f"{TOP}/beta/sub_one/task.json": _task("beta_sub_one"),
            f"{TOP}/gamma/task.json": _task("gamma"),
            "bigbench-1.0.0/other/alpha/task.json": _task("decoy"),  # not under benchmark_tasks
        },
    )


# ------------------------------------------------------------------------------------- loading
def test_load_task_parses_multiple_choice_examples(task_root):
    task = tasks.load_task("tiny_mc", root=task_root)
    assert task.name == "tiny_mc" and len(task.examples) == 3  # the generative one is skipped
    spider = task.examples[0]
    assert spider.choices == ("six", "eight", "ten") and spider.answer == 1
    assert task.examples[2].answer == 2  # ties at the top: the first best, as BIG-bench does
    assert task.chance == pytest.approx((1 / 3 + 1 / 2 + 1 / 4) / 3)
    assert task.metadata["preferred_score"] == "multiple_choice_grade"


def test_prompt_follows_bigbench_default_format(task_root):
    task = tasks.load_task("tiny_mc", root=task_root)
    prompt = task.prompt(task.examples[0])
    head = "\nQuestion: How many legs does a spider have?"
    assert prompt.startswith(head) and prompt.endswith("\nAnswer: ")
    listed = prompt[len(head) : -len("\nAnswer: ")].split("\n  choice: ")
    assert listed[0] == "" and sorted(listed[1:]) == ["eight", "six", "ten"]
    assert task.prompt(task.examples[0]) == prompt  # seeded: the same listing every time
    plain = tasks.BigBenchTask("t", "", task.examples, append_choices_to_input=False)
    assert plain.prompt(task.examples[1]) == "\nQ: Which is a colour?\nA: "


def test_unfetched_task_says_how_to_fetch(tmp_path):
    with pytest.raises(AssetError, match=r"attrctl assets fetch bigbench$"):
        tasks.load_task("social_iqa", root=tmp_path)
    with pytest.raises(AssetError, match=r"attrctl assets fetch bigbench --tasks other_task"):
        tasks.load_task("other_task", root=tmp_path)


@pytest.mark.parametrize(
    ("data", "match"),
    [
        ({"subtasks": [{"name": "x"}]}, "has subtasks"),
        ({"examples": [{"input": "q", "target": "a"}]}, "no multiple-choice examples"),
        ({"examples": [{"input": "q", "target_scores": {"a": 0, "b": 0}}]}, r"examples\[0\]"),
        ({"examples": [{"input": 3, "target_scores": {"a": 1, "b": 0}}]}, "string 'input'"),
    ],
)
def test_malformed_tasks_name_the_problem(data, match):
    with pytest.raises(AttrctlError, match=match):
        tasks.parse_task(data, "x/task.json")


def test_task_names_cannot_escape_the_cache(tmp_path):
    with pytest.raises(AttrctlError, match="invalid BIG-bench task name"):
        tasks.load_task("../../etc", root=tmp_path)


# ---------------------------------------------------------------------------------- extraction
def test_extract_only_the_chosen_tasks(sdist, tmp_path):
    root = tmp_path / "out"
    assert tasks.extract_tasks(sdist, ["gamma", "alpha"], root) == ["alpha", "gamma"]
    assert tasks.fetched_tasks(root) == ["alpha", "gamma"]
    assert json.loads((root / "alpha" / "task.json").read_text())["name"] == "alpha"  # not decoy
    assert tasks.load_task("gamma", root=root).examples[0].answer == 0
    assert tasks.extract_tasks(sdist, ["beta/sub_one"], root) == ["beta/sub_one"]


def test_extract_reports_missing_and_keeps_found(sdist, tmp_path):
    root = tmp_path / "out"
    with pytest.raises(
        AttrctlError, match=r"(?s)not in bigbench-1\.0\.0\.tar\.gz: nope .*; extracted beta$"
    ):
        tasks.extract_tasks(sdist, ["beta", "nope"], root)
    assert tasks.fetched_tasks(root) == ["beta"]


def test_extract_rejects_non_json_and_corrupt_archives(tmp_path):
    bad = make_sdist(tmp_path / "bad.tar.gz", {f"{TOP}/alpha/task.json": b"{not json"})
    with pytest.raises(AttrctlError, match="not JSON"):
        tasks.extract_tasks(bad, ["alpha"], tmp_path / "out")
    assert not (tmp_path / "out" / "alpha" / "task.json").exists()
    junk = tmp_path / "junk.tar.gz"
    junk.write_bytes(b"definitely not gzip")
    with pytest.raises(AttrctlError, match=r"not a readable \.tar\.gz"):
        tasks.extract_tasks(junk, ["alpha"], tmp_path / "out")


# ------------------------------------------------------------------------------------- fetching
def test_fetch_is_idempotent_and_force_refetches(sdist, tmp_path, monkeypatch):
    root = tmp_path / "cache"
    downloads: list[Path] = []

    def fake_download(folder: Path, *, progress: bool = False) -> Path:
        downloads.append(folder)
        return Path(shutil.copy(sdist, folder / tasks.BIGBENCH_SDIST))

    monkeypatch.setattr(tasks, "download_sdist", fake_download)
    first = tasks.fetch_bigbench(["alpha", "beta"], root=root)
    assert (first.extracted, first.skipped, len(downloads)) == (["alpha", "beta"], [], 1)
    assert not downloads[0].exists()  # the 358 MB download is not left behind
    again = tasks.fetch_bigbench(["alpha", "beta"], root=root)
    assert (again.extracted, again.skipped, len(downloads)) == ([], ["alpha", "beta"], 1)
    partly = tasks.fetch_bigbench(["beta", "gamma"], root=root)
    assert (partly.extracted, partly.skipped) == (["gamma"], ["beta"])
    forced = tasks.fetch_bigbench(["alpha"], root=root, force=True)
    assert forced.extracted == ["alpha"] and len(downloads) == 3


def test_download_runs_pip_and_reports_failure(tmp_path, monkeypatch):
    seen: list[list[str]] = []

    class Proc:
        returncode, stdout, stderr = 1, "", "ERROR: No matching distribution found"

    monkeypatch.setattr(tasks.subprocess, "run", lambda cmd, **kw: seen.append(cmd) or Proc())
    with pytest.raises(
        AttrctlError, match=r"(?s)could not download bigbench==1\.0\.0.*No matching"
    ):
        tasks.download_sdist(tmp_path)
    cmd = seen[0]
    assert cmd[1:4] == ["-m", "pip", "download"] and "bigbench==1.0.0" in cmd
    assert {"--no-deps", "--no-binary", ":all:"} <= set(cmd)


# ------------------------------------------------------------------------------------------ CLI
def test_cli_fetch_and_ls(run_cli, sdist, tmp_path, monkeypatch):
    monkeypatch.setenv("ATTRCTL_CACHE", str(tmp_path / "cache"))
    code, out, _ = run_cli("assets", "fetch", "bigbench", "--archive", sdist, "--tasks", "alpha")
    assert code == 0 and "fetched alpha" in out and "never train" in out
    assert (tmp_path / "cache" / "bigbench" / "alpha" / "task.json").is_file()
    code, out, _ = run_cli("assets", "fetch", "bigbench", "--archive", sdist, "--tasks", "alpha")
    assert code == 0 and "already present: alpha" in out
    code, out, _ = run_cli("assets", "ls")
    assert code == 0
    assert any(line.split()[:3] == ["bigbench", "alpha", "ready"] for line in out.splitlines())
    assert any(
        line.split()[:3] == ["bigbench", "social_iqa", "missing"] for line in out.splitlines()
    )


def test_cli_fetch_errors_exit_2(run_cli, sdist, tmp_path, monkeypatch):
    monkeypatch.setenv("ATTRCTL_CACHE", str(tmp_path / "cache"))
    code, _, err = run_cli("assets", "fetch", "bigbench", "--archive", sdist, "--tasks", "nope")
    assert code == 2 and "not in bigbench-1.0.0.tar.gz: nope" in err and "Traceback" not in err
    code, _, err = run_cli("assets", "fetch", "wikipedia")
    assert code == 2 and "unknown asset 'wikipedia'" in err


@pytest.mark.slow
def test_real_bigbench_fetch(tmp_path):
    """The real 358 MB download (~1 min here); run by hand: pytest -m slow tests/test_tasks.py."""
    report = tasks.fetch_bigbench(root=tmp_path)
    assert report.extracted == sorted(tasks.DEFAULT_TASKS)  # archive order is alphabetical
    chance = {name: tasks.load_task(name, root=tmp_path).chance for name in tasks.DEFAULT_TASKS}
    # The chance levels of the four utility tasks (docs/design.md, "The embedded offline default").
    assert chance == pytest.approx(
        {
            "movie_recommendation": 0.25,
            "general_knowledge": 0.14,
            "date_understanding": 0.17,
            "social_iqa": 0.33,
        },
        abs=0.01,
    )
