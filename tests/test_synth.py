"""`attrctl data synth`: per-row seeded sampling, labelling, resumption after interruptions."""

from __future__ import annotations

import json

import pytest
import torch

from attrctl.data.synth import read_rows, synthesize
from attrctl.errors import AttrctlError
from attrctl.policy.schema import Policy
from attrctl.sampling import prompt_token_ids, row_seed, sample_continuations

LIMIT = 3  # prompts per set → 2 sets × 3 prompts × 2 samples = 12 rows in batches of 5


@pytest.fixture(scope="module")
def tiny():
    from attrctl.models import load_model

    return load_model("tiny-random")


TOX = {"kind": "regex", "patterns": ["[aeiou]{1}"]}


def make_policy(tmp_path, seed=0, oracle=TOX, target=None, **synth) -> Policy:
    src = {"kind": "synth", "domain": "toxic", "samples_per_prompt": 2, "max_new_tokens": 6}
    raw = {
        "name": "t",
        "model": "tiny-random",
        "data": [{**src, "batch_size": 5, **synth}],
        "attributes": [
            # two attributes: `score` mirrors the first, `scores` holds both
            {"name": "tox", "oracle": oracle, **({"target": target} if target else {})},
            {"name": "caps", "oracle": {"kind": "regex", "patterns": ["[A-Z]"]}},
        ],
        "output_dir": str(tmp_path / "run"),
        "seed": seed,
    }
    return Policy.model_validate(raw, context={"base_dir": tmp_path})


def run(policy, out, tiny, **kw):
    return synthesize(policy, out, model=tiny, limit=LIMIT, progress=False, **kw)


def test_rows_are_labelled_and_complete(tmp_path, tiny):
    out = tmp_path / "s.jsonl"
    rep = run(make_policy(tmp_path), out, tiny)
    rows = read_rows(out)
    assert rep.rows_written == rep.rows_total == len(rows) == 12 and rep.complete
    keys = [(r["prompt_set"], r["prompt_index"], r["sample"]) for r in rows]
    assert keys == [(s, p, k) for s in ("toxic", "neutral") for p in range(3) for k in range(2)]
    for r in rows:
        assert r["score"] == r["scores"]["tox"] and set(r["scores"]) == {"tox", "caps"}
        want = float(any(c in "aeiou" for c in r["continuation"]))  # the regex oracle is 0/1
        assert r["score"] == want
        assert r["domain"] == "toxic" and r["model"] == "tiny-random" and r["seed"] == 0
        assert 0 <= r["new_tokens"] <= 6
    assert rep.per_set["toxic"]["rows"] == 6
    assert rep.new_tokens == sum(r["new_tokens"] for r in rows)
    # samples of one prompt differ (each row has its own seed)
    assert rows[0]["continuation"] != rows[1]["continuation"]


def test_same_seed_same_file_other_seed_other_rows(tmp_path, tiny):
    a, b, c = (tmp_path / f"{x}.jsonl" for x in "abc")
    run(make_policy(tmp_path), a, tiny)
    run(make_policy(tmp_path), b, tiny)
    run(make_policy(tmp_path, seed=1), c, tiny)
    assert a.read_bytes() == b.read_bytes()
    conts = lambda p: [r["continuation"] for r in read_rows(p)]  # noqa: E731
    assert conts(a) != conts(c)


def test_stopped_run_resumes_to_the_uninterrupted_file(tmp_path, tiny):
    full, part = tmp_path / "full.jsonl", tmp_path / "part.jsonl"
    run(make_policy(tmp_path), full, tiny)
    first = run(make_policy(tmp_path), part, tiny, stop_after=1)
    assert first.rows_written == 5 and not first.complete
    rest = run(make_policy(tmp_path), part, tiny)
    assert rest.rows_written == 7 and rest.complete
    assert part.read_bytes() == full.read_bytes()
    again = run(make_policy(tmp_path), part, tiny)  # nothing left: no duplicates
    assert again.rows_written == 0 and part.read_bytes() == full.read_bytes()
    # every row records the settings that made it, the same for all rows
    rows = read_rows(part)
    assert len({r["fingerprint"] for r in rows}) == 1 and len(rows[0]["fingerprint"]) == 16
    assert rows[0]["labelled_by"]["tox"]["oracle"] == "regex"
    assert rows[0]["labelled_by"]["tox"]["max_violation"] == 0.5


def test_half_written_line_is_dropped_and_regenerated(tmp_path, tiny):
    full, part = tmp_path / "full.jsonl", tmp_path / "part.jsonl"
    run(make_policy(tmp_path), full, tiny)
    data = full.read_bytes()
    lines = data.splitlines(keepends=True)
    # interrupted inside row 7 (the middle of the second batch of 5)
    cut = sum(map(len, lines[:7])) + len(lines[7]) // 2
    part.write_bytes(data[:cut])
    rep = run(make_policy(tmp_path), part, tiny)
    assert rep.dropped_partial_line
    assert rep.rows_written == 5  # rows 7..11: the rest of batch 2 and batch 3
    assert part.read_bytes() == data


def test_other_settings_or_corrupt_rows_refuse_to_append(tmp_path, tiny):
    out = tmp_path / "s.jsonl"
    run(make_policy(tmp_path), out, tiny)
    before = out.read_bytes()
    with pytest.raises(AttrctlError, match=r"other settings \(seed: 0 in the file vs 1 now\)"):
        run(make_policy(tmp_path, seed=1), out, tiny)
    with pytest.raises(AttrctlError, match="gen"):
        run(make_policy(tmp_path, max_new_tokens=7), out, tiny)
    assert out.read_bytes() == before  # nothing written is lost
    lines = before.splitlines(keepends=True)
    out.write_bytes(b"".join([*lines[:3], b"{oops\n", *lines[3:]]))
    with pytest.raises(AttrctlError, match=r"s\.jsonl:4: corrupt row"):
        run(make_policy(tmp_path), out, tiny)


def interrupted(tmp_path, tiny, **policy) -> tuple:
    """A run stopped after its first batch: (file, its bytes)."""
    out = tmp_path / "s.jsonl"
    assert run(make_policy(tmp_path, **policy), out, tiny, stop_after=1).rows_written == 5
    return out, out.read_bytes()


def test_resume_under_another_oracle_refuses(tmp_path, tiny):
    # The issue: interrupted under one oracle, resumed under another, labels silently mixed.
    out, before = interrupted(tmp_path, tiny)
    lexicon = {"kind": "lexicon", "words": ["the"]}
    with pytest.raises(AttrctlError) as err:
        run(make_policy(tmp_path, oracle=lexicon), out, tiny)
    msg = str(err.value)
    assert msg.startswith(f"{out}:1: the file was written with other settings")
    assert "oracle of attribute 'tox': regex in the file vs lexicon now" in msg
    assert "pass another --out, or delete the file" in msg
    # the same kind with other parameters
    other = {"kind": "regex", "patterns": ["[xyz]"]}
    with pytest.raises(AttrctlError, match=r"oracle of attribute 'tox': regex with other param"):
        run(make_policy(tmp_path, oracle=other), out, tiny)
    assert out.read_bytes() == before


def test_resume_after_the_word_list_changed_refuses(tmp_path, tiny):
    words = tmp_path / "words.txt"
    words.write_text("the\n")
    out, before = interrupted(tmp_path, tiny, oracle={"kind": "lexicon", "path": "words.txt"})
    words.write_text("the\nidiot\n")  # same spec, other contents
    with pytest.raises(AttrctlError, match=r"s\.jsonl:1: .*oracle of attribute 'tox': lexicon"):
        run(make_policy(tmp_path, oracle={"kind": "lexicon", "path": "words.txt"}), out, tiny)
    assert out.read_bytes() == before


def test_resume_with_another_target_refuses(tmp_path, tiny):
    out, before = interrupted(tmp_path, tiny)
    with pytest.raises(AttrctlError, match=r"target of attribute 'tox': .*0\.5.* in the file vs "):
        run(make_policy(tmp_path, target={"max_violation": 0.7}), out, tiny)
    with pytest.raises(AttrctlError, match=r"target of attribute 'tox': .*'hard'.*'soft'"):
        run(make_policy(tmp_path, target={"labels": "soft"}), out, tiny)
    assert out.read_bytes() == before


def test_resume_with_an_edited_prompt_file_refuses(tmp_path, tiny):
    prompts = tmp_path / "mine.txt"
    prompts.write_text("Shut up, you\nThe weather today\nI told him that\n")
    out, before = interrupted(tmp_path, tiny, prompts=["mine.txt"])  # rows of prompts 0..2
    prompts.write_text("Shut up, you\nThe weather tomorrow\nI told him that\n")
    with pytest.raises(AttrctlError) as err:
        run(make_policy(tmp_path, prompts=["mine.txt"]), out, tiny)
    assert str(err.value).startswith(f"{out}:3: ")  # rows 1-2 are prompt 0, still the same
    assert "prompt 1 of set 'mine.txt': 'The weather today' in the file vs 'The weather " in str(
        err.value
    )
    prompts.write_text("Shut up, you\n")  # prompts 1 and 2 are gone
    with pytest.raises(AttrctlError, match=r"prompt 1 of set 'mine\.txt': .* vs none now"):
        run(make_policy(tmp_path, prompts=["mine.txt"]), out, tiny)
    assert out.read_bytes() == before
    prompts.write_text("Shut up, you\nThe weather today\nI told him that\nMore\n")  # appended
    assert run(make_policy(tmp_path, prompts=["mine.txt"]), out, tiny).complete


def test_file_without_fingerprints_refuses(tmp_path, tiny):
    out, _ = interrupted(tmp_path, tiny)
    rows = [
        {k: v for k, v in r.items() if k not in ("fingerprint", "labelled_by")}
        for r in read_rows(out)
    ]
    out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    before = out.read_bytes()
    with pytest.raises(AttrctlError, match=r"s\.jsonl:1: .*before synth rows recorded"):
        run(make_policy(tmp_path), out, tiny)
    assert out.read_bytes() == before


def test_a_row_does_not_depend_on_its_batch(tiny):
    # The same (prompt, seed) alone and left-padded next to a longer prompt: the attention mask
    # must make padding invisible, and the row's generator is its own. (Llama's RoPE is
    # shift-invariant, so this checks the mask, not the position ids.)
    alone = sample_continuations(
        tiny.model, tiny.tokenizer, ["Shut up, you"], [7], max_new_tokens=8
    )
    batched = sample_continuations(
        tiny.model,
        tiny.tokenizer,
        ["a much longer prompt that forces left padding on the other row", "Shut up, you"],
        [123, 7],
        max_new_tokens=8,
    )
    assert batched[1] == alone[0]
    assert row_seed(0, "toxic", 1, 0) != row_seed(0, "toxic", 1, 1) != row_seed(1, "toxic", 1, 0)
    assert row_seed(0, "/a/b/mine.txt", 1, 0) == row_seed(0, "/c/mine.txt", 1, 0)


def test_an_empty_prompt_starts_from_bos_alone_or_in_a_batch(tiny):
    # "" encodes to no token with this tokenizer; the row starts from BOS/EOS (as generate does
    # without input) instead of a zero-length forward, and still ignores its batch-mates.
    tok = tiny.tokenizer
    assert tok("")["input_ids"] == []
    start = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
    assert prompt_token_ids(tok, ["", "Shut up"])[0] == [start]
    alone = sample_continuations(tiny.model, tok, [""], [5], max_new_tokens=8)
    batched = sample_continuations(tiny.model, tok, ["Shut up, you", ""], [9, 5], max_new_tokens=8)
    assert len(alone[0]) > 0 and batched[1] == alone[0]


def test_near_zero_temperature_matches_greedy_decoding(tiny):
    # Sampling at T→0 is argmax: the cached loop must agree with transformers' own greedy search.
    prompts = ["He looked at me and said", "The weather forecast"]
    ours = sample_continuations(
        tiny.model, tiny.tokenizer, prompts, [0, 1], max_new_tokens=6, temperature=1e-6
    )
    enc = tiny.tokenizer(prompts, return_tensors="pt", padding=True)
    with torch.inference_mode():
        ref = tiny.model.generate(
            **enc, do_sample=False, max_new_tokens=6, pad_token_id=tiny.tokenizer.pad_token_id
        )[:, enc["input_ids"].shape[1] :]
    for mine, theirs in zip(ours, ref.tolist(), strict=True):
        assert mine == theirs[: len(mine)] and len(mine) > 0


def test_cli_synth_writes_rows_and_rejects_bad_input(tmp_path, run_cli):
    policy = tmp_path / "p.yaml"
    policy.write_text(
        "name: p\nmodel: tiny-random\n"
        "data: [{kind: synth, domain: toxic, samples_per_prompt: 1, max_new_tokens: 4}]\n"
        "attributes: [{name: tox, oracle: {kind: lexicon, words: [idiot]}}]\n"
    )
    out = tmp_path / "o.jsonl"
    code, stdout, _ = run_cli(
        "data", "synth", "--policy", policy, "--out", out, "--limit", "2", "-q"
    )
    assert code == 0 and "4 rows (4 new" in stdout and "toxic" in stdout
    assert len(read_rows(out)) == 4
    code, _, err = run_cli(
        "data", "synth", "--policy", policy, "--out", out, "--set", "seed=3", "-q"
    )
    assert code == 2 and "other settings" in err and "Traceback" not in err
    policy.write_text(
        policy.read_text().replace("{kind: lexicon, words: [idiot]}", "{kind: vader}")
    )
    code, _, err = run_cli("data", "synth", "--policy", policy, "--out", out, "-q")
    assert code == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert "oracle of attribute 'tox': lexicon in the file vs vader now" in err
    code, _, err = run_cli("data", "synth", "--policy", tmp_path / "missing.yaml", "-q")
    assert code == 2 and "missing.yaml" in err
    assert json.loads(out.read_text().splitlines()[0])["prompt_set"] == "toxic"
