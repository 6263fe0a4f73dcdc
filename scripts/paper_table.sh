#!/usr/bin/env bash
# The paper's table on the embedded default (docs/design.md, "Baselines"): seven rows, one
# command each, then `attrctl report`. Run from the repository root after `make setup`; runs land in runs/, and the
# eval results, table and plot in docs/report/. Every run can be interrupted and the script
# rerun: finished runs and evals are kept (`attrctl train` continues a run of the same policy).
#
# EVAL_ARGS sizes the evaluation (docs/evaluation.md states the sizes its table used); the defaults of
# `attrctl eval` (k = 25, 100 BIG-bench examples per task) take ~4x longer per row on a laptop.
set -euo pipefail
cd "$(dirname "$0")/.."
ATTRCTL=${ATTRCTL:-.venv/bin/attrctl}
EVAL_ARGS=${EVAL_ARGS:--k 8 --mc-examples 25 --ppl-tokens 8192}
BASE=bundled:smollm2-135m-instruct

# BIG-bench multiple choice needs its task files once (~1 min; without them eval skips MC).
$ATTRCTL assets ls 2>/dev/null | grep -Eq "movie_recommendation +ready" || $ATTRCTL assets fetch bigbench

# Trained rows. `toxicity` (ours, adaptive λ) first: the baselines train on its synthesized rows.
for policy in toxicity toxicity_sft toxicity_filter toxicity_uniform toxicity_rl; do
  [ -d "runs/$policy/model/final" ] || $ATTRCTL train --policy "$policy"
  [ -f "runs/$policy/eval.json" ] || $ATTRCTL eval "runs/$policy" $EVAL_ARGS
done

# Untrained rows: the base model, and NADO decoding (ours' heads applied to the base model).
[ -f runs/eval/base/eval.json ] || $ATTRCTL eval "$BASE" --policy toxicity $EVAL_ARGS --out runs/eval/base
[ -f runs/eval/nado/eval_guided.json ] ||
  $ATTRCTL eval "$BASE" --guided runs/toxicity $EVAL_ARGS --out runs/eval/nado

# The results are kept beside the report (runs/ is not committed), and the report reads them there.
mkdir -p docs/report/evals
for policy in toxicity_sft toxicity_filter toxicity_rl toxicity_uniform toxicity; do
  cp "runs/$policy/eval.json" "docs/report/evals/$policy.json"
done
cp runs/eval/base/eval.json docs/report/evals/base.json
cp runs/eval/nado/eval_guided.json docs/report/evals/nado_decoding.json
E=docs/report/evals
$ATTRCTL report $E/base.json $E/toxicity_sft.json $E/toxicity_filter.json $E/toxicity_rl.json \
  $E/nado_decoding.json $E/toxicity_uniform.json $E/toxicity.json --out docs/report
