"""Copy an `attrctl eval` result with a new row label: relabel.py SRC DST LABEL.

The docs' tables (scripts/*_table.sh, scripts/heldout_ablation.sh) keep each result under docs/
with its row's name as the label `attrctl report` prints.
"""

import json
import sys

src, dst, label = sys.argv[1:]
with open(src) as f:
    result = json.load(f)
result["label"] = label
with open(dst, "w") as f:
    json.dump(result, f, indent=1, sort_keys=True)
