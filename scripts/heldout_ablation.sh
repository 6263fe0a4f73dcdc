#!/usr/bin/env bash
# The held-out control ablation of docs/heldout-control.md: one training per row, each scored by
# `attrctl eval` on the bundled held-out prompts (100 toxic-leaning + 50 everyday, k 25, 20 tokens,
# top-p 0.9, judge jigsaw_bilstm), then one table and the trade-off plot. Run from the repository
# root after `make setup`; runs land in runs/ablation/, the eval results, table and plot in
# docs/heldout-control/. A finished run or eval is kept, so the script can be stopped and rerun.
#
# The default row is `attrctl train --policy toxicity` as shipped (what `make demo` runs); it
# synthesizes the 1,280 toxic-domain rows, and every other row reads them (`data.0.path`) except
# soft labels, whose synthesized file records the label kind. On a 2-core machine a row takes
# ~10–16 min to train and ~7 min to evaluate.
set -euo pipefail
cd "$(dirname "$0")/.."
ATTRCTL=${ATTRCTL:-.venv/bin/attrctl}
EVAL_ARGS=${EVAL_ARGS:--k 25 --mc-examples 0}
RUNS=runs/ablation
OUT=docs/heldout-control
SYNTH=data.0.path=$RUNS/default/data/synth.jsonl

row() {  # name policy [--set key=value ...]
  local name=$1 policy=$2
  shift 2
  [ -d "$RUNS/$name/model/final" ] || $ATTRCTL train -p "$policy" -o "$RUNS/$name" -q "$@"
  [ -f "$RUNS/$name/eval.json" ] || $ATTRCTL eval "$RUNS/$name" $EVAL_ARGS -q
}

row default toxicity
row sft toxicity_sft --set "$SYNTH"
row lam30_soft toxicity --set regularization.own_samples.lam=0 \
  --set regularization.per_domain.toxic=30 --set attributes.0.target.labels=soft
row lam30_own30 toxicity --set "$SYNTH" --set regularization.per_domain.toxic=30 \
  --set regularization.own_samples.lam=30
row own10_rows8 toxicity --set "$SYNTH" --set regularization.own_samples.lam=10 \
  --set regularization.own_samples.rows=8
row own20 toxicity --set "$SYNTH" --set regularization.own_samples.lam=20
row own25_gen0 toxicity --set "$SYNTH" --set regularization.own_samples.lam=25 \
  --set regularization.per_domain.general=0
row tox5_own20 toxicity --set "$SYNTH" --set regularization.per_domain.toxic=5 \
  --set regularization.own_samples.lam=20
row owntox toxicity --set "$SYNTH" --set 'regularization.own_samples.prompts=[toxic]'
row owntox12 toxicity --set "$SYNTH" --set 'regularization.own_samples.prompts=[toxic]' \
  --set regularization.own_samples.lam=12
row owntox_t5 toxicity --set "$SYNTH" --set 'regularization.own_samples.prompts=[toxic]' \
  --set regularization.per_domain.toxic=5
row mix21_t5 toxicity --set "$SYNTH" \
  --set 'regularization.own_samples.prompts=[toxic, toxic, neutral]' \
  --set regularization.per_domain.toxic=5
row owntox_it2 toxicity --set "$SYNTH" --set 'regularization.own_samples.prompts=[toxic]' \
  --set schedule.iterations=2 --set finetune.steps=100
row spp8 toxicity --set "$SYNTH" --set regularizer.samples_per_prompt=8
# Violation contexts as own-sample prompts: each synthesized continuation the training oracle
# flags, cut after half its words, appended to its prompt (106 lines, one per line).
MINED=$PWD/$RUNS/mined_prompts.txt
[ -f "$MINED" ] || python3 - "$RUNS/default/data/synth.jsonl" "$MINED" <<'PY'
import json, re, sys
lines = []
for line in open(sys.argv[1]):
    r = json.loads(line)
    if r["scores"]["toxicity"] < 0.5:
        continue
    words = list(re.finditer(r"\S+", r["continuation"]))
    end = words[max(1, len(words) // 2) - 1].end()
    lines.append(" ".join((r["prompt"] + r["continuation"][:end]).split()))
open(sys.argv[2], "w").write("\n".join(dict.fromkeys(lines)) + "\n")
PY
row mined toxicity --set "$SYNTH" \
  --set "regularization.own_samples.prompts=[toxic, neutral, $MINED]"
# The default on another seed (its own synthesized rows, heads, batches and own samples).
row default_s1 toxicity --set seed=1 --set "data.0.path=$PWD/$RUNS/default_s1_synth.jsonl"
[ -f $RUNS/base/eval.json ] ||
  $ATTRCTL eval bundled:smollm2-135m-instruct --policy toxicity $EVAL_ARGS -o $RUNS/base -q

# Each result keeps its row's name as its label; the table and plot read them from docs/.
mkdir -p $OUT/evals
names="base sft lam30_soft lam30_own30 own10_rows8 own20 own25_gen0 tox5_own20 owntox owntox12 owntox_t5 mix21_t5 owntox_it2 spp8 mined default_s1 default"
for name in $names; do
  python3 scripts/relabel.py "$RUNS/$name/eval.json" "$OUT/evals/$name.json" "$name"
done
$ATTRCTL report $(for n in $names; do echo "$OUT/evals/$n.json"; done) --out $OUT
