"""Seed the builder-1.4 base table (cal clips, text probe, special rows fixed) from the
builder-1.3 one: every row but the vocabulary chunks (those are measured fresh)."""

import json
import sys
from pathlib import Path

sys.path.insert(0, "/work/main/benchmarks")
from _common import DEFAULT_MANIFEST, read_manifest

from wruntime.build import sensitivity as S
from wruntime.build.decoder import vocab_chunks
from wruntime.catalog import precisions

items = read_manifest(DEFAULT_MANIFEST)
clips = [
    it.path
    for it in items
    if it.key.split("/")[0] in ("librispeech-dev-clean", "librispeech-train-clean-5")
]
fixed = precisions()["auto"].compression
new = S._cache_path("base", clips, fixed, False)
newn = S._noise_cache_path("base", fixed)
old = json.loads(Path("/tmp/wrc_home/sensitivity/base-b98768350fff.json").read_text())
oldn = json.loads(Path("/tmp/wrc_home/sensitivity/base-noise-7faed18b2433.json").read_text())
assert sorted(old["clips"]) == sorted(str(c.resolve()) for c in clips), "different clips"
old["layers"] = [r for r in old["layers"] if "token_embedding" not in r["layer"]]
oldn = {k: v for k, v in oldn.items() if "token_embedding" not in k}
print(new, newn, len(old["layers"]), len(oldn))
new.parent.mkdir(parents=True, exist_ok=True)
Path(new).write_text(json.dumps(old, indent=1))
Path(newn).write_text(json.dumps(oldn, indent=1))
# The new text chunks: a row that lacks every candidate's noise, so the pass measures it
# (a table that does not list a weight at all counts as complete).
for o, n in vocab_chunks(51865)[:-1]:
    old["layers"].append(
        {
            "layer": f"decoder.token_embedding.weight[{o}:{o + n}]",
            "package": "decoder",
            "size": n * 512,
            "copies": 2,
            "fixed": None,
            "bits": {"fp16": 16.0},
            "noise": {"fp16": 0.0},
            "error": {},
            "measured": [],
        }
    )
Path(new).write_text(json.dumps(old, indent=1))
print([r["layer"] for r in old["layers"][-4:]])
