"""Energy: the OS's own counter where it has one, else a labelled estimate.

Three figures, never confused with one another:

- **CPU time per audio second** (everywhere): process CPU seconds (all
  threads) over seconds of audio. It is measured, costs nothing, and is the
  proxy that exists on every OS.
- **Measured** (macOS 12+, no root): the kernel's per-process energy counter
  ``ri_energy_nj`` from ``proc_pid_rusage(pid, RUSAGE_INFO_V6, ...)``, read
  through ctypes before and after a run. Declared in the macOS SDK's
  ``usr/include/sys/resource.h`` (``struct rusage_info_v6``; v4, macOS
  10.14+, added ``ri_billed_energy``/``ri_serviced_energy``, v6, macOS 12+,
  added ``ri_energy_nj``/``ri_penergy_nj``) and ``usr/include/libproc.h``
  (``int proc_pid_rusage(int pid, int flavor, rusage_info_t *buffer)``).
  Apple does not document what it covers; it is the kernel's estimate of the
  energy of the task's CPU execution, so Neural Engine and GPU work submitted
  by the process is not known to be in it. Reports say so. (Reports elsewhere
  find ``ri_billed_energy`` stays 0 on Apple silicon, so it is not used, and
  that the counter updates coarsely: runs under ~20 ms read 0 or late.)
- **Estimate** (anywhere): each stage's time times a nominal power for the
  compute unit it ran on, from `WattsTable`. It is a model, not a reading,
  and every report labels it "estimate".

The counter reader is injectable (`EnergyMeter(reader=...)`), so the macOS
path runs in the Linux suite with a reader that returns known counts.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import math
import os
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from wruntime.errors import WruntimeError

#: Environment override of the nominal watts, e.g. "cpu_core=4,gpu=8,ane=2".
WATTS_ENV = "WRUNTIME_NOMINAL_WATTS"

#: ``RUSAGE_INFO_V6`` in <sys/resource.h>: the first flavor with ``ri_energy_nj``.
RUSAGE_INFO_V6 = 6

ESTIMATE = "estimate"
MEASURED = "measured"


# --------------------------------------------------------------------------- nominal power


@dataclass(frozen=True)
class WattsTable:
    """Nominal power of each compute unit while busy, in watts: the estimate's only input.

    The defaults are round figures of the order `powermetrics` shows on M1/M2-class
    chips under sustained ML load (a busy performance core a few watts; the GPU
    several watts; the Neural Engine a watt or two). They are NOT measurements of
    the machine at hand: override them from a reading on your own Mac
    (`--watts cpu_core=...,gpu=...,ane=...` or WRUNTIME_NOMINAL_WATTS).

    ``cpu_core`` is charged per CPU-second (so two busy cores cost twice one);
    ``gpu`` and ``ane`` are charged per wall-second of a stage that ran there.
    """

    cpu_core: float = 4.0
    gpu: float = 8.0
    ane: float = 2.0

    def __post_init__(self) -> None:
        for name in ("cpu_core", "gpu", "ane"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise WruntimeError(
                    f"Nominal watts for {name} must be a number >= 0, not {value!r}."
                )

    @classmethod
    def parse(cls, text: str | None, base: WattsTable | None = None) -> WattsTable:
        """ "cpu_core=4,gpu=8,ane=2" (any subset) over `base` (default: the defaults)."""
        values = dict((base or cls()).as_dict())
        for part in filter(None, (p.strip() for p in (text or "").split(","))):
            key, sep, value = part.partition("=")
            key = key.strip().lower().replace("-", "_")
            key = {"cpu": "cpu_core", "ne": "ane", "neural_engine": "ane"}.get(key, key)
            if not sep or key not in values:
                raise WruntimeError(
                    f"Cannot read nominal watts {text!r}; write e.g. cpu_core=4,gpu=8,ane=2."
                )
            try:
                values[key] = float(value)
            except ValueError:
                raise WruntimeError(
                    f"Nominal watts for {key} must be a number, not {value!r}."
                ) from None
        return cls(**values)

    @classmethod
    def from_env(cls) -> WattsTable:
        return cls.parse(os.environ.get(WATTS_ENV))

    def as_dict(self) -> dict[str, float]:
        return {"cpu_core": self.cpu_core, "gpu": self.gpu, "ane": self.ane}


def accelerator_of(compute_units: Any) -> str:
    """The unit an estimate charges for a stage run with these Core ML compute units.

    ``None`` (the interpreter, or a CPU stage) and CPU_ONLY are "cpu". ALL lets
    Core ML choose the GPU or the Neural Engine per layer; the estimate cannot
    know which, so it charges the costlier of the two ("gpu" with the defaults)
    and the table footnote says so.
    """
    if compute_units is None:
        return "cpu"
    name = str(getattr(compute_units, "name", compute_units)).upper()
    return {"CPU_ONLY": "cpu", "CPU_AND_GPU": "gpu", "CPU_AND_NE": "ane", "ALL": "all"}.get(
        name, "cpu"
    )


def estimate_stage_joules(
    wall: float, cpu: float, compute_units: Any, watts: WattsTable
) -> tuple[float, str]:
    """(joules, unit charged) for one stage: CPU seconds on cores, plus wall on an accelerator.

    The CPU part is always charged: even a Neural Engine stage keeps a core
    busy preparing inputs and waiting, and process CPU time sees exactly that.
    """
    unit = accelerator_of(compute_units)
    joules = max(cpu, 0.0) * watts.cpu_core
    if unit == "gpu":
        joules += wall * watts.gpu
    elif unit == "ane":
        joules += wall * watts.ane
    elif unit == "all":
        unit = "gpu" if watts.gpu >= watts.ane else "ane"
        joules += wall * max(watts.gpu, watts.ane)
    return joules, unit


# --------------------------------------------------------------------------- counters


@dataclass(frozen=True)
class EnergyReading:
    """A cumulative counter value: nanojoules since the process started, and where from."""

    nanojoules: int
    source: str


#: A function returning the process's cumulative energy, or None where there is no counter.
EnergyReader = Callable[[], "EnergyReading | None"]


class _RusageInfoV6(ctypes.Structure):
    """`struct rusage_info_v6` from the macOS SDK's <sys/resource.h>, field for field.

    macOS 12's header ends in ``ri_reserved[12]``; later SDKs spend three of those
    words on neural-footprint fields and keep ``ri_reserved[9]``: the size and the
    offsets of every field read here are the same in both.
    """

    _fields_ = [
        ("ri_uuid", ctypes.c_uint8 * 16),
        *(
            (name, ctypes.c_uint64)
            for name in (
                # v0
                "ri_user_time",
                "ri_system_time",
                "ri_pkg_idle_wkups",
                "ri_interrupt_wkups",
                "ri_pageins",
                "ri_wired_size",
                "ri_resident_size",
                "ri_phys_footprint",
                "ri_proc_start_abstime",
                "ri_proc_exit_abstime",
                # v1
                "ri_child_user_time",
                "ri_child_system_time",
                "ri_child_pkg_idle_wkups",
                "ri_child_interrupt_wkups",
                "ri_child_pageins",
                "ri_child_elapsed_abstime",
                # v2
                "ri_diskio_bytesread",
                "ri_diskio_byteswritten",
                # v3
                "ri_cpu_time_qos_default",
                "ri_cpu_time_qos_maintenance",
                "ri_cpu_time_qos_background",
                "ri_cpu_time_qos_utility",
                "ri_cpu_time_qos_legacy",
                "ri_cpu_time_qos_user_initiated",
                "ri_cpu_time_qos_user_interactive",
                "ri_billed_system_time",
                "ri_serviced_system_time",
                # v4
                "ri_logical_writes",
                "ri_lifetime_max_phys_footprint",
                "ri_instructions",
                "ri_cycles",
                "ri_billed_energy",
                "ri_serviced_energy",
                "ri_interval_max_phys_footprint",
                "ri_runnable_time",
                # v5
                "ri_flags",
                # v6
                "ri_user_ptime",
                "ri_system_ptime",
                "ri_pinstructions",
                "ri_pcycles",
                "ri_energy_nj",
                "ri_penergy_nj",
                "ri_secure_time_in_system",
                "ri_secure_ptime_in_system",
            )
        ),
        ("ri_reserved", ctypes.c_uint64 * 12),
    ]


def rusage_energy_reader(pid: int | None = None) -> EnergyReader | None:
    """A reader of ``ri_energy_nj`` for `pid` (this process by default); None off macOS.

    Also None when libproc cannot be loaded or the first call fails (macOS
    before 12 rejects flavor 6 with EINVAL) or reads 0 (a kernel that keeps the
    field but never advances it): then the caller falls back to the estimate.
    """
    if sys.platform != "darwin":
        return None
    try:
        lib = ctypes.CDLL(ctypes.util.find_library("proc") or "libproc.dylib", use_errno=True)
        call = lib.proc_pid_rusage
    except (OSError, AttributeError):
        return None
    call.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_void_p]
    call.restype = ctypes.c_int
    target = os.getpid() if pid is None else pid

    def read() -> EnergyReading | None:
        info = _RusageInfoV6()
        if call(target, RUSAGE_INFO_V6, ctypes.byref(info)) != 0:
            return None
        return EnergyReading(int(info.ri_energy_nj), "proc_pid_rusage ri_energy_nj (CPU side)")

    first = read()
    if first is None or first.nanojoules == 0:
        return None
    return read


def default_energy_reader() -> EnergyReader | None:
    """The OS counter where one is readable without root, else None (estimate only)."""
    return rusage_energy_reader()


@dataclass
class EnergyMeter:
    """Reads an energy counter around a block; ``joules`` stays None without a counter."""

    reader: EnergyReader | None = field(default_factory=default_energy_reader)
    joules: float | None = None
    source: str | None = None
    _start: EnergyReading | None = None

    def __enter__(self) -> EnergyMeter:
        self.joules = None
        self._start = self.reader() if self.reader is not None else None
        return self

    def __exit__(self, *exc: object) -> None:
        if self._start is None or self.reader is None:
            return
        end = self.reader()
        if end is None or end.nanojoules < self._start.nanojoules:
            return  # the counter vanished or went backwards: no reading rather than a wrong one
        self.joules = (end.nanojoules - self._start.nanojoules) * 1e-9
        self.source = end.source


# --------------------------------------------------------------------------- the report


@dataclass
class EnergyFigures:
    """Energy of one run, per audio second where it says so, each figure labelled."""

    audio_seconds: float
    cpu_seconds: float
    #: Estimated joules per stage and the unit each was charged to.
    estimate_joules: dict[str, float]
    estimate_units: dict[str, str]
    watts: WattsTable
    measured_joules: float | None = None
    measured_source: str | None = None

    @property
    def cpu_seconds_per_audio_second(self) -> float:
        return self.cpu_seconds / self.audio_seconds if self.audio_seconds > 0 else math.nan

    @property
    def estimate_total_joules(self) -> float:
        return sum(self.estimate_joules.values())

    @property
    def estimate_mj_per_audio_second(self) -> float:
        if self.audio_seconds <= 0:
            return math.nan
        return 1e3 * self.estimate_total_joules / self.audio_seconds

    @property
    def measured_mj_per_audio_second(self) -> float | None:
        if self.measured_joules is None or self.audio_seconds <= 0:
            return None
        return 1e3 * self.measured_joules / self.audio_seconds

    @property
    def best(self) -> tuple[float, str]:
        """(mJ per audio second, "measured"/"estimate"): the counter when there is one."""
        measured = self.measured_mj_per_audio_second
        if measured is not None:
            return measured, MEASURED
        return self.estimate_mj_per_audio_second, ESTIMATE

    def to_dict(self) -> dict[str, Any]:
        return {
            "cpu_seconds_per_audio_second": _num(self.cpu_seconds_per_audio_second),
            "measured": None
            if self.measured_joules is None
            else {
                "kind": MEASURED,
                "source": self.measured_source,
                "joules": self.measured_joules,
                "mj_per_audio_second": _num(self.measured_mj_per_audio_second),
            },
            "estimate": {
                "kind": ESTIMATE,
                "joules": self.estimate_total_joules,
                "mj_per_audio_second": _num(self.estimate_mj_per_audio_second),
                "per_stage_joules": dict(self.estimate_joules),
                "per_stage_unit": dict(self.estimate_units),
                "nominal_watts": self.watts.as_dict(),
            },
        }


def energy_figures(
    stages: Mapping[str, tuple[float, float]],
    audio_seconds: float,
    cpu_seconds: float,
    stage_units: Mapping[str, Any],
    watts: WattsTable | None = None,
    measured: EnergyMeter | None = None,
) -> EnergyFigures:
    """Energy of one run from exclusive per-stage (wall, cpu) seconds.

    `stage_units` maps a stage to the compute units it ran with ("encoder" ->
    CPU_AND_NE, ...); stages not in it ran on the CPU.
    """
    watts = watts or WattsTable.from_env()
    joules: dict[str, float] = {}
    units: dict[str, str] = {}
    for name, (wall, cpu) in stages.items():
        joules[name], units[name] = estimate_stage_joules(wall, cpu, stage_units.get(name), watts)
    return EnergyFigures(
        audio_seconds=audio_seconds,
        cpu_seconds=cpu_seconds,
        estimate_joules=joules,
        estimate_units=units,
        watts=watts,
        measured_joules=measured.joules if measured is not None else None,
        measured_source=measured.source if measured is not None else None,
    )


def _num(x: float | None) -> float | None:
    return None if x is None or not math.isfinite(x) else float(x)
