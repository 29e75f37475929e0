"""python fb.py NAME SOURCE: transcribe's default decoding (fallback, seed 0) on every manifest file"""

import sys

sys.path.insert(0, "/work/main/benchmarks")
from _common import DEFAULT_MANIFEST, read_manifest
from compression_table import _transcripts

_transcripts(sys.argv[1], read_manifest(DEFAULT_MANIFEST), True, sys.argv[2], fallback=True)
