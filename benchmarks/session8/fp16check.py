import json
import sys
from pathlib import Path

sys.path.insert(0, "/work/main/benchmarks")
from _common import DEFAULT_MANIFEST, read_manifest

from wruntime import Transcriber

old = json.loads(Path("/work/main/benchmarks/results/compression_tiny.en-fp16.json").read_text())[
    "texts"
]
t = Transcriber("/tmp/wrc8/models/tiny.en-fp16", executor="interpreter", fp16_emulation=True)
items = read_manifest(DEFAULT_MANIFEST)[::8]
same = 0
for it in items:
    txt = t.transcribe(str(it.path), temperature=0.0).text
    same += txt == old[it.key]
    if txt != old[it.key]:
        print("DIFF", it.key, repr(txt[:80]), repr(old[it.key][:80]))
print(f"{same}/{len(items)} identical to builder 1.3's fp16 transcripts")
