"""How many threads the interpreter's products and element-wise passes may use.

Two measurements on the 2-core machines this was written on decide it:

* Waking a second BLAS thread for a small product (a decoder step's
  matrix-vector products) costs a scheduler tick, far more than the product:
  16 ms instead of 0.04 ms was measured. Small products always run on one thread.
* When the cores are already busy with other processes (load average 8-10 on
  2 cores), multi-threaded BLAS is about 3x *slower* than one thread for the
  whole tiny.en encoder (threads wait for each other at every barrier), while
  on an idle machine two threads are faster. So each run picks its thread count
  from the load average: all cores when they are free, one when they are not.

`WRUNTIME_THREADS` overrides the choice. BLAS is switched through threadpoolctl's
handle on numpy's OpenBLAS, only when the wanted count changes; without
threadpoolctl, BLAS keeps its own setting.
"""

from __future__ import annotations

import os
from typing import Any

#: Products with fewer multiply-adds than this run single-threaded.
SMALL_PRODUCT = 1 << 23

_controllers: list[Any] | None = None
_current: int | None = None
_blas_max = 1
_run_threads = 1


def _init() -> list[Any]:
    global _controllers, _blas_max, _current
    if _controllers is None:
        try:
            from threadpoolctl import ThreadpoolController

            found = [c for c in ThreadpoolController().lib_controllers if c.user_api == "blas"]
        except Exception:  # pragma: no cover - threadpoolctl comes with scikit-learn
            found = []
        _controllers = found
        _blas_max = max((c.num_threads for c in found), default=1)
        _current = _blas_max
    return _controllers


def _policy() -> int:
    cores = os.cpu_count() or 1
    forced = os.environ.get("WRUNTIME_THREADS", "")
    if forced.isdigit() and int(forced) > 0:
        return min(int(forced), cores)
    try:
        load = os.getloadavg()[0]
    except OSError:  # pragma: no cover - not on this platform
        return cores
    # Our own threads count towards the load too: only a load well past the core
    # count means other processes hold the cores.
    return cores if load < 1.5 * cores else 1


def begin_run() -> int:
    """Choose the thread count for one predict; returns it."""
    global _run_threads
    _init()
    _run_threads = _policy()
    return _run_threads


def run_threads() -> int:
    """The thread count chosen for the current run (element-wise passes use it)."""
    return _run_threads


def _set(want: int) -> None:
    global _current
    if want != _current and _controllers:
        for c in _controllers:
            c.set_num_threads(want)
        _current = want


def for_product(macs: int) -> None:
    """Set the BLAS thread count for a product of `macs` multiply-adds."""
    if _controllers is None:
        _init()
    _set(1 if macs < SMALL_PRODUCT else min(_run_threads, _blas_max))


def restore() -> None:
    """Give BLAS back its own thread count (after a run, for the rest of the process)."""
    if _controllers:
        _set(_blas_max)
