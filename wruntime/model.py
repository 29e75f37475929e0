"""A built model directory, opened: the executors, the tokenizer and the encoder call.

`WhisperModel.open("tiny.en-fp32")` (a catalog name, built on first use) or
`WhisperModel.open(path)` (a built directory) gives everything the decoding
loop needs and nothing about how the packages are executed: the encoder and
decoder are `Executor`s picked by a factory (`executor="auto" | "interpreter"
| "coreml"`, compute units per stage), so the Core ML executor plugs in
without this module or the decoding changing.

Decoder variants: the explicit-cache decoder always exists; where the
directory has a stateful decoder and the executor can hold state, its
per-batch functions (`stateful_function_name`) are loaded lazily and
`session()` prefers them for the batch sizes they cover.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from wruntime.build.interface import (
    DECODER_FILE,
    ENCODER_FILE,
    ENCODER_INPUT,
    N_FRAMES,
    STATEFUL_BATCHES,
    STATEFUL_DECODER_FILE,
    stateful_function_name,
)
from wruntime.errors import ExecutorError, WruntimeError
from wruntime.executors.base import Executor
from wruntime.weights.canonical import ModelDims

EXECUTOR_KINDS = ("auto", "interpreter", "coreml")

#: (package path, kind, function name, compute units or None, fp16 emulation) -> Executor
ExecutorFactory = Callable[[Path, str, str, "str | None", "bool | None"], Executor]


@dataclass(frozen=True)
class CrossKV:
    """The encoder's output for one window: every decoder layer's cross-attention K and V."""

    #: (L, 1, C, S) float32
    cross_k: np.ndarray
    #: (L, 1, C, S) float32
    cross_v: np.ndarray


def resolve_executor_kind(kind: str) -> str:
    """ "auto" is Core ML on macOS and the MIL interpreter everywhere else."""
    if kind not in EXECUTOR_KINDS:
        raise WruntimeError(f"Unknown executor {kind!r}; use one of {', '.join(EXECUTOR_KINDS)}.")
    if kind == "auto":
        return "coreml" if sys.platform == "darwin" else "interpreter"
    return kind


class DefaultExecutorFactory:
    """Loads package functions through `wruntime.executors.load_executor`.

    The interpreter reads each package once and shares the read among its
    functions (the stateful decoder's batch functions share one weights file).
    """

    def __init__(self) -> None:
        self._packages: dict[Path, Any] = {}

    def __call__(
        self,
        package: Path,
        kind: str,
        function_name: str,
        compute_units: str | None,
        fp16_emulation: bool | None,
    ) -> Executor:
        from wruntime.executors import load_executor

        if kind == "interpreter":
            from wruntime.executors.interpreter import load_package

            if package not in self._packages:
                self._packages[package] = load_package(package)
            return load_executor(
                self._packages[package],
                kind=kind,
                function_name=function_name,
                fp16_emulation=bool(fp16_emulation),
            )
        stage = "encoder" if package.name == ENCODER_FILE else "decoder"
        return load_executor(
            package,
            kind=kind,
            function_name=function_name,
            compute_units=compute_units,
            stage=stage,
            fp16_emulation=fp16_emulation,
        )


class WhisperModel:
    """A Whisper model ready to decode: dims, tokenizer, encoder and decoder executors."""

    def __init__(
        self,
        *,
        dims: ModelDims,
        tokenizer_files: Any,
        encoder: Executor,
        decoder: Executor,
        alignment_heads: np.ndarray,
        manifest: Mapping[str, Any] | None = None,
        stateful_decoders: Mapping[int, Callable[[], Executor]] | None = None,
        prefer_stateful: bool = False,
        name: str = "",
        executor_kind: str = "",
    ) -> None:
        self.dims = dims
        self.tokenizer_files = tokenizer_files
        self.encoder = encoder
        self.decoder = decoder
        self.alignment_heads = np.asarray(alignment_heads, dtype=np.int64).reshape(-1, 2)
        self.manifest = dict(manifest or {})
        self.name = name
        self.executor_kind = executor_kind
        self.prefer_stateful = prefer_stateful
        # batch -> loader; loaded on first use, since each function costs a load.
        self._stateful_loaders = dict(stateful_decoders or {})
        self._stateful: dict[int, Executor] = {}
        self._tokenizers: dict[tuple[str | None, str | None], Any] = {}

    # ------------------------------------------------------------ opening

    @classmethod
    def open(
        cls,
        model: str | os.PathLike[str],
        *,
        executor: str = "auto",
        compute_units: Mapping[str, str] | None = None,
        fp16_emulation: bool | None = None,
        stateful: bool | None = None,
        factory: ExecutorFactory | None = None,
        verify: bool | None = None,
        **build_options: Any,
    ) -> WhisperModel:
        """Open a built directory, or a catalog name (built on first use by the builder).

        ``stateful``: None uses the stateful decoder (where the directory has one)
        on Core ML only, where keeping the cache in MLState saves copying it every
        step; the interpreter defaults to the explicit fp32 cache. True prefers it
        on any executor; False never loads it. ``build_options`` go to
        `ensure_model` (weights=..., progress=...).
        """
        from wruntime.build import ensure_model, load_model_dir

        path = Path(model)
        if path.is_dir():
            info = load_model_dir(path, verify=verify)
        elif path.suffix == ".mlpackage" or os.sep in str(model):
            raise WruntimeError(f"{model} is not a built model directory.")
        else:
            info = ensure_model(str(model), verify=verify, **build_options)
        return cls.from_directory(
            info,
            executor=executor,
            compute_units=compute_units,
            fp16_emulation=fp16_emulation,
            stateful=stateful,
            factory=factory,
        )

    @classmethod
    def from_directory(
        cls,
        info: Any,
        *,
        executor: str = "auto",
        compute_units: Mapping[str, str] | None = None,
        fp16_emulation: bool | None = None,
        stateful: bool | None = None,
        factory: ExecutorFactory | None = None,
    ) -> WhisperModel:
        """Load the executors of a checked directory (`wruntime.build.ModelDirectory`)."""
        kind = resolve_executor_kind(executor)
        make = factory or DefaultExecutorFactory()
        units = dict(compute_units or {})
        path = Path(info.path)

        def load(file: str, function: str, stage: str) -> Executor:
            return make(path / file, kind, function, units.get(stage), fp16_emulation)

        use_stateful = stateful
        if kind == "coreml" and stateful is not False and info.has_package("decoder_stateful"):
            # The stateful decoder targets iOS 18: on an older macOS it must not be
            # chosen (it would fail at its first lazy load, mid-transcription). With
            # stateful=True the choice fails here, clearly, instead.
            from wruntime.executors.compute_units import current_host
            from wruntime.executors.coreml import decoder_variant_for_directory

            variant = decoder_variant_for_directory(
                path,
                current_host().os_version,
                info.manifest,
                prefer="stateful" if stateful else None,
            )
            use_stateful = variant == "stateful"
        elif stateful is None:
            use_stateful = False
        loaders: dict[int, Callable[[], Executor]] = {}
        if use_stateful and info.has_package("decoder_stateful"):
            for batch in info.stateful_batches or STATEFUL_BATCHES:
                fn = stateful_function_name(batch)
                loaders[batch] = lambda fn=fn: load(STATEFUL_DECODER_FILE, fn, "decoder")
        return cls(
            dims=info.dims,
            tokenizer_files=info.tokenizer_files,
            encoder=load(ENCODER_FILE, "main", "encoder"),
            decoder=load(DECODER_FILE, "main", "decoder"),
            alignment_heads=info.alignment_heads,
            manifest=info.manifest,
            stateful_decoders=loaders,
            prefer_stateful=bool(loaders),
            name=info.name,
            executor_kind=kind,
        )

    # ------------------------------------------------------------ facts

    @property
    def is_multilingual(self) -> bool:
        return self.dims.is_multilingual

    @property
    def num_languages(self) -> int:
        return self.dims.num_languages

    @property
    def n_text_ctx(self) -> int:
        return self.dims.n_text_ctx

    @property
    def tokenizer(self) -> Any:
        """The default tokenizer (English transcription on multilingual models)."""
        return self.tokenizer_for()

    def tokenizer_for(self, language: str | None = None, task: str | None = None) -> Any:
        """The tokenizer whose SOT sequence carries this language and task (cached)."""
        key = (language, task if task != "lang_id" else None)
        if key not in self._tokenizers:
            from wruntime.tokenizer import get_tokenizer

            self._tokenizers[key] = get_tokenizer(
                self.tokenizer_files,
                multilingual=self.is_multilingual,
                num_languages=self.num_languages,
                language=key[0],
                task=key[1],
            )
        return self._tokenizers[key]

    # ------------------------------------------------------------ running

    def encode(self, mel: np.ndarray) -> CrossKV | list[CrossKV]:
        """Cross-attention K/V of one window (n_mels, 3000), or a list for (n, n_mels, 3000)."""
        x = np.asarray(mel, dtype=np.float32)
        expected = (self.dims.n_mels, N_FRAMES)
        if x.shape[-2:] != expected or x.ndim not in (2, 3):
            raise WruntimeError(
                f"A window's log-mel must be {expected} (or a batch of them), got {x.shape}."
            )
        if x.ndim == 3:
            return [self._encode_one(w) for w in x]
        return self._encode_one(x)

    def _encode_one(self, mel: np.ndarray) -> CrossKV:
        out = self.encoder.predict({ENCODER_INPUT: np.ascontiguousarray(mel[None])})
        return CrossKV(
            np.asarray(out["cross_k"], dtype=np.float32), np.asarray(out["cross_v"], np.float32)
        )

    def stateful_decoder(self, batch: int) -> Executor | None:
        """The stateful decoder function for this batch, if the directory has one."""
        if batch not in self._stateful_loaders:
            return None
        if batch not in self._stateful:
            self._stateful[batch] = self._stateful_loaders[batch]()
        return self._stateful[batch]

    def session(self, cross: CrossKV, batch: int = 1, *, stateful: bool | None = None) -> Any:
        """A decoder session for one window: stateful where available (or asked), else explicit.

        ``stateful=None`` follows the model's preference (see `open`) where a
        stateful function covers ``batch``; True insists (ExecutorError if none
        does); False forces the explicit cache.
        """
        from wruntime.decoding.inference import ExplicitCacheSession, StatefulSession

        want = self.prefer_stateful if stateful is None else stateful
        executor = self.stateful_decoder(batch) if want else None
        if stateful and executor is None:
            raise ExecutorError(f"This model has no stateful decoder for batch {batch}.")
        if executor is not None:
            return StatefulSession(
                executor, cross.cross_k, cross.cross_v, n_ctx=self.dims.n_text_ctx, batch=batch
            )
        return ExplicitCacheSession(
            self.decoder, cross.cross_k, cross.cross_v, n_ctx=self.dims.n_text_ctx, batch=batch
        )

    def detect_language(self, mel_or_cross: Any) -> tuple[str, dict[str, float]]:
        """The spoken language of one window and every language's probability."""
        from wruntime.decoding.language import detect_language

        cross = mel_or_cross if isinstance(mel_or_cross, CrossKV) else self.encode(mel_or_cross)
        return detect_language(self, cross)
