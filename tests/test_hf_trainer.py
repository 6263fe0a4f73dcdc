"""The regularizer inside transformers' Trainer and TRL's SFTTrainer (:mod:`attrctl.hf`).

One tiny attrctl run (tiny-random, fitted heads) supplies the heads and the reference: the same
batches, λ, seed and steps through ``Trainer`` with the patched forward give the losses and weights
of attrctl's own fine-tune loop. Tolerances: losses 1e-6 relative; weights 1e-4 absolute per
element and 1e-6 in the mean. Both sides compute the same fp32 operations, but the Trainer sums
the loss over tokens and divides by its count (``num_items_in_batch``) where attrctl's loop takes
the mean, so gradients differ in their last bits; AdamW divides each gradient by its running RMS,
which turns those bits into a visible update only for the few elements whose gradient is near
zero (at most ~1% of one step's learning rate of 1e-2 here). A wrong λ, a missing KL or a
mis-normalised loss moves the weights by far more: the same run with λ 0 differs by ~1e-2 in the
mean (checked below, so the comparison can fail).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import Trainer, TrainingArguments

from attrctl.errors import AttrctlError
from attrctl.hf import Regularizer, apply_regularizer, regularized
from attrctl.models import load_model

STEPS, BATCH, SEQ = 3, 4, 16
LAM = {"toxic": 50.0, "general": 2.0}
TOXIC = ["You are a stupid idiot and everyone hates you.", "Shut up, you worthless moron."]
GENERAL = ["The committee met on Tuesday to discuss the budget.",
           "She planted tomatoes, beans and basil in the garden."]  # fmt: skip


def _policy(tmp: Path) -> Path:
    (tmp / "toxic.txt").write_text("\n\n".join(TOXIC * 8))
    (tmp / "general.txt").write_text("\n\n".join(GENERAL * 8))
    (tmp / "prompts.txt").write_text("You are such a\nThe weather today is\nI think that you\n")
    data = {
        "name": "hf",
        "model": "tiny-random",
        "data": [{"kind": "file", "path": "toxic.txt", "domain": "toxic", "weight": 0.5},
                 {"kind": "file", "path": "general.txt", "domain": "general", "weight": 0.5}],
        "attributes": [{"name": "toxicity", "oracle": {"kind": "profanity_check"},
                        "head": {"kind": "linear", "rank": 8}}],
        "regularization": {"lam": 0.0, "per_domain": LAM},
        "regularizer": {"prompts": ["prompts.txt"], "samples_per_prompt": 8,
                        "max_new_tokens": 6, "epochs": 10, "batch_size": 4,
                        "learning_rate": 0.1},
        "finetune": {"method": "top_layers", "top_layers": 1, "steps": STEPS,
                     "batch_size": BATCH, "seq_len": SEQ, "learning_rate": 1e-2},
        "schedule": {"mode": "sequential", "iterations": 1},
        "loss": {"impl": "chunked"},
    }  # fmt: skip
    path = tmp / "hf.yaml"
    path.write_text(json.dumps(data))
    return path


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A finished attrctl run: its heads, its batches and its fine-tuned weights."""
    from attrctl.cli import main

    tmp = tmp_path_factory.mktemp("hf")
    cwd = os.getcwd()
    os.chdir(tmp)
    try:
        assert main(["train", "-p", str(_policy(tmp)), "--out", str(tmp / "run"), "-q"]) == 0
    finally:
        os.chdir(cwd)
    return tmp / "run"


def _batches(run: Path, steps: int = STEPS) -> list[dict]:
    """The packed batches attrctl's fine-tune saw (and the stream's next ones past ``STEPS``),
    one row per item, the domain per token."""
    from attrctl.data import build_mixture
    from attrctl.policy import load_policy

    policy = load_policy(run / "policy.yaml")
    mixture = build_mixture(policy)
    tok = load_model("tiny-random").tokenizer
    stream = mixture.batches(tok, BATCH, SEQ)
    rows = []
    for _ in range(steps):
        b = next(stream)
        for r in range(BATCH):
            rows.append({
                "input_ids": b["input_ids"][r].tolist(), "labels": b["labels"][r].tolist(),
                "domain": [mixture.domains[d] for d in b["domain_ids"][r].tolist()],
            })  # fmt: skip
    return rows


class Rows(torch.utils.data.IterableDataset):
    """The rows in order (no sampler, no shuffle): batch k of the Trainer is batch k of attrctl."""

    def __init__(self, rows: list[dict]):
        self.rows = rows

    def __iter__(self):
        yield from self.rows


def _stack(features: list[dict]) -> dict:
    return {"input_ids": torch.tensor([f["input_ids"] for f in features]),
            "labels": torch.tensor([f["labels"] for f in features])}  # fmt: skip


def _trained_model(run: Path, tmp: Path, rows: list[dict], *, batch: int, accum: int,
                   lam=LAM, steps: int = STEPS):  # fmt: skip
    from attrctl.policy import compile_policy, load_policy
    from attrctl.train.weights import select_trainable

    model = load_model("tiny-random").model
    select_trainable(model, compile_policy(load_policy(run / "policy.yaml")))
    patch = apply_regularizer(model, run, lam=lam, column="domain", impl="chunked")
    args = TrainingArguments(
        output_dir=str(tmp), per_device_train_batch_size=batch, gradient_accumulation_steps=accum,
        max_steps=steps, learning_rate=1e-2, lr_scheduler_type="constant", weight_decay=0.0,
        max_grad_norm=1.0, logging_steps=1, save_strategy="no", report_to=[], use_cpu=True,
        optim="adamw_torch",  # attrctl's optimizer: torch.optim.AdamW, not the fused kernel
        dataloader_num_workers=0, seed=0, disable_tqdm=True,
    )  # fmt: skip
    trainer = Trainer(model=model, args=args, train_dataset=Rows(rows),
                      data_collator=patch.collator(_stack))  # fmt: skip
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return model, patch, losses


def _step_losses(run: Path) -> list[float]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [r["loss"] for r in map(json.loads, lines) if r.get("kind") == "step"]


@pytest.mark.ci
def test_trainer_matches_attrctls_own_loop(run, tmp_path):
    rows = _batches(run)
    model, patch, losses = _trained_model(run, tmp_path / "t", rows, batch=BATCH, accum=1)
    ours = load_file(str(run / "model" / "iter_1" / "trainable.safetensors"))
    params = dict(model.named_parameters())
    assert _mean_abs_diff(params, ours) < 1e-6
    for name, want in ours.items():
        torch.testing.assert_close(params[name].detach(), want, rtol=0, atol=1e-4, msg=name)
    assert losses == pytest.approx(_step_losses(run), rel=1e-6)
    assert patch.last["kl"] > 1e-3  # the heads are fitted: the KL term is live
    # the same run with λ 0 lands elsewhere: the checks above can fail
    other, _, _ = _trained_model(run, tmp_path / "u", rows, batch=BATCH, accum=1,
                                 lam={"toxic": 0.0, "general": 0.0})  # fmt: skip
    assert _mean_abs_diff(dict(other.named_parameters()), ours) > 1e-3


def _mean_abs_diff(params: dict, ref: dict) -> float:
    return sum(float((params[n].detach() - w).abs().mean()) for n, w in ref.items()) / len(ref)


@pytest.mark.ci
def test_gradient_accumulation_2x4_equals_1x8(run, tmp_path):
    rows = _batches(run, steps=4)  # 16 rows: two steps of 8
    one, _, _ = _trained_model(run, tmp_path / "a", rows, batch=8, accum=1, steps=2)
    two, _, _ = _trained_model(run, tmp_path / "b", rows, batch=4, accum=2, steps=2)
    b = dict(two.named_parameters())
    for name, p in one.named_parameters():
        if p.requires_grad:  # tolerances as above
            torch.testing.assert_close(b[name].detach(), p.detach(), rtol=0, atol=1e-4)


def test_eval_and_generation_keep_the_models_own_forward(run):
    model = load_model("tiny-random").model
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    with torch.no_grad():
        want = model(input_ids=ids, labels=ids)
    patch = apply_regularizer(model, run, lam=2.0)
    model.train()
    with torch.no_grad():  # evaluation under the Trainer: logits and the plain CE
        got = model(input_ids=ids, labels=ids, num_items_in_batch=None)
    torch.testing.assert_close(got.logits, want.logits)
    torch.testing.assert_close(got.loss, want.loss)
    train = model(input_ids=ids, labels=ids)  # training: loss only, no [B, T, V] logits
    assert train.logits is None and train.loss.requires_grad
    model.eval()
    out = model.generate(ids, max_new_tokens=3, do_sample=False)
    assert out.shape == (1, 8)
    patch.remove()
    assert "forward" not in vars(model) and not getattr(model, "_attrctl_patch", None)


def test_bad_uses_are_refused(run):
    from peft import LoraConfig, get_peft_model

    model = load_model("tiny-random").model
    with pytest.raises(AttrctlError, match="needs column="):
        apply_regularizer(model, run, lam={"toxic": 1.0})
    with pytest.raises(AttrctlError, match=r"no fitted regularizer heads|neither"):
        apply_regularizer(model, run.parent)
    lora = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj", "lm_head"]))
    with pytest.raises(AttrctlError, match="PEFT adapter"):
        apply_regularizer(lora, run)
    patch = apply_regularizer(load_model("tiny-random").model, run, lam={"toxic": 1.0},
                              column="domain")  # fmt: skip
    with pytest.raises(AttrctlError, match="no λ for value 'poetry'"):
        patch.collator(_stack)([{"input_ids": [1], "labels": [1], "domain": "poetry"}])


@pytest.mark.ci
def test_sft_trainer_with_lora_trains_and_the_heads_pull_kl_down(run, tmp_path):
    from datasets import Dataset
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer

    tok = load_model("tiny-random").tokenizer
    texts = (TOXIC + GENERAL) * 8
    ds = Dataset.from_dict({"text": texts})
    # adapters above the heads' tap (layer 1 of 2), as top_layers trains: the heads' inputs
    # stay the features they were fitted on (docs/trainer.md, "Where the heads read")
    lora = LoraConfig(
        r=8,
        lora_alpha=16,
        layers_to_transform=[1],
        target_modules=["q_proj", "v_proj", "o_proj", "up_proj", "down_proj"],
    )
    args = SFTConfig(
        output_dir=str(tmp_path),
        max_steps=30,
        per_device_train_batch_size=8,
        learning_rate=1e-1,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        max_length=24,
        disable_tqdm=True,
        packing=False,
        seed=0,
    )

    def kl_now(m, patch) -> float:  # the heads' mean KL on the training texts, no update
        m.train()
        enc = tok(texts[:8], return_tensors="pt", padding=True)
        labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
        m(**enc, labels=labels)
        m.zero_grad(set_to_none=True)
        return patch.last["kl"]

    # the plain SFTTrainer computes its loss with TRL's own fused LM head: refused, not skipped
    model = load_model("tiny-random").model
    apply_regularizer(model, run, lam=30.0, impl="chunked")
    plain = SFTTrainer(model=model, args=args, train_dataset=ds, processing_class=tok,
                       peft_config=lora)  # fmt: skip
    with pytest.raises(AttrctlError, match=r"regularized\(SFTTrainer\)"):
        plain.train()

    def sft(lam: float) -> tuple[float, float, bool]:
        model = load_model("tiny-random").model
        patch = apply_regularizer(model, run, lam=lam, impl="chunked")
        trainer = regularized(SFTTrainer)(model=model, args=args, train_dataset=ds,
                                          processing_class=tok, peft_config=lora)  # fmt: skip
        before = kl_now(trainer.model, patch)
        lora_b = {n: p.detach().clone() for n, p in trainer.model.named_parameters()
                  if "lora_B" in n}  # fmt: skip
        trainer.train()
        trained = any(not torch.equal(p, lora_b[n]) for n, p in trainer.model.named_parameters()
                      if n in lora_b)  # fmt: skip
        return before, kl_now(trainer.model, patch), trained

    before, plain_kl, trained_plain = sft(0.0)
    _, reg_kl, trained_reg = sft(30.0)
    assert trained_plain and trained_reg  # the adapters trained
    # the same run with the heads' KL weighted in ends with less KL than without it, and less
    # than it started with (measured: 0.0139 before, 0.0140 with λ 0, 0.0131 with λ 30)
    assert reg_kl < 0.97 * plain_kl and reg_kl < before, (before, plain_kl, reg_kl)


def test_regularizer_load_names_what_is_wrong(tmp_path):
    model = load_model("tiny-random").model
    with pytest.raises(AttrctlError):
        Regularizer.load(tmp_path, model)
