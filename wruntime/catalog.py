"""The model catalog: which names exist, what they are, and where their weights come from.

The facts live as data in ``models/`` (architectures.json, precisions.json; the
schema is in models/README.md) so that adding an architecture or tuning a
compression recipe is an edit to data, not code. This module reads that data,
resolves ``<architecture>-<precision>`` names, and finds weights for an
architecture in the order a user would expect: what they pass explicitly, then
what their environment points at, then what is installed, and only then the
network (which may not be there: that must fail in seconds, with the options).
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import re
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from wruntime.errors import ModelNameError, WeightsError
from wruntime.weights import ModelDims, WhisperWeights, load_weights

__all__ = [
    "ArchitectureSpec",
    "CompressionRule",
    "ModelSpec",
    "PrecisionSpec",
    "architectures",
    "data_dir",
    "env_var_for",
    "list_model_names",
    "load_architecture_weights",
    "precisions",
    "resolve_model_name",
]

#: Seconds to wait for the Hugging Face hub to answer before giving up on it.
HUB_PROBE_TIMEOUT = 6.0

_RULE_KINDS = ("linear_quantize", "palettize", "none")
_RULE_TARGETS = ("global", "op_type", "op_name")
_TARGETS = ("iOS16", "iOS17", "iOS18")

_HUB_FILES = {
    "ctranslate2": ["config.json", "model.bin", "tokenizer.json", "vocabulary.*"],
    "safetensors": [
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "model.safetensors.index.json",
        "model-*.safetensors",
        "tokenizer.json",
        "vocab.json",
        "merges.txt",
        "added_tokens.json",
        "special_tokens_map.json",
        "tokenizer_config.json",
        "normalizer.json",
    ],
}


# --- data -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CompressionRule:
    """One line of a compression recipe, applied first-match-wins to each weight.

    ``target`` says what the rule matches: "global" (every weight), "op_type"
    (weights feeding ops of type ``pattern``, e.g. "linear", "conv") or
    "op_name" (ops whose name matches the glob ``pattern``). The remaining
    fields are the arguments of coremltools.optimize.coreml's
    OpLinearQuantizerConfig / OpPalettizerConfig; ``kind == "none"`` keeps the
    weight in the compute precision. ``lut_dtype`` "int8" (palettize only) stores the
    tables' entries as int8 with one scale (coremltools' joint compression, iOS18).
    """

    target: str
    kind: str
    pattern: str | None = None
    dtype: str | None = None
    nbits: int | None = None
    mode: str | None = None
    granularity: str | None = None
    block_size: int | None = None
    group_size: int | None = None
    weight_threshold: int | None = None
    lut_dtype: str | None = None

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str) -> CompressionRule:
        unknown = set(data) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"{where}: unknown compression rule fields {sorted(unknown)}")
        rule = cls(**data)
        if rule.kind not in _RULE_KINDS or rule.target not in _RULE_TARGETS:
            raise ValueError(f"{where}: bad kind/target in {data}")
        if (rule.target != "global") != (rule.pattern is not None):
            raise ValueError(f"{where}: a {rule.target} rule needs a pattern only if not global")
        if rule.kind == "linear_quantize" and rule.dtype not in ("int8", "uint8", "int4", "uint4"):
            raise ValueError(f"{where}: linear_quantize needs dtype int8/int4")
        if rule.kind == "palettize" and rule.nbits not in (1, 2, 3, 4, 6, 8):
            raise ValueError(f"{where}: palettize needs nbits in 1,2,3,4,6,8")
        if rule.lut_dtype is not None and (rule.kind != "palettize" or rule.lut_dtype != "int8"):
            raise ValueError(f"{where}: lut_dtype can only be int8, on a palettize rule")
        return rule

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if v is not None}


@dataclass(frozen=True)
class PrecisionSpec:
    name: str
    description: str
    #: "float32" or "float16": the precision Core ML computes in.
    compute_precision: str
    #: "iOS17" / "iOS18": the oldest OS whose Core ML runs every op the recipe makes.
    minimum_deployment_target: str
    compression: tuple[CompressionRule, ...]
    #: For per-layer searches (mixed, auto): the budget and the candidate rules, as data.
    sensitivity: dict[str, Any] | None = None

    @property
    def is_compressed(self) -> bool:
        return any(r.kind != "none" for r in self.compression) or self.sensitivity is not None


@dataclass(frozen=True)
class PackageSource:
    distribution: str  # what `pip install` takes
    module: str  # what importlib finds
    path: str  # the weight file inside the module's directory


@dataclass(frozen=True)
class HubSource:
    repo_id: str
    format: str  # "ctranslate2" or "safetensors"


@dataclass(frozen=True)
class ArchitectureSpec:
    name: str
    dims: ModelDims
    #: Default (layer, head) alignment heads, openai-whisper's; weights may carry their own.
    alignment_heads: tuple[tuple[int, int], ...]
    packages: tuple[PackageSource, ...]
    huggingface: tuple[HubSource, ...]

    @property
    def alignment_heads_array(self) -> np.ndarray:
        return np.array(self.alignment_heads, dtype=np.int64).reshape(-1, 2)

    @property
    def env_var(self) -> str:
        return env_var_for(self.name)


@dataclass(frozen=True)
class ModelSpec:
    """What a model name means: an architecture at a precision."""

    name: str
    architecture: ArchitectureSpec
    precision: PrecisionSpec

    @property
    def dims(self) -> ModelDims:
        return self.architecture.dims


def data_dir() -> Path:
    """models/: inside the installed package (wheel, or the editable symlink), else the checkout."""
    packaged = resources.files("wruntime") / "_models"
    if packaged.is_dir() and (packaged / "architectures.json").is_file():
        return Path(str(packaged))
    checkout = Path(__file__).resolve().parent.parent / "models"
    if (checkout / "architectures.json").is_file():
        return checkout
    raise RuntimeError(f"the model catalog data is missing (looked in {packaged} and {checkout})")


def _read(name: str) -> dict[str, Any]:
    with open(data_dir() / name, encoding="utf-8") as f:
        return json.load(f)


@functools.cache
def architectures() -> dict[str, ArchitectureSpec]:
    """Every architecture in catalog order (smallest first)."""
    out = {}
    for name, a in _read("architectures.json")["architectures"].items():
        out[name] = ArchitectureSpec(
            name=name,
            dims=ModelDims(**a["dims"]),
            alignment_heads=tuple((int(layer), int(head)) for layer, head in a["alignment_heads"]),
            packages=tuple(PackageSource(**p) for p in a.get("packages", [])),
            huggingface=tuple(HubSource(**h) for h in a.get("huggingface", [])),
        )
    return out


@functools.cache
def precisions() -> dict[str, PrecisionSpec]:
    out = {}
    for name, p in _read("precisions.json")["precisions"].items():
        where = f"precisions.json:{name}"
        if p["minimum_deployment_target"] not in _TARGETS:
            raise ValueError(f"{where}: unknown deployment target")
        if p["compute_precision"] not in ("float32", "float16"):
            raise ValueError(f"{where}: unknown compute precision")
        rules = tuple(CompressionRule.from_dict(r, where) for r in p["compression"])
        if any(r.lut_dtype for r in rules) and p["minimum_deployment_target"] != "iOS18":
            raise ValueError(f"{where}: int8 lookup tables (joint compression) need iOS18")
        out[name] = PrecisionSpec(
            name=name,
            description=p.get("description", ""),
            compute_precision=p["compute_precision"],
            minimum_deployment_target=p["minimum_deployment_target"],
            compression=rules,
            sensitivity=p.get("sensitivity"),
        )
    return out


# --- names ----------------------------------------------------------------------------------------


def list_model_names() -> list[str]:
    """Every valid `<architecture>-<precision>` name."""
    return [f"{a}-{p}" for a in architectures() for p in precisions()]


def _valid_names_sentence() -> str:
    return (
        f"architectures are {', '.join(architectures())}; precisions are {', '.join(precisions())}"
    )


def architecture(name: str) -> ArchitectureSpec:
    try:
        return architectures()[name]
    except KeyError:
        raise ModelNameError(
            f"Unknown architecture '{name}': the architectures are {', '.join(architectures())}."
        ) from None


def resolve_model_name(name: str) -> ModelSpec:
    """Parse `<architecture>-<precision>`.

    Architecture names contain dots and dashes (large-v3-turbo), so the name is
    split by finding a known precision as its suffix, not at the first dash.
    """
    text = name.strip().lower()
    if "@" in text:
        return _budgeted(name, text)
    for precision in sorted(precisions(), key=len, reverse=True):
        suffix = "-" + precision
        if text.endswith(suffix) and text[: -len(suffix)] in architectures():
            return ModelSpec(
                name=text,
                architecture=architectures()[text[: -len(suffix)]],
                precision=precisions()[precision],
            )
    if text in architectures():
        raise ModelNameError(
            f"Model name '{name}' has no precision: use {text}-<precision> with one of "
            f"{', '.join(precisions())} (e.g. {text}-fp16)."
        )
    raise ModelNameError(
        f"Unknown model '{name}': a model name is <architecture>-<precision>, where the "
        f"{_valid_names_sentence()} (e.g. tiny.en-fp16, small-int8, base-auto@0.3)."
    )


_BUDGET = re.compile(r"^(?P<value>\d+(?:\.\d+)?)(?P<mb>mb)?$")


def budget_suffix(max_fraction: float | None = None, max_mb: float | None = None) -> str:
    """The ``@<budget>`` a model name carries for a size budget ("" for none): `_budgeted`
    reads it back."""
    if max_fraction is not None:
        return f"@{max_fraction:g}"
    return f"@{max_mb:g}mb" if max_mb is not None else ""


def _budgeted(name: str, text: str) -> ModelSpec:
    """`<architecture>-auto@<budget>`: a searched precision built to a size budget.

    ``tiny.en-auto@0.3`` is at most 30% of the fp16 model directory, ``base-auto@40mb``
    at most 40 MB. The catalog's `auto` has one error budget; a size is what a user
    shipping an app has in mind, and each budget is its own cached model.
    """
    stem, _, budget = text.partition("@")
    base = resolve_model_name(stem)
    if base.precision.sensitivity is None:
        raise ModelNameError(
            f"'{name}': only a precision chosen from measured sensitivity takes a budget "
            f"(@); {base.precision.name} is a fixed recipe."
        )
    match = _BUDGET.match(budget)
    value = float(match["value"]) if match else 0.0
    if match is None or value <= 0 or (not match["mb"] and value >= 1):
        raise ModelNameError(
            f"'{name}': the budget after @ is a fraction of the fp16 size below 1 (e.g. "
            f"{stem}@0.3) or a size in MB (e.g. {stem}@40mb)."
        )
    metric = "size_mb" if match["mb"] else "size_fraction"
    described = f"at most {value:g} MB" if match["mb"] else f"at most {value:.0%} of fp16"
    precision = PrecisionSpec(
        name=f"{base.precision.name}@{budget}",
        description=f"{base.precision.description}; here to a size budget: {described}",
        compute_precision=base.precision.compute_precision,
        minimum_deployment_target=base.precision.minimum_deployment_target,
        compression=base.precision.compression,
        sensitivity={**base.precision.sensitivity, "budget": {"metric": metric, "max": value}},
    )
    return ModelSpec(name=text, architecture=base.architecture, precision=precision)


# --- weights --------------------------------------------------------------------------------------


def env_var_for(arch: str) -> str:
    """WRUNTIME_WEIGHTS_TINY_EN for tiny.en, WRUNTIME_WEIGHTS_LARGE_V3_TURBO for large-v3-turbo."""
    return "WRUNTIME_WEIGHTS_" + re.sub(r"[^A-Z0-9]", "_", arch.upper())


SourceArg = str | Path | Sequence[str | Path] | None


def load_architecture_weights(arch: str, source: SourceArg = None) -> WhisperWeights:
    """The weights of ``arch``: from ``source``, the environment, a package, or the hub.

    Loaded weights are cached per process (keyed on the files and their mtimes),
    so tests and repeated builds read the 75 MB tiny.en once. The cached arrays
    are read-only, because they are shared.
    """
    spec = architecture(arch)
    found = _find_source(spec, source)
    if found is None:
        return _from_hub(spec)
    return _load_cached(spec.name, _cache_key(found))


def _as_paths(source: str | Path | Sequence[str | Path]) -> list[Path]:
    if isinstance(source, (str, Path)):
        return [Path(p) for p in str(source).split(os.pathsep) if p]
    return [Path(p) for p in source]


def _find_source(spec: ArchitectureSpec, source: SourceArg) -> list[Path] | None:
    if source is not None:
        return _as_paths(source)
    env = os.environ.get(spec.env_var)
    if env:
        return _as_paths(env)
    weights_dir = os.environ.get("WRUNTIME_WEIGHTS_DIR")
    if weights_dir:
        for candidate in (spec.name, f"{spec.name}.pt", f"{spec.name}.safetensors"):
            path = Path(weights_dir) / candidate
            if path.exists():
                return [path]
    return _package_files(spec)


def _package_files(spec: ArchitectureSpec) -> list[Path] | None:
    if not spec.packages:
        return None
    files = []
    for package in spec.packages:
        found = importlib.util.find_spec(package.module)
        if found is None or not found.submodule_search_locations:
            return None
        files.append(Path(next(iter(found.submodule_search_locations))) / package.path)
    return files


def _cache_key(paths: list[Path]) -> tuple[tuple[str, int, int], ...]:
    key = []
    for p in paths:
        resolved = p.expanduser().resolve()
        try:
            st = resolved.stat()
            key.append((str(resolved), st.st_mtime_ns, st.st_size))
        except OSError:
            key.append((str(resolved), 0, -1))  # the reader reports what is missing
    return tuple(key)


@functools.lru_cache(maxsize=4)
def _load_cached(arch: str, key: tuple[tuple[str, int, int], ...]) -> WhisperWeights:
    spec = architectures()[arch]
    paths = [Path(p) for p, _, _ in key]
    weights = load_weights(
        paths[0] if len(paths) == 1 else paths,
        default_alignment_heads=spec.alignment_heads_array,
    )
    _check_dims(spec, weights)
    for array in weights.params.values():
        array.flags.writeable = False
    return weights


def _check_dims(spec: ArchitectureSpec, weights: WhisperWeights) -> None:
    if weights.dims == spec.dims:
        return
    want, got = spec.dims.to_dict(), weights.dims.to_dict()
    diff = ", ".join(f"{k} {got[k]} (not {want[k]})" for k in want if want[k] != got[k])
    raise WeightsError(f"The weights at {weights.source} are not {spec.name} weights: {diff}.")


def _options(spec: ArchitectureSpec) -> str:
    ways = []
    if spec.packages:
        ways.append("install " + " ".join(p.distribution for p in spec.packages))
    ways.append(
        "pass --weights PATH (a faster-whisper directory, a Hugging Face directory or an OpenAI .pt)"
    )
    ways.append(f"set {spec.env_var}=PATH (or WRUNTIME_WEIGHTS_DIR with a {spec.name}/ inside)")
    return "; ".join(ways)


def _hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def _from_hub(spec: ArchitectureSpec) -> WhisperWeights:
    """Hugging Face: the local hub cache first, then (unless offline) a download.

    Reachability is probed in a daemon thread with a hard deadline: with no
    network, DNS or a proxy can stall far beyond socket timeouts, and the user
    must hear about their options in seconds, not minutes.
    """
    if importlib.util.find_spec("huggingface_hub") is None or not spec.huggingface:
        raise WeightsError(f"No weights for {spec.name} were found: {_options(spec)}.")
    import huggingface_hub

    for hub in spec.huggingface:
        try:
            local = huggingface_hub.snapshot_download(
                hub.repo_id, allow_patterns=_HUB_FILES[hub.format], local_files_only=True
            )
        except Exception:  # not in the cache: any of several hub exception types
            continue
        return _load_cached(spec.name, _cache_key([Path(local)]))
    if _hub_offline():
        raise WeightsError(
            f"No weights for {spec.name} were found and HF_HUB_OFFLINE is set: {_options(spec)}."
        )
    hub = spec.huggingface[0]
    if not _hub_reachable(huggingface_hub, hub.repo_id):
        raise WeightsError(
            f"No weights for {spec.name} were found and the Hugging Face hub is unreachable: "
            f"{_options(spec)}."
        )
    try:
        local = huggingface_hub.snapshot_download(
            hub.repo_id, allow_patterns=_HUB_FILES[hub.format]
        )
    except Exception as e:
        raise WeightsError(
            f"Downloading {hub.repo_id} failed ({type(e).__name__}): {_options(spec)}."
        ) from None
    return _load_cached(spec.name, _cache_key([Path(local)]))


def _hub_reachable(huggingface_hub: Any, repo_id: str) -> bool:
    result: list[bool] = []

    def probe() -> None:
        try:
            huggingface_hub.HfApi().model_info(repo_id, timeout=HUB_PROBE_TIMEOUT)
            result.append(True)
        except Exception:
            result.append(False)

    thread = threading.Thread(target=probe, name="wruntime-hub-probe", daemon=True)
    thread.start()
    thread.join(HUB_PROBE_TIMEOUT + 1.0)
    return bool(result and result[0])
