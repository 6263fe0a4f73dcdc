"""The lexicon and regex oracles, and third-party oracle kinds through entry points."""

from __future__ import annotations

import sys
import textwrap
from importlib.metadata import EntryPoint

import numpy as np
import pytest

from attrctl.errors import AttrctlError
from attrctl.oracles import build_oracle, oracle_kinds, plugin_entry_points
from attrctl.policy.load import validate_policy


def test_lexicon_matches_whole_words_case_insensitively():
    oracle = build_oracle({"kind": "lexicon", "words": ["ass", "shut up"]})
    scores = oracle.score(["You ASS!", "a classic class", "Shut   up", "shut up, please", "passé"])
    assert scores.tolist() == [1.0, 0.0, 0.0, 1.0, 0.0]


def test_lexicon_weights_combine_as_noisy_or():
    oracle = build_oracle({"kind": "lexicon", "words": {"dumb": 0.5, "stupid": 0.5}})
    assert oracle.score(["dumb", "dumb dumb", "dumb and stupid", "fine"]).tolist() == [
        0.5,
        0.5,  # repeats of one entry count once
        0.75,
        0.0,
    ]


def test_lexicon_case_sensitive_and_non_word_entries():
    oracle = build_oracle({"kind": "lexicon", "words": ["F*ck", "Bob"], "case_sensitive": True})
    assert oracle.score(["f*ck", "F*ck!", "bob", "Bob."]).tolist() == [0.0, 1.0, 0.0, 1.0]


def test_lexicon_word_list_file(tmp_path):
    path = tmp_path / "words.txt"
    path.write_text("# a comment\nidiot\nmoron\t0.25\n\n")
    oracle = build_oracle({"kind": "lexicon", "path": str(path)})
    assert oracle.score(["idiot", "moron", "hello"]).tolist() == [1.0, 0.25, 0.0]


def test_lexicon_bad_word_list_names_file_and_line(tmp_path):
    path = tmp_path / "words.txt"
    path.write_text("idiot\nmoron\tlots\n")
    with pytest.raises(AttrctlError, match=r"words.txt:2: weight 'lots'"):
        build_oracle({"kind": "lexicon", "path": str(path)})


def test_regex_pii_policy_flags_emails_and_phones():
    from attrctl.policy import compile_policy, load_policy

    oracle = compile_policy(load_policy("no_pii")).attributes[0].oracle
    texts = [
        "write to jane.doe@example.org today",
        "call me at (555) 123-4567",
        "my SSN is 123-45-6789",
        "card 4111 1111 1111 1111",
        "the year 2024 had 365 days",
        "version 1.2.3 released",
    ]
    assert oracle.score(texts).tolist() == [1, 1, 1, 1, 0, 0]
    assert oracle.find(texts[0]) == ["email"]


def test_regex_list_patterns_and_case():
    oracle = build_oracle({"kind": "regex", "patterns": [r"\bsecret\b"], "case_sensitive": True})
    assert oracle.score(["a secret", "a SECRET"]).tolist() == [1.0, 0.0]


def test_scores_are_batched_and_shaped():
    oracle = build_oracle({"kind": "lexicon", "words": ["x"]})
    oracle.batch_size = 3  # force several batches
    texts = [f"{'x' if i % 2 else 'y'} {i}" for i in range(10)]
    assert np.array_equal(oracle.score(texts), np.array([i % 2 for i in range(10)], float))
    with pytest.raises(TypeError):
        oracle.score("a single string")


@pytest.fixture
def plugin(tmp_path, monkeypatch):
    """A third-party package registering oracle kind `shouting` through the entry-point group."""
    pkg = tmp_path / "shout_oracle.py"
    pkg.write_text(
        textwrap.dedent(
            """
            from typing import Literal
            import numpy as np
            from pydantic import Field
            from attrctl.oracles.base import Oracle
            from attrctl.strict import StrictModel

            class ShoutSpec(StrictModel):
                kind: Literal["shouting"] = "shouting"
                min_ratio: float = Field(0.5, gt=0, le=1)

            class ShoutOracle(Oracle):
                kind = "shouting"
                Spec = ShoutSpec

                def score_batch(self, texts):
                    out = []
                    for t in texts:
                        letters = [c for c in t if c.isalpha()]
                        upper = sum(c.isupper() for c in letters) / max(len(letters), 1)
                        out.append(float(upper >= self.spec.min_ratio))
                    return np.array(out)
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    ep = EntryPoint(name="shouting", value="shout_oracle:ShoutOracle", group="attrctl.oracles")
    plugin_entry_points.cache_clear()
    monkeypatch.setattr(
        "attrctl.oracles.entry_points", lambda group: [ep] if group == "attrctl.oracles" else []
    )
    yield
    plugin_entry_points.cache_clear()
    sys.modules.pop("shout_oracle", None)


def test_plugin_oracle_kind_is_usable_from_a_policy(plugin, minimal_policy, tmp_path):
    assert "shouting" in oracle_kinds()
    minimal_policy["attributes"][0]["oracle"] = {"kind": "shouting", "min_ratio": 0.8}
    policy = validate_policy(minimal_policy, source=tmp_path / "p.yaml")
    from attrctl.policy import compile_policy

    oracle = compile_policy(policy).attributes[0].oracle
    assert oracle.score(["STOP YELLING", "calm words", "MOSTLY upper CASE"]).tolist() == [1, 0, 0]


def test_plugin_parameters_are_validated_strictly(plugin, minimal_policy, tmp_path, run_cli):
    import yaml

    minimal_policy["attributes"][0]["oracle"] = {"kind": "shouting", "min_ration": 0.8}
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(minimal_policy))
    code, _, err = run_cli("policy", "validate", path)
    assert code == 2
    assert "attributes[0].oracle" in err and "min_ration" in err
