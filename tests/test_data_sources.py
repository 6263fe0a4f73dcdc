"""Data sources: local files of every format, bad input as AttrctlError, max_examples, preview."""

from __future__ import annotations

import json

import pytest

from attrctl.data.sources import load_source, preview_sources
from attrctl.errors import AttrctlError
from attrctl.policy.schema import Policy

ORACLE = {"kind": "lexicon", "words": ["idiot"]}


def make_policy(tmp_path, data, **extra) -> Policy:
    raw = {
        "name": "t",
        "model": "tiny-random",
        "data": data,
        "attributes": [{"name": "tox", "oracle": ORACLE}],
        "output_dir": str(tmp_path / "run"),
        **extra,
    }
    return Policy.model_validate(raw, context={"base_dir": tmp_path})


def load(tmp_path, **source):
    policy = make_policy(tmp_path, [{"kind": "file", "domain": "d", **source}])
    return load_source(policy.data[0], policy)


def test_jsonl_csv_txt_parquet_read_the_same_texts(tmp_path):
    texts = ["first, with a comma", 'second "quoted"', "third\nwith a newline"]
    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"body": t}) + "\n" for t in texts))
    import csv

    with (tmp_path / "a.csv").open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["id", "body"])
        w.writerows([[i, t] for i, t in enumerate(texts)])
    (tmp_path / "a.txt").write_text("\n\n".join(texts) + "\n")
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"body": texts}), tmp_path / "a.parquet")

    for name in ("a.jsonl", "a.csv", "a.parquet"):
        got = load(tmp_path, path=name, text_field="body")
        assert [e.text for e in got] == texts, name
        assert {e.domain for e in got} == {"d"}
    assert [e.text for e in load(tmp_path, path="a.txt")] == texts


def test_missing_text_field_names_file_and_field(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"body": "x"}\n')
    with pytest.raises(AttrctlError, match=r"a\.jsonl:1: no text field 'text' \(keys: body\)"):
        load(tmp_path, path="a.jsonl")
    (tmp_path / "a.csv").write_text("body\nx\n")
    with pytest.raises(AttrctlError, match=r"a\.csv: no text field 'text' \(columns: body\)"):
        load(tmp_path, path="a.csv")


def test_empty_and_malformed_files(tmp_path):
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(AttrctlError, match=r"empty.jsonl: empty dataset"):
        load(tmp_path, path="empty.jsonl")
    (tmp_path / "blank.txt").write_text("  \n\n \n")
    with pytest.raises(AttrctlError, match=r"blank.txt: empty dataset"):
        load(tmp_path, path="blank.txt")
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"text": \n')
    with pytest.raises(AttrctlError, match=r"bad\.jsonl:2: not valid JSON"):
        load(tmp_path, path="bad.jsonl")
    (tmp_path / "x.dat").write_text("x")
    with pytest.raises(AttrctlError, match=r"set `format:`"):
        load(tmp_path, path="x.dat")


def test_file_deleted_after_validation_is_an_attrctl_error(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_text('{"text": "x"}\n')
    policy = make_policy(tmp_path, [{"kind": "file", "domain": "d", "path": "a.jsonl"}])
    path.unlink()
    with pytest.raises(AttrctlError, match=r"a.jsonl: data file not found"):
        load_source(policy.data[0], policy)


def test_max_examples_is_a_seeded_ordered_subset(tmp_path):
    (tmp_path / "a.txt").write_text("\n\n".join(f"p{i}" for i in range(50)))

    def pick(seed):
        src = {"kind": "file", "domain": "d", "path": "a.txt", "max_examples": 10}
        policy = make_policy(tmp_path, [src], seed=seed)
        return [int(e.text[1:]) for e in load_source(policy.data[0], policy)]

    a, b = pick(0), pick(1)
    assert len(a) == 10 and a == sorted(a) and a == pick(0)
    assert a != b  # another seed draws another subset (1 chance in C(50,10) of a clash)
    assert a != list(range(10))  # a random subset, not the head of the file


def test_synth_source_reads_prompt_plus_continuation(tmp_path):
    policy = make_policy(tmp_path, [{"kind": "synth", "domain": "toxic"}])
    with pytest.raises(AttrctlError, match=r"attrctl data synth"):
        load_source(policy.data[0], policy)
    path = tmp_path / "run" / "data" / "synth.jsonl"
    path.parent.mkdir(parents=True)
    rows = [
        {"prompt": "Shut up, you", "continuation": " fool."},
        {"prompt": "A", "continuation": " b"},
    ]
    # an interrupted writer may leave half a line: readers ignore it
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"prompt": "hal')
    got = load_source(policy.data[0], policy)
    assert [e.text for e in got] == ["Shut up, you fool.", "A b"]
    assert {e.domain for e in got} == {"toxic"}


def test_preview_reports_a_missing_source_without_failing(tmp_path):
    (tmp_path / "a.txt").write_text("one\n\ntwo\n\nthree")
    policy = make_policy(
        tmp_path,
        [{"kind": "synth", "domain": "toxic"}, {"kind": "file", "domain": "g", "path": "a.txt"}],
    )
    synth, file = preview_sources(policy, n=2)
    assert synth["examples"] == 0 and "not found" in synth["error"]
    assert file["examples"] == 3 and file["samples"] == ["one", "two"] and file["error"] is None


def test_hub_source_through_datasets(tmp_path, monkeypatch):
    import datasets

    calls = []

    def fake_load(name, config=None, split="train"):
        calls.append((name, config, split))
        if name == "offline/none":
            raise ConnectionError("no internet")
        return datasets.Dataset.from_dict({"sentence": ["a", None, "c"]})

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    hub = {"kind": "hub", "domain": "g", "name": "some/ds", "config": "c1", "split": "validation"}
    policy = make_policy(tmp_path, [{**hub, "text_field": "sentence"}, hub])
    assert [e.text for e in load_source(policy.data[0], policy)] == ["a", "c"]
    assert calls[0] == ("some/ds", "c1", "validation")
    with pytest.raises(
        AttrctlError, match=r"'some/ds'.*no text field 'text' \(columns: sentence\)"
    ):
        load_source(policy.data[1], policy)
    policy = make_policy(tmp_path, [{"kind": "hub", "domain": "g", "name": "offline/none"}])
    with pytest.raises(AttrctlError, match=r"could not load.*no internet.*kind: file"):
        load_source(policy.data[0], policy)


def test_shipped_prompt_sets():
    from attrctl.data.prompt_sets import load_prompt_set

    sets = {name: load_prompt_set(name).prompts for name in ("toxic", "neutral")}
    for name, prompts in sets.items():
        assert len(prompts) >= 150, name
        assert len(set(prompts)) == len(prompts), f"{name}: duplicate prompts"
        assert all(p == p.strip() and len(p) > 3 for p in prompts), name
    assert not set(sets["toxic"]) & set(sets["neutral"])


def test_prompt_file_errors(tmp_path):
    from attrctl.data.prompt_sets import load_prompt_set

    (tmp_path / "p.txt").write_text("# a comment\n\n first prompt \nsecond\n")
    assert load_prompt_set(str(tmp_path / "p.txt")).prompts == ("first prompt", "second")
    (tmp_path / "e.txt").write_text("# only a comment\n")
    with pytest.raises(AttrctlError, match=r"e\.txt: prompt file holds no prompts"):
        load_prompt_set(str(tmp_path / "e.txt"))
    with pytest.raises(AttrctlError, match=r"gone\.txt: prompt file not found"):
        load_prompt_set(str(tmp_path / "gone.txt"))
