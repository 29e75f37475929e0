"""The transcriber's view of a model: open it, encode a window once, decode, align.

Keeps everything the long-form loop needs from `wruntime.model` and
`wruntime.decoding` in one small place, and adds the stage timing there:
the encoder runs once per window (fallback retries and word alignment reuse
its cross-attention K/V), decoder calls are timed through a session wrapper,
and the alignment prefill uses the model directly so it is not counted as
decoding.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from wruntime.errors import WruntimeError
from wruntime.timing import stage


class _TimedSession:
    """A decoder session whose calls are recorded as the "decoder" stage."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner

    def prefill(self, tokens: Sequence[int]) -> np.ndarray:
        # The prompt call is timed apart from the per-token steps (inside
        # "decoder"), so a profile can tell prefill cost from step cost.
        with stage("decoder"), stage("decoder.prefill"):
            return self._inner.prefill(tokens)

    def step(self, tokens: np.ndarray) -> np.ndarray:
        with stage("decoder"):
            return self._inner.step(tokens)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


class _TimedModel:
    """The model as `decode()` sees it, with its sessions timed."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner

    def session(self, *args: Any, **kwargs: Any) -> _TimedSession:
        return _TimedSession(self._inner.session(*args, **kwargs))

    def encode(self, mel: np.ndarray) -> Any:
        with stage("encoder"):
            return self._inner.encode(mel)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


class Window:
    """One 30 s window, encoded once; decoded (maybe several times) and aligned."""

    def __init__(self, runtime: ModelRuntime, mel: np.ndarray) -> None:
        self._runtime = runtime
        with stage("encoder"):
            self.cross = runtime.model.encode(mel)

    def decode(self, options: dict[str, Any]) -> Any:
        from wruntime.decoding.decode import decode
        from wruntime.decoding.options import DecodingOptions

        with stage("decode"):
            return decode(self._runtime.timed, self.cross, DecodingOptions(**options))

    def align(self, tokens: list[int]) -> tuple[np.ndarray, np.ndarray]:
        """One prefill over the whole sequence: (alignment (A, T, S), logits (T, V))."""
        session = self._runtime.model.session(self.cross, batch=1)
        logits = session.prefill(tokens)
        if session.alignment is None:
            raise WruntimeError("This model's decoder has no alignment output for word timestamps.")
        return np.asarray(session.alignment)[0], np.asarray(logits)


class ModelRuntime:
    """An opened model with what the transcriber asks of it."""

    def __init__(self, model: Any) -> None:
        self.model = model
        self.timed = _TimedModel(model)

    @classmethod
    def open(
        cls,
        model: str | os.PathLike[str],
        *,
        executor: str = "auto",
        compute_units: dict[str, str] | None = None,
        weights: Path | None = None,
        fp16_emulation: bool | None = None,
        build_progress: Callable[..., Any] | None = None,
    ) -> ModelRuntime:
        path = Path(model)
        if not path.is_dir():
            if os.sep in str(model) or str(model).startswith("."):
                raise WruntimeError(f"{model} is not a built model directory.")
            # An unknown name fails here, in one line, before anything is loaded.
            from wruntime.catalog import resolve_model_name

            resolve_model_name(str(model))
        try:
            from wruntime.model import WhisperModel
        except ImportError as e:
            raise WruntimeError(
                f"The model runtime is not available in this installation ({e.name} is missing)."
            ) from None
        build_options: dict[str, Any] = {}
        if weights is not None:
            build_options["weights"] = weights
        if build_progress is not None:
            build_options["progress"] = build_progress
        try:
            opened = WhisperModel.open(
                model,
                executor=executor,
                compute_units=compute_units,
                fp16_emulation=fp16_emulation,
                **build_options,
            )
        except ImportError as e:
            # A stage of the pipeline is missing from this installation.
            raise WruntimeError(
                f"Cannot open model {model}: part of the runtime is not installed ({e})."
            ) from None
        return cls(opened)

    @property
    def n_mels(self) -> int:
        return int(self.model.dims.n_mels)

    @property
    def n_text_ctx(self) -> int:
        return int(self.model.dims.n_text_ctx)

    @property
    def is_multilingual(self) -> bool:
        return bool(self.model.is_multilingual)

    def tokenizer(self, language: str | None, task: str) -> Any:
        return self.model.tokenizer_for(language=language, task=task)

    def window(self, mel: np.ndarray) -> Window:
        return Window(self, mel)

    def detect_language(self, mel: np.ndarray) -> str:
        from wruntime.decoding.language import detect_language

        window = self.window(mel)
        with stage("decode"):
            code, _ = detect_language(self.timed, window.cross)
        return code
