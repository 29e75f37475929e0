"""python run_auto.py ARCH FRACTION PROBE NAME cal|def [nower]: sensitivity, build, 171 greedy transcripts"""

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _common import DEFAULT_MANIFEST, read_manifest
from compression_table import _transcripts

from wruntime.build.model_dir import models_root
from wruntime.build.pipeline import build_model
from wruntime.build.sensitivity import Budget, sensitivity_report

arch, fraction, probe, name, which = sys.argv[1:6]
items = read_manifest(DEFAULT_MANIFEST)
clips = None
if which == "cal":
    clips = [
        it.path
        for it in items
        if it.key.split("/")[0] in ("librispeech-dev-clean", "librispeech-train-clean-5")
    ]
dest = models_root() / name
t0 = time.time()
if not dest.is_dir():
    choice = sensitivity_report(
        arch,
        budget=Budget(max_fraction=float(fraction)),
        clips=clips,
        probe=probe,
        log=lambda m: print(f"[{time.time() - t0:7.0f}s] {m}", flush=True),
    )
    print("choice", choice.fraction, choice.predicted_error, flush=True)
    for r in choice.rows():
        if "token_embedding" in r["layer"]:
            print(r, flush=True)
    build_model(f"{arch}-auto@{fraction}", dest=dest, choices=choice.rules)
    print("built", time.time() - t0, flush=True)
if len(sys.argv) > 6 and sys.argv[6] == "nower":
    sys.exit()
_transcripts(name, items, True, str(dest))
print("done", time.time() - t0, flush=True)
