"""python fp16check.py MODEL_DIR: a tiny.en-fp16 directory's greedy transcripts (fp16
emulation) of every 8th manifest file against the stored ones (builder 1.3)."""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _common import DEFAULT_MANIFEST, RESULTS, read_manifest

from wruntime import Transcriber

old = json.loads((RESULTS / "compression_tiny.en-fp16.json").read_text())["texts"]
t = Transcriber(sys.argv[1], executor="interpreter", fp16_emulation=True)
items = read_manifest(DEFAULT_MANIFEST)[::8]
same = 0
for it in items:
    txt = t.transcribe(str(it.path), temperature=0.0).text
    same += txt == old[it.key]
    if txt != old[it.key]:
        print("DIFF", it.key, repr(txt[:80]), repr(old[it.key][:80]))
print(f"{same}/{len(items)} identical to the stored fp16 transcripts")
