"""python fb.py NAME SOURCE: transcribe's default decoding (fallback, seed 0) on every manifest file"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _common import DEFAULT_MANIFEST, read_manifest
from compression_table import _transcripts

_transcripts(sys.argv[1], read_manifest(DEFAULT_MANIFEST), True, sys.argv[2], fallback=True)
