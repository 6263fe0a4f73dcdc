"""The ``rl`` objective: TRL's ``GRPOTrainer`` with the policy's oracles as reward.

A baseline of the paper's table (docs/design.md, "Baselines"): policy-gradient fine-tuning that
rewards outputs the oracles accept, run by TRL rather than a hand-written PPO. One job stands
where the fine-tune job of iteration i stands, and leaves the same outputs, so the rest of a run
(S_I, ``model/final``, ``eval``, ``export``, ``report``) does not know the difference:

    prompts     the regularizer prompts, each once (what the heads are fitted on)
    completions ``rl.num_generations`` per prompt, ``regularizer.max_new_tokens`` long at most
    reward      Σ_k w_k · (1 − score_k): the attributes' weights times their oracles' "satisfies"
                probability (soft, whatever ``target.labels`` says: GRPO compares rewards within a
                group of completions, and a graded reward separates more of them than 0/1)
    step        ``finetune.batch_size`` × ``grad_accum`` completions, ``finetune.steps`` steps
    weights     ``finetune.method`` (the same :func:`select_trainable` as the fine-tune loop)
    KL          ``rl.beta`` × KL to the model the iteration starts from (TRL's k3 estimator)

Completions are sampled by ``transformers.generate`` inside TRL (its global-RNG sampler, seeded
with the policy seed), not by attrctl's per-row-seeded sampler; S_0 and S_I are attrctl's as in
every run. The job is not checkpointed: an interrupted ``rl`` job starts again from its beginning.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from transformers import PrinterCallback, TrainerCallback

from attrctl.errors import AttrctlError
from attrctl.policy.compile import CompiledPolicy
from attrctl.train.context import TrainContext
from attrctl.train.finetune import peak_memory_mb
from attrctl.train.weights import load_trainable, save_trainable, select_trainable


def oracle_reward(compiled: CompiledPolicy) -> Callable[..., list[float]]:
    """The reward function TRL calls on each generation batch: Σ_k w_k · (1 − score_k)."""
    attributes = compiled.attributes

    def oracle_reward(prompts: list, completions: list, **_: Any) -> list[float]:
        texts = [c if isinstance(c, str) else c[-1]["content"] for c in completions]
        total = np.zeros(len(texts))
        for a in attributes:
            total += a.weight * (1.0 - np.asarray(a.oracle.score(texts), dtype=np.float64))
        return total.tolist()

    return oracle_reward


def rl_prompts(compiled: CompiledPolicy) -> list[str]:
    """The regularizer prompts, each once, in policy order."""
    from attrctl.data.prompt_sets import load_prompt_set

    return [p for ref in compiled.policy.regularizer.prompts for p in load_prompt_set(ref).prompts]


def rl_job(ctx: TrainContext, i: int) -> dict[str, Any]:
    """θ_i from θ_{i−1} by GRPO on the oracles' reward; publishes θ_i like the fine-tune job."""
    from datasets import Dataset
    from transformers.utils import logging as hf_logging
    from trl import GRPOTrainer

    from attrctl.models import load_model

    policy, ft, run = ctx.policy, ctx.policy.finetune, ctx.run
    if ctx.world > 1:
        raise AttrctlError(
            "finetune.objective rl runs in one process; start it with `attrctl train`, not torchrun"
        )
    device = ctx.role_device("finetune")
    start = time.perf_counter()
    loaded = load_model(policy.model, device=device, dtype=ctx.compiled.torch_dtype)
    work = run.checkpoint(i)  # TRL's output_dir (nothing is saved there); removed on publish
    model = select_trainable(loaded.model, ctx.compiled)
    if i > 1:
        load_trainable(model, run.model(i - 1))
    if ft.rl.beta > 0 and ft.method != "lora":  # under lora TRL keeps a frozen adapter copy
        _point_reference_at(model, work / "reference", force=i > 1)

    hf_logging.disable_progress_bar()  # the reference model's save and load bars
    metrics = _Metrics(ctx, i, ft.steps, device)
    with warnings.catch_warnings():  # TRL 1.16 uses transformers APIs deprecated in 5.x
        warnings.simplefilter("ignore", FutureWarning)
        trainer = GRPOTrainer(
            model=model,
            reward_funcs=oracle_reward(ctx.compiled),
            args=_config(ctx, work, device),
            train_dataset=Dataset.from_dict({"prompt": rl_prompts(ctx.compiled)}),
            processing_class=loaded.tokenizer,
            callbacks=[metrics],
        )
        trainer.remove_callback(PrinterCallback)  # it prints every log dict to stdout
        try:
            trainer.train()
        finally:
            metrics.bar.close()
    model = trainer.model
    if hasattr(model, "peft_config") and "ref" in model.peft_config:
        model.delete_adapter("ref")  # TRL's frozen copy for the KL; θ_i is the default adapter
    meta = {"iteration": i, "heads": 0, "steps": ft.steps, "objective": "rl"}
    if ctx.writer:
        save_trainable(model, run.model(i), meta)
    history = metrics.history
    return {
        "iteration": i, "objective": "rl", "heads": 0, "steps": ft.steps,
        "trainer": "trl.GRPOTrainer", "num_generations": ft.rl.num_generations,
        "completions_per_step": ft.batch_size * ft.grad_accum, "beta": ft.rl.beta,
        "reward_first": history[0].get("reward") if history else None,
        "reward_last": _tail_mean(history, "reward"), "kl_last": _tail_mean(history, "kl"),
        "seconds": round(time.perf_counter() - start, 3),
    }  # fmt: skip


def _config(ctx: TrainContext, work: Path, device: str):
    """TRL's GRPOConfig from the policy: the fine-tune's budget, the rl knobs, offline, fp32."""
    from trl import GRPOConfig

    policy, ft = ctx.policy, ctx.policy.finetune
    return GRPOConfig(
        output_dir=str(work),
        max_steps=ft.steps,
        per_device_train_batch_size=ft.batch_size,  # completions per micro-batch
        gradient_accumulation_steps=ft.grad_accum,
        num_generations=ft.rl.num_generations,
        max_completion_length=policy.regularizer.max_new_tokens,
        temperature=ft.rl.temperature,
        beta=ft.rl.beta,
        epsilon=ft.rl.epsilon,
        learning_rate=ft.rl.learning_rate or ft.learning_rate,
        weight_decay=ft.weight_decay,
        max_grad_norm=ft.max_grad_norm,
        lr_scheduler_type="constant",  # as the fine-tune loop: AdamW at a fixed rate
        warmup_steps=0,
        seed=policy.seed,
        data_seed=policy.seed,
        bf16=False,  # fp32 like every other job (TRL defaults to bf16)
        fp16=False,
        use_cpu=device == "cpu",
        gradient_checkpointing=False,  # a small model, and the lower layers are frozen
        disable_dropout=True,
        logging_steps=1,
        save_strategy="no",
        report_to="none",  # offline: no trackers, no hub
        disable_tqdm=True,  # progress goes through attrctl's own bar
        dataloader_num_workers=0,
    )


def _point_reference_at(model: Any, folder: Path, *, force: bool = False) -> None:
    """TRL builds its reference model with ``from_pretrained(config._name_or_path)``. The bundled
    model's is its converted folder already; a model built in memory (``tiny-random``) or read from
    the hub, or θ_{i−1} (``force``), is saved to ``folder`` first so nothing is downloaded."""
    name = getattr(model.config, "_name_or_path", "") or ""
    if not force and name and Path(name).is_dir():
        return
    folder.mkdir(parents=True, exist_ok=True)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    base.save_pretrained(folder, safe_serialization=True)
    base.config._name_or_path = str(folder)


def _tail_mean(history: list[dict], key: str, n: int = 10) -> float | None:
    vals = [h[key] for h in history[-n:] if isinstance(h.get(key), (int, float))]
    return sum(vals) / len(vals) if vals else None


class _Metrics(TrainerCallback):
    """TRL's per-step logs → ``metrics.jsonl`` records (kind ``rl_step``) and the progress bar."""

    def __init__(self, ctx: TrainContext, i: int, steps: int, device: str):
        self.ctx, self.i, self.device = ctx, i, device
        self.bar = ctx.bar(f"rl θ_{i}", steps, "step")
        self.history: list[dict] = []
        self._t0 = time.perf_counter()

    def on_step_begin(self, args, state, control, **kwargs):
        self._t0 = time.perf_counter()

    def on_log(self, args, state, control, logs=None, **kwargs):
        logs = logs or {}
        if "train_runtime" in logs:  # the closing summary, not a step
            return
        record = {
            "kind": "rl_step", "job": f"finetune/{self.i}", "iteration": self.i,
            "step": state.global_step, "seconds": time.perf_counter() - self._t0,
            "peak_mb": peak_memory_mb(self.device),
            **{k: float(v) for k, v in logs.items()
               if isinstance(v, (int, float)) and math.isfinite(v)},
        }  # fmt: skip
        self.history.append(record)
        self.ctx.log(record)
        self.bar.update(1, reward=f"{record.get('reward', float('nan')):.3f}")
