#!/usr/bin/env bash
# Learning from toxic content (docs/classification.md): the paper's classification experiment on
# the embedded default — four rows, one command each, then `attrctl report`. Run from the
# repository root after `make demo` (the rows train on the default run's synthesized texts,
# runs/toxicity/data/synth.jsonl, labelled by the jigsaw_bilstm judge). Rerunnable: finished
# runs and evals are kept.
set -euo pipefail
cd "$(dirname "$0")/.."
ATTRCTL=${ATTRCTL:-.venv/bin/attrctl}
EVAL_ARGS=${EVAL_ARGS:--k 25 --mc-examples 0}
OUT=docs/classification

[ -f runs/toxicity/data/synth.jsonl ] || $ATTRCTL data synth --policy toxicity

# Trained rows: LM loss without and with the regularizer, classification loss only.
for policy in toxicity_cls_sft toxicity_cls toxicity_cls_classify; do
  [ -d "runs/$policy/model/final" ] || $ATTRCTL train --policy "$policy"
  [ -f "runs/$policy/eval.json" ] || $ATTRCTL eval "runs/$policy" $EVAL_ARGS
done
# The base model, zero-shot: the same held-out rows and prompts.
[ -f runs/eval/cls_base/eval.json ] ||
  $ATTRCTL eval bundled:smollm2-135m-instruct --policy toxicity_cls $EVAL_ARGS --out runs/eval/cls_base

# Each result gets its row's name as its label; the table reads them from docs/.
mkdir -p $OUT/evals
label() { python3 scripts/relabel.py "$@"; }  # eval.json out.json label
label runs/eval/cls_base/eval.json $OUT/evals/base.json "base, zero-shot"
label runs/toxicity_cls_sft/eval.json $OUT/evals/toxicity_cls_sft.json "SFT, LM loss"
label runs/toxicity_cls/eval.json $OUT/evals/toxicity_cls.json "ours, LM loss"
label runs/toxicity_cls_classify/eval.json $OUT/evals/toxicity_cls_classify.json \
  "classification loss"
E=$OUT/evals
$ATTRCTL report $E/base.json $E/toxicity_cls_sft.json $E/toxicity_cls.json \
  $E/toxicity_cls_classify.json --out $OUT
