"""The memory planner (``attrctl memory``, :mod:`attrctl.memory`): counts checked against real
models, the sharding arithmetic, and the table in docs/training.md."""

from __future__ import annotations

from pathlib import Path

import pytest

from attrctl.memory import KNOWN, plan, plans_for, shape_of, trained_params

DOCS = Path(__file__).resolve().parents[1] / "docs" / "training.md"
DOC_COMMAND = ("memory", "--model", "llama2-7b", "--gpus", "8", "--set", "finetune.seq_len=1024")


def test_parameter_counts_match_real_models():
    from attrctl.models import load_model

    model = load_model("tiny-random").model
    assert shape_of("tiny-random").params == model.num_parameters()
    assert KNOWN["llama2-7b"].params == pytest.approx(6.738e9, rel=1e-3)  # published: 6.74 B
    assert KNOWN["smollm2-135m"].params == pytest.approx(134.5e6, rel=1e-3)


def test_trained_parameter_counts_match_what_the_fine_tune_trains():
    from peft import LoraConfig, get_peft_model

    from attrctl.models import load_model
    from attrctl.policy import compile_policy, load_policy
    from attrctl.train.weights import select_trainable

    shape = shape_of("tiny-random")
    pol = load_policy("toxicity", ["model=tiny-random", "finetune.top_layers=1"])
    model = select_trainable(load_model("tiny-random").model, compile_policy(pol))
    real = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trained_params(shape, "top_layers", 1, 8, ["q_proj"]) == real
    lora = get_peft_model(
        load_model("tiny-random").model,
        LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"]),
    )
    real = sum(p.numel() for p in lora.parameters() if p.requires_grad)  # fmt: skip
    assert trained_params(shape, "lora", 2, 4, ["q_proj", "v_proj", "down_proj"]) == real


def test_sharding_and_checkpointing_arithmetic():
    shape = KNOWN["llama2-7b"]
    common = {"dtype": "float32", "batch": 8, "seq": 1024, "method": "full"}
    one = plan(shape, label="1", gpus=1, sharding="none", **common)
    ddp = plan(shape, label="ddp", gpus=8, sharding="none", **common)
    fsdp = plan(shape, label="fsdp", gpus=8, sharding="fsdp", **common)
    assert one.adamw == 2 * one.gradients == 2 * one.weights  # fp32: 4 + 4 + 8 bytes a param
    assert (ddp.weights, ddp.gradients, ddp.adamw) == (one.weights, one.gradients, one.adamw)
    assert fsdp.weights == one.weights / 8 and fsdp.adamw == one.adamw / 8
    assert ddp.activations < one.activations  # each rank holds an eighth of the batch
    ckpt = plan(shape, label="c", gpus=1, sharding="none", gradient_checkpointing=True, **common)
    assert ckpt.activations < one.activations / 4
    assert one.total / 2**30 > 80 > fsdp.total / 2**30  # why FSDP: 7B fp32 full fits no H100
    bf16 = plan(shape, label="b", gpus=1, sharding="none", **{**common, "dtype": "bfloat16"})
    assert bf16.weights == one.weights / 2
    assert (
        len(
            plans_for(
                shape,
                gpus=1,
                dtype="float32",
                batch=8,
                seq=64,
                top_layers=4,
                lora_r=8,
                lora_targets=("q_proj",),
                gradient_checkpointing=False,
            )
        )
        == 3
    )


def test_the_docs_table_is_the_commands_output(run_cli):
    code, out, err = run_cli(*DOC_COMMAND)
    assert code == 0, err
    assert out.strip() in DOCS.read_text(), "regenerate the table in docs/training.md"


def test_unknown_model_is_a_clear_error(run_cli):
    code, _, err = run_cli("memory", "--model", "./no/such/folder")
    assert code == 2 and "known shapes" in err and "Traceback" not in err
