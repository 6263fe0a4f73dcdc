"""`attrctl oracle score`, run in-process through ``attrctl.cli.main`` (the ``run_cli`` fixture)."""

from __future__ import annotations

import io
import json
import re

import numpy as np
import pytest

from attrctl.errors import AttrctlError
from attrctl.oracles import build_oracle
from attrctl.oracles.scoring import parse_params, read_texts, score_texts

ABUSE = ["You are a stupid idiot and everyone hates you.", "Fuck you, you worthless piece of shit."]
BENIGN = ["Thank you for your help with the article.", "The weather is nice today."]
THROUGHPUT = re.compile(r"scored (\d+) texts in [\d.]+ s \(([\d,]+|inf) texts/s\)")


def _table_scores(out: str) -> list[float]:
    lines = out.strip().splitlines()
    assert lines[0].split() == ["score", "text"]
    return [float(line.split()[0]) for line in lines[1:]]


@pytest.mark.parametrize("kind", ["profanity_check", "jigsaw_bilstm"])
def test_table_separates_abuse_from_benign_and_reports_throughput(run_cli, kind):
    code, out, err = run_cli("oracle", "score", "--oracle", kind, *ABUSE, *BENIGN)
    assert code == 0, err
    scores = _table_scores(out)
    assert len(scores) == 4
    assert all(s > 0.9 for s in scores[:2]) and all(s < 0.2 for s in scores[2:])
    for text in ABUSE + BENIGN:
        assert text in out
    match = THROUGHPUT.search(err)
    assert match and match.group(1) == "4" and kind in err


def test_json_output_is_text_score_records(run_cli):
    code, out, err = run_cli("oracle", "score", "-o", "jigsaw_bilstm", "--json", *ABUSE, *BENIGN)
    assert code == 0, err
    records = json.loads(out)
    assert [r["text"] for r in records] == ABUSE + BENIGN
    expected = build_oracle({"kind": "jigsaw_bilstm"}).score(ABUSE + BENIGN)
    np.testing.assert_allclose([r["score"] for r in records], expected, rtol=0, atol=1e-12)
    assert "texts/s" in err  # throughput stays off stdout, so stdout is pure JSON


def test_file_input_one_text_per_line_skipping_blank_lines(run_cli, tmp_path):
    path = tmp_path / "texts.txt"
    path.write_text(f"{ABUSE[0]}\n\n{BENIGN[0]}\r\n   \n", encoding="utf-8")
    code, out, err = run_cli("oracle", "score", "-o", "profanity_check", "--json", "--file", path)
    assert code == 0, err
    assert [r["text"] for r in json.loads(out)] == [ABUSE[0], BENIGN[0]]


def test_file_dash_reads_stdin(run_cli, monkeypatch):
    monkeypatch.setattr("sys.stdin", io.StringIO("\n".join(BENIGN) + "\n"))
    code, out, err = run_cli("oracle", "score", "-o", "vader", "--json", "-f", "-")
    assert code == 0, err
    assert [r["text"] for r in json.loads(out)] == BENIGN


def test_label_and_param_reach_the_spec(run_cli):
    texts = ["I will kill you and your whole family.", *BENIGN]
    code, out, err = run_cli(
        "oracle", "score", "-o", "jigsaw_bilstm", "--json",
        "--label", "threat", "--label", "insult", "--param", "reduce=mean", *texts,
    )  # fmt: skip
    assert code == 0, err
    oracle = build_oracle(
        {"kind": "jigsaw_bilstm", "labels": ["threat", "insult"], "reduce": "mean"}
    )
    np.testing.assert_allclose(
        [r["score"] for r in json.loads(out)], oracle.score(texts), atol=1e-12
    )


def test_long_and_multiline_texts_stay_on_one_table_line(run_cli):
    long = "word " * 100
    code, out, _ = run_cli("oracle", "score", "-o", "vader", long, "two\nlines")
    assert code == 0
    lines = out.strip().splitlines()
    assert len(lines) == 3
    assert lines[1].endswith("…") and len(lines[1]) < 90
    assert "two\\nlines" in lines[2]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["-o", "vader", "-f", "/no/such/texts.txt"], "/no/such/texts.txt: no such file"),
        (["-o", "nope", "x"], "unknown oracle kind 'nope'"),
        (["-o", "vader"], "give the texts as arguments or with --file"),
        (["-o", "vader", "-p", "measure=bogus", "x"], "measure: Input should be"),
        (
            ["-o", "profanity_check", "--label", "toxic", "x"],
            "labels: Extra inputs are not permitted",
        ),
        (["-o", "jigsaw_bilstm", "--label", "toxc", "x"], "labels.0: Input should be"),
        (["-o", "vader", "-p", "no-equals-sign", "x"], "expected KEY=VALUE"),
    ],
)
def test_bad_input_is_one_message_and_exit_2(run_cli, args, message):
    code, out, err = run_cli("oracle", "score", *args)
    assert code == 2
    assert message in err and "Traceback" not in err
    assert out == ""


def test_empty_file_is_an_error_naming_it(tmp_path):
    path = tmp_path / "empty.txt"
    path.write_text("\n\n", encoding="utf-8")
    with pytest.raises(AttrctlError, match=re.escape(f"{path}: contains no texts")):
        read_texts(path)


def test_score_texts_library_api():
    result = score_texts("vader", ["I hate this.", "Lovely."], {"measure": "neg"})
    assert result.kind == "vader" and result.scores.shape == (2,)
    assert result.scores[0] > 0.5 and result.scores[1] == 0.0
    assert result.load_seconds >= 0 and result.texts_per_second > 0
    assert parse_params(["labels=[threat, insult]", "reduce=mean"]) == {
        "labels": ["threat", "insult"],
        "reduce": "mean",
    }
    with pytest.raises(TypeError):
        score_texts("vader", "a single string")
