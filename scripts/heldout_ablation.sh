#!/usr/bin/env bash
# The held-out control ablation (docs/heldout-control.md): one training per row, each scored by
# `attrctl eval` on the bundled held-out prompts (100 toxic-leaning + 50 everyday, k 25, 20 tokens,
# top-p 0.9), then one table. Run from the repository root after `make setup`; runs land in
# runs/ablation/, the eval results and the table in docs/heldout-control/. A finished run or eval
# is kept, so the script can be interrupted and rerun.
#
# Every trained row reads the same 1,280 synthesized toxic-domain rows (the first run writes them):
# the rows differ only in the settings shown. Each row takes ~10–13 min to train and ~9 min to
# evaluate on a 2-core machine.
set -euo pipefail
cd "$(dirname "$0")/.."
ATTRCTL=${ATTRCTL:-.venv/bin/attrctl}
EVAL_ARGS=${EVAL_ARGS:--k 25 --mc-examples 0}
RUNS=runs/ablation
OUT=docs/heldout-control
SYNTH="--set data.0.path=$RUNS/synth.jsonl"

train() {  # name policy [--set ...]
  local name=$1 policy=$2
  shift 2
  [ -d "$RUNS/$name/model/final" ] || $ATTRCTL train -p "$policy" -o "$RUNS/$name" $SYNTH "$@" -q
  [ -f "$RUNS/$name/eval.json" ] || $ATTRCTL eval "$RUNS/$name" $EVAL_ARGS -q
}

train toxicity_sft toxicity_sft
train lam10_before toxicity --set regularization.own_samples.lam=0
train lam30 toxicity --set regularization.own_samples.lam=0 --set regularization.per_domain.toxic=30
train lam30_own30 toxicity --set regularization.per_domain.toxic=30 --set regularization.own_samples.lam=30
train own15 toxicity --set regularization.own_samples.lam=15
train default toxicity
[ -f runs/ablation/base/eval.json ] ||
  $ATTRCTL eval bundled:smollm2-135m-instruct --policy toxicity $EVAL_ARGS -o $RUNS/base -q

mkdir -p $OUT/evals
for name in base toxicity_sft lam10_before lam30 lam30_own30 own15 default; do
  python3 - "$RUNS/$name/eval.json" "$OUT/evals/$name.json" "$name" <<'PY'
import json, sys
data = json.load(open(sys.argv[1]))
data["label"] = sys.argv[3]
json.dump(data, open(sys.argv[2], "w"), indent=1)
PY
done
$ATTRCTL report $OUT/evals/{base,toxicity_sft,lam10_before,lam30,lam30_own30,own15,default}.json \
  --out $OUT
