"""The builder: Whisper weights to a split Core ML model directory, and the cache of them.

- `build_model(name)` builds ``<cache>/models/<name>/`` (encoder, explicit-cache
  decoder, stateful decoder, tokenizer, manifest) atomically;
- `ensure_model(name)` opens it, building on first use with a progress bar;
- `load_model_dir(path)` opens and checks any built directory;
- `list_models`, `inspect_model`, `remove_model` back the CLI.

The package I/O contract is `wruntime.build.interface`. Importing this package
does not import coremltools; building does.
"""

from __future__ import annotations

from wruntime.build.model_dir import (
    ModelDirectory,
    load_model_dir,
    model_path,
    models_root,
    wruntime_home,
)
from wruntime.build.pipeline import (
    BuildPlan,
    ModelInfo,
    build_model,
    ensure_model,
    inspect_model,
    list_models,
    remove_model,
    rich_progress,
)

__all__ = [
    "BuildPlan",
    "ModelDirectory",
    "ModelInfo",
    "build_model",
    "ensure_model",
    "inspect_model",
    "list_models",
    "load_model_dir",
    "model_path",
    "models_root",
    "remove_model",
    "rich_progress",
    "wruntime_home",
]
