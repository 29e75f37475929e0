"""Shared plumbing of the end-to-end benchmarks: manifests, audio once, peer workers.

Both benchmarks run our runtime in this (project) environment and the peers
(openai-whisper, faster-whisper) in the reference venv, as a subprocess of the
same script with ``--peer-worker``. Audio is decoded once by wruntime and
handed to every program as the same float32 samples, so differences come from
the models and the decoding, never from resamplers.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_MANIFEST = ROOT.parent / "shared" / "data" / "speech" / "manifest.tsv"
REF_PYTHON = Path(os.environ.get("WRUNTIME_REF_PYTHON", "/work/refvenv/bin/python"))
RESULTS = ROOT / "benchmarks" / "results"


@dataclass
class Item:
    key: str
    path: Path
    reference: str
    subset: str


def read_manifest(
    manifest: Path, subset: str | None = None, limit: int | None = None
) -> list[Item]:
    """Rows of a manifest.tsv; `subset` keeps rows whose path or corpus mentions it."""
    items = []
    with open(manifest, encoding="utf-8", newline="") as f:
        for row in csv.DictReader(f, delimiter="\t"):
            key = row["path"]
            if subset and subset not in key and subset not in row.get("corpus_subset", ""):
                continue
            items.append(
                Item(
                    key,
                    manifest.parent / key,
                    row["reference_transcript"],
                    row.get("corpus_subset", ""),
                )
            )
    return items[:limit] if limit else items


def decode_all(items: list[Item]) -> dict[str, np.ndarray]:
    from wruntime.audio import load_audio

    return {it.key: load_audio(it.path) for it in items}


def save_audio(audio: dict[str, np.ndarray], directory: Path) -> Path:
    path = directory / "audio.npz"
    np.savez(path, **{f"a{i}": a for i, a in enumerate(audio.values())}, keys=np.array(list(audio)))
    return path


def load_audio_npz(path: Path) -> dict[str, np.ndarray]:
    data = np.load(path)
    return {str(k): data[f"a{i}"] for i, k in enumerate(data["keys"])}


def run_peer(script: Path, args: list[str]) -> dict:
    """Run `script --peer-worker ARGS` in the reference venv; returns its JSON answer."""
    if not REF_PYTHON.exists():
        raise SystemExit(f"reference python not found at {REF_PYTHON} (set WRUNTIME_REF_PYTHON)")
    with tempfile.TemporaryDirectory() as tmp:
        answer = Path(tmp) / "answer.json"
        cmd = [str(REF_PYTHON), str(script), "--peer-worker", "--answer", str(answer), *args]
        subprocess.run(cmd, check=True, cwd=ROOT)
        return json.loads(answer.read_text(encoding="utf-8"))


def ensure_openai_checkpoint(arch: str) -> Path:
    """The openai-whisper checkpoint of our weights, written once by benchmarks/peers.

    Kept in $WRUNTIME_HOME/peers, or in the temp dir when that home is inside
    the checkout (the checkpoint script refuses to write there).
    """
    sys.path.insert(0, str(ROOT))
    from benchmarks.peers.openai_checkpoint import default_path

    path = default_path(arch)
    if path.resolve().is_relative_to(ROOT.resolve()):
        path = Path(tempfile.gettempdir()) / "wruntime-peers" / f"{arch}.pt"
    if not path.exists():
        script = ROOT / "benchmarks" / "peers" / "openai_checkpoint.py"
        subprocess.run(
            [str(REF_PYTHON), str(script), arch, "--out", str(path)], check=True, cwd=ROOT
        )
    return path


def write_results(name: str, data: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / name
    fd, tmp = tempfile.mkstemp(dir=RESULTS, prefix=f".{name}.", suffix=".tmp")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=1, ensure_ascii=False)
        f.write("\n")
    os.replace(tmp, path)
    return path
