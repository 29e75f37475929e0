"""Profiles as a reader wants them: rich tables, JSON, and an optional PNG chart.

Every energy figure carries its kind in the table itself ("measured" or
"estimate"), so a screenshot of a table cannot pass an estimate off as a
reading.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from rich.table import Table

from wruntime.atomic import atomic_write
from wruntime.errors import WruntimeError
from wruntime.profile import OTHER, ProfileReport, RunProfile

_STAGE_HELP = {
    "audio": "decode file, mono, 16 kHz",
    "features": "log-mel",
    "language": "language detection (its encoder/decoder time is in those rows)",
    "encoder": "encoder predict (+ cross K/V)",
    "decoder.prefill": "prompt, one call per decode",
    "decoder.step": "one call per token",
    "decoder": "all decoder calls",
    "search": "logit filters, greedy/beam search",
    "text": "tokens to text",
    "words": "word timestamps (DTW)",
    OTHER: "unattributed (seeking, tokenizer setup)",
}


def _fmt(x: float | None, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "-"
    return f"{x:.{digits}f}"


def stage_table(run: RunProfile, title: str | None = None) -> Table:
    """Every stage of one run: wall, CPU, calls, share, RTF and CPU s per audio s."""
    audio = run.audio_seconds
    table = Table(
        title=title or f"Stages: {audio:.1f} s of audio in {run.wall:.3f} s (RTF {_fmt(run.rtf)})"
    )
    for name, justify in (
        ("stage", "left"),
        ("wall s", "right"),
        ("cpu s", "right"),
        ("calls", "right"),
        ("% wall", "right"),
        ("RTF", "right"),
        ("cpu s / audio s", "right"),
        ("what", "left"),
    ):
        table.add_column(name, justify=justify)  # type: ignore[arg-type]
    for row in run.rows():
        name = f"  {row.name}" if row.nested and row.name.startswith("decoder.") else row.name
        table.add_row(
            name + (" *" if row.nested else ""),
            _fmt(row.wall),
            _fmt(row.cpu),
            str(row.count) if row.count else "",
            _fmt(100 * row.wall / run.wall, 1) if run.wall > 0 else "-",
            _fmt(row.wall / audio if audio > 0 else math.nan, 4),
            _fmt(row.cpu / audio if audio > 0 else math.nan, 4),
            _STAGE_HELP.get(row.name, ""),
        )
    table.add_row(
        "total",
        _fmt(run.wall),
        _fmt(run.cpu),
        "",
        "100.0",
        _fmt(run.rtf, 4),
        _fmt(run.cpu_per_audio_second, 4),
        f"stages add up to {100 * run.coverage:.1f}% of the total",
        style="bold",
    )
    lines = [
        "* inside the row below/above it, not summed",
        f"tokens kept {run.tokens}, decoder calls {run.decoder_calls}",
    ]
    if run.energy is not None:
        lines.append(energy_line(run))
    if run.stage_units:
        lines.append("compute units: " + ", ".join(f"{k} {v}" for k, v in run.stage_units.items()))
    table.caption = "\n".join(lines)
    return table


def energy_line(run: RunProfile) -> str:
    """One line, each figure with its kind: never an estimate without the word."""
    e = run.energy
    if e is None:
        return ""
    parts = [f"CPU {_fmt(e.cpu_seconds_per_audio_second, 3)} s per audio s (measured)"]
    measured = e.measured_mj_per_audio_second
    if measured is not None:
        parts.append(f"energy {_fmt(measured, 1)} mJ per audio s (measured: {e.measured_source})")
    parts.append(
        f"energy {_fmt(e.estimate_mj_per_audio_second, 1)} mJ per audio s "
        f"(estimate: nominal W {', '.join(f'{k}={v:g}' for k, v in e.watts.as_dict().items())})"
    )
    return "; ".join(parts)


def load_table(load: Mapping[str, Any]) -> Table:
    """First versus warm model load (and Core ML's compile time where it reports it)."""
    table = Table(title="Model load")
    for name, justify in (("load", "left"), ("seconds", "right"), ("detail", "left")):
        table.add_column(name, justify=justify)  # type: ignore[arg-type]
    table.add_row("first (this process)", _fmt(load.get("first_seconds")), "")
    if "warm_seconds" in load:
        table.add_row("warm (again)", _fmt(load.get("warm_seconds")), "")
    for key in ("executors_first", "executors_warm"):
        for stage, info in (load.get(key) or {}).items():
            detail = (
                f"{info.get('backend')} {info.get('compute_units')} {info.get('load')} load; "
                f"compile {_fmt(info.get('compile_seconds'))} s, "
                f"first load when compiled {_fmt(info.get('first_load_seconds'))} s"
            )
            table.add_row(
                f"  {stage} ({key.split('_')[1]})", _fmt(info.get("load_seconds")), detail
            )
    return table


def profile_tables(report: ProfileReport) -> list[Table]:
    """`wruntime profile`: load, the first (cold) run, and the warm median."""
    med = report.median
    return [
        load_table(report.load),
        stage_table(report.first, title=f"First run (cold): {report.audio}"),
        stage_table(
            med,
            title=(
                f"Warm runs, the median of {len(report.runs)}: {med.audio_seconds:.1f} s of audio "
                f"in {med.wall:.3f} s (RTF {_fmt(med.rtf)}) — {report.model}, {report.executor}"
            ),
        ),
    ]


def matrix_table(matrix: Any) -> Table:
    """One row per compute-unit pair; the best for latency and for energy marked."""
    kind = matrix.energy_kind
    title = f"Compute-unit matrix: {matrix.model}, {matrix.audio_seconds:.1f} s of audio"
    if matrix.stand_in:
        title += " (interpreter stand-in)"
    table = Table(title=title)
    for name, justify in (
        ("encoder", "left"),
        ("decoder", "left"),
        ("enc s", "right"),
        ("dec s", "right"),
        ("search s", "right"),
        ("total s (min-max)", "right"),
        ("RTF", "right"),
        ("cpu s/audio s", "right"),
        (f"mJ/audio s ({kind})", "right"),
        ("best", "left"),
    ):
        table.add_column(name, justify=justify)  # type: ignore[arg-type]
    fastest = matrix.best_latency
    frugal = matrix.best_energy
    for row in matrix.rows:
        med = row.median
        marks = [
            m for m, best in (("latency", fastest), (f"energy ({kind})", frugal)) if row is best
        ]
        table.add_row(
            row.encoder_units,
            row.decoder_units,
            _fmt(row.stage_median("encoder")),
            _fmt(row.stage_median("decoder")),
            _fmt(row.stage_median("search")),
            f"{_fmt(row.wall_median)} ({_fmt(row.wall_min)}-{_fmt(row.wall_max)})",
            _fmt(med.rtf, 4),
            _fmt(med.cpu_per_audio_second, 4),
            _fmt(row.energy(kind), 1),
            ", ".join(marks),
        )
    table.caption = "\n".join(
        [f"medians of {matrix.runs} run(s) after {matrix.warmup} warm-up(s)", *matrix.notes]
    )
    return table


# --------------------------------------------------------------------------- files


def write_json(data: Mapping[str, Any], path: str | os.PathLike[str]) -> Path:
    """JSON with NaN written as null (JSON has no NaN)."""
    clean = _clean(data)
    out = Path(path)
    atomic_write(out, lambda f: json.dump(clean, f, indent=2, ensure_ascii=False))
    return out


def _clean(x: Any) -> Any:
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, Mapping):
        return {str(k): _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    return x


def _pyplot() -> Any:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise WruntimeError("PNG charts need matplotlib: pip install 'wruntime[plot]'.") from None
    return plt


_COLORS = {
    "audio": "#9e9e9e",
    "features": "#bdbdbd",
    "encoder": "#1f77b4",
    "decoder": "#ff7f0e",
    "search": "#2ca02c",
    "text": "#8c564b",
    "words": "#e377c2",
    OTHER: "#dddddd",
}


def _bars(ax: Any, labels: list[str], runs: list[RunProfile], audio: float) -> None:
    """Stacked horizontal bars of exclusive stage time (as RTF) per label."""
    names = list(dict.fromkeys(r.name for run in runs for r in run.rows() if not r.nested))
    left = [0.0] * len(runs)
    for name in names:
        widths = []
        for run in runs:
            row = next((r for r in run.rows() if r.name == name and not r.nested), None)
            widths.append(max(0.0, row.wall) / audio if row and audio > 0 else 0.0)
        ax.barh(labels, widths, left=left, label=name, color=_COLORS.get(name))
        left = [a + b for a, b in zip(left, widths, strict=True)]
    ax.set_xlabel("realtime factor (processing s / audio s), by stage")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.25), ncol=len(names), fontsize="small")
    ax.invert_yaxis()


def save_png(report_or_matrix: Any, path: str | os.PathLike[str]) -> Path:
    """A stacked-bar chart: stages per run (profile) or per compute-unit pair (matrix)."""
    plt = _pyplot()
    from wruntime.profile.matrix import Matrix

    if isinstance(report_or_matrix, Matrix):
        m = report_or_matrix
        runs = [row.median for row in m.rows]
        labels = [row.label for row in m.rows]
        audio = m.audio_seconds
        kind = m.energy_kind
        fig, (ax, ax2) = plt.subplots(
            1, 2, figsize=(12, 2.2 + 0.45 * len(runs)), gridspec_kw={"width_ratios": [3, 1]}
        )
        _bars(ax, labels, runs, audio)
        ax2.barh(labels, [row.energy(kind) for row in m.rows], color="#7f7f7f")
        ax2.set_xlabel(f"mJ per audio s ({kind})")
        ax2.invert_yaxis()
        ax2.set_yticks([])
        title = f"{m.model}: compute-unit matrix" + (
            " (interpreter stand-in)" if m.stand_in else ""
        )
    else:
        r: ProfileReport = report_or_matrix
        runs = [r.first, r.median]
        labels = ["first run (cold)", f"warm median ({len(r.runs)})"]
        audio = r.median.audio_seconds
        fig, ax = plt.subplots(figsize=(10, 3.2))
        _bars(ax, labels, runs, audio)
        title = f"{r.model} on {Path(r.audio).name} ({r.executor})"
    fig.suptitle(title)
    fig.tight_layout()
    out = Path(path)
    atomic_write(out, lambda f: fig.savefig(f, format="png", dpi=110), mode="wb")
    plt.close(fig)
    return out


def timings_table(
    timings: Mapping[str, Mapping[str, float]],
    audio_seconds: float,
    wall: float,
    *,
    cpu: float | None = None,
    load_seconds: float | None = None,
    tokens: int = 0,
) -> Table:
    """The `wtranscribe --profile` table: every stage, RTF, CPU per audio second, load.

    Takes a `StageTimer.to_dict()` (one file's or several files' merged totals)
    and the wall time they were measured over.
    """
    from wruntime.profile import profile_timings

    run = profile_timings(timings, audio_seconds, wall, cpu=cpu, tokens=tokens)
    table = stage_table(run)
    if load_seconds is not None:
        table.caption = f"{table.caption}\nmodel load {load_seconds:.3f} s (not in the total)"
    return table
