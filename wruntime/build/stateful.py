"""The decoder with its self-attention cache in MLState (``decoder_stateful.mlpackage``, iOS 18).

The cache lives inside Core ML between calls, so a step moves no cache across
the API boundary. States have fixed shapes, so the package holds one function
per batch size (interface.STATEFUL_BATCHES), built separately and merged with
save_multifunction, which stores the shared weights once.

Each call:
1. reads each cache state once and gathers its rows by ``beam_order`` (beam
   search reorders hypotheses between steps);
2. per layer, writes the new tokens' K/V at ``positions[0]`` with slice_update
   and commits with coreml_update_state, then attends over the whole updated
   cache (length N) under the caller's (T, N) mask.

Trap (coremltools): a second read_state after an update is merged with the
first by the remove_redundant_ops pass and silently reads the stale cache; so
the value returned by each coreml_update_state is carried forward instead.
"""

from __future__ import annotations

import coremltools as ct
import numpy as np
from coremltools.converters.mil import Builder as mb
from coremltools.converters.mil.mil import Program, Var, get_new_symbol, types

from wruntime.build import interface as io
from wruntime.build.decoder import decoder_body, name_outputs
from wruntime.build.layers import as_dtype, compute_dtype, dim, is_fp16
from wruntime.weights.canonical import WhisperWeights

#: The stateful decoder needs MLState: iOS 18 / macOS 15.
STATEFUL_TARGET = "iOS18"


def stateful_input_types(w: WhisperWeights, batch: int) -> list[ct.TensorType]:
    """The non-state inputs with their flexible token dimension (states are not listed)."""
    d = w.dims
    n = d.n_text_ctx
    L, C, S = d.n_text_layer, d.n_text_state, d.n_audio_ctx
    tokens = ct.RangeDim(1, n, default=1)
    f32t, i32t = np.float32, np.int32
    return [
        ct.TensorType("tokens", shape=(batch, tokens), dtype=i32t),
        ct.TensorType("positions", shape=(tokens,), dtype=i32t),
        ct.TensorType("beam_order", shape=(batch,), dtype=i32t),
        ct.TensorType("mask", shape=(tokens, n), dtype=f32t),
        ct.TensorType("cross_k", shape=(L, 1, C, S), dtype=f32t),
        ct.TensorType("cross_v", shape=(L, 1, C, S), dtype=f32t),
    ]


def build_stateful_program(
    weights: WhisperWeights, batch: int, *, fp16: bool, target: object
) -> Program:
    """A fresh MIL program for one batch size of the stateful decoder."""
    d = weights.dims
    n = d.n_text_ctx
    L, C, S = d.n_text_layer, d.n_text_state, d.n_audio_ctx
    T = get_new_symbol()
    cache_shape = (L, batch, C, n)
    specs = [
        mb.TensorSpec(shape=(batch, T), dtype=types.int32),
        mb.TensorSpec(shape=(T,), dtype=types.int32),
        mb.TensorSpec(shape=(batch,), dtype=types.int32),
        mb.TensorSpec(shape=(T, n), dtype=types.fp32),
        mb.TensorSpec(shape=(L, 1, C, S), dtype=types.fp32),
        mb.TensorSpec(shape=(L, 1, C, S), dtype=types.fp32),
        # States must be fp16 and fixed-shape (Core ML's rule).
        mb.StateTensorSpec(shape=cache_shape, dtype=types.fp16),
        mb.StateTensorSpec(shape=cache_shape, dtype=types.fp16),
    ]

    with compute_dtype(fp16):
        return _stateful_program(weights, batch, specs, target)


def _stateful_program(weights: WhisperWeights, batch: int, specs, target) -> Program:
    d = weights.dims
    n = d.n_text_ctx
    C = d.n_text_state

    @mb.program(input_specs=specs, opset_version=target)
    def decoder_stateful(tokens, positions, beam_order, mask, cross_k, cross_v, k_cache, v_cache):
        t = dim(mb.shape(x=tokens), 1)
        start = mb.slice_by_size(x=positions, begin=[0], size=[1])  # positions[0]
        stop = mb.add(x=start, y=t)
        # Read each state once, reordered for the beams; later layers keep
        # using the value each update returns (see the module docstring).
        current = {
            "k": mb.gather(x=mb.read_state(input=k_cache), indices=beam_order, axis=1),
            "v": mb.gather(x=mb.read_state(input=v_cache), indices=beam_order, axis=1),
        }
        states = {"k": k_cache, "v": v_cache}

        def write_and_read(kind: str, layer: int, new: Var) -> Var:
            update = as_dtype(mb.expand_dims(x=new, axes=[0]), "fp16")  # (1, B, C, T)
            begin = mb.concat(values=[np.array([layer, 0, 0], np.int32), start], axis=0)
            end = mb.concat(values=[np.array([layer + 1, batch, C], np.int32), stop], axis=0)
            cache = mb.slice_update(x=current[kind], update=update, begin=begin, end=end)
            current[kind] = mb.coreml_update_state(state=states[kind], value=cache)
            layer_cache = mb.slice_by_index(
                x=current[kind],
                begin=[layer, 0, 0, 0],
                end=[layer + 1, batch, C, n],
                squeeze_mask=[True, False, False, False],
            )  # (B, C, N)
            return as_dtype(layer_cache, "fp16" if is_fp16() else "fp32")

        def self_kv(layer: int, k: Var, v: Var) -> tuple[Var, Var]:
            return write_and_read("k", layer, k), write_and_read("v", layer, v)

        parts = decoder_body(weights, tokens, positions, mask, cross_k, cross_v, self_kv, n)
        return name_outputs(parts, split_logits=False, with_cache=False)

    return decoder_stateful


def stateful_function_names() -> dict[int, str]:
    return {b: io.stateful_function_name(b) for b in io.STATEFUL_BATCHES}
