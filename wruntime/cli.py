"""Command line: `wtranscribe AUDIO...` and `wruntime <command>`.

Failures a user can cause print one line (the `WruntimeError` sentence) and
set a non-zero exit code; with several files, a bad one is reported and the
others still run. Tracebacks appear only with --debug, so even an internal
error reads as one line. Transcripts are written whole or not at all (see
`wruntime.transcribe.writers`).
"""

from __future__ import annotations

import json
import sys
import time
import traceback
from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from wruntime.errors import WruntimeError, describe_error

app = typer.Typer(
    name="wruntime",
    help="Whisper on a split Core ML model: transcribe, build and manage models.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
transcribe_app = typer.Typer(
    name="wtranscribe",
    help="Transcribe audio files with a Whisper model built for Core ML.",
    add_completion=False,
    pretty_exceptions_enable=False,
)

out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)


class Executor(str, Enum):
    auto = "auto"
    coreml = "coreml"
    interpreter = "interpreter"


class Units(str, Enum):
    CPU_ONLY = "CPU_ONLY"
    CPU_AND_GPU = "CPU_AND_GPU"
    CPU_AND_NE = "CPU_AND_NE"
    ALL = "ALL"


class OutputFormat(str, Enum):
    txt = "txt"
    srt = "srt"
    vtt = "vtt"
    json = "json"
    tsv = "tsv"
    all = "all"


class Task(str, Enum):
    transcribe = "transcribe"
    translate = "translate"


def _error(message: str, where: str | None = None) -> None:
    prefix = f"error: {where}: " if where else "error: "
    err.print(prefix + message, markup=False)


def _fail_line(exc: BaseException, debug: bool, where: str | None = None) -> None:
    if debug:
        traceback.print_exception(exc, file=sys.stderr)
    _error(describe_error(exc), where)


def _timestamp(seconds: float) -> str:
    from wruntime.transcribe.writers import format_timestamp

    return format_timestamp(seconds)


def _temperatures(start: float, increment: float | None) -> tuple[float, ...] | float:
    if increment is None or increment <= 0:
        return start
    temps = []
    t = start
    while t <= 1.0 + 1e-6:
        temps.append(round(t, 6))
        t += increment
    return tuple(temps) or start


def _check_inputs(paths: list[Path], debug: bool) -> tuple[list[tuple[Path, float]], int]:
    """Files that exist and whose header reads, with durations; count of the others."""
    from wruntime.audio import audio_info

    ok: list[tuple[Path, float]] = []
    failed = 0
    for path in paths:
        try:
            if not path.exists():
                raise WruntimeError(f"No such file: {path}.")
            if path.is_dir():
                raise WruntimeError(f"{path} is a directory, not an audio file.")
            duration = float(audio_info(path)[0])
        except Exception as exc:
            _fail_line(exc, debug, str(path))
            failed += 1
            continue
        ok.append((path, duration))
    return ok, failed


def _print_segment(console: Console, segment: Any, verbose: bool) -> None:
    line = f"[{_timestamp(segment.start)} --> {_timestamp(segment.end)}] {segment.text.strip()}"
    if verbose:
        line += (
            f"  (T={segment.temperature:.1f} logprob={segment.avg_logprob:.2f}"
            f" no_speech={segment.no_speech_prob:.2f})"
        )
    console.print(line, markup=False)


def profile_table(
    timings: dict[str, dict[str, float | int]],
    audio_seconds: float,
    wall: float,
    load_seconds: float | None = None,
    tokens: int = 0,
) -> Table:
    """The --profile table: every stage, RTF, CPU per audio second, model load."""
    from wruntime.profile.report import timings_table

    return timings_table(timings, audio_seconds, wall, load_seconds=load_seconds, tokens=tokens)


def run_transcribe(
    audio: list[Path],
    model: str,
    *,
    language: str | None,
    task: str,
    beam_size: int | None,
    best_of: int | None,
    patience: float | None,
    temperature: float,
    temperature_increment_on_fallback: float | None,
    initial_prompt: str | None,
    condition_on_previous_text: bool,
    word_timestamps: bool,
    output_format: str,
    output_dir: Path,
    executor: str,
    encoder_units: str | None,
    decoder_units: str | None,
    weights: Path | None,
    verbose: bool,
    quiet: bool,
    profile: bool,
    debug: bool,
    max_words_per_line: int | None = None,
    highlight_words: bool = False,
    extra_options: dict[str, Any] | None = None,
) -> int:
    """Transcribe every file; returns the exit code (1 if any file failed)."""
    _quiet_libraries(debug)
    inputs, failed = _check_inputs(audio, debug)
    if not inputs:
        return 1

    compute_units = {
        k: v for k, v in (("encoder", encoder_units), ("decoder", decoder_units)) if v
    } or None
    try:
        from wruntime.transcribe import Transcriber

        if verbose:
            err.print(f"Loading model {model} (built on first use)...", markup=False)
        load_start = time.perf_counter()
        transcriber = Transcriber(
            model,
            executor=executor,
            compute_units=compute_units,
            weights=weights,
            build_progress=False if quiet else None,
        )
    except Exception as exc:
        _fail_line(exc, debug)
        return 1
    load_seconds = time.perf_counter() - load_start

    from wruntime.timing import StageTimer
    from wruntime.transcribe.writers import write_result

    options: dict[str, Any] = {
        "language": language,
        "task": task,
        "temperature": _temperatures(temperature, temperature_increment_on_fallback),
        "initial_prompt": initial_prompt,
        "condition_on_previous_text": condition_on_previous_text,
        "word_timestamps": word_timestamps,
        "beam_size": beam_size,
        "best_of": best_of,
        "patience": patience,
        **(extra_options or {}),
    }
    total_timer = StageTimer()
    total_audio = 0.0
    total_wall = 0.0
    total_tokens = 0
    show_progress = not quiet and out.is_terminal

    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    progress = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.completed:.0f}/{task.total:.0f} s audio"),
        TimeRemainingColumn(),
        console=out,
        disable=not show_progress,
        transient=True,
    )
    with progress:
        bar = progress.add_task("transcribing", total=sum(d for _, d in inputs) or 1.0)
        done_before = 0.0
        for path, duration in inputs:
            progress.update(bar, description=path.name, completed=done_before)

            def on_progress(seconds: float, _total: float, base: float = done_before) -> None:
                progress.update(bar, completed=base + seconds)

            if not quiet and len(inputs) > 1:
                progress.console.print(f"{path}:", markup=False)
            try:
                stream = transcriber.transcribe_iter(path, progress=on_progress, **options)
                for segment in stream:
                    if not quiet:
                        _print_segment(progress.console, segment, verbose)
                result = stream.result()
                written = write_result(
                    result,
                    path,
                    output_dir,
                    output_format,
                    max_words_per_line=max_words_per_line,
                    highlight_words=highlight_words or None,
                )
            except Exception as exc:
                _fail_line(exc, debug, str(path))
                failed += 1
                done_before += duration
                continue
            done_before += duration
            total_audio += result.duration
            total_wall += result.wall_time
            total_tokens += sum(len(seg.tokens) for seg in result.segments)
            total_timer.merge(stream.timer)
            if verbose:
                progress.console.print(
                    f"{path}: {result.duration:.1f} s audio in {result.wall_time:.2f} s "
                    f"(realtime factor {result.realtime_factor:.3f}), language {result.language}; "
                    f"wrote {', '.join(str(p) for p in written)}",
                    markup=False,
                )

    if profile and total_audio > 0:
        from wruntime.transcribe.transcriber import derive_search

        timings = total_timer.to_dict()
        derive_search(timings)
        out.print(profile_table(timings, total_audio, total_wall, load_seconds, total_tokens))
    return 1 if failed else 0


def transcribe(
    audio: Annotated[
        list[Path], typer.Argument(help="Audio files to transcribe.", show_default=False)
    ],
    model: Annotated[
        str,
        typer.Option(
            "--model", "-m", help="Model name (e.g. tiny.en-fp16) or built model directory."
        ),
    ] = "tiny.en-fp16",
    language: Annotated[
        str | None, typer.Option(help="Spoken language (detected when omitted).")
    ] = None,
    task: Annotated[
        Task, typer.Option(help="transcribe, or translate to English.")
    ] = Task.transcribe,
    beam_size: Annotated[
        int | None, typer.Option(help="Beams for beam search at temperature 0 (0: greedy).")
    ] = 5,
    best_of: Annotated[
        int | None, typer.Option(help="Candidates when sampling at temperature > 0.")
    ] = 5,
    patience: Annotated[float | None, typer.Option(help="Beam search patience.")] = None,
    temperature: Annotated[
        float, typer.Option(help="Sampling temperature of the first attempt.")
    ] = 0.0,
    temperature_increment_on_fallback: Annotated[
        float | None,
        typer.Option(help="Temperature step when a window fails the thresholds (0: no fallback)."),
    ] = 0.2,
    initial_prompt: Annotated[
        str | None, typer.Option(help="Text to prompt the first window with.")
    ] = None,
    condition_on_previous_text: Annotated[
        bool, typer.Option(help="Prompt each window with the previous text.")
    ] = True,
    word_timestamps: Annotated[
        bool, typer.Option("--word-timestamps", help="Add word-level timestamps.")
    ] = False,
    max_words_per_line: Annotated[
        int | None, typer.Option(help="(srt/vtt, with --word-timestamps) words per cue.")
    ] = None,
    length_penalty: Annotated[
        float | None, typer.Option(help="Length penalty alpha for ranking candidates (0-1).")
    ] = None,
    compression_ratio_threshold: Annotated[
        float | None, typer.Option(help="Redecode hotter when gzip ratio exceeds this.")
    ] = 2.4,
    logprob_threshold: Annotated[
        float | None, typer.Option(help="Redecode hotter when avg log-prob is below this.")
    ] = -1.0,
    no_speech_threshold: Annotated[
        float | None, typer.Option(help="Treat a window as silence above this no-speech prob.")
    ] = 0.6,
    clip_timestamps: Annotated[
        str, typer.Option(help="Comma-separated start,end,... seconds of the parts to transcribe.")
    ] = "0",
    hallucination_silence_threshold: Annotated[
        float | None,
        typer.Option(
            help="(with --word-timestamps) skip silences longer than this around hallucinations."
        ),
    ] = None,
    highlight_words: Annotated[
        bool,
        typer.Option(
            "--highlight-words",
            help="(srt/vtt, with --word-timestamps) underline each word as it is spoken.",
        ),
    ] = False,
    output_format: Annotated[
        OutputFormat, typer.Option("--output-format", "-f", help="Output file format.")
    ] = OutputFormat.txt,
    output_dir: Annotated[
        Path, typer.Option("--output-dir", "-o", help="Directory for the output files.")
    ] = Path("."),
    executor: Annotated[
        Executor, typer.Option(help="auto: Core ML on macOS, the MIL interpreter elsewhere.")
    ] = Executor.auto,
    encoder_units: Annotated[
        Units | None,
        typer.Option(
            case_sensitive=False, help="Core ML compute units of the encoder (default CPU_AND_NE)."
        ),
    ] = None,
    decoder_units: Annotated[
        Units | None,
        typer.Option(
            case_sensitive=False, help="Core ML compute units of the decoder (default CPU_AND_GPU)."
        ),
    ] = None,
    weights: Annotated[
        Path | None, typer.Option(help="Build the model from these weights (file or directory).")
    ] = None,
    verbose: Annotated[
        bool,
        typer.Option("--verbose", "-v", help="Also print decoding statistics and per-file timing."),
    ] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Print nothing but errors.")] = False,
    profile: Annotated[
        bool, typer.Option("--profile", help="Print a stage-timing table at the end.")
    ] = False,
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks.")] = False,
) -> None:
    """Transcribe audio files; writes <name>.<format> for each into the output directory."""
    code = run_transcribe(
        audio,
        model,
        language=language,
        task=task.value,
        beam_size=beam_size if beam_size else None,
        best_of=best_of if best_of else None,
        patience=patience,
        temperature=temperature,
        temperature_increment_on_fallback=temperature_increment_on_fallback,
        initial_prompt=initial_prompt,
        condition_on_previous_text=condition_on_previous_text,
        word_timestamps=word_timestamps,
        max_words_per_line=max_words_per_line,
        highlight_words=highlight_words,
        extra_options={
            "length_penalty": length_penalty,
            "compression_ratio_threshold": compression_ratio_threshold,
            "logprob_threshold": logprob_threshold,
            "no_speech_threshold": no_speech_threshold,
            "clip_timestamps": clip_timestamps,
            "hallucination_silence_threshold": hallucination_silence_threshold,
        },
        output_format=output_format.value,
        output_dir=output_dir,
        executor=executor.value,
        encoder_units=encoder_units.value if encoder_units else None,
        decoder_units=decoder_units.value if decoder_units else None,
        weights=weights,
        verbose=verbose,
        quiet=quiet,
        profile=profile,
        debug=debug,
    )
    raise typer.Exit(code)


transcribe_app.command()(transcribe)
app.command("transcribe")(transcribe)


# ---------------------------------------------------------------- model management


def _build_api(name: str) -> Any:
    """A function of wruntime.build, or a one-line error if the builder lacks it."""
    try:
        import wruntime.build as build
    except ImportError as e:
        raise WruntimeError(f"The model builder is not available ({e}).") from None
    fn = getattr(build, name, None)
    if fn is None:
        raise WruntimeError(f"This installation's builder has no {name}().")
    return fn


def _managed(action: Any, debug: bool) -> None:
    _quiet_libraries(debug)
    try:
        action()
    except Exception as exc:
        _fail_line(exc, debug)
        raise typer.Exit(1) from None


@app.command("build")
def build_cmd(
    name: Annotated[str, typer.Argument(help="Model name, e.g. tiny.en-fp16 or base-int8.")],
    weights: Annotated[
        Path | None, typer.Option(help="Build from these weights (file or directory).")
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="Rebuild even if already built.")] = False,
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks.")] = False,
) -> None:
    """Build a model into the cache (models are also built on first use)."""

    def action() -> None:
        if force:
            build_model = _build_api("build_model")
            path = build_model(name, weights=weights, force=True, progress=_build_progress(name))
        else:
            # Builds with a progress bar unless already built; checks the directory either way.
            path = Path(_build_api("ensure_model")(name, weights=weights))
        out.print(f"Built {name}: {path}", markup=False)

    _managed(action, debug)


def _build_progress(name: str) -> Any:
    """A builder progress callback (description, stage, stages) printing one line per stage."""

    def report(description: str, index: int, total: int) -> None:
        err.print(f"[{min(index, total)}/{total}] {name}: {description}", markup=False)

    return report


@app.command("sensitivity")
def sensitivity_cmd(
    architecture: Annotated[str, typer.Argument(help="Architecture, e.g. tiny.en or base.")],
    max_mb: Annotated[float | None, typer.Option(help="Budget: at most this many MB.")] = None,
    max_fraction: Annotated[
        float | None, typer.Option(help="Budget: at most this fraction of the fp16 size.")
    ] = None,
    max_kl: Annotated[
        float | None, typer.Option(help="Budget: at most this summed next-token KL vs fp16.")
    ] = None,
    clip: Annotated[
        list[Path] | None, typer.Option(help="Audio to measure on (default: the test clips).")
    ] = None,
    layer: Annotated[
        list[str] | None, typer.Option(help="Measure only these weights (a quick look).")
    ] = None,
    probe: Annotated[
        str | None,
        typer.Option(
            help="How the clips are decoded: text (no timestamps), timestamps (as transcribe "
            "does) or both, averaged (default: the catalog's).",
        ),
    ] = None,
    build: Annotated[
        bool, typer.Option("--build", help="Build <architecture>-auto with the choice.")
    ] = False,
    json_out: Annotated[Path | None, typer.Option("--json", help="Write the table here.")] = None,
    rows: Annotated[int, typer.Option(help="Table rows to print (most sensitive first).")] = 20,
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks.")] = False,
) -> None:
    """Measure how much compressing each weight hurts, and choose per-layer bits for a budget.

    Each weight is compressed alone and the next-token distribution compared with fp16
    (KL) on real clips; the table is cached, so asking again with another budget is
    instant. With --build the choice is built (replacing a cached one): as
    `<architecture>-auto@<fraction>` for --max-fraction, `<architecture>-auto@<N>mb` for
    --max-mb (the names `--model` takes), else `<architecture>-auto`.
    """

    def action() -> None:
        from wruntime.build.sensitivity import (
            PROBE_MODES,
            Budget,
            choose,
            measure_sensitivity,
            probe_mode,
        )
        from wruntime.catalog import architecture as find_architecture
        from wruntime.catalog import precisions

        given = [b for b in (max_mb, max_fraction, max_kl) if b is not None]
        if len(given) > 1:
            raise WruntimeError("Give one budget: --max-mb, --max-fraction or --max-kl.")
        if build and layer:
            raise WruntimeError("--build needs the whole table; drop --layer.")
        find_architecture(architecture)  # unknown names fail here, listing the valid ones
        spec = precisions()["auto"]
        search = spec.sensitivity or {}
        mode = probe_mode(spec) if probe is None else probe
        if mode not in PROBE_MODES:
            raise WruntimeError(f"Unknown --probe {mode!r}: use one of {', '.join(PROBE_MODES)}.")
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        with Progress(
            TextColumn("[bold]Measuring[/bold] {task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=err,
            transient=True,
        ) as bar:
            task = bar.add_task("", total=None)

            def advance(done: int, todo: int, name: str) -> None:
                bar.update(task, completed=done, total=todo, description=name)

            table = measure_sensitivity(
                architecture,
                search.get("candidates", []),
                fixed=spec.compression,
                clips=clip or None,
                layers=layer or None,
                probe=mode,
                log=lambda line: bar.console.print(line, markup=False),
                progress=advance,
            )
        budget = (
            Budget(max_mb=max_mb, max_fraction=max_fraction, max_error=max_kl)
            if given
            else Budget.from_spec(search.get("budget", {}))
        )
        choice = choose(table, budget, search.get("max_noise"))
        measured = [r for r in choice.rows() if any(k.startswith("kl[") for k in r)]
        keys = sorted({k for r in measured for k in r if k.startswith("kl[")})
        table_view = Table(
            title=f"{architecture}: sensitivity (KL vs fp16), budget {budget.describe()}"
        )
        from rich.markup import escape

        for col in ("layer", "params", "chosen", *keys):
            justify = "left" if col in ("layer", "chosen") else "right"
            table_view.add_column(escape(col), justify=justify)  # type: ignore[arg-type]
        for r in measured[:rows]:
            table_view.add_row(
                r["layer"], f"{r['params']:,}", r["chosen"], *(f"{r.get(k, 0):.2e}" for k in keys)
            )
        out.print(table_view)
        verdict = "meets" if choice.met else "cannot meet"
        out.print(
            f"choice: {choice.size_bytes / 1e6:.1f} MB ({choice.fraction:.0%} of fp16), "
            f"predicted KL {choice.predicted_error:.2e}; {verdict} the budget",
            markup=False,
        )
        if json_out is not None:
            from wruntime.profile.report import write_json

            write_json(
                {
                    "budget": budget.describe(),
                    "met": choice.met,
                    "probe": mode,
                    "rows": choice.rows(),
                },
                json_out,
            )
        if build and choice.met:
            from wruntime.build import build_model
            from wruntime.catalog import budget_suffix, load_architecture_weights

            # A size budget names its own model (tiny.en-auto@0.3, what `--model` takes);
            # an error budget replaces the catalog's `auto`.
            name = f"{architecture}-auto" + budget_suffix(max_fraction, max_mb)
            weights = load_architecture_weights(architecture)
            path = build_model(
                name,
                weights=weights,
                force=True,
                choices=choice.rules,
                progress=_build_progress(name),
            )
            out.print(f"Built {name}: {path}", markup=False)
        if not choice.met:
            raise typer.Exit(1)

    _managed(action, debug)


@app.command("list")
def list_cmd(
    built: Annotated[bool, typer.Option("--built", help="Only the models already built.")] = False,
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks.")] = False,
) -> None:
    """List the catalog's model names and which are built."""

    def action() -> None:
        rows = [_row(m) for m in _build_api("list_models")()]
        if built:
            rows = [r for r in rows if r.get("built")]
        table = Table(title="Built models" if built else "Models")
        for column, justify in (
            ("name", "left"),
            ("architecture", "left"),
            ("precision", "left"),
            ("built", "left"),
            ("size MB", "right"),
            ("path", "left"),
        ):
            table.add_column(column, justify=justify, no_wrap=column != "path", overflow="fold")  # type: ignore[arg-type]
        for r in rows:
            size = r.get("size_mb")
            table.add_row(
                str(r.get("name", "")),
                str(r.get("architecture", "")),
                str(r.get("precision", "")),
                "yes" if r.get("built") else "",
                f"{size:.1f}" if isinstance(size, (int, float)) else "",
                str(r.get("path") or ""),
            )
        out.print(table)

    _managed(action, debug)


def _row(item: Any) -> dict[str, Any]:
    if isinstance(item, dict):
        return item
    if hasattr(item, "__dataclass_fields__"):
        return {k: getattr(item, k) for k in item.__dataclass_fields__}
    if isinstance(item, tuple) and hasattr(item, "_asdict"):
        return dict(item._asdict())
    return {"name": item}


@app.command("inspect")
def inspect_cmd(
    name: Annotated[str, typer.Argument(help="Model name or built directory.")],
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks.")] = False,
) -> None:
    """Show a built model's manifest: precision, sizes, inputs and outputs."""

    def action() -> None:
        info = _build_api("inspect_model")(name)
        if isinstance(info, str):
            out.print(info, markup=False)
            return

        data = _row(info)
        out.print(json.dumps(data, indent=2, default=str), markup=False)

    _managed(action, debug)


@app.command("remove")
def remove_cmd(
    name: Annotated[str, typer.Argument(help="Model name to delete from the cache.")],
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks.")] = False,
) -> None:
    """Delete a built model from the cache."""

    def action() -> None:
        removed = _build_api("remove_model")(name)
        out.print(f"Removed {removed if removed not in (None, True) else name}", markup=False)

    _managed(action, debug)


#: Commands that live with their stage: (name, module, function). A stage not in
#: this installation leaves its command out instead of breaking the others.
OPTIONAL_COMMANDS = (("profile", "wruntime.profile.cli", "profile"),)


def _register_optional_commands() -> None:
    import importlib

    for name, module, function in OPTIONAL_COMMANDS:
        try:
            command = getattr(importlib.import_module(module), function)
        except (ImportError, AttributeError):
            continue
        app.command(name)(command)


_register_optional_commands()


def _quiet_libraries(debug: bool = False) -> None:
    """Keep import-time chatter off stderr, where each error is one line.

    coremltools logs a warning per missing native proxy (all of them off
    macOS) and about scikit-learn's version when imported; --debug keeps them.
    """
    if debug or "--debug" in sys.argv:
        return
    import logging

    logging.getLogger("coremltools").setLevel(logging.ERROR)


def _run(typer_app: typer.Typer) -> None:
    _quiet_libraries()
    try:
        typer_app()
    except KeyboardInterrupt:
        _error("interrupted.")
        raise SystemExit(130) from None


def transcribe_main() -> None:
    """Console script `wtranscribe`."""
    _run(transcribe_app)


def main() -> None:
    """Console script `wruntime`."""
    _run(app)


if __name__ == "__main__":  # pragma: no cover
    main()
