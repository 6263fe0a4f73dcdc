"""Any causal LM, not only Llama: the architecture matrix (:mod:`attrctl.models.arch`).

Each case is a seeded tiny random model of one architecture a user would bring, saved as a local
model folder with the tiny tokenizer (with or without a BOS token), driven through what a user
runs: ``train`` (sequential, one iteration: sample, fit, fine-tune), ``generate --guided``,
``eval`` and ``export``, whose folder ``AutoModelForCausalLM.from_pretrained`` loads back with the
run's weights. Architectures attrctl cannot handle are refused with a message naming them.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers as tf
from safetensors.torch import load_file
from tiny_runs import tiny_eval
from transformers import AutoModelForCausalLM, AutoTokenizer

from attrctl.models.load import TINY_TOKENIZER_DIR

SMALL = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 3,
         "num_attention_heads": 4, "max_position_embeddings": 128}  # fmt: skip

# name: (config class, config fields, tokenizer adds a BOS)
ARCHS = {
    "llama": (tf.LlamaConfig, {**SMALL, "num_key_value_heads": 2}, True),
    "qwen2": (tf.Qwen2Config, {**SMALL, "num_key_value_heads": 2, "tie_word_embeddings": False},
              False),
    "gemma": (tf.GemmaConfig, {**SMALL, "num_key_value_heads": 1, "head_dim": 8,
                               "tie_word_embeddings": True}, True),
    "gpt_neox": (tf.GPTNeoXConfig, {**SMALL, "tie_word_embeddings": False}, False),
    "falcon": (tf.FalconConfig, {"hidden_size": 32, "num_hidden_layers": 3,
                                 "num_attention_heads": 4, "tie_word_embeddings": True}, False),
    "gpt2": (tf.GPT2Config, {"n_embd": 32, "n_layer": 3, "n_head": 4, "n_positions": 128,
                             "tie_word_embeddings": True}, False),
}  # fmt: skip


def tiny_model_folder(folder: Path, arch: str) -> Path:
    """A seeded random model of ``arch`` with the tiny tokenizer, as ``save_pretrained`` writes."""
    cls, fields, adds_bos = ARCHS[arch]
    extra = {"bos_token": "<|im_start|>", "add_bos_token": True} if adds_bos else {}
    tok = AutoTokenizer.from_pretrained(str(TINY_TOKENIZER_DIR), **extra)
    ids = {"bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id,
           "pad_token_id": tok.pad_token_id}  # fmt: skip
    config = cls(vocab_size=len(tok), **fields, **ids)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def policy(tmp: Path, model: Path) -> Path:
    (tmp / "general.txt").write_text("\n\n".join(["The library opens at nine on weekdays."] * 24))
    (tmp / "prompts.txt").write_text("You are such a\nThe weather today is\nI think that you\n")
    data = {
        "name": "arch",
        "model": str(model),
        "data": [{"kind": "file", "path": "general.txt", "domain": "general"}],
        "attributes": [{"name": "toxicity", "oracle": {"kind": "profanity_check"},
                        "head": {"kind": "linear", "rank": 8}}],
        "regularization": {"lam": 1.0},
        "regularizer": {"prompts": ["prompts.txt"], "samples_per_prompt": 2,
                        "max_new_tokens": 4, "epochs": 1, "batch_size": 4},
        "finetune": {"method": "top_layers", "top_layers": 1, "steps": 2, "batch_size": 2,
                     "seq_len": 16, "learning_rate": 1e-2},
        "schedule": {"mode": "sequential", "iterations": 1},
        "loss": {"impl": "chunked"},
    }  # fmt: skip
    path = tmp / "arch.yaml"
    path.write_text(json.dumps(data))
    return path


@pytest.mark.ci
@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_train_generate_eval_export(arch, run_cli, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    folder = tiny_model_folder(tmp_path / "model", arch)
    run, out = tmp_path / "run", tmp_path / "export"
    code, _, err = run_cli("train", "-p", policy(tmp_path, folder), "--out", run, "-q")
    assert code == 0, err
    state = json.loads((run / "state.json").read_text())["jobs"]
    assert state["fit/1"]["fitted"] and state["finetune/1"]["steps"] == 2
    trained = load_file(str(run / "model" / "iter_1" / "trainable.safetensors"))
    assert trained, "top_layers trained nothing"

    code, text, err = run_cli("generate", run, "You are such a", "-n", "2",
                              "--max-new-tokens", "4", "--guided")  # fmt: skip
    assert code == 0, err
    assert text.strip()

    result = tiny_eval(run_cli, run, tmp_path)
    assert result["generation"]["ppl"] > 1

    code, _, err = run_cli("export", run, "--out", out)
    assert code == 0, err
    back = AutoModelForCausalLM.from_pretrained(out)
    params = dict(back.named_parameters())
    for name, tensor in trained.items():  # the export holds the fine-tuned weights
        assert torch.equal(params[name], tensor), name
    original = dict(AutoModelForCausalLM.from_pretrained(folder).named_parameters())
    assert any(not torch.equal(original[n], t) for n, t in trained.items())


@pytest.mark.parametrize(
    ("cls", "fields", "said"),
    [
        (tf.Gemma2Config, {**SMALL, "num_key_value_heads": 1, "head_dim": 8},
         "final_logit_softcapping"),
        (tf.T5Config, {"d_model": 32, "d_ff": 64, "num_layers": 2, "num_heads": 4},
         "T5Config is not a causal language model"),
    ],
    ids=["gemma2-softcap", "t5"],
)  # fmt: skip
def test_unsupported_architecture_is_refused_by_name(cls, fields, said, run_cli, tmp_path,
                                                     monkeypatch):  # fmt: skip
    monkeypatch.chdir(tmp_path)
    tok = AutoTokenizer.from_pretrained(str(TINY_TOKENIZER_DIR))
    folder = tmp_path / "model"
    config = cls(vocab_size=len(tok), **fields)
    try:
        model = AutoModelForCausalLM.from_config(config)
    except ValueError:  # no causal-LM class at all: build what a user would have saved
        model = tf.AutoModelForSeq2SeqLM.from_config(config)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    code, _, err = run_cli("train", "-p", policy(tmp_path, folder), "--out", tmp_path / "r", "-q")
    assert code != 0
    assert said in err and "Traceback" not in err, err
