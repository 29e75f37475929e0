"""The split matrix: the encoder and the decoder under every compute-unit pair.

The project's bet is encoder on the Neural Engine, decoder on the GPU. That is
folklore until measured on the machine at hand: the Neural Engine can lose to
the GPU on a small model, and its advantage may be energy rather than speed.
So every pair (4 x 4) is loaded, warmed up, run several times on the same
audio, and reported as medians, with the best pair for latency and the best
for energy marked.

Each (stage, compute units) executor is loaded once and shared by every pair
that uses it (`UnitCachingFactory`): 8 loads instead of 32, and the first
(compile) load of each is reported apart.

Off macOS there is no Core ML: the matrix has the interpreter's row alone and
says so. `stand_in=True` (or WRUNTIME_COREML_BACKEND=interpreter with the
coreml executor) runs every pair through the Core ML executor's code path with
the MIL interpreter answering `predict`, so the plumbing is exercised on
Linux; those rows are labelled as stand-ins, their differences are noise.
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from wruntime.errors import WruntimeError
from wruntime.profile import (
    RunProfile,
    declared_units,
    executor_units,
    machine_description,
    median_run,
    open_model,
    profile_once,
    stage_medians,
)
from wruntime.profile.energy import ESTIMATE, MEASURED, EnergyReader, WattsTable

UNITS = ("CPU_ONLY", "CPU_AND_GPU", "CPU_AND_NE", "ALL")
ALL_PAIRS: tuple[tuple[str, str], ...] = tuple((e, d) for e in UNITS for d in UNITS)
INTERPRETER = "interpreter"

LINUX_NOTE = (
    "Core ML runs only on macOS: this matrix has the interpreter's row alone "
    "(every stage on the CPU)."
)
STAND_IN_NOTE = (
    "Stand-in: the MIL interpreter answers predict for every compute-unit choice (no Core ML "
    "here); the units go through the Core ML executor's plumbing, but every row runs on the "
    "CPU, so differences between rows are noise."
)


class UnitCachingFactory:
    """A `WhisperModel` executor factory that loads each (package, function, units) once.

    ``backend`` is the Core ML executor's backend factory (`CoreMLBackend()` on
    macOS, `interpreter_backend` for a stand-in); ``host`` is passed to the
    executor's OS and compute-unit checks.
    """

    def __init__(self, backend: Any | None = None, host: Any | None = None) -> None:
        self.backend = backend
        self.host = host
        self.loaded: dict[tuple[Path, str, str | None], Any] = {}
        self.load_seconds: dict[tuple[Path, str, str | None], float] = {}

    def __call__(
        self,
        package: Path,
        kind: str,
        function_name: str,
        compute_units: str | None,
        fp16_emulation: bool | None,
    ) -> Any:
        from wruntime.executors.coreml import CoreMLExecutor, stage_of

        if kind != "coreml":
            raise WruntimeError("The compute-unit matrix needs the coreml executor.")
        key = (Path(package), function_name, compute_units)
        if key not in self.loaded:
            started = time.perf_counter()
            self.loaded[key] = CoreMLExecutor(
                package,
                function_name=function_name,
                compute_units=compute_units,
                stage=stage_of(Path(package)),
                factory=self.backend,
                host=self.host,
                fp16_emulation=fp16_emulation,
            )
            self.load_seconds[key] = time.perf_counter() - started
        return self.loaded[key]


@dataclass
class MatrixRow:
    """One compute-unit pair: its runs and their medians."""

    encoder_units: str
    decoder_units: str
    runs: list[RunProfile]
    load: dict[str, Any] = field(default_factory=dict)

    @property
    def median(self) -> RunProfile:
        return median_run(self.runs)

    @property
    def label(self) -> str:
        return f"{self.encoder_units} / {self.decoder_units}"

    def stage_median(self, name: str) -> float:
        """Median over the runs of one stage's exclusive wall seconds."""
        return float(stage_medians(self.runs).get(name, 0.0))

    @property
    def wall_median(self) -> float:
        return statistics.median(r.wall for r in self.runs)

    @property
    def wall_min(self) -> float:
        return min(r.wall for r in self.runs)

    @property
    def wall_max(self) -> float:
        return max(r.wall for r in self.runs)

    def energy(self, kind: str) -> float:
        """Median mJ per audio second: the counter ("measured") or the model ("estimate")."""
        energies = [r.energy for r in self.runs if r.energy is not None]
        if kind == MEASURED:
            values = [e.measured_mj_per_audio_second for e in energies]
        else:
            values = [e.estimate_mj_per_audio_second for e in energies]
        known = [v for v in values if v is not None and v == v]
        return statistics.median(known) if known else float("nan")

    def to_dict(self, energy_kind: str) -> dict[str, Any]:
        m = self.median
        return {
            "encoder_units": self.encoder_units,
            "decoder_units": self.decoder_units,
            "runs": len(self.runs),
            "wall_median": self.wall_median,
            "wall_min": self.wall_min,
            "wall_max": self.wall_max,
            "rtf": m.rtf,
            "cpu_per_audio_second": m.cpu_per_audio_second,
            "stages": {n: self.stage_median(n) for n in ("encoder", "decoder", "search")},
            "energy_mj_per_audio_second": self.energy(energy_kind),
            "energy_kind": energy_kind,
            "load": self.load,
            "median": m.to_dict(),
        }


@dataclass
class Matrix:
    """The whole matrix: rows, which is best, and what the numbers are."""

    model: str
    audio: str
    audio_seconds: float
    rows: list[MatrixRow]
    runs: int
    warmup: int
    stand_in: bool = False
    notes: list[str] = field(default_factory=list)
    machine: dict[str, Any] = field(default_factory=dict)

    @property
    def energy_kind(self) -> str:
        """ "measured" only when every run of every row read the OS counter."""
        for row in self.rows:
            for r in row.runs:
                if r.energy is None or r.energy.measured_joules is None:
                    return ESTIMATE
        return MEASURED if self.rows else ESTIMATE

    @property
    def best_latency(self) -> MatrixRow:
        return min(self.rows, key=lambda r: r.wall_median)

    @property
    def best_energy(self) -> MatrixRow:
        kind = self.energy_kind
        return min(self.rows, key=lambda r: _nan_last(r.energy(kind)))

    def to_dict(self) -> dict[str, Any]:
        kind = self.energy_kind
        return {
            "model": self.model,
            "audio": self.audio,
            "audio_seconds": self.audio_seconds,
            "runs": self.runs,
            "warmup": self.warmup,
            "stand_in": self.stand_in,
            "energy_kind": kind,
            "best_latency": self.best_latency.label,
            "best_energy": self.best_energy.label,
            "rows": [r.to_dict(kind) for r in self.rows],
            "notes": list(self.notes),
            "machine": self.machine,
        }


def _nan_last(x: float) -> float:
    return float("inf") if x != x else x


def parse_pairs(pairs: Sequence[tuple[str, str]] | Sequence[str] | None) -> list[tuple[str, str]]:
    """Pairs as ("CPU_AND_NE", "CPU_AND_GPU") or "cpu_and_ne/cpu_and_gpu"; None: all 16."""
    from wruntime.executors.compute_units import parse_compute_units

    if pairs is None:
        return list(ALL_PAIRS)
    out: list[tuple[str, str]] = []
    for pair in pairs:
        if isinstance(pair, str):
            enc, sep, dec = pair.partition("/")
            if not sep:
                raise WruntimeError(
                    f"Cannot read the pair {pair!r}; write encoder/decoder, e.g. cpu_and_ne/cpu_and_gpu."
                )
            pair = (enc, dec)
        enc_units, dec_units = (parse_compute_units(p).name for p in pair)
        out.append((enc_units, dec_units))
    return out


def _stand_in_requested(executor: str, stand_in: bool) -> bool:
    if stand_in:
        return True
    from wruntime.executors.coreml import InterpreterBackend, default_backend_factory

    return executor == "coreml" and isinstance(default_backend_factory(), InterpreterBackend)


def run_matrix(
    audio: str | os.PathLike[str],
    model: str | os.PathLike[str],
    *,
    executor: str = "auto",
    pairs: Sequence[tuple[str, str]] | Sequence[str] | None = None,
    runs: int = 3,
    warmup: int = 1,
    stand_in: bool = False,
    host: Any | None = None,
    options: Mapping[str, Any] | None = None,
    watts: WattsTable | None = None,
    energy_reader: EnergyReader | str | None = "default",
    progress: Callable[[str], None] | None = None,
) -> Matrix:
    """Run the model on `audio` under every compute-unit pair (see the module docstring)."""
    from wruntime.model import resolve_executor_kind
    from wruntime.profile import _batches
    from wruntime.profile.energy import default_energy_reader

    if runs < 1 or warmup < 0:
        raise WruntimeError("The matrix needs --runs >= 1 and a warm-up count >= 0.")
    reader = default_energy_reader() if energy_reader == "default" else energy_reader
    say = progress or (lambda _msg: None)
    kind = resolve_executor_kind(executor)
    stand_in = _stand_in_requested(kind, stand_in)
    batches = _batches(options)
    notes: list[str] = []

    def measure(opened: Any, label: str) -> list[RunProfile]:
        for i in range(warmup):
            say(f"{label}: warm-up {i + 1}/{warmup}")
            profile_once(opened, audio, options=options, watts=watts, energy_reader=reader)
        out = []
        for i in range(runs):
            say(f"{label}: run {i + 1}/{runs}")
            run, _ = profile_once(opened, audio, options=options, watts=watts, energy_reader=reader)
            out.append(run)
        return out

    rows: list[MatrixRow] = []
    if kind == INTERPRETER and not stand_in:
        notes.append(LINUX_NOTE if platform.system() != "Darwin" else "Interpreter only.")
        opened, seconds = open_model(model, executor=INTERPRETER, preload_batches=batches)
        rows.append(
            MatrixRow(INTERPRETER, INTERPRETER, measure(opened, INTERPRETER), {"seconds": seconds})
        )
    else:
        backend = None
        if stand_in:
            from wruntime.executors.coreml import interpreter_backend

            backend = interpreter_backend
            notes.append(STAND_IN_NOTE)
        factory = UnitCachingFactory(backend=backend, host=host)
        for enc, dec in parse_pairs(pairs):
            label = f"{enc}/{dec}"
            say(f"{label}: loading")
            before = dict(factory.load_seconds)
            opened, seconds = open_model(
                model,
                executor="coreml",
                compute_units={"encoder": enc, "decoder": dec},
                factory=factory,
                preload_batches=batches,
            )
            new = {
                f"{Path(k[0]).stem}:{k[1]}:{k[2]}": v
                for k, v in factory.load_seconds.items()
                if k not in before
            }
            units = declared_units(opened)
            if units.get("encoder") != enc or units.get("decoder") != dec:
                raise WruntimeError(
                    f"The executors report {units}, not the requested {enc}/{dec} compute units."
                )
            row_runs = measure(opened, label)
            rows.append(MatrixRow(enc, dec, row_runs, {"seconds": seconds, "new_loads": new}))
            if not executor_units(opened) and not stand_in:
                notes.append(f"{label}: no Core ML backend reported; energy charged to the CPU.")
    if reader is None:
        notes.append("Energy: estimate from nominal watts (no OS counter readable here).")
    else:
        notes.append(
            "Energy: the kernel's per-process counter (CPU side; GPU and Neural Engine work are "
            "not known to be included)."
        )
    audio_seconds = rows[0].runs[0].audio_seconds if rows and rows[0].runs else 0.0
    return Matrix(
        model=str(model),
        audio=os.fspath(audio),
        audio_seconds=audio_seconds,
        rows=rows,
        runs=runs,
        warmup=warmup,
        stand_in=stand_in,
        notes=notes,
        machine=machine_description(),
    )
