"""Compute units, the host they run on, and the checks Core ML would otherwise fail late.

Why this module exists apart from the executor: every decision here (which compute units a
stage gets, whether this Mac can honour them, whether a package's deployment target fits the
OS, which decoder variant to load) is a pure function of a few strings and version tuples, so
Linux tests cover all of it by passing the host in. Nothing here imports coremltools; the
executor turns a `ComputeUnits` into `coremltools.ComputeUnit[units.name]` only on macOS (the
member names are identical on purpose).
"""

from __future__ import annotations

import enum
import platform
import re
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass

from wruntime.errors import ExecutorError


class ComputeUnits(str, enum.Enum):
    """Where Core ML may run a model; names match `coremltools.ComputeUnit` members exactly."""

    CPU_ONLY = "CPU_ONLY"
    CPU_AND_GPU = "CPU_AND_GPU"
    CPU_AND_NE = "CPU_AND_NE"
    ALL = "ALL"

    def __str__(self) -> str:
        return self.value.lower()


#: The split the project is about: the encoder is one big static-shape graph, the Neural
#: Engine's best case; the decoder is small, step-by-step and cache-bound, which the GPU
#: handles without the ANE's per-call overhead and fixed-shape constraints.
DEFAULT_COMPUTE_UNITS: Mapping[str, ComputeUnits] = {
    "encoder": ComputeUnits.CPU_AND_NE,
    "decoder": ComputeUnits.CPU_AND_GPU,
}
STAGES = tuple(DEFAULT_COMPUTE_UNITS)

# Short spellings a user is likely to type on a command line.
_ALIASES = {
    "CPU": ComputeUnits.CPU_ONLY,
    "GPU": ComputeUnits.CPU_AND_GPU,
    "NE": ComputeUnits.CPU_AND_NE,
    "ANE": ComputeUnits.CPU_AND_NE,
    "CPU_AND_ANE": ComputeUnits.CPU_AND_NE,
}
_CHOICES = "cpu_only, cpu_and_gpu, cpu_and_ne or all"


def parse_compute_units(value: str | ComputeUnits) -> ComputeUnits:
    """One compute-unit name, case-insensitive, '-' or ' ' allowed for '_' ("cpu-and-ne")."""
    if isinstance(value, ComputeUnits):
        return value
    if not isinstance(value, str):
        raise ExecutorError(f"Compute units must be a name such as cpu_and_ne, not {value!r}.")
    key = re.sub(r"[\s\-]+", "_", value.strip()).upper()
    if key in ComputeUnits.__members__:
        return ComputeUnits[key]
    if key in _ALIASES:
        return _ALIASES[key]
    raise ExecutorError(f"Unknown compute units {value!r}; choose one of {_CHOICES}.")


def resolve_compute_units(
    spec: str | ComputeUnits | Mapping[str, str | ComputeUnits] | None = None,
) -> dict[str, ComputeUnits]:
    """Compute units for every stage: defaults, overridden per stage or for all stages at once.

    Accepts None (defaults), one name for every stage ("cpu_only"), a mapping
    ({"encoder": "all"}), or the command-line form "encoder=all,decoder=cpu_only".
    """
    resolved = dict(DEFAULT_COMPUTE_UNITS)
    if spec is None:
        return resolved
    if isinstance(spec, str) and "=" in spec:
        pairs: dict[str, str] = {}
        for part in filter(None, (p.strip() for p in spec.split(","))):
            stage, sep, name = part.partition("=")
            if not sep or not name.strip():
                raise ExecutorError(
                    f"Cannot read compute units {spec!r}; write e.g. encoder=cpu_and_ne,decoder=cpu_and_gpu."
                )
            pairs[stage.strip().lower()] = name.strip()
        spec = pairs
    if isinstance(spec, Mapping):
        for stage, name in spec.items():
            if stage not in resolved:
                raise ExecutorError(
                    f"Unknown stage {stage!r} for compute units; use {' or '.join(STAGES)}."
                )
            resolved[stage] = parse_compute_units(name)
        return resolved
    units = parse_compute_units(spec)
    return dict.fromkeys(resolved, units)


# --------------------------------------------------------------------------- the host


@dataclass(frozen=True)
class Host:
    """What Core ML cares about: the OS, its version, the CPU architecture."""

    system: str  # platform.system(): "Darwin", "Linux", ...
    os_version: tuple[int, ...]  # macOS product version, () elsewhere
    machine: str  # platform.machine(): "arm64" on Apple silicon, "x86_64" on Intel

    @property
    def is_macos(self) -> bool:
        return self.system == "Darwin"

    @property
    def has_neural_engine(self) -> bool:
        # Every Apple-silicon Mac has an ANE and no Intel Mac has one. An x86_64 Python under
        # Rosetta also reports x86_64 and cannot reach the ANE reliably, so it counts as Intel.
        return self.is_macos and self.machine == "arm64"

    @property
    def version_text(self) -> str:
        return format_version(self.os_version)


def parse_version(text: str) -> tuple[int, ...]:
    """'15.1.1' -> (15, 1, 1); trailing zeros dropped so (15, 0) == (15,)."""
    parts = re.findall(r"\d+", text or "")
    version = [int(p) for p in parts[:3]]
    while version and version[-1] == 0 and len(version) > 1:
        version.pop()
    return tuple(version)


def format_version(version: tuple[int, ...]) -> str:
    if not version:
        return "unknown"
    return ".".join(str(v) for v in (version if len(version) > 1 else (*version, 0)))


def _macos_product_version() -> tuple[int, ...]:
    version = parse_version(platform.mac_ver()[0])
    # A Python built against an old SDK is told "10.16" for every macOS from 11 on; ask
    # sw_vers then (coremltools itself does the same in models.utils._macos_version).
    if not version or version == (10, 16):
        try:
            out = subprocess.run(
                ["sw_vers", "-productVersion"], capture_output=True, text=True, check=True
            ).stdout
            version = parse_version(out) or version
        except (OSError, subprocess.CalledProcessError):
            pass
    return version


def current_host() -> Host:
    system = platform.system()
    version = _macos_product_version() if system == "Darwin" else ()
    return Host(system=system, os_version=version, machine=platform.machine())


# --------------------------------------------------------------------------- checks

#: Core ML specification version -> (first macOS that runs it, deployment-target name).
#: From coremltools' _SPECIFICATION_VERSION_IOS_* and AvailableTarget (macOS14 == iOS17 == 8).
SPEC_VERSION_TARGETS: Mapping[int, tuple[tuple[int, ...], str]] = {
    4: ((10, 15), "iOS13"),
    5: ((11,), "iOS14"),
    6: ((12,), "iOS15"),
    7: ((13,), "iOS16"),
    8: ((14,), "iOS17"),
    9: ((15,), "iOS18"),
    10: ((26,), "iOS26"),
}
_TARGET_BY_NAME = {name.lower(): macos for macos, name in SPEC_VERSION_TARGETS.values()}


def min_macos_for_target(target: str | int) -> tuple[int, ...]:
    """The first macOS able to run a package with this deployment target.

    `target` is a specification version (8), an iOS target ("iOS18") or a macOS one ("macOS15").
    """
    if isinstance(target, int):
        if target in SPEC_VERSION_TARGETS:
            return SPEC_VERSION_TARGETS[target][0]
        newest = max(SPEC_VERSION_TARGETS)
        if target > newest:
            # Newer than anything this table knows: assume one macOS per spec version.
            return (SPEC_VERSION_TARGETS[newest][0][0] + target - newest,)
        raise ExecutorError(f"Core ML specification version {target} is too old for wruntime.")
    text = str(target).strip()
    if text.lower() in _TARGET_BY_NAME:
        return _TARGET_BY_NAME[text.lower()]
    match = re.fullmatch(r"(?i)macos\s*([\d.]+)", text.replace("_", "."))
    if match:
        return parse_version(match.group(1))
    raise ExecutorError(f"Unknown deployment target {target!r} in the model manifest.")


def target_name(target: str | int) -> str:
    if isinstance(target, int) and target in SPEC_VERSION_TARGETS:
        return SPEC_VERSION_TARGETS[target][1]
    return str(target)


def require_coreml(host: Host) -> None:
    """Core ML exists on macOS only; everywhere else the interpreter runs the same package."""
    if not host.is_macos:
        raise ExecutorError("Core ML runs only on macOS; use --executor interpreter.")


def check_deployment_target(package: str, target: str | int, host: Host) -> None:
    """Refuse early, by name, a package this OS cannot load (Core ML's own error is vague)."""
    need = min_macos_for_target(target)
    if host.os_version and host.os_version < need:
        raise ExecutorError(
            f"{package} targets {target_name(target)} and needs macOS {format_version(need)} or "
            f"newer, but this Mac runs macOS {host.version_text}; update macOS or build the model "
            "for an older target."
        )


def check_compute_units(units: ComputeUnits, host: Host, stage: str = "this stage") -> None:
    """Refuse compute units this Mac does not have instead of letting Core ML silently fall back."""
    if units is ComputeUnits.CPU_AND_NE:
        if not host.has_neural_engine:
            raise ExecutorError(
                f"This Mac ({host.machine}) has no Neural Engine, so {stage} cannot use cpu_and_ne; "
                "choose cpu_and_gpu, cpu_only or all (or run an arm64 Python on Apple silicon)."
            )
        if host.os_version and host.os_version < (13,):
            raise ExecutorError(
                f"cpu_and_ne needs macOS 13 or newer, but this Mac runs macOS {host.version_text}; "
                "choose all or cpu_and_gpu."
            )


def default_compute_units(stage: str | None, host: Host) -> ComputeUnits:
    """The stage's default, except that an Intel Mac's encoder goes to the GPU.

    Asking for cpu_and_ne on a Mac without a Neural Engine is an error (see
    `check_compute_units`), but not asking must still work there out of the box.
    """
    units = DEFAULT_COMPUTE_UNITS.get(stage or "", ComputeUnits.ALL)
    if units is ComputeUnits.CPU_AND_NE and host.is_macos and not host.has_neural_engine:
        return ComputeUnits.CPU_AND_GPU
    return units


# --------------------------------------------------------------------------- decoder variant

EXPLICIT = "explicit"
STATEFUL = "stateful"


def choose_decoder_variant(
    targets: Mapping[str, str | int], os_version: tuple[int, ...] | None, prefer: str | None = None
) -> str:
    """The decoder to load: stateful (cache in MLState) when the OS can run it, else explicit.

    `targets` maps each variant the model directory holds ("explicit", "stateful") to its
    deployment target, as the manifest records it. `os_version` is the running macOS version
    (None or () for "no OS constraint", e.g. the interpreter on Linux, which runs both; the
    stateful one is still preferred there so Linux exercises what a current Mac runs).
    `prefer` forces a variant and fails clearly if it cannot run.
    """
    if not targets:
        raise ExecutorError("The model directory has no decoder package; rebuild the model.")

    def runs(variant: str) -> bool:
        return not os_version or os_version >= min_macos_for_target(targets[variant])

    if prefer is not None:
        if prefer not in (EXPLICIT, STATEFUL):
            raise ExecutorError(f"Unknown decoder variant {prefer!r}; use explicit or stateful.")
        if prefer not in targets:
            raise ExecutorError(
                f"This model has no {prefer} decoder; rebuild it with one or drop the choice."
            )
        if not runs(prefer):
            need = format_version(min_macos_for_target(targets[prefer]))
            raise ExecutorError(
                f"The {prefer} decoder needs macOS {need} or newer, but this Mac runs macOS "
                f"{format_version(os_version or ())}; use the explicit decoder or update macOS."
            )
        return prefer
    for variant in (STATEFUL, EXPLICIT):
        if variant in targets and runs(variant):
            return variant
    oldest = min(min_macos_for_target(t) for t in targets.values())
    raise ExecutorError(
        f"Every decoder in this model needs macOS {format_version(oldest)} or newer, but this Mac "
        f"runs macOS {format_version(os_version or ())}; build the model for an older target."
    )


# --------------------------------------------------------------------------- optimization hints

#: Core ML optimization hints (MLOptimizationHints, macOS 15): the key coremltools expects ->
#: the values it accepts, as member names of ct.SpecializationStrategy / ct.ReshapeFrequency
#: (None: a bool). coremltools validates them in models.model._verify_optimization_hint_input.
_HINTS: Mapping[str, tuple[str, ...] | None] = {
    "specializationStrategy": ("Default", "FastPrediction"),
    "reshapeFrequency": ("Frequent", "Infrequent"),
    "allowLowPrecisionAccumulationOnGPU": None,
}


def _squash(text: str) -> str:
    return re.sub(r"[\s_\-]", "", text).lower()


def parse_optimization_hints(
    hints: Mapping[str, str | bool] | None, host: Host
) -> dict[str, str | bool]:
    """Normalize optimization hints to coremltools' keys and member names, checking the OS.

    Accepts snake_case or camelCase keys and values ("specialization_strategy":
    "fast_prediction"). Why these matter here: the decoder's input shape changes rarely
    (B, 1) so "reshapeFrequency: Infrequent" lets Core ML specialize for it, and
    "FastPrediction" trades a longer first load for lower latency; both are measurable
    choices, so none is on by default.
    """
    if not hints:
        return {}
    if host.os_version and host.os_version < (15,):
        raise ExecutorError(
            f"Core ML optimization hints need macOS 15 or newer, but this Mac runs macOS "
            f"{host.version_text}; drop the hints."
        )
    keys = {_squash(k): k for k in _HINTS}
    out: dict[str, str | bool] = {}
    for key, value in hints.items():
        canonical = keys.get(_squash(str(key)))
        if canonical is None:
            raise ExecutorError(
                f"Unknown optimization hint {key!r}; use {', '.join(_HINTS)} (or snake_case)."
            )
        allowed = _HINTS[canonical]
        if allowed is None:
            if not isinstance(value, bool):
                raise ExecutorError(f"The optimization hint {canonical} takes true or false.")
            out[canonical] = value
            continue
        match = next((a for a in allowed if _squash(a) == _squash(str(value))), None)
        if match is None:
            raise ExecutorError(
                f"Unknown value {value!r} for {canonical}; use {' or '.join(allowed)}."
            )
        out[canonical] = match
    return out
