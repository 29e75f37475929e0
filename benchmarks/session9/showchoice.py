"""python showchoice.py TABLE.json [FRACTION]: the catalog auto's choice (noise ceiling 0.03)
from a cached sensitivity table, per weight: bytes, label, bits, predicted KL."""

import json
import sys
from pathlib import Path

from wruntime.build.sensitivity import Budget, SensitivityTable, choose

table = SensitivityTable.from_json(json.loads(Path(sys.argv[1]).read_text()))
choice = choose(table, Budget(max_fraction=float(sys.argv[2]) if len(sys.argv) > 2 else 0.3), 0.03)
print("fraction", choice.fraction, "predicted KL", choice.predicted_error)
for row in table.layers:
    label = choice.labels.get(row.layer, row.fixed or "fp16")
    print(
        f"{row.layer:50s} {row.size * row.copies / 1e6:6.2f}M {label:12s}"
        f" bits {row.bits.get(label, 0):.2f} kl {row.error.get(label, 0):.2e}"
    )
