"""The decoder program with an explicit self-attention cache (``decoder.mlpackage``).

One call serves both the prompt prefill (T > 1) and each step (T = 1): the
caller passes the cache so far (fixed length N) and an additive mask over
[cache slots, new tokens]; the program returns the logits and only the new
tokens' keys and values, which the runtime writes into its cache itself.

The decoder runs on the GPU with flexible batch and token counts, so its
activations are channels-first (B, C, T) and attention takes all heads at once
(the score maps are small: T x (N + T) per head).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass

import coremltools as ct
import numpy as np
from coremltools.converters.mil import Builder as mb
from coremltools.converters.mil.mil import Program, Var, get_new_symbol, types

from wruntime.build import interface as io
from wruntime.build.layers import (
    compute_dtype,
    dim,
    dynamic_shape,
    layer_norm_c,
    mlp,
    output,
    project,
    query_projection,
    to_compute,
    wt,
)
from wruntime.weights.canonical import WhisperWeights, first_special_token

#: The control tokens' chunk of the tied token embedding (see `vocab_chunks`).
SPECIAL_ROWS_CONST = "token_embedding_special_rows"

#: Text chunks hold a multiple of this many rows, so that per-grouped-channel
#: tables of 16 or of 6 rows fit every chunk (a shape they do not divide falls
#: back to one table per chunk, and 3 or 4 bits in one table is much noisier).
ROW_ALIGN = 48


def control_chunk_start(n_vocab: int) -> int | None:
    """Where the control tokens' chunk starts: None for a non-Whisper vocabulary.

    The text rows are cut at a multiple of `ROW_ALIGN`; the rest of them (one
    row in a multilingual vocabulary) joins the control chunk.
    """
    special = first_special_token(n_vocab)
    return None if special is None else special - special % ROW_ALIGN


#: Where the first text chunks of a Whisper vocabulary end. Its BPE ids follow the
#: merge order, so the first rows are the commonest tokens, and they take most of
#: the vocabulary's error when compressed: on tiny.en at 4 bits, rows [0:768) gave
#: half of the first 12,576 rows' KL (benchmarks/RESULTS.md, session 9). Chunks of
#: their own let a compression search give them more bits at little cost in size.
FREQUENT_ROWS = (768, 3072)


def vocab_chunks(n_vocab: int, limit: int = io.ANE_MAX_DIM) -> list[tuple[int, int]]:
    """(offset, rows) of the vocabulary chunks: text chunks, then the control tokens.

    ANE: no tensor dimension above 16384, so the vocabulary projection is split
    into chunks whose logits are concatenated (or kept as separate outputs). In a
    Whisper vocabulary the commonest tokens come first in chunks of their own
    (`FREQUENT_ROWS`), the other text tokens follow in near-equal chunks, and the
    control tokens (end of text, languages, tasks, timestamps: 1,608 rows) get a
    chunk of their own, so compression can keep them apart: whether a segment ends
    is read from these rows, and at 4 bits base went on after the speech, filling
    the next window with a repeated sentence (benchmarks/RESULTS.md, session 7).
    """
    control = control_chunk_start(n_vocab)
    frequent = (
        [] if control is None else [b - a for a, b in itertools.pairwise((0, *FREQUENT_ROWS))]
    )
    if any(rows > limit for rows in frequent):
        frequent = []  # a limit under the frequent chunks' sizes: plain near-equal chunks
    text = (n_vocab if control is None else control) - sum(frequent)
    units, rest = divmod(text, ROW_ALIGN)  # only a non-Whisper vocabulary leaves a rest
    n = math.ceil(text / limit)
    while True:
        sizes = [ROW_ALIGN * (units // n + (i < units % n)) for i in range(n)]
        sizes[-1] += rest
        if max(sizes) <= limit:
            break
        n += 1
    sizes = frequent + sizes
    chunks = list(zip(itertools.accumulate(sizes, initial=0), sizes, strict=False))
    if control is not None:
        chunks.append((control, n_vocab - control))
    return chunks


def logits_output_names(n_vocab: int, split_logits: bool) -> list[str]:
    if not split_logits:
        return ["logits"]
    return [f"logits_{i}" for i in range(len(vocab_chunks(n_vocab)))]


@dataclass
class DecoderParts:
    """What the shared decoder body produces, for the two decoder programs to name."""

    logits: list[Var]
    alignment: Var
    k_new: list[Var]  # per layer, (B, C, T)
    v_new: list[Var]


#: (layer, k (B, C, T), v (B, C, T)) -> (keys, values) to attend to, (B, C, Nk).
SelfKV = Callable[[int, Var, Var], tuple[Var, Var]]


def _embed(tokens: Var, chunks: list[Var], offsets: list[int]) -> Var:
    """Token embeddings (B, T, C) gathered from the vocabulary chunks.

    The chunks are the same constants the logits projection uses (the
    embedding is tied), so the table is stored once: each chunk is gathered
    at the token's offset inside it (clamped into range) and the last chunk
    starting at or before the token wins. The chunks differ in size (the
    control tokens' is small), so the offsets are compared, not divided.
    """
    emb = None
    for table, offset in zip(chunks, offsets, strict=True):
        last = np.int32(int(table.shape[0]) - 1)
        local = tokens if offset == 0 else mb.sub(x=tokens, y=np.int32(offset))
        if offset:
            local = mb.maximum(x=local, y=np.int32(0))
        rows = mb.gather(x=table, indices=mb.minimum(x=local, y=last), axis=0)
        if emb is None:
            emb = rows
        else:
            here = mb.greater_equal(x=tokens, y=np.int32(offset))
            emb = mb.select(cond=mb.expand_dims(x=here, axes=[-1]), a=rows, b=emb)
    return emb


def _attend(q: Var, k: Var, v: Var, mask: Var | None, q_shape: Var, kv_shape: Var, out_shape: Var):
    """All-heads attention on (B, C, T) tensors; returns (out (B, C, T), weights (B, H, T, Nk))."""
    qh = mb.reshape(x=q, shape=q_shape)  # (B, H, d, T)
    kh = mb.reshape(x=k, shape=kv_shape)  # (B, H, d, Nk): a head's keys are contiguous channels
    vh = mb.reshape(x=v, shape=kv_shape)
    scores = mb.matmul(x=qh, y=kh, transpose_x=True)  # (B, H, T, Nk)
    if mask is not None:
        scores = mb.add(x=scores, y=mask)
    weights = mb.softmax(x=scores, axis=-1)
    out = mb.matmul(x=vh, y=weights, transpose_y=True)  # (B, H, d, T)
    return mb.reshape(x=out, shape=out_shape), weights


def _cross_layer(cross: Var, layer: int, n_head: int) -> Var:
    """One layer's cross K or V from (L, 1, C, S) as (1, H, d, S) (static shapes)."""
    _, _, c, s = (int(v) for v in cross.shape)
    one = mb.slice_by_size(x=cross, begin=[layer, 0, 0, 0], size=[1, 1, c, s])
    return mb.reshape(x=one, shape=[1, n_head, c // n_head, s])


def decoder_body(
    w: WhisperWeights,
    tokens: Var,
    positions: Var,
    mask: Var,
    cross_k: Var,
    cross_v: Var,
    self_kv: SelfKV,
    kv_len: Var | int,
) -> DecoderParts:
    """Whisper's text decoder on channels-first activations, shared by both decoders."""
    d = w.dims
    n_head, n_state = d.n_text_head, d.n_text_state
    head_dim = n_state // n_head

    mask, cross_k, cross_v = to_compute(mask), to_compute(cross_k), to_compute(cross_v)
    table = w["decoder.token_embedding.weight"]
    chunk_list = vocab_chunks(d.n_vocab)
    # Named, so a recipe's op_name rule can reach the control tokens' chunk.
    special = control_chunk_start(d.n_vocab)
    chunks = [
        mb.const(
            val=wt(table[o : o + n]),
            name=SPECIAL_ROWS_CONST if o == special else f"token_embedding_rows_{i}",
        )
        for i, (o, n) in enumerate(chunk_list)
    ]

    # Runtime shapes: batch and token count are flexible.
    tok_shape = mb.shape(x=tokens)
    b, t = dim(tok_shape, 0), dim(tok_shape, 1)
    kv = kv_len if isinstance(kv_len, Var) else np.array([kv_len], dtype=np.int32)
    q_shape = dynamic_shape([b, [n_head, head_dim], t])
    kv_shape = dynamic_shape([b, [n_head, head_dim], kv])
    out_shape = dynamic_shape([b, [n_state], t])

    x = _embed(tokens, chunks, [o for o, _ in chunk_list])  # (B, T, C)
    pos = mb.gather(x=wt(w["decoder.positional_embedding"]), indices=positions, axis=0)
    x = mb.add(x=x, y=pos)
    # Channels-first (B, C, T): projections become 1x1 convolutions.
    x = mb.transpose(x=x, perm=[0, 2, 1])

    heads = [(int(layer), int(head)) for layer, head in w.alignment_heads.tolist()]
    alignment: dict[tuple[int, int], Var] = {}
    k_new: list[Var] = []
    v_new: list[Var] = []
    for i in range(d.n_text_layer):
        p = f"decoder.blocks.{i}"
        # Self-attention: one fused q/k/v projection, split along channels.
        h = layer_norm_c(x, w[f"{p}.attn_ln.weight"], w[f"{p}.attn_ln.bias"])
        q_w, q_b = query_projection(w, f"{p}.attn", n_head)
        qkv_w = np.concatenate([q_w, w[f"{p}.attn.key.weight"], w[f"{p}.attn.value.weight"]])
        qkv_b = np.concatenate([q_b, np.zeros(n_state, np.float32), w[f"{p}.attn.value.bias"]])
        q, k, v = mb.split(x=project(h, qkv_w, qkv_b), num_splits=3, axis=1)
        k_new.append(k)
        v_new.append(v)
        k_all, v_all = self_kv(i, k, v)
        a, _ = _attend(q, k_all, v_all, mask, q_shape, kv_shape, out_shape)
        x = mb.add(x=x, y=project(a, w[f"{p}.attn.out.weight"], w[f"{p}.attn.out.bias"]))

        # Cross-attention over the encoder's K/V (batch 1, broadcast over the beams).
        h = layer_norm_c(x, w[f"{p}.cross_attn_ln.weight"], w[f"{p}.cross_attn_ln.bias"])
        q_w, q_b = query_projection(w, f"{p}.cross_attn", n_head)
        qh = mb.reshape(x=project(h, q_w, q_b), shape=q_shape)  # (B, H, d, T)
        ck = _cross_layer(cross_k, i, n_head)  # (1, H, d, S)
        cv = _cross_layer(cross_v, i, n_head)
        weights = mb.softmax(x=mb.matmul(x=qh, y=ck, transpose_x=True), axis=-1)  # (B, H, T, S)
        a = mb.reshape(x=mb.matmul(x=cv, y=weights, transpose_y=True), shape=out_shape)
        x = mb.add(
            x=x, y=project(a, w[f"{p}.cross_attn.out.weight"], w[f"{p}.cross_attn.out.bias"])
        )
        for head in sorted({hd for layer, hd in heads if layer == i}):
            alignment[(i, head)] = mb.slice_by_index(
                x=weights,
                begin=[0, head, 0, 0],
                end=[0, head + 1, 0, 0],
                begin_mask=[True, False, True, True],
                end_mask=[True, False, True, True],
            )  # (B, 1, T, S)

        h = layer_norm_c(x, w[f"{p}.mlp_ln.weight"], w[f"{p}.mlp_ln.bias"])
        x = mb.add(x=x, y=mlp(h, w, f"{p}.mlp"))

    x = layer_norm_c(x, w["decoder.ln.weight"], w["decoder.ln.bias"])
    x = mb.transpose(x=x, perm=[0, 2, 1])  # (B, T, C)
    logits = [mb.linear(x=x, weight=chunk) for chunk in chunks]  # (B, T, <=16384) each
    return DecoderParts(
        logits=logits, alignment=[alignment[lh] for lh in heads], k_new=k_new, v_new=v_new
    )


def name_outputs(parts: DecoderParts, *, split_logits: bool, with_cache: bool) -> tuple[Var, ...]:
    """Give the body's results the interface's output names and order, in fp32."""
    if split_logits:
        outs = [output(v, f"logits_{i}") for i, v in enumerate(parts.logits)]
    elif len(parts.logits) == 1:
        outs = [output(parts.logits[0], "logits")]
    else:
        outs = [output(mb.concat(values=parts.logits, axis=-1), "logits")]
    if with_cache:
        outs.append(output(mb.stack(values=parts.k_new, axis=0), "k_new"))
        outs.append(output(mb.stack(values=parts.v_new, axis=0), "v_new"))
    if len(parts.alignment) == 1:
        outs.append(output(parts.alignment[0], "alignment"))
    else:
        outs.append(output(mb.concat(values=parts.alignment, axis=1), "alignment"))
    return tuple(outs)


def decoder_input_types(w: WhisperWeights) -> list[ct.TensorType]:
    """The flexible input shapes, passed again to ct.convert (else ranges become (1, 2))."""
    d = w.dims
    n = d.n_text_ctx
    L, C, S = d.n_text_layer, d.n_text_state, d.n_audio_ctx
    batch = ct.RangeDim(1, io.MAX_BATCH, default=1)
    tokens = ct.RangeDim(1, n, default=1)
    width = ct.RangeDim(n + 1, 2 * n, default=n + 1)
    f32t, i32t = np.float32, np.int32
    return [
        ct.TensorType("tokens", shape=(batch, tokens), dtype=i32t),
        ct.TensorType("positions", shape=(tokens,), dtype=i32t),
        ct.TensorType("k_cache", shape=(L, batch, C, n), dtype=f32t),
        ct.TensorType("v_cache", shape=(L, batch, C, n), dtype=f32t),
        ct.TensorType("mask", shape=(tokens, width), dtype=f32t),
        ct.TensorType("cross_k", shape=(L, 1, C, S), dtype=f32t),
        ct.TensorType("cross_v", shape=(L, 1, C, S), dtype=f32t),
    ]


def build_decoder_program(
    weights: WhisperWeights, *, fp16: bool, target: object, split_logits: bool = False
) -> Program:
    """A fresh MIL program for the explicit-cache decoder.

    ``split_logits`` keeps the vocabulary chunks as separate outputs
    (logits_0, logits_1, ...) for a decoder placed on the Neural Engine, where
    even the concatenated (B, T, V) tensor would pass the 16384 limit.
    """
    d = weights.dims
    n = d.n_text_ctx
    L, C, S = d.n_text_layer, d.n_text_state, d.n_audio_ctx
    B, T, U = get_new_symbol(), get_new_symbol(), get_new_symbol()
    specs = [
        mb.TensorSpec(shape=(B, T), dtype=types.int32),
        mb.TensorSpec(shape=(T,), dtype=types.int32),
        mb.TensorSpec(shape=(L, B, C, n), dtype=types.fp32),
        mb.TensorSpec(shape=(L, B, C, n), dtype=types.fp32),
        mb.TensorSpec(shape=(T, U), dtype=types.fp32),
        mb.TensorSpec(shape=(L, 1, C, S), dtype=types.fp32),
        mb.TensorSpec(shape=(L, 1, C, S), dtype=types.fp32),
    ]

    with compute_dtype(fp16):
        return _decoder_program(weights, specs, target, split_logits)


def _decoder_program(weights: WhisperWeights, specs, target, split_logits: bool) -> Program:
    n = weights.dims.n_text_ctx

    @mb.program(input_specs=specs, opset_version=target)
    def decoder(tokens, positions, k_cache, v_cache, mask, cross_k, cross_v):
        k_cache, v_cache = to_compute(k_cache), to_compute(v_cache)

        def self_kv(layer: int, k: Var, v: Var) -> tuple[Var, Var]:
            # Attend over [cache slots 0..N) + [the T new tokens], as the mask's columns.
            def cached(cache: Var) -> Var:
                return mb.slice_by_index(
                    x=cache,
                    begin=[layer, 0, 0, 0],
                    end=[layer + 1, 0, 0, 0],
                    end_mask=[False, True, True, True],
                    squeeze_mask=[True, False, False, False],
                )  # (B, C, N)

            return (
                mb.concat(values=[cached(k_cache), k], axis=2),
                mb.concat(values=[cached(v_cache), v], axis=2),
            )

        t = dim(mb.shape(x=tokens), 1)
        kv_len = mb.add(x=t, y=np.int32(n))
        parts = decoder_body(weights, tokens, positions, mask, cross_k, cross_v, self_kv, kv_len)
        return name_outputs(parts, split_logits=split_logits, with_cache=True)

    return decoder
