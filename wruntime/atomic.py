"""Files written whole or not at all.

Caches, manifests and reports are read back by later runs, and a run can be
interrupted at any moment: a write must leave the old file or none, never half
of a new one. Every stage writes files that way, so the one helper lives below
them all.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from wruntime.errors import WruntimeError


def atomic_write(
    path: str | os.PathLike[str],
    write: Callable[[IO[Any]], object],
    mode: str = "w",
    *,
    durable: bool = False,
) -> None:
    """``write(file)`` into a temporary file beside ``path``, then rename it over ``path``.

    ``durable`` also flushes it to disk before the rename, for a file whose loss
    after a crash would cost a rebuild (a model's manifest). A failed write removes
    its temporary file.
    """
    path = Path(path)
    if not path.parent.is_dir():
        raise WruntimeError(f"Cannot write {path}: the directory {path.parent} does not exist.")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp's 0600 would outlive the rename
    try:
        with os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
            write(f)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text(path: str | os.PathLike[str], text: str, *, durable: bool = False) -> None:
    """`atomic_write` of a string."""
    atomic_write(path, lambda f: f.write(text), durable=durable)
