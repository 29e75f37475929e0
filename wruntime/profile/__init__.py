"""Profiling: where a transcription's time (and energy) went, stage by stage.

    from wruntime.profile import run_profile
    report = run_profile("talk.flac", "tiny.en-fp16", runs=3)
    report.median.rtf, report.median.rows(), report.median.energy.best

The stage timer (`wruntime.timing`) is always on; this stage turns its flat
totals into a report a user can act on: exclusive time per stage that adds up
to the run's wall time (with the remainder shown as "other", never hidden),
realtime factor overall and per stage, CPU seconds per audio second (the
energy proxy that exists everywhere), the OS energy counter where readable,
a labelled estimate where not, and first versus warm model load.

Nesting in the timer's totals, and how it is undone here:
"decode" = "decoder" + "search"; "decoder" = "decoder.prefill" + steps (the
transcriber's runtime records the prompt call apart); "language" contains an encoder call and a decode, which
are already in "encoder"/"decoder", so it is shown but not summed.
"""

from __future__ import annotations

import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from wruntime.profile.energy import (
    EnergyFigures,
    EnergyMeter,
    EnergyReader,
    WattsTable,
    default_energy_reader,
    energy_figures,
)

#: Exclusive top-level stages, in pipeline order (their sum is compared with the total).
TOP_LEVEL = ("audio", "features", "encoder", "decoder", "search", "text", "words")
#: Stages shown but inside others (never summed).
NESTED = ("language", "decode", "decoder.prefill", "decoder.step")
PREFILL = "decoder.prefill"
STEP = "decoder.step"
OTHER = "other"
_RUNTIME_STAGES = {"encoder", "decoder", PREFILL, STEP}


@dataclass(frozen=True)
class StageRow:
    """One line of a profile: seconds of wall and process CPU time, and calls."""

    name: str
    wall: float
    cpu: float
    count: int
    #: True when this time is also inside another row (not part of the sum).
    nested: bool = False

    def to_dict(self, audio_seconds: float) -> dict[str, Any]:
        return {
            "stage": self.name,
            "wall": self.wall,
            "cpu": self.cpu,
            "count": self.count,
            "nested": self.nested,
            "rtf": _ratio(self.wall, audio_seconds),
            "cpu_per_audio_second": _ratio(self.cpu, audio_seconds),
        }


@dataclass
class RunProfile:
    """One transcription, profiled."""

    audio_seconds: float
    wall: float
    cpu: float
    timings: dict[str, dict[str, float]]
    tokens: int = 0
    energy: EnergyFigures | None = None
    stage_units: dict[str, str] = field(default_factory=dict)

    # ---------------------------------------------------------------- views

    def rows(self) -> list[StageRow]:
        """Every stage, in pipeline order, then "other" (the unattributed rest)."""
        t = self.timings
        out: list[StageRow] = []
        for name in ("audio", "features", "language", "encoder"):
            if name in t:
                out.append(_row(name, t[name], nested=name == "language"))
        if "decoder" in t:
            if PREFILL in t:
                out.append(_row(PREFILL, t[PREFILL], nested=True))
                out.append(_row(STEP, _minus(t["decoder"], t[PREFILL]), nested=True))
            out.append(_row("decoder", t["decoder"]))
        for name in ("search", "text", "words"):
            if name in t:
                out.append(_row(name, t[name]))
        known = {*TOP_LEVEL, *NESTED}
        out.extend(_row(name, s) for name, s in t.items() if name not in known)
        summed = [r for r in out if not r.nested]
        out.append(
            StageRow(
                OTHER,
                self.wall - sum(r.wall for r in summed),
                max(0.0, self.cpu - sum(r.cpu for r in summed)),
                0,
            )
        )
        return out

    @property
    def stage_sum(self) -> float:
        """Sum of the exclusive stages' wall time (everything but "other")."""
        return sum(r.wall for r in self.rows() if not r.nested and r.name != OTHER)

    @property
    def coverage(self) -> float:
        """stage_sum / wall: 1.0 means every second is attributed to a stage."""
        return _ratio(self.stage_sum, self.wall)

    @property
    def rtf(self) -> float:
        return _ratio(self.wall, self.audio_seconds)

    @property
    def cpu_per_audio_second(self) -> float:
        return _ratio(self.cpu, self.audio_seconds)

    @property
    def decoder_calls(self) -> int:
        return int(self.timings.get("decoder", {}).get("count", 0))

    def to_dict(self) -> dict[str, Any]:
        return {
            "audio_seconds": self.audio_seconds,
            "wall": self.wall,
            "cpu": self.cpu,
            "rtf": _num(self.rtf),
            "cpu_per_audio_second": _num(self.cpu_per_audio_second),
            "stage_sum": self.stage_sum,
            "coverage": _num(self.coverage),
            "tokens": self.tokens,
            "decoder_calls": self.decoder_calls,
            "stages": [r.to_dict(self.audio_seconds) for r in self.rows()],
            "stage_units": dict(self.stage_units),
            "energy": self.energy.to_dict() if self.energy else None,
        }


def _row(name: str, s: Mapping[str, float], nested: bool = False) -> StageRow:
    return StageRow(name, float(s["wall"]), float(s["cpu"]), int(s.get("count", 0)), nested)


def _minus(a: Mapping[str, float], b: Mapping[str, float]) -> dict[str, float]:
    return {
        "wall": max(0.0, a["wall"] - b["wall"]),
        "cpu": max(0.0, a["cpu"] - b["cpu"]),
        "count": max(0, int(a.get("count", 0)) - int(b.get("count", 0))),
    }


def profile_timings(
    timings: Mapping[str, Mapping[str, float]],
    audio_seconds: float,
    wall: float,
    *,
    tokens: int = 0,
    cpu: float | None = None,
    stage_units: Mapping[str, Any] | None = None,
    watts: WattsTable | None = None,
    meter: EnergyMeter | None = None,
) -> RunProfile:
    """Profile a stage timer's totals (`StageTimer.to_dict()`) over `wall` seconds.

    `cpu` is the run's process CPU seconds when the caller measured them (else
    the stages' sum); `stage_units` maps "encoder"/"decoder" to the Core ML
    compute units that ran them, for the energy estimate (absent: the CPU).
    """
    copied = {k: dict(v) for k, v in timings.items()}
    if "search" not in copied and "decode" in copied:
        from wruntime.transcribe.transcriber import derive_search

        derive_search(copied)
    units = {k: str(getattr(v, "name", v)) for k, v in (stage_units or {}).items() if v}
    run = RunProfile(
        audio_seconds=float(audio_seconds),
        wall=float(wall),
        cpu=0.0,
        timings=copied,
        tokens=tokens,
        stage_units=units,
    )
    summed = [r for r in run.rows() if not r.nested and r.name != OTHER]
    run.cpu = float(cpu) if cpu is not None else sum(r.cpu for r in summed)
    exclusive = {r.name: (r.wall, r.cpu) for r in run.rows() if not r.nested}
    run.energy = energy_figures(
        exclusive, run.audio_seconds, run.cpu, stage_units or {}, watts=watts, measured=meter
    )
    return run


def profile_result(
    result: Any,
    *,
    cpu: float | None = None,
    stage_units: Mapping[str, Any] | None = None,
    watts: WattsTable | None = None,
    meter: EnergyMeter | None = None,
) -> RunProfile:
    """Profile a finished `TranscriptionResult` (its timings, duration and wall time)."""
    return profile_timings(
        result.timings,
        result.duration,
        result.wall_time,
        tokens=sum(len(s.tokens) for s in result.segments),
        cpu=cpu,
        stage_units=stage_units,
        watts=watts,
        meter=meter,
    )


def median_run(runs: Sequence[RunProfile]) -> RunProfile:
    """The run with the median wall time (the lower middle one for an even count).

    A real run rather than per-field medians, so its stages still add up to
    its total; per-stage medians across runs are `stage_medians`.
    """
    if not runs:
        raise ValueError("median_run needs at least one run")
    ordered = sorted(runs, key=lambda r: r.wall)
    return ordered[(len(ordered) - 1) // 2]


def stage_medians(runs: Sequence[RunProfile]) -> dict[str, float]:
    """Median wall seconds of each exclusive stage across runs (0 where a run lacks it)."""
    names = list(dict.fromkeys(r.name for run in runs for r in run.rows()))
    per_run = [{r.name: r.wall for r in run.rows()} for run in runs]
    return {n: statistics.median(p.get(n, 0.0) for p in per_run) for n in names}


# --------------------------------------------------------------------------- running


class _Opened:
    """What `TranscriptionStream` needs of a transcriber: its runtime."""

    def __init__(self, model: Any) -> None:
        from wruntime.transcribe.runtime import ModelRuntime

        self.model = model
        self.runtime = ModelRuntime(model)


def executor_units(model: Any) -> dict[str, Any]:
    """Compute units of a model's Core ML executors, for the energy estimate.

    Only executors whose backend is Core ML count: an interpreter standing in
    for Core ML carries the units through the plumbing but computes on the
    CPU, and the estimate must charge the CPU for it.
    """
    units: dict[str, Any] = {}
    for name in ("encoder", "decoder"):
        ex = getattr(model, name, None)
        info = getattr(ex, "load_info", None)
        if info is not None and getattr(info, "backend", "") == "coreml":
            units[name] = ex.compute_units
    return units


def declared_units(model: Any) -> dict[str, str]:
    """The compute units each stage's executor was asked for (recorded even by stand-ins)."""
    out: dict[str, str] = {}
    for name in ("encoder", "decoder"):
        units = getattr(getattr(model, name, None), "compute_units", None)
        if units is not None:
            out[name] = str(getattr(units, "name", units))
    return out


def load_infos(model: Any) -> dict[str, dict[str, Any]]:
    """What loading each executor cost (Core ML executors report first vs warm load)."""
    out: dict[str, dict[str, Any]] = {}
    for name in ("encoder", "decoder"):
        info = getattr(getattr(model, name, None), "load_info", None)
        if info is not None and hasattr(info, "as_dict"):
            out[name] = info.as_dict()
    return out


def profile_once(
    model: Any,
    audio: Any,
    *,
    options: Mapping[str, Any] | None = None,
    watts: WattsTable | None = None,
    energy_reader: EnergyReader | None = None,
    stage_units: Mapping[str, Any] | None = None,
) -> tuple[RunProfile, Any]:
    """Transcribe `audio` once with an opened `WhisperModel`; (profile, result)."""
    from wruntime.transcribe.transcriber import TranscribeOptions, TranscriptionStream

    opened = _Opened(model)
    opts = TranscribeOptions.from_kwargs(dict(options or {}))
    meter = EnergyMeter(reader=energy_reader)
    with meter:
        cpu0 = time.process_time()
        result = TranscriptionStream(opened, audio, opts).result()  # type: ignore[arg-type]
        cpu = time.process_time() - cpu0
    units = executor_units(model) if stage_units is None else stage_units
    run = profile_result(result, cpu=cpu, stage_units=units, watts=watts, meter=meter)
    run.stage_units = declared_units(model) or run.stage_units
    return run, result


@dataclass
class ProfileReport:
    """`wruntime profile`: a model on one input, first run and warm runs."""

    model: str
    executor: str
    audio: str
    first: RunProfile
    runs: list[RunProfile]
    load: dict[str, Any] = field(default_factory=dict)
    machine: dict[str, Any] = field(default_factory=dict)
    text: str = ""
    notes: list[str] = field(default_factory=list)

    @property
    def median(self) -> RunProfile:
        return median_run(self.runs or [self.first])

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "executor": self.executor,
            "audio": self.audio,
            "text": self.text,
            "machine": self.machine,
            "load": self.load,
            "first_run": self.first.to_dict(),
            "median": self.median.to_dict(),
            "runs": [r.to_dict() for r in self.runs],
            "notes": list(self.notes),
        }


def open_model(
    model: str | os.PathLike[str],
    *,
    executor: str = "auto",
    compute_units: Mapping[str, str] | None = None,
    factory: Any | None = None,
    build_progress: Any | None = None,
    preload_batches: Sequence[int] = (1,),
) -> tuple[Any, float]:
    """(WhisperModel, seconds to open it): a catalog name is built on first use.

    `preload_batches`: decoder batch sizes (1 greedy, beam_size/best_of otherwise)
    whose stateful functions are loaded now rather than inside the first run.
    """
    from wruntime.model import WhisperModel

    path = os.fspath(model)
    if not os.path.isdir(path):
        # A name the catalog does not know fails in one line before anything loads.
        from wruntime.catalog import resolve_model_name

        resolve_model_name(path)
        from wruntime.build import ensure_model

        path = os.fspath(
            getattr(
                ensure_model(path, progress=True if build_progress is None else build_progress),
                "path",
                path,
            )
        )
    started = time.perf_counter()
    opened = WhisperModel.open(
        path, executor=executor, compute_units=compute_units, factory=factory
    )
    # The tokenizer is built on first use, outside every stage of the transcriber's timer;
    # building it here counts it as loading (its encoding is shared by every language).
    opened.tokenizer_for(language="en", task="transcribe")
    if getattr(opened, "prefer_stateful", False):
        # Stateful decoder functions load on first use; load them here so their cost is
        # counted as load time, not as the first run's decoding.
        for batch in preload_batches:
            opened.stateful_decoder(batch)
    return opened, time.perf_counter() - started


def run_profile(
    audio: str | os.PathLike[str],
    model: str | os.PathLike[str],
    *,
    executor: str = "auto",
    compute_units: Mapping[str, str] | None = None,
    runs: int = 3,
    options: Mapping[str, Any] | None = None,
    watts: WattsTable | None = None,
    energy_reader: EnergyReader | str | None = "default",
    warm_load: bool = True,
    progress: Callable[[str], None] | None = None,
) -> ProfileReport:
    """Open the model (twice, for first vs warm load), transcribe once cold, `runs` times warm."""
    from wruntime.model import resolve_executor_kind

    if runs < 1:
        from wruntime.errors import WruntimeError

        raise WruntimeError(f"--runs must be at least 1, not {runs}.")
    reader = default_energy_reader() if energy_reader == "default" else energy_reader
    say = progress or (lambda _msg: None)
    batches = _batches(options)
    say("loading the model")
    opened, first_load = open_model(
        model, executor=executor, compute_units=compute_units, preload_batches=batches
    )
    load: dict[str, Any] = {"first_seconds": first_load, "executors_first": load_infos(opened)}
    if warm_load:
        say("loading it again (warm load)")
        opened, warm = open_model(
            model, executor=executor, compute_units=compute_units, preload_batches=batches
        )
        load["warm_seconds"] = warm
        load["executors_warm"] = load_infos(opened)
    say("first run")
    first, result = profile_once(
        opened,
        audio,
        options=options,
        watts=watts,
        energy_reader=reader,  # type: ignore[arg-type]
    )
    warm_runs: list[RunProfile] = []
    for i in range(runs):
        say(f"warm run {i + 1}/{runs}")
        run, result = profile_once(
            opened,
            audio,
            options=options,
            watts=watts,
            energy_reader=reader,  # type: ignore[arg-type]
        )
        warm_runs.append(run)
    notes = []
    if reader is None:
        notes.append(
            "No energy counter readable here: energy figures are estimates from nominal watts."
        )
    else:
        notes.append(
            "Measured energy is the kernel's per-process counter (CPU side); GPU and Neural "
            "Engine work are not known to be included."
        )
    return ProfileReport(
        model=str(model),
        executor=resolve_executor_kind(executor),
        audio=os.fspath(audio),
        first=first,
        runs=warm_runs,
        load=load,
        machine=machine_description(),
        text=result.text,
        notes=notes,
    )


def _batches(options: Mapping[str, Any] | None) -> tuple[int, ...]:
    """Decoder batch sizes a transcription with these options uses (1 always)."""
    opts = options or {}
    sizes = {1} | {int(opts[k]) for k in ("beam_size", "best_of") if opts.get(k)}
    return tuple(sorted(sizes))


# --------------------------------------------------------------------------- machine


def machine_description() -> dict[str, Any]:
    """What a benchmark result needs to be compared across machines."""
    import numpy as np

    desc: dict[str, Any] = {
        "system": platform.system(),
        "release": platform.release(),
        "machine": platform.machine(),
        "processor": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "numpy": np.__version__,
    }
    if sys.platform == "darwin":
        desc["macos"] = platform.mac_ver()[0]
    try:
        import importlib.metadata as md

        desc["coremltools"] = md.version("coremltools")
        desc["wruntime"] = md.version("wruntime")
    except Exception:
        pass
    return desc


def _cpu_name() -> str:
    if sys.platform == "darwin":
        import subprocess

        try:
            return subprocess.run(
                ["sysctl", "-n", "machdep.cpu.brand_string"],
                capture_output=True,
                text=True,
                timeout=5,
            ).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return platform.processor()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def _ratio(a: float, b: float) -> float:
    return a / b if b > 0 else math.nan


def _num(x: float) -> float | None:
    return float(x) if math.isfinite(x) else None


__all__ = [
    "NESTED",
    "OTHER",
    "TOP_LEVEL",
    "EnergyFigures",
    "EnergyMeter",
    "ProfileReport",
    "RunProfile",
    "StageRow",
    "WattsTable",
    "machine_description",
    "median_run",
    "open_model",
    "profile_once",
    "profile_result",
    "profile_timings",
    "run_profile",
    "stage_medians",
]
