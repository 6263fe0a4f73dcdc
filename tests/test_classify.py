"""Classification fine-tuning: templated sources, the label mask, `finetune.objective: classify`
and the ROC-AUC `attrctl eval` reports (on tiny-random)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from attrctl.data.mixture import IGNORE_INDEX, PackingCollator
from attrctl.data.sources import heldout_labelled, load_source
from attrctl.data.template import is_test, labelled_texts
from attrctl.errors import AttrctlError
from attrctl.eval.classify import label_log_odds, roc_auc_ci
from attrctl.policy import load_policy
from attrctl.policy.schema import Template

FORMAT = "Comment: {text}\nToxic:{label}"
WORDS = {0: " no", 1: " yes"}


def labelled_rows(n: int = 60) -> list[dict]:
    """Rows whose label is readable from the text: positives say 'awful', negatives 'lovely'."""
    rows = []
    for i in range(n):
        bad = i % 3 == 0
        word = "awful" if bad else "lovely"
        rows.append(
            {"text": f"what a {word} day number {i}", "label": int(bad), "topic": f"t{i // 2}"}
        )
    return rows


def write_policy(tmp: Path, rows: list[dict], **finetune) -> Path:
    with (tmp / "rows.jsonl").open("w") as fh:
        for r in rows:
            fh.write(json.dumps(r) + "\n")
    (tmp / "prompts.txt").write_text("You are such a\nThe weather today is\n")
    policy = {
        "name": "cls",
        "model": "tiny-random",
        "data": [{"kind": "file", "path": "rows.jsonl", "domain": "comments",
                  "template": {"format": FORMAT, "label_words": WORDS, "split_by": "topic",
                               "test_share": 0.3}}],
        "attributes": [{"name": "toxicity", "oracle": {"kind": "profanity_check"},
                        "head": {"kind": "linear", "rank": 8}}],
        "regularization": {"lam": 1.0},
        "regularizer": {"prompts": ["prompts.txt"], "samples_per_prompt": 2,
                        "max_new_tokens": 4, "epochs": 1, "batch_size": 4},
        "finetune": {"method": "full", "steps": 40, "batch_size": 8, "seq_len": 32,
                     "learning_rate": 3e-3, "checkpoint_every": 40, **finetune},
        "schedule": {"iterations": 1},
        "loss": {"impl": "chunked"},
    }  # fmt: skip
    path = tmp / "cls.yaml"
    path.write_text(json.dumps(policy))
    return path


# ------------------------------------------------------------------------------- the template
def test_template_rows_become_text_that_ends_in_the_label_words(tmp_path):
    policy = load_policy(write_policy(tmp_path, labelled_rows()))
    examples = load_source(policy.data[0], policy)
    _, test = heldout_labelled(policy.data[0], policy)
    # every training text is the format filled in, its label words last and marked as such
    for ex in examples:
        assert ex.text.startswith("Comment: what a ") and ex.label in (" no", " yes")
        assert ex.text.endswith("\nToxic:" + ex.label)
        assert (" awful " in ex.text) == (ex.label == " yes")
    # the split is by topic: no held-out topic has a training row, and both sides are used
    train_topics = {ex.text.split("number ")[1].split("\n")[0] for ex in examples}
    test_topics = {t.group for t in test}
    assert test and len(examples) + len(test) == 60
    assert not {f"t{int(n) // 2}" for n in train_topics} & test_topics
    # the split is a function of the group alone (every policy holds out the same rows)
    assert all(is_test(t.group, 0.3) for t in test)


def test_yaml_int_label_keys_and_labels_of_any_spelling_are_one_label():
    t = Template(format="{text}:{label}", label_words={0: " no", 1: " yes"})
    assert t.label_words == {"0": " no", "1": " yes"} and t.positive_label == "1"
    rows = [{"text": "a", "label": 1}, {"text": "b", "label": "0"}, {"text": "c", "label": 1.0}]
    assert [r.label for r in labelled_texts(rows, t, "x")] == ["1", "0", "1"]


@pytest.mark.parametrize(
    "template, message",
    [
        ({"format": "{text} {label} done"}, "must end with `{label}`"),
        ({"format": "{text}"}, "must end with `{label}`"),
        ({"format": "{label}"}, "must end with `{label}`, once, after some text"),
        ({"format": "{0}{label}"}, "is not a field"),
        ({"format": "{text{label}"}, "template.format"),
        ({"format": "{text}{label}", "positive": "2"}, "is not a key of label_words"),
        ({"format": "{text}{label}", "label_words": {"ok": "a", "bad": "b"}},
         "say which label ROC-AUC counts as positive"),
        ({"format": "{text}{label}", "label_words": {"0": " ", "1": "x"}}, "are empty"),
        ({"format": "{text}{label}", "label_oracle": {"kind": "profanity_check"},
          "label_words": {"no": "n", "yes": "y"}}, "labels are 0 and 1"),
    ],
)  # fmt: skip
def test_bad_templates_are_refused_with_the_field(tmp_path, template, message):
    rows = labelled_rows(6)
    path = write_policy(tmp_path, rows)
    policy = json.loads(path.read_text())
    policy["data"][0]["template"] = {"label_words": WORDS, **template}
    path.write_text(json.dumps(policy))
    with pytest.raises(AttrctlError, match="template") as err:
        load_policy(path)
    assert message in str(err.value)


@pytest.mark.parametrize(
    "rows, message",
    [
        ([{"text": "a", "label": 1, "topic": "x"}, {"text": "b", "topic": "y"}],
         "rows.jsonl:2: no field 'label'"),
        ([{"text": "a", "label": 7, "topic": "x"}], "label 7 in field 'label' has no words"),
        ([{"text": ["a"], "label": 1, "topic": "x"}], "field 'text' holds list"),
    ],
)  # fmt: skip
def test_bad_rows_name_the_file_row_and_field(tmp_path, rows, message):
    policy = load_policy(write_policy(tmp_path, rows))
    with pytest.raises(AttrctlError) as err:
        load_source(policy.data[0], policy)
    assert message in str(err.value) and "rows.jsonl" in str(err.value)


def test_a_txt_file_cannot_be_templated(tmp_path):
    path = write_policy(tmp_path, labelled_rows(6))
    policy = json.loads(path.read_text())
    (tmp_path / "t.txt").write_text("one\n\ntwo\n")
    policy["data"][0]["path"] = "t.txt"
    path.write_text(json.dumps(policy))
    loaded = load_policy(path)
    with pytest.raises(AttrctlError, match="use a jsonl, csv or parquet file"):
        load_source(loaded.data[0], loaded)


def test_classify_needs_a_template_on_every_source(tmp_path):
    path = write_policy(tmp_path, labelled_rows(6), objective="classify")
    policy = json.loads(path.read_text())
    (tmp_path / "plain.txt").write_text("some text\n")
    policy["data"].append({"kind": "file", "path": "plain.txt", "domain": "general"})
    path.write_text(json.dumps(policy))
    with pytest.raises(AttrctlError, match=r"data.1 has no `template`"):
        load_policy(path)


def test_synth_rows_can_be_labelled_by_an_oracle(tmp_path):
    """The offline recipe: synthesized rows, labelled by an oracle's score of prompt + continuation,
    split by prompt."""
    rows = [{"prompt": p, "continuation": c, "prompt_set": "toxic", "prompt_index": i,
             "sample": 0, "scores": {"toxicity": 0.0}}
            for i, (p, c) in enumerate([("You are", " a stupid idiot"), ("The sky", " is blue"),
                                        ("Shut up", " you moron"), ("I like", " gardens")])]  # fmt: skip
    (tmp_path / "synth.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    path = write_policy(tmp_path, labelled_rows(6))
    policy = json.loads(path.read_text())
    policy["data"] = [{"kind": "synth", "path": str(tmp_path / "synth.jsonl"), "domain": "c",
                       "prompts": ["prompts.txt"],
                       "template": {"format": FORMAT, "label_words": WORDS, "split_by": "prompt",
                                    "label_oracle": {"kind": "lexicon",
                                                     "words": ["idiot", "moron"]},
                                    "test_share": 0.0}}]  # fmt: skip
    path.write_text(json.dumps(policy))
    loaded = load_policy(path)
    examples = load_source(loaded.data[0], loaded)
    assert [e.label for e in examples] == [" yes", " no", " yes", " no"]
    assert examples[0].text == "Comment: You are a stupid idiot\nToxic: yes"


# ------------------------------------------------------------------------------ the label mask
def test_the_collator_gives_a_labelled_example_a_row_of_its_own():
    """Label words are marked; a templated example starts a row, is padded after, and a long one
    is cut from the left, so its label tokens are trained from its own text only."""
    from attrctl.data.mixture import labelled_ids
    from attrctl.data.sources import Example
    from attrctl.models import load_model

    tok = load_model("tiny-random").tokenizer
    coll = PackingCollator(tok, seq_len=16, domains=["c"])
    long = "Comment: " + "very " * 30 + "long\nToxic: yes"
    batch = coll([Example("plain text", "c"),
                  Example("Comment: hi\nToxic: yes", "c", label=" yes"),
                  Example("more plain", "c"),
                  Example(long, "c", label=" yes")])  # fmt: skip
    ids, real, marks = batch["input_ids"], batch["labels"] != IGNORE_INDEX, batch["label_mask"]
    yes = tok(" yes", add_special_tokens=False)["input_ids"]
    assert ids.shape[0] == 4  # plain | labelled, padded | plain | long labelled, cut to 16
    for row in (1, 3):  # the labelled rows: text, label words, eos, then padding only
        n = int(real[row].sum())
        assert real[row, :n].all() and not real[row, n:].any()
        assert ids[row, n - 1] == tok.eos_token_id
        assert ids[row, n - 1 - len(yes) : n - 1].tolist() == yes
        assert marks[row].nonzero().flatten().tolist() == list(range(n - 1 - len(yes), n - 1))
    assert not real[0, int(real[0].sum()) :].any()  # the plain row before was closed
    assert int(real[3].sum()) == 16  # cut from the left to the row
    want, _ = labelled_ids(tok, long[: -len(" yes")], " yes", 15)
    assert ids[3, :15].tolist() == want
    assert not marks[real.logical_not()].any() and not marks[[0, 2]].any()


# --------------------------------------------------------------------------- ROC-AUC in eval
@pytest.mark.parametrize("max_len", [63, 6])
def test_label_log_odds_match_the_model_likelihood_of_each_label(max_len):
    """The score is log p(words | text) summed over the words' tokens, the text cut from the
    left to ``max_len`` tokens with the words (as training cuts it)."""
    from attrctl.models import load_model

    loaded = load_model("tiny-random")
    model, tok = loaded.model, loaded.tokenizer
    prefixes = ["Comment: hello there, how are you today\nToxic:", "Comment: x\nToxic:", ""]
    got = label_log_odds(model, tok, prefixes, {"0": " no", "1": " yes sir"}, "1",
                         max_len=max_len)  # fmt: skip

    def logp(prefix, words):  # the whole sequence's log-likelihood, words' part only
        head = tok(prefix, add_special_tokens=False)["input_ids"] or [tok.bos_token_id]
        tail = tok(words, add_special_tokens=False)["input_ids"]
        head = head[max(0, len(head) + len(tail) - max_len) :]
        ids = torch.tensor([head + tail])
        with torch.no_grad():
            lp = torch.log_softmax(model(ids).logits[0].float(), -1)
        return sum(float(lp[len(head) - 1 + j, t]) for j, t in enumerate(tail))

    want = [logp(p, " yes sir") - logp(p, " no") for p in prefixes]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_roc_auc_and_its_group_bootstrap():
    scores = np.array([0.1, 0.2, 0.9, 0.8, 0.3, 0.7])
    positive = np.array([0, 0, 1, 1, 0, 1], dtype=bool)
    value, ci = roc_auc_ci(scores, positive, list("aabbcc"), seed=0, resamples=200)
    assert value == 1.0 and ci == [1.0, 1.0]
    flipped, _ = roc_auc_ci(-scores, positive, list("aabbcc"), seed=0, resamples=200)
    assert flipped == 0.0
    mixed, (lo, hi) = roc_auc_ci(np.array([0.1, 0.9, 0.5, 0.4]), np.array([0, 0, 1, 1], bool),
                                 list("abcd"), seed=0, resamples=500)  # fmt: skip
    assert mixed == 0.5 and lo < 0.5 < hi


@pytest.mark.ci
def test_classify_objective_learns_the_label_and_eval_reports_roc(tmp_path, run_cli):
    """`classify` trains on the label words alone: after 40 steps the held-out ROC-AUC is near 1,
    far above the untrained model's on the same rows, while the text before the label stays
    untrained (its CE far above the sft objective's on the same rows)."""
    rows = labelled_rows()
    policy = write_policy(tmp_path, rows, objective="classify")
    code, _, err = run_cli("train", "-p", policy, "--out", tmp_path / "run", "-q")
    assert code == 0, err
    code, out, err = run_cli("eval", tmp_path / "run", "-k", "1", "--max-new-tokens", "2",
                             "--ppl-tokens", "0", "--mc-examples", "0",
                             "--prompts", tmp_path / "prompts.txt")  # fmt: skip
    assert code == 0, err
    assert "classification ROC-AUC" in out
    result = json.loads((tmp_path / "run" / "eval.json").read_text())
    (cls,) = result["classification"].values()
    assert cls["texts"] > 0 and 0 < cls["positives"] < cls["texts"]
    assert cls["roc_auc"]["value"] > 0.9, cls

    code, _, err = run_cli("eval", "tiny-random", "--policy", policy, "-k", "1",
                           "--max-new-tokens", "2", "--ppl-tokens", "0", "--mc-examples", "0",
                           "--prompts", tmp_path / "prompts.txt", "-o", tmp_path / "base")  # fmt: skip
    assert code == 0, err
    base = json.loads((tmp_path / "base" / "eval.json").read_text())
    (base_cls,) = base["classification"].values()
    assert base_cls["texts"] == cls["texts"]  # the same held-out rows
    assert base_cls["roc_auc"]["value"] < cls["roc_auc"]["value"] - 0.2

    from attrctl.report import build_report

    detail = build_report([tmp_path / "run" / "eval.json", tmp_path / "base" / "eval.json"]).control
    assert "| ROC-AUC |" in detail and "| cls | 1.000 (1.000–1.000) |" in detail, detail

    state = json.loads((tmp_path / "run" / "state.json").read_text())
    assert state["jobs"]["finetune/1"]["objective"] == "classify"
    # the text before the label is not trained under classify; under sft it is
    sft = write_policy(tmp_path, rows, objective="sft")
    code, _, err = run_cli("train", "-p", sft, "--out", tmp_path / "sft", "-q")
    assert code == 0, err
    text_ce = {name: _prefix_ce(tmp_path / name, rows) for name in ("run", "sft")}
    assert text_ce["run"] > text_ce["sft"] + 1.0, text_ce


def _prefix_ce(run: Path, rows: list[dict]) -> float:
    """Mean CE of a run's final model on the templated text before the label words."""
    from attrctl.models import load_model
    from attrctl.train.rundir import open_finished_run

    loaded = load_model(str(open_finished_run(run).model_dir))
    total, n = 0.0, 0
    for r in rows[:12]:
        ids = loaded.tokenizer(FORMAT.format(text=r["text"], label=""), add_special_tokens=False)
        ids = torch.tensor([ids["input_ids"]])
        with torch.no_grad():
            total += float(loaded.model(ids, labels=ids).loss)
        n += 1
    return total / n


# ------------------------------------------------------------------------- shipped policies
CLS_POLICIES = ("toxicity_cls", "toxicity_cls_sft", "toxicity_cls_classify")


@pytest.mark.parametrize("name", CLS_POLICIES)
def test_classification_policies_read_the_default_runs_rows(name):
    """Each classification row templates the default run's synthesized rows: the settings its
    synth source would write rows with are those rows' (else training refuses the file)."""
    from attrctl.data.synth_file import row_settings

    default, policy = load_policy("toxicity"), load_policy(name)
    assert policy.data[0].path == "runs/toxicity/data/synth.jsonl"
    assert row_settings(policy, policy.data[0]) == row_settings(default, default.data[0])


def test_classification_rows_differ_only_in_their_objective():
    from attrctl.policy.show import resolved_dict

    rows = {n: resolved_dict(load_policy(n)) for n in CLS_POLICIES}
    objectives = {}
    for name, d in rows.items():
        for key in ("name", "description"):
            d.pop(key)
        objectives[name] = d["finetune"].pop("objective")
    assert objectives == {"toxicity_cls": "regularized", "toxicity_cls_sft": "sft",
                          "toxicity_cls_classify": "classify"}  # fmt: skip
    assert rows["toxicity_cls"] == rows["toxicity_cls_sft"] == rows["toxicity_cls_classify"]


def test_eval_refuses_a_templated_source_with_a_bad_row(tmp_path, run_cli):
    """A templated source with a bad row fails `attrctl eval`, naming file and row; nothing written."""
    path = write_policy(tmp_path, [*labelled_rows(6), {"text": "x", "label": 7, "topic": "t9"}])
    code, _, err = run_cli("eval", "tiny-random", "--policy", path, "-k", "1",
                           "--prompts", tmp_path / "prompts.txt", "-o", tmp_path / "out")  # fmt: skip
    assert code != 0 and "rows.jsonl: line 7: label 7 in field 'label' has no words" in err
    assert not (tmp_path / "out").exists()


def test_text_field_is_refused_beside_a_template(tmp_path):
    path = write_policy(tmp_path, labelled_rows(6))
    policy = json.loads(path.read_text())
    policy["data"][0]["text_field"] = "body"
    path.write_text(json.dumps(policy))
    with pytest.raises(AttrctlError, match="text_field is not read when a template"):
        load_policy(path)


def test_the_held_out_rows_do_not_depend_on_the_objective_or_on_dropped_rows(tmp_path):
    """The filter objective drops flagged synth rows from training, not from the test split; and
    without split_by a row's side is a function of its content, not of its position."""
    rows = [{"prompt": f"p{i} ", "continuation": c, "prompt_set": "toxic", "prompt_index": i,
             "sample": 0, "scores": {"toxicity": s}}
            for i, (c, s) in enumerate([("idiot", 0.9), ("nice", 0.1)] * 20)]  # fmt: skip
    (tmp_path / "synth.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    path = write_policy(tmp_path, labelled_rows(6))
    policy = json.loads(path.read_text())
    policy["data"] = [{"kind": "synth", "path": str(tmp_path / "synth.jsonl"), "domain": "c",
                       "prompts": ["prompts.txt"],
                       "template": {"format": FORMAT, "label_words": WORDS, "test_share": 0.3,
                                    "label_oracle": {"kind": "lexicon", "words": ["idiot"]}}}]  # fmt: skip
    held = {}
    for objective in ("sft", "filter"):
        policy["finetune"]["objective"] = objective
        path.write_text(json.dumps(policy))
        loaded = load_policy(path)
        held[objective] = heldout_labelled(loaded.data[0], loaded)[1]
        train = load_source(loaded.data[0], loaded)
        assert (objective == "filter") == all(e.label == " no" for e in train)
    assert held["sft"] == held["filter"] and {t.label for t in held["sft"]} == {"0", "1"}
