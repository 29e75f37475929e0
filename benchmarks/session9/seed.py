"""python seed.py ARCH OLD_TABLE OLD_NOISE cal|def: seed this builder's sensitivity table (text
probe, the catalog auto's fixed rules) from an older builder's, keeping every row but the
vocabulary chunks, which the next pass measures fresh. The other rows are the same numbers
(session 8: a fresh pass reproduced them to 3 digits). A chunk row without every candidate's
noise is what makes the pass measure it (a table that does not list a weight counts as
complete); the pass then rebuilds the table's other rows, sizes and the fixed chunk."""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _common import DEFAULT_MANIFEST, read_manifest

from wruntime.build import sensitivity as S
from wruntime.build.decoder import vocab_chunks
from wruntime.catalog import load_architecture_weights, precisions

arch, old_table, old_noise, which = sys.argv[1:5]
if which == "cal":
    clips = [
        it.path
        for it in read_manifest(DEFAULT_MANIFEST)
        if it.key.split("/")[0] in ("librispeech-dev-clean", "librispeech-train-clean-5")
    ]
else:
    clips = S.default_clips()
fixed = precisions()["auto"].compression
new, newn = S._cache_path(arch, clips, fixed, False), S._noise_cache_path(arch, fixed)
old = json.loads(Path(old_table).read_text())
oldn = json.loads(Path(old_noise).read_text())
assert sorted(Path(c).name for c in old["clips"]) == sorted(Path(c).name for c in clips)
old["clips"] = [str(c) for c in clips]
old["layers"] = [r for r in old["layers"] if "token_embedding" not in r["layer"]]
oldn = {k: v for k, v in oldn.items() if "token_embedding" not in k}
dims = load_architecture_weights(arch).dims
for o, n in vocab_chunks(dims.n_vocab)[:-1]:
    old["layers"].append(
        {
            "layer": f"decoder.token_embedding.weight[{o}:{o + n}]",
            "package": "decoder",
            "size": n * dims.n_text_state,
            "copies": 2,
            "fixed": None,
            "bits": {"fp16": 16.0},
            "noise": {"fp16": 0.0},
            "error": {},
            "measured": [],
        }
    )
new.parent.mkdir(parents=True, exist_ok=True)
new.write_text(json.dumps(old, indent=1))
newn.write_text(json.dumps(oldn, indent=1))
print(new, newn, len(old["layers"]), [r["layer"] for r in old["layers"][-4:]])
