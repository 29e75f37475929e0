"""Profiling: stage accounting, energy counters and estimates, the compute-unit matrix, the CLI.

The real runs transcribe the committed clips with tiny.en through the MIL interpreter; the
macOS paths run here through their seams: an energy reader function, and the Core ML
executor with the interpreter as its backend standing in for every compute unit.
"""

from __future__ import annotations

import ctypes
import json
import math
import statistics
import sys
import time

import pytest
from conftest import CLIPS
from rich.console import Console
from typer.testing import CliRunner

from wruntime.errors import ExecutorError, WruntimeError
from wruntime.profile import (
    OTHER,
    RunProfile,
    median_run,
    profile_timings,
    run_profile,
    stage_medians,
)
from wruntime.profile import report as rep
from wruntime.profile.energy import (
    WATTS_ENV,
    EnergyMeter,
    EnergyReading,
    WattsTable,
    _RusageInfoV6,
    estimate_stage_joules,
    rusage_energy_reader,
)
from wruntime.profile.matrix import (
    LINUX_NOTE,
    STAND_IN_NOTE,
    Matrix,
    MatrixRow,
    parse_pairs,
    run_matrix,
)

MODEL = "tiny.en-fp16"
JFK = CLIPS["jfk"][0]
SHORT = CLIPS["experience"][0]
REQUIRED_STAGES = {"audio", "features", "encoder", "decoder.prefill", "decoder.step", "search"}


def cpu_counter_reader() -> EnergyReading:
    """A real, moving counter for the reader seam: process CPU time charged at 4 W."""
    return EnergyReading(time.process_time_ns() * 4, "test: process CPU time x 4 W")


def render(table) -> str:  # type: ignore[no-untyped-def]
    console = Console(record=True, width=250)
    console.print(table)
    return console.export_text()


# --------------------------------------------------------------------------- energy


def test_watts_table_parses_overrides_and_refuses_nonsense(monkeypatch):
    w = WattsTable.parse("cpu=5, gpu=9.5")
    assert (w.cpu_core, w.gpu, w.ane) == (5.0, 9.5, WattsTable().ane)
    assert WattsTable.parse("ne=1", base=w).as_dict() == {"cpu_core": 5.0, "gpu": 9.5, "ane": 1.0}
    monkeypatch.setenv(WATTS_ENV, "ane=0.5")
    assert WattsTable.from_env().ane == 0.5
    for bad in ("tpu=3", "gpu", "gpu=lots", "gpu=-1"):
        with pytest.raises(WruntimeError):
            WattsTable.parse(bad)


def test_estimate_charges_cpu_seconds_and_the_accelerator_wall():
    w = WattsTable(cpu_core=4.0, gpu=8.0, ane=2.0)
    assert estimate_stage_joules(1.0, 0.5, None, w) == (2.0, "cpu")
    assert estimate_stage_joules(1.0, 0.5, "CPU_ONLY", w) == (2.0, "cpu")
    assert estimate_stage_joules(1.0, 0.5, "CPU_AND_GPU", w) == (10.0, "gpu")
    assert estimate_stage_joules(1.0, 0.5, "CPU_AND_NE", w) == (4.0, "ane")
    # ALL: Core ML may use either; the estimate charges the costlier.
    assert estimate_stage_joules(1.0, 0.5, "ALL", w) == (10.0, "gpu")
    assert estimate_stage_joules(1.0, 0.0, "ALL", WattsTable(gpu=1.0, ane=3.0)) == (3.0, "ane")


def test_rusage_v6_layout_matches_the_sdk_header():
    # <sys/resource.h>: 16-byte uuid, then uint64s; ri_billed_energy is the 32nd (v4),
    # ri_energy_nj the 41st (v6); 464 bytes in all (12 words reserved/neural footprint).
    assert ctypes.sizeof(_RusageInfoV6) == 464
    assert _RusageInfoV6.ri_billed_energy.offset == 16 + 8 * 31
    assert _RusageInfoV6.ri_energy_nj.offset == 16 + 8 * 40


@pytest.mark.skipif(sys.platform == "darwin", reason="the counter exists on macOS")
def test_no_counter_off_macos():
    assert rusage_energy_reader() is None


def test_energy_meter_reads_the_injected_counter():
    counts = iter([1_000_000_000, 3_500_000_000])
    with EnergyMeter(reader=lambda: EnergyReading(next(counts), "fake")) as meter:
        pass
    assert meter.joules == pytest.approx(2.5)
    assert meter.source == "fake"
    with EnergyMeter(reader=None) as meter:
        pass
    assert meter.joules is None
    backwards = iter([5, 1])
    with EnergyMeter(reader=lambda: EnergyReading(next(backwards), "x")) as meter:
        pass
    assert meter.joules is None  # a counter that went backwards gives no reading, not a negative


# --------------------------------------------------------------------------- accounting

TIMINGS = {
    "audio": {"wall": 0.1, "cpu": 0.05, "count": 1},
    "features": {"wall": 0.2, "cpu": 0.2, "count": 1},
    "language": {"wall": 1.3, "cpu": 1.0, "count": 1},
    "encoder": {"wall": 2.0, "cpu": 3.0, "count": 2},
    "decoder.prefill": {"wall": 0.3, "cpu": 0.3, "count": 2},
    "decoder": {"wall": 1.5, "cpu": 1.4, "count": 30},
    "decode": {"wall": 1.8, "cpu": 1.6, "count": 2},
    "text": {"wall": 0.01, "cpu": 0.01, "count": 3},
}


def test_stages_are_exclusive_and_the_rest_is_shown_as_other():
    run = profile_timings(TIMINGS, audio_seconds=10.0, wall=4.5, watts=WattsTable())
    rows = {r.name: r for r in run.rows()}
    assert [r.name for r in run.rows()] == [
        "audio",
        "features",
        "language",
        "encoder",
        "decoder.prefill",
        "decoder.step",
        "decoder",
        "search",
        "text",
        OTHER,
    ]
    assert rows["search"].wall == pytest.approx(0.3)  # decode - decoder
    assert rows["decoder.step"].wall == pytest.approx(1.2)
    assert rows["decoder.step"].count == 28
    assert rows["language"].nested and rows["decoder.step"].nested
    # language holds an encoder call and a decode already counted: not summed.
    assert run.stage_sum == pytest.approx(0.1 + 0.2 + 2.0 + 1.5 + 0.3 + 0.01)
    assert rows[OTHER].wall == pytest.approx(4.5 - run.stage_sum)
    assert run.coverage == pytest.approx(run.stage_sum / 4.5)
    assert run.rtf == pytest.approx(0.45)
    assert run.energy is not None and run.energy.best[1] == "estimate"
    assert run.energy.measured_mj_per_audio_second is None


def test_median_is_a_real_run_and_stage_medians_are_per_stage():
    runs = [
        profile_timings(
            {"encoder": {"wall": w, "cpu": w, "count": 1}}, audio_seconds=2.0, wall=total
        )
        for w, total in ((1.0, 1.5), (3.0, 3.1), (2.5, 2.6), (0.5, 2.7))
    ]
    med = median_run(runs)
    assert med is runs[2]  # walls 1.5, 2.6, 2.7, 3.1: the lower middle
    assert med.stage_sum <= med.wall  # a real run's stages never exceed its total
    medians = stage_medians(runs)
    assert medians["encoder"] == pytest.approx(1.75)
    assert medians[OTHER] == pytest.approx(statistics.median([0.5, 0.1, 0.1, 2.2]))


def _run(wall: float, measured: float | None) -> RunProfile:
    meter = EnergyMeter(reader=None)
    meter.joules, meter.source = measured, "fake" if measured is not None else None
    return profile_timings(
        {"encoder": {"wall": wall, "cpu": wall, "count": 1}},
        audio_seconds=1.0,
        wall=wall,
        meter=meter,
    )


def test_matrix_marks_the_fastest_and_the_most_frugal_pair():
    rows = [
        MatrixRow("CPU_AND_NE", "CPU_AND_GPU", [_run(1.0, 5.0), _run(1.2, 5.0)]),
        MatrixRow("CPU_ONLY", "CPU_ONLY", [_run(2.0, 1.0)]),
    ]
    m = Matrix("m", "a.wav", 1.0, rows, runs=1, warmup=0)
    assert m.energy_kind == "measured"
    assert m.best_latency is rows[0] and m.best_energy is rows[1]
    text = render(rep.matrix_table(m))
    assert "mJ/audio s (measured)" in text and "latency" in text
    # One run without a counter reading makes the whole matrix an estimate, and says so.
    rows[1].runs.append(_run(2.0, None))
    assert m.energy_kind == "estimate"
    assert "(estimate)" in render(rep.matrix_table(m))
    assert json.loads(json.dumps(m.to_dict(), default=str))["energy_kind"] == "estimate"


def test_pairs_parse_like_the_cli_writes_them():
    assert parse_pairs(["cpu_and_ne/cpu_and_gpu", ("ALL", "cpu")]) == [
        ("CPU_AND_NE", "CPU_AND_GPU"),
        ("ALL", "CPU_ONLY"),
    ]
    assert len(parse_pairs(None)) == 16
    with pytest.raises(WruntimeError):
        parse_pairs(["cpu_and_ne"])
    with pytest.raises(ExecutorError):
        parse_pairs(["tpu/cpu"])


def test_json_has_no_nan_and_is_written_whole(tmp_path):
    path = rep.write_json({"a": math.nan, "b": [1.0, math.inf]}, tmp_path / "p.json")
    assert json.loads(path.read_text()) == {"a": None, "b": [1.0, None]}
    assert [p.name for p in tmp_path.iterdir()] == ["p.json"]
    with pytest.raises(WruntimeError):
        rep.write_json({}, tmp_path / "missing" / "p.json")


def test_png_needs_the_plot_extra_or_draws(tmp_path):
    run = profile_timings(TIMINGS, audio_seconds=10.0, wall=4.5)
    m = Matrix("m", "a.wav", 10.0, [MatrixRow("ALL", "ALL", [run])], runs=1, warmup=0)
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        with pytest.raises(WruntimeError, match="matplotlib"):
            rep.save_png(m, tmp_path / "m.png")
        return
    out = rep.save_png(m, tmp_path / "m.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# --------------------------------------------------------------------------- real runs


@pytest.fixture(scope="module")
def jfk_report(test_home):
    return run_profile(
        JFK,
        MODEL,
        executor="interpreter",
        runs=1,
        warm_load=False,
        energy_reader=cpu_counter_reader,
    )


@pytest.mark.slow
def test_real_run_reports_every_stage_and_they_add_up(jfk_report):
    assert "ask not what your country can do for you" in jfk_report.text
    for run in (jfk_report.first, jfk_report.median):
        names = {r.name for r in run.rows()}
        assert names >= REQUIRED_STAGES, names
        assert abs(run.stage_sum - run.wall) <= 0.05 * run.wall, (run.stage_sum, run.wall)
        assert run.audio_seconds == pytest.approx(11.0, abs=0.01)
        assert run.rtf == pytest.approx(run.wall / run.audio_seconds)
        assert 0 < run.cpu_per_audio_second < 10
        assert run.tokens > 10 and run.decoder_calls > run.tokens // 2
        rows = {r.name: r for r in run.rows()}
        assert rows["decoder.prefill"].count >= 1
        assert rows["decoder.step"].wall + rows["decoder.prefill"].wall == pytest.approx(
            rows["decoder"].wall
        )


@pytest.mark.slow
def test_real_run_energy_reads_the_injected_counter_and_labels_the_estimate(jfk_report):
    e = jfk_report.first.energy
    assert e is not None and e.measured_joules is not None
    # The injected counter is 4 W of process CPU time, measured around the whole run.
    assert e.measured_joules == pytest.approx(4 * jfk_report.first.cpu, rel=0.05)
    assert e.best[1] == "measured"
    text = render(rep.stage_table(jfk_report.first))
    assert "(measured: test: process CPU time x 4 W)" in text
    assert "(estimate: nominal W" in text
    data = jfk_report.to_dict()
    assert data["first_run"]["energy"]["estimate"]["kind"] == "estimate"
    assert data["load"]["first_seconds"] > 0


@pytest.mark.slow
def test_matrix_on_linux_is_the_interpreter_row_alone(test_home):
    m = run_matrix(SHORT, MODEL, runs=1, warmup=0, energy_reader=None)
    assert [(r.encoder_units, r.decoder_units) for r in m.rows] == [("interpreter", "interpreter")]
    assert LINUX_NOTE in m.notes and not m.stand_in
    assert m.energy_kind == "estimate"


@pytest.mark.slow
def test_matrix_stand_in_carries_each_compute_unit_to_its_executor(test_home):
    from wruntime.executors.compute_units import Host

    mac = Host(system="Darwin", os_version=(15,), machine="arm64")
    pairs = ["cpu_and_ne/cpu_and_gpu", "cpu_only/cpu_and_gpu"]
    m = run_matrix(SHORT, MODEL, pairs=pairs, runs=1, warmup=0, stand_in=True, host=mac)
    assert m.stand_in and STAND_IN_NOTE in m.notes
    assert [(r.encoder_units, r.decoder_units) for r in m.rows] == [
        ("CPU_AND_NE", "CPU_AND_GPU"),
        ("CPU_ONLY", "CPU_AND_GPU"),
    ]
    for row in m.rows:
        assert row.median.stage_units == {"encoder": row.encoder_units, "decoder": "CPU_AND_GPU"}
        assert row.median.timings["encoder"]["count"] == 1
    # The decoder under CPU_AND_GPU was loaded once and shared by both pairs.
    assert any("decoder" in k for k in m.rows[0].load["new_loads"])
    assert not any("decoder" in k for k in m.rows[1].load["new_loads"])
    # The stand-in computes on the CPU: the estimate charges the CPU, not the GPU or ANE.
    assert set(m.rows[0].median.energy.estimate_units.values()) == {"cpu"}
    assert m.best_latency in m.rows


def test_matrix_refuses_units_the_mac_lacks_before_the_backend_loads(test_home):
    from wruntime.executors.compute_units import Host

    intel = Host(system="Darwin", os_version=(15,), machine="x86_64")
    with pytest.raises(ExecutorError, match="no Neural Engine"):
        run_matrix(SHORT, MODEL, pairs=["cpu_and_ne/cpu_only"], stand_in=True, host=intel)


# --------------------------------------------------------------------------- CLI


def _app():
    from wruntime.profile.cli import app

    return app


@pytest.mark.slow
def test_cli_profile_prints_every_stage_and_writes_json(tmp_path, test_home):
    out = tmp_path / "p.json"
    res = CliRunner().invoke(
        _app(),
        [str(SHORT), "--model", MODEL, "--runs", "1", "--beam-size", "0", "--json", str(out), "-q"],
    )
    assert res.exit_code == 0, res.output
    for word in ("audio", "features", "encoder", "decoder.prefill", "decoder.step", "search"):
        assert word in res.output
    assert "RTF" in res.output and "cpu s / audio s" in res.output and "Model load" in res.output
    assert "(estimate: nominal W" in res.output
    data = json.loads(out.read_text())
    assert data["median"]["coverage"] == pytest.approx(1.0, abs=0.05)
    assert data["load"]["warm_seconds"] > 0


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["missing.wav"], "No such file"),
        ([str(SHORT), "--runs", "0"], "--runs must be at least 1"),
        ([str(SHORT), "--watts", "tpu=1"], "nominal watts"),
        ([str(SHORT), "--model", "tiny.en-fp99"], ""),
    ],
)
def test_cli_user_errors_are_one_line(args, message, test_home):
    res = CliRunner().invoke(_app(), args)
    assert res.exit_code == 1
    lines = [line for line in res.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], res.output


def test_wtranscribe_table_from_merged_timer_totals():
    # What `wtranscribe --profile` prints: a StageTimer's totals over several files.
    from wruntime.timing import StageTimer

    merged = StageTimer()
    for _ in range(2):
        one = StageTimer()
        for name, s in TIMINGS.items():
            one.add(name, s["wall"], s["cpu"], int(s["count"]))
        merged.merge(one)
    text = render(rep.timings_table(merged.to_dict(), 20.0, 9.0, load_seconds=1.25))
    for name in ("audio", "features", "encoder", "decoder.prefill", "decoder.step", "search"):
        assert name in text
    assert "cpu s / audio s" in text and "RTF" in text
    assert "model load 1.250 s" in text
    assert "0.4500" in text  # total RTF 9 s / 20 s
