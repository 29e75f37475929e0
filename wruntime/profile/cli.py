"""`wruntime profile AUDIO --model NAME [--matrix] [--runs N] [--json PATH] [--png PATH]`.

Registered in `wruntime.cli` as the `profile` command; also runnable alone
(`python -m wruntime.profile.cli`). Errors a user can cause print one line.
"""

from __future__ import annotations

import sys
import traceback
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from wruntime.errors import WruntimeError, describe_error

app = typer.Typer(
    name="wruntime-profile",
    help="Per-stage latency, realtime factor and energy proxy; the compute-unit matrix.",
    add_completion=False,
    pretty_exceptions_enable=False,
)

out = Console(highlight=False)
if not out.is_terminal:
    out.width = 180  # piped or captured: keep the wide tables readable (rich would use 80)
err = Console(stderr=True, highlight=False, soft_wrap=True)


def profile(
    audio: Annotated[Path, typer.Argument(help="Audio file to profile on.", show_default=False)],
    model: Annotated[
        str, typer.Option("--model", "-m", help="Model name (e.g. tiny.en-fp16) or directory.")
    ] = "tiny.en-fp16",
    matrix: Annotated[
        bool,
        typer.Option("--matrix", help="Run the encoder and decoder under every compute-unit pair."),
    ] = False,
    runs: Annotated[int, typer.Option(help="Timed runs (medians are reported).")] = 3,
    beam_size: Annotated[
        int, typer.Option(help="Beams at temperature 0, as wtranscribe (0: greedy).")
    ] = 5,
    warmup: Annotated[int, typer.Option(help="(--matrix) untimed warm-up runs per pair.")] = 1,
    pairs: Annotated[
        list[str] | None,
        typer.Option(
            "--pair", help="(--matrix) only this encoder/decoder pair, e.g. cpu_and_ne/cpu_and_gpu."
        ),
    ] = None,
    executor: Annotated[
        str,
        typer.Option(help="auto (Core ML on macOS, else the interpreter), coreml, interpreter."),
    ] = "auto",
    encoder_units: Annotated[
        str | None, typer.Option(help="Core ML compute units of the encoder (profile only).")
    ] = None,
    decoder_units: Annotated[
        str | None, typer.Option(help="Core ML compute units of the decoder (profile only).")
    ] = None,
    watts: Annotated[
        str | None,
        typer.Option(
            help="Nominal watts for the energy estimate, e.g. cpu_core=4,gpu=8,ane=2 "
            "(default: WRUNTIME_NOMINAL_WATTS, else built-in round figures)."
        ),
    ] = None,
    json_path: Annotated[
        Path | None, typer.Option("--json", help="Write the report as JSON.")
    ] = None,
    png_path: Annotated[
        Path | None, typer.Option("--png", help="Write a chart (needs the 'plot' extra).")
    ] = None,
    stand_in: Annotated[
        bool,
        typer.Option(
            "--stand-in",
            hidden=True,
            help="(--matrix, any OS) let the interpreter stand in for every compute unit.",
        ),
    ] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Only the tables.")] = False,
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks.")] = False,
) -> None:
    """Profile a model on AUDIO: every stage's time, RTF, CPU time and energy per audio second."""
    try:
        code = _run(
            audio,
            model,
            matrix=matrix,
            runs=runs,
            beam_size=beam_size,
            warmup=warmup,
            pairs=pairs or None,
            executor=executor,
            encoder_units=encoder_units,
            decoder_units=decoder_units,
            watts=watts,
            json_path=json_path,
            png_path=png_path,
            stand_in=stand_in,
            quiet=quiet,
        )
    except Exception as exc:
        if debug:
            traceback.print_exception(exc, file=sys.stderr)
        err.print("error: " + describe_error(exc), markup=False)
        raise typer.Exit(1) from None
    raise typer.Exit(code)


def _run(
    audio: Path,
    model: str,
    *,
    matrix: bool,
    runs: int,
    beam_size: int,
    warmup: int,
    pairs: list[str] | None,
    executor: str,
    encoder_units: str | None,
    decoder_units: str | None,
    watts: str | None,
    json_path: Path | None,
    png_path: Path | None,
    stand_in: bool,
    quiet: bool,
) -> int:
    from wruntime.profile.energy import WattsTable

    if not audio.exists():
        raise WruntimeError(f"No such file: {audio}.")
    if audio.is_dir():
        raise WruntimeError(f"{audio} is a directory, not an audio file.")
    if runs < 1:
        raise WruntimeError(f"--runs must be at least 1, not {runs}.")
    if not Path(model).is_dir():
        from wruntime.catalog import resolve_model_name

        resolve_model_name(model)  # an unknown name fails here, before anything loads
    for target in (json_path, png_path):
        if target is not None and not target.parent.exists():
            raise WruntimeError(f"Cannot write {target}: {target.parent} does not exist.")
    if png_path is not None:
        from wruntime.profile.report import _pyplot

        _pyplot()  # fail before the runs, not after them
    table = WattsTable.parse(watts, base=WattsTable.from_env())
    if beam_size < 0:
        raise WruntimeError(f"--beam-size must be 0 (greedy) or more, not {beam_size}.")
    # wtranscribe's defaults: beam search at temperature 0, best_of 5 when sampling.
    options = {"beam_size": beam_size, "best_of": 5} if beam_size else {}
    say = None if quiet else (lambda msg: err.print(msg, markup=False))

    from wruntime.profile import report as rep

    if matrix:
        from wruntime.profile.matrix import run_matrix

        result = run_matrix(
            audio,
            model,
            executor=executor,
            pairs=pairs,
            runs=runs,
            warmup=warmup,
            stand_in=stand_in,
            options=options,
            watts=table,
            progress=say,
        )
        out.print(rep.matrix_table(result))
    else:
        from wruntime.profile import run_profile

        units = {k: v for k, v in (("encoder", encoder_units), ("decoder", decoder_units)) if v}
        result = run_profile(
            audio,
            model,
            executor=executor,
            compute_units=units or None,
            runs=runs,
            options=options,
            watts=table,
            progress=say,
        )
        for t in rep.profile_tables(result):
            out.print(t)
        for note in result.notes:
            out.print(note, markup=False)
    if json_path is not None:
        rep.write_json(result.to_dict(), json_path)
        if not quiet:
            err.print(f"wrote {json_path}", markup=False)
    if png_path is not None:
        rep.save_png(result, png_path)
        if not quiet:
            err.print(f"wrote {png_path}", markup=False)
    return 0


app.command()(profile)


def main() -> None:
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
