"""python variant.py ARCH FRACTION NAME LAYER=LABEL ... [cal]: the auto choice with some layers' rules replaced, built and transcribed"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _common import DEFAULT_MANIFEST, read_manifest
from compression_table import _transcripts

from wruntime.build.model_dir import models_root
from wruntime.build.pipeline import build_model
from wruntime.build.sensitivity import Budget, sensitivity_report

arch, fraction, name = sys.argv[1:4]
subs = dict(a.rsplit("=", 1) for a in sys.argv[4:] if "=" in a)
items = read_manifest(DEFAULT_MANIFEST)
clips = None
if "cal" in sys.argv[4:]:
    clips = [
        it.path
        for it in items
        if it.key.split("/")[0] in ("librispeech-dev-clean", "librispeech-train-clean-5")
    ]
choice = sensitivity_report(
    arch, budget=Budget(max_fraction=float(fraction)), clips=clips, probe="text"
)
rules = dict(choice.rules)
table = choice.table
labels = table.candidate_rules()
for layer, label in subs.items():
    print(layer, rules.get(layer) and choice.labels.get(layer), "->", label)
    rules[layer] = labels[label]
dest = models_root() / name
if not dest.is_dir():
    build_model(f"{arch}-auto@{fraction}", dest=dest, choices=rules)
_transcripts(name, items, True, str(dest))
