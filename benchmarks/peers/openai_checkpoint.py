"""Turn wruntime's canonical weights into an openai-whisper checkpoint for reference runs.

openai-whisper can only load its own ``.pt`` format, and Hugging Face (where
those files live) is unreachable here; the weights we do have come as
CTranslate2 directories. Since wruntime reads those into openai-whisper's own
parameter names, the checkpoint is just ``{"dims", "model_state_dict"}`` with
the arrays as fp32 tensors, so both programs run on exactly the same numbers.

Run with the reference venv (torch + openai-whisper); it imports wruntime from
this checkout and needs none of coremltools:

    /work/refvenv/bin/python benchmarks/peers/openai_checkpoint.py tiny.en
    /work/refvenv/bin/python benchmarks/peers/openai_checkpoint.py base --out /tmp/base.pt

The file goes to $WRUNTIME_HOME/peers/<arch>.pt by default (never the repo),
written to a temporary name and renamed, so an interrupted run leaves nothing
half-written. Loading by path gives no alignment heads to openai-whisper
(it only knows them for its named downloads); word-level timestamps in a
reference run therefore need ``model.set_alignment_heads`` separately.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from wruntime.weights.canonical import WhisperWeights  # noqa: E402


def default_home() -> Path:
    """$WRUNTIME_HOME, else the user cache dir wruntime uses."""
    env = os.environ.get("WRUNTIME_HOME")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "wruntime"


def default_path(arch: str) -> Path:
    return default_home() / "peers" / f"{arch}.pt"


def load_canonical(arch: str, weights: str | None = None) -> WhisperWeights:
    """The canonical weights of ``arch``, from the catalog or from a given weights path."""
    if weights is not None:
        from wruntime.weights import load_weights

        return load_weights(Path(weights))
    from wruntime.catalog import load_architecture_weights

    return load_architecture_weights(arch)


def to_checkpoint(weights: WhisperWeights) -> dict:
    """The dict ``whisper.load_model(path)`` expects, as fp32 torch tensors."""
    import numpy as np
    import torch

    state = {
        name: torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32).copy())
        for name, arr in weights.params.items()
    }
    return {"dims": weights.dims.to_dict(), "model_state_dict": state}


def write_checkpoint(weights: WhisperWeights, path: Path) -> Path:
    """Save atomically: a temporary file beside ``path``, then rename."""
    import torch

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        torch.save(to_checkpoint(weights), tmp)
        os.chmod(tmp, 0o644)  # mkstemp's 0600 would hide it from other users of the cache
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def ensure_checkpoint(arch: str, path: Path | None = None, weights: str | None = None) -> Path:
    """The checkpoint for ``arch``, converting only when it is not there yet."""
    path = default_path(arch) if path is None else path
    if not path.exists():
        write_checkpoint(load_canonical(arch, weights), path)
    return path


def load_reference_model(arch: str, path: Path | None = None):
    """openai-whisper's fp32 model on CPU for ``arch``, converted on first use."""
    import whisper

    return whisper.load_model(str(ensure_checkpoint(arch, path)), device="cpu")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("arch", help="architecture name in the catalog, e.g. tiny.en or base")
    parser.add_argument(
        "--out", type=Path, help="checkpoint path (default $WRUNTIME_HOME/peers/<arch>.pt)"
    )
    parser.add_argument("--weights", help="read these weights instead of the catalog's")
    parser.add_argument("--force", action="store_true", help="rewrite an existing checkpoint")
    parser.add_argument("--check", action="store_true", help="load it back with whisper.load_model")
    args = parser.parse_args(argv)

    from wruntime.errors import WruntimeError

    path = default_path(args.arch) if args.out is None else args.out
    if path.resolve().is_relative_to(ROOT):
        print(
            f"error: {path} is inside the repository; checkpoints are never kept there.",
            file=sys.stderr,
        )
        return 2
    try:
        if args.force or not path.exists():
            write_checkpoint(load_canonical(args.arch, args.weights), path)
    except WruntimeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if args.check:
        import whisper

        model = whisper.load_model(str(path), device="cpu")
        print(f"loaded {path}: {model.dims}")
    else:
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
