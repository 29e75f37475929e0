"""Building a model directory from a catalog name, and managing the cache of built ones.

A build is a list of stages (load weights, one per package, finalize), each
reported to an optional ``progress`` callback. Packages are converted and
saved into a staging directory next to the destination, then the tokenizer is
copied, every file hashed, the manifest written last, and the directory
renamed into place: a failure at any point leaves nothing behind.

Compression (int8, int4, palettization: a later issue) plugs in as
`PackageStage`s, applied to each converted package before it is saved.
"""

from __future__ import annotations

import datetime
import json
import os
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from wruntime.build import interface as io
from wruntime.build.model_dir import (
    BUILDER_VERSION,
    FORMAT_VERSION,
    PACKAGE_FILES,
    TOKENIZER_DIR,
    ModelDirectory,
    directory_size,
    file_table,
    fill_output_shapes,
    load_model_dir,
    model_path,
    models_root,
    publish,
    remove_directory,
    staging_directory,
    write_manifest,
    write_stamp,
)
from wruntime.errors import ModelDirectoryError, WeightsError, WruntimeError
from wruntime.weights.canonical import WhisperWeights

if TYPE_CHECKING:
    from wruntime.catalog import CompressionRule

#: progress(description, stage number (1-based), number of stages); called as each
#: stage starts, and once more with (description, total, total) when all are done.
Progress = Callable[[str, int, int], None]
#: Converted model, package role -> model to save (see convert.PackageStage).
PackageStage = Callable[[Any, str], Any]

_STAGES = (
    "Loading weights",
    "Building the encoder",
    "Building the decoder",
    "Building the stateful decoder",
    "Writing the manifest",
)


@dataclass(frozen=True)
class BuildPlan:
    """What to build, whatever the caller named it with."""

    name: str
    architecture: str
    precision: str
    compute_precision: str  # "float32" or "float16"
    deployment_target: str  # "iOS17", "iOS18"
    compressed: bool

    @property
    def fp16(self) -> bool:
        return self.compute_precision == "float16"


def plan_for(name_or_spec: Any) -> tuple[BuildPlan, Any]:
    """A BuildPlan from a catalog name or a catalog ModelSpec (and the spec itself)."""
    if isinstance(name_or_spec, str):
        from wruntime.catalog import resolve_model_name

        spec = resolve_model_name(name_or_spec)
    else:
        spec = name_or_spec
    precision = spec.precision
    plan = BuildPlan(
        name=spec.name,
        architecture=spec.architecture.name,
        precision=precision.name,
        compute_precision=precision.compute_precision,
        deployment_target=precision.minimum_deployment_target,
        compressed=bool(precision.is_compressed),
    )
    if plan.compute_precision not in ("float32", "float16"):
        raise WruntimeError(
            f"Unknown compute precision {plan.compute_precision!r} for {plan.name}."
        )
    return plan, spec


def compression_stages(
    plan: BuildPlan,
    spec: Any,
    weights: WhisperWeights | None = None,
    progress: Callable[[int, int, str], None] | None = None,
    choices: Mapping[str, CompressionRule] | None = None,
) -> list[PackageStage]:
    """The package stages a precision's recipe needs (none for fp32 / fp16)."""
    if not plan.compressed:
        return []
    from wruntime.build.compress import compression_stages as recipe_stages

    return list(recipe_stages(spec.precision, weights, choices, progress=progress))


def _resolve_weights(plan: BuildPlan, spec: Any, weights: Any) -> WhisperWeights:
    if isinstance(weights, WhisperWeights):
        want = spec.architecture.dims
        if weights.dims != want:
            raise WeightsError(
                f"The weights from {weights.source or 'the caller'} are not "
                f"{plan.architecture} weights (dims {weights.dims.to_dict()})."
            )
        return weights
    from wruntime.catalog import load_architecture_weights

    return load_architecture_weights(plan.architecture, weights)


def _stateful_target(target: str) -> str:
    from wruntime.build.stateful import STATEFUL_TARGET

    return max(target, STATEFUL_TARGET, key=lambda t: int(t.removeprefix("iOS")))


def build_model(
    name_or_spec: Any,
    *,
    weights: Any = None,
    dest: str | os.PathLike[str] | None = None,
    force: bool = False,
    progress: Progress | None = None,
    stages: Sequence[PackageStage] | None = None,
    choices: Mapping[str, CompressionRule] | None = None,
    stateful: bool = True,
    split_logits: bool = False,
) -> Path:
    """Build a model directory and return its path.

    ``weights``: a WhisperWeights, or a path/paths the catalog's readers take;
    None finds them through the catalog. ``dest`` defaults to the cache
    (`model_path(name)`); an existing directory is kept unless ``force``.
    ``stages`` replaces the precision's compression stages (for experiments).
    ``choices``: an auto precision's per-layer rules, already chosen
    (`sensitivity.choose`, on the caller's clips or budget): no search at build time.
    An existing directory that is damaged or from another builder version is
    rebuilt even without ``force``. ``progress``: see `Progress` (and
    `rich_progress` for a ready-made bar).
    """
    from wruntime.build import convert as cv

    started = time.perf_counter()
    plan, spec = plan_for(name_or_spec)
    dest_path = Path(dest) if dest is not None else model_path(plan.name)
    repair = False  # rebuilding a damaged or stale directory nobody asked to force
    if dest_path.exists() and not force:
        if _usable(dest_path):
            return dest_path
        repair = True
    report = progress or (lambda *_: None)
    total = len(_STAGES)

    report(_STAGES[0], 1, total)
    w = _resolve_weights(plan, spec, weights)

    def measuring(done: int, todo: int, layer: str) -> None:
        # A first auto build measures every layer's sensitivity (minutes): say where it is.
        report(f"Measuring layer sensitivity {done}/{todo} {layer}".rstrip(), 1, total)

    package_stages = (
        list(stages)
        if stages is not None
        else compression_stages(plan, spec, w, measuring, choices)
    )
    target = plan.deployment_target
    stateful_target = _stateful_target(target)
    batches = tuple(io.STATEFUL_BATCHES) if stateful else ()

    with staging_directory(dest_path) as tmp:
        from wruntime.build.decoder import build_decoder_program, decoder_input_types
        from wruntime.build.encoder import build_encoder_program
        from wruntime.build.stateful import build_stateful_program, stateful_input_types

        report(_STAGES[1], 2, total)
        program = build_encoder_program(w, fp16=plan.fp16, target=cv.target_of(target))
        model = cv.convert(program, fp16=plan.fp16, target=target)
        cv.apply_stages(model, "encoder", package_stages).save(str(tmp / io.ENCODER_FILE))

        report(_STAGES[2], 3, total)
        program = build_decoder_program(
            w, fp16=plan.fp16, target=cv.target_of(target), split_logits=split_logits
        )
        model = cv.convert(program, fp16=plan.fp16, target=target, inputs=decoder_input_types(w))
        cv.apply_stages(model, "decoder", package_stages).save(str(tmp / io.DECODER_FILE))

        targets = {"encoder": target, "decoder": target}
        if batches:
            report(_STAGES[3], 4, total)
            functions = {}
            for batch in batches:
                program = build_stateful_program(
                    w, batch, fp16=plan.fp16, target=cv.target_of(stateful_target)
                )
                model = cv.convert(
                    program,
                    fp16=plan.fp16,
                    target=stateful_target,
                    inputs=stateful_input_types(w, batch),
                )
                model = cv.apply_stages(model, "decoder_stateful", package_stages)
                functions[io.stateful_function_name(batch)] = model
            cv.save_multifunction(functions, tmp / io.STATEFUL_DECODER_FILE)
            targets["decoder_stateful"] = stateful_target

        report(_STAGES[4], 5, total)
        tok_dir = tmp / TOKENIZER_DIR
        tok_dir.mkdir()
        for file_name, source in sorted(w.tokenizer_files.items()):
            shutil.copyfile(source, tok_dir / file_name)
        if not w.tokenizer_files:
            raise WeightsError(
                f"The weights at {w.source} carry no tokenizer files (tokenizer.json, "
                "vocabulary.*); a model directory needs the model's own vocabulary."
            )
        fields = _manifest(plan, w, tmp, targets, batches, started)
        compression = _compression_record(package_stages)
        if compression:
            fields["compression"] = compression
        manifest = write_manifest(tmp, fields)
        load_model_dir(tmp, verify=False)  # the names, sizes and checksum we just wrote
        # The files were hashed a moment ago: stamp them so the first load skips hashing
        # (the stamp holds relative paths and mtimes, which the rename keeps).
        write_stamp(tmp, manifest)
        # A repair replaces the old directory only if no other process repaired it
        # meanwhile (it may be in use by then); a forced build always replaces.
        publish(tmp, dest_path, replace=force or (repair and not _usable(dest_path)))
        report("Done", total, total)
    return dest_path


def _compression_record(stages: Sequence[Any]) -> dict[str, Any] | None:
    """What each weight was stored as (layer -> rule label), and how long compressing took.

    An auto model's bits were chosen per layer from measurements: the manifest says
    which, so a model can be inspected (and compared) without the sensitivity table.
    """
    layers: dict[str, str] = {}
    seconds = 0.0
    for stage in stages:
        for entry in getattr(stage, "report", {}).values():
            seconds += entry.get("seconds", 0.0)
            for row in entry.get("weights", []):
                layers.setdefault(row["layer"], row["rule"])
    if not layers:
        return None
    return {"seconds": round(seconds, 2), "layers": layers}


def _manifest(
    plan: BuildPlan,
    w: WhisperWeights,
    root: Path,
    targets: dict[str, str],
    batches: tuple[int, ...],
    started: float,
) -> dict[str, Any]:
    import coremltools as ct

    import wruntime
    from wruntime.build import convert as cv

    packages = {}
    for role, file in PACKAGE_FILES.items():
        path = root / file
        if not path.exists():
            continue
        files = file_table(path)
        packages[role] = {
            "file": file,
            "deployment_target": targets[role],
            "compute_precision": plan.compute_precision,
            "functions": fill_output_shapes(
                cv.describe_package(path), role, w.dims, len(w.alignment_heads)
            ),
            "op_types": cv.spec_op_types(path),
            "size_bytes": sum(f["size"] for f in files.values()),
            "files": files,
        }
    return {
        "format_version": FORMAT_VERSION,
        "name": plan.name,
        "architecture": plan.architecture,
        "precision": plan.precision,
        "compute_precision": plan.compute_precision,
        "deployment_target": plan.deployment_target,
        "dims": w.dims.to_dict(),
        "alignment_heads": [[int(a), int(b)] for a, b in w.alignment_heads.tolist()],
        "stateful_batches": list(batches),
        "max_batch": io.MAX_BATCH,
        "mask_neg": io.MASK_NEG,
        "packages": packages,
        "tokenizer": {"dir": TOKENIZER_DIR, "files": file_table(root / TOKENIZER_DIR)},
        "weights_source": str(w.source),
        "builder_version": BUILDER_VERSION,
        "wruntime_version": getattr(wruntime, "__version__", "unknown"),
        "coremltools_version": ct.__version__,
        "built_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "build_seconds": round(time.perf_counter() - started, 2),
    }


# ------------------------------------------------------------------ the cache


def rich_progress(name: str) -> tuple[Progress, Callable[[], None]]:
    """A rich progress bar on stderr for `build_model(progress=...)`, one step per stage.

    Returns (callback, stop); call stop() when the build ends, failed or not.
    """
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    bar = Progress(
        TextColumn(f"[bold]Building {name}[/bold]"),
        BarColumn(),
        TextColumn("{task.description}"),
        TimeElapsedColumn(),
        console=Console(stderr=True),
        transient=True,
    )
    task = None

    def update(description: str, index: int, total: int) -> None:
        nonlocal task
        if task is None:
            bar.start()
            task = bar.add_task(description, total=total)
        bar.update(task, description=description, completed=index - 1 if index < total else total)

    return update, bar.stop


def ensure_model(
    name: str,
    *,
    verify: bool | None = None,
    progress: bool | Progress = True,
    weights: Any = None,
    **build_options: Any,
) -> ModelDirectory:
    """The built directory of a catalog name, building it on first use.

    Opened with `load_model_dir` (``verify`` as there). A directory from another
    builder version is rebuilt; a damaged one is refused with a
    ModelDirectoryError rather than silently rebuilt.
    """
    from wruntime.catalog import resolve_model_name

    spec = resolve_model_name(name)
    path = model_path(spec.name)
    stale = path.exists() and _built_by_another_builder(path)
    force = False
    if weights is not None and path.exists() and not stale:
        # The user named their own weights: a cached build of other weights
        # under the same name must not be used silently in their place.
        wanted = _resolve_weights(*plan_for(spec), weights)
        force = _manifest_weights_source(path) != str(wanted.source)
        weights = wanted
    if stale or force or not path.exists():
        stop: Callable[[], None] = lambda: None  # noqa: E731
        if progress is True:
            report, stop = rich_progress(spec.name)
        elif callable(progress):
            report = progress
        else:
            report = None
        try:
            build_model(spec, weights=weights, progress=report, force=force, **build_options)
        finally:
            stop()
        verify = False  # hashed by the build a moment ago
    return load_model_dir(path, verify=verify)


def _manifest_weights_source(path: Path) -> str | None:
    try:
        return json.loads((path / io.MANIFEST_FILE).read_text(encoding="utf-8")).get(
            "weights_source"
        )
    except (OSError, ValueError):
        return None


def _usable(path: Path) -> bool:
    """An intact directory from this builder (sizes checked; see load_model_dir)."""
    if _built_by_another_builder(path):
        return False
    try:
        load_model_dir(path, verify=None)
    except ModelDirectoryError:
        return False
    return True


def _built_by_another_builder(path: Path) -> bool:
    """A readable manifest from an older (or newer) builder: rebuilt on first use.

    An unreadable one is not "stale" but damaged, which load_model_dir reports.
    """
    try:
        manifest = json.loads((path / io.MANIFEST_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(manifest, dict) and manifest.get("builder_version") != BUILDER_VERSION


@dataclass(frozen=True)
class ModelInfo:
    """One row of `list_models`."""

    name: str
    architecture: str
    precision: str
    built: bool
    size_mb: float | None
    path: str


def list_models() -> list[ModelInfo]:
    """Every catalog name (built or not), plus any other directory in the cache."""
    from wruntime.catalog import list_model_names, resolve_model_name

    rows = []
    names = list(list_model_names())
    root = models_root()
    if root.is_dir():
        names += sorted(
            p.name
            for p in root.iterdir()
            if p.is_dir() and not p.name.startswith(".") and p.name not in names
        )
    for name in names:
        path = model_path(name)
        built = (path / io.MANIFEST_FILE).is_file()
        try:
            spec = resolve_model_name(name)
            arch, precision = spec.architecture.name, spec.precision.name
        except WruntimeError:
            arch = precision = "?"
        size = round(directory_size(path) / 1e6, 1) if built else None
        rows.append(ModelInfo(name, arch, precision, built, size, str(path) if built else ""))
    return rows


def _locate(name_or_path: str) -> Path:
    """A built directory from a catalog name or a directory path."""
    path = Path(name_or_path)
    if path.is_dir() and (path / io.MANIFEST_FILE).exists():
        return path
    candidate = model_path(name_or_path)
    if candidate.is_dir():
        return candidate
    if os.sep in name_or_path or path.exists():
        raise ModelDirectoryError(f"{name_or_path} is not a built model directory.")
    from wruntime.catalog import resolve_model_name

    spec = resolve_model_name(name_or_path)  # unknown names fail here, with the valid ones
    candidate = model_path(spec.name)
    if not candidate.is_dir():
        raise ModelDirectoryError(
            f"{spec.name} is not built yet; build it with: wruntime build {spec.name}"
        )
    return candidate


def inspect_model(name_or_path: str) -> dict[str, Any]:
    """A built model's summary, after a full hash check of every file."""
    path = _locate(name_or_path)
    model = load_model_dir(path, verify=True)
    m = model.manifest

    def describe(f: dict[str, Any]) -> str:
        shape = ", ".join(f"{d[0]}..{d[1]}" if isinstance(d, list) else str(d) for d in f["shape"])
        return f"{f['name']} ({shape}) {f['dtype']}"

    packages = {}
    for role, entry in m["packages"].items():
        packages[role] = {
            "file": entry["file"],
            "deployment_target": entry["deployment_target"],
            "size_mb": round(entry["size_bytes"] / 1e6, 1),
            "functions": {
                fn: {
                    kind: [describe(f) for f in io_[kind]]
                    for kind in ("inputs", "outputs", "states")
                    if io_[kind]
                }
                for fn, io_ in entry["functions"].items()
            },
            "op_types": sorted({op for ops in entry["op_types"].values() for op in ops}),
        }
    return {
        "name": m["name"],
        "path": str(path),
        "verified": "every file matches its sha256",
        "architecture": m["architecture"],
        "precision": m["precision"],
        "compute_precision": m["compute_precision"],
        "deployment_target": m["deployment_target"],
        "size_mb": round(model.size_bytes() / 1e6, 1),
        "dims": m["dims"],
        "alignment_heads": m["alignment_heads"],
        "stateful_batches": m["stateful_batches"],
        "packages": packages,
        "tokenizer": sorted(m["tokenizer"]["files"]),
        "built_at": m["built_at"],
        "build_seconds": m["build_seconds"],
        "builder_version": m["builder_version"],
        "coremltools_version": m["coremltools_version"],
        "weights_source": m["weights_source"],
        **({"compression": _compression_summary(m["compression"])} if m.get("compression") else {}),
    }


def _compression_summary(record: dict[str, Any]) -> dict[str, Any]:
    """The manifest's record with a count of weights per rule, most used first."""
    counts: dict[str, int] = {}
    for rule in record["layers"].values():
        counts[rule] = counts.get(rule, 0) + 1
    return {
        "seconds": record["seconds"],
        "weights_per_rule": dict(sorted(counts.items(), key=lambda kv: -kv[1])),
        "layers": record["layers"],
    }


def remove_model(name_or_path: str) -> Path:
    """Delete a built directory from the cache (or a built directory given by path)."""
    path = Path(name_or_path)
    if not (path.is_dir() and (path / io.MANIFEST_FILE).exists()):
        path = model_path(name_or_path)
        if not path.is_dir():
            raise ModelDirectoryError(f"{name_or_path} is not built; nothing to remove.")
    remove_directory(path)
    return path
