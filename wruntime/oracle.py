"""A plain numpy forward pass of Whisper, straight from the canonical weights.

This is the reference every other path is judged against: the builder's MIL
program, the MIL interpreter and the Core ML packages must all agree with it,
and it must agree with openai-whisper (tests/test_oracle.py checks that on real
weights). So it shares nothing with the builder — no MIL, no layout tricks —
and follows openai-whisper's arithmetic: layer norm eps 1e-5, exact (erf)
GELU, q and k each scaled by d^-0.25, no key bias, softmax in float32, logits
against the token embedding.

Everything is float32. Shapes at the decoder boundary follow
``wruntime.build.interface`` (cross K/V as (L, 1, C, S), the self-attention
cache as (L, B, C, N)), so the oracle's tensors can be compared with a
package's outputs directly. Keys in those tensors are the raw key projections
(unscaled); the d^-0.25 scaling happens inside attention.

It imports only canonical weights and the interface constants: stages before
``build`` in spirit, kept outside the runtime's flow.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

import numpy as np
from numpy.typing import ArrayLike, NDArray
from scipy.special import erf

from wruntime.build.interface import MASK_NEG, N_FRAMES
from wruntime.weights.canonical import WhisperWeights

F32 = NDArray[np.float32]

#: openai-whisper's LayerNorm (torch default).
LN_EPS = 1e-5


class DecoderOutput(NamedTuple):
    """One decoder call's outputs, named and shaped as the interface's decoder outputs."""

    #: (B, T, V) float32
    logits: F32
    #: (L, B, C, T) the new tokens' self-attention keys (raw projection)
    k_new: F32
    #: (L, B, C, T) the new tokens' self-attention values
    v_new: F32
    #: (B, A, T, S) softmaxed cross-attention weights of weights.alignment_heads, in that order
    alignment: F32


# ---------------------------------------------------------------- primitives


def layer_norm(x: F32, weight: F32, bias: F32, eps: float = LN_EPS) -> F32:
    """Layer norm over the last axis, biased variance as torch computes it."""
    mean = x.mean(axis=-1, keepdims=True)
    centered = x - mean
    var = np.mean(centered * centered, axis=-1, keepdims=True)
    return (centered / np.sqrt(var + np.float32(eps)) * weight + bias).astype(
        np.float32, copy=False
    )


def gelu(x: F32) -> F32:
    """Exact GELU (torch's default, approximate='none'), not the tanh form."""
    y = erf(x * np.float32(1.0 / np.sqrt(2.0))).astype(np.float32, copy=False)
    y += 1.0
    y *= x
    y *= 0.5
    return y


def softmax(x: F32, axis: int = -1) -> F32:
    """Softmax in float32, max-subtracted so masked (-1e4 / -inf) slots give exact zeros."""
    e = np.asarray(x - x.max(axis=axis, keepdims=True), dtype=np.float32)
    np.exp(e, out=e)
    e /= e.sum(axis=axis, keepdims=True)
    return e


def _linear(w: WhisperWeights, prefix: str, x: F32) -> F32:
    """x @ W.T (+ b): torch's Linear, with the canonical (out, in) weight layout."""
    y = x @ w[f"{prefix}.weight"].T
    bias = w.params.get(f"{prefix}.bias")
    return y + bias if bias is not None else y


def _ln(w: WhisperWeights, prefix: str, x: F32) -> F32:
    return layer_norm(x, w[f"{prefix}.weight"], w[f"{prefix}.bias"])


def _mlp(w: WhisperWeights, prefix: str, x: F32) -> F32:
    # openai-whisper's nn.Sequential(Linear, GELU, Linear): indices 0 and 2.
    return _linear(
        w, f"{prefix}.mlp.2", gelu(_linear(w, f"{prefix}.mlp.0", _ln(w, f"{prefix}.mlp_ln", x)))
    )


def _split_heads(x: F32, n_head: int) -> F32:
    """(..., T, C) -> (..., H, T, d)."""
    *lead, t, c = x.shape
    return np.moveaxis(x.reshape(*lead, t, n_head, c // n_head), -2, -3)


def _merge_heads(x: F32) -> F32:
    """(..., H, T, d) -> (..., T, C)."""
    *lead, h, t, d = x.shape
    return np.moveaxis(x, -3, -2).reshape(*lead, t, h * d)


def _attend(q: F32, k_cf: F32, v_cf: F32, n_head: int, mask: F32 | None) -> tuple[F32, F32]:
    """Multi-head attention with channels-first keys and values.

    q is (..., T, C); k_cf and v_cf are (..., C, S), the interface layout, so a
    head's keys are a contiguous block of channels. Returns the merged output
    (..., T, C) and the softmax weights (..., H, T, S).
    """
    d = q.shape[-1] // n_head
    scale = np.float32(d**-0.25)
    qh = _split_heads(q * scale, n_head)  # (..., H, T, d)
    kh = (k_cf * scale).reshape(*k_cf.shape[:-2], n_head, d, k_cf.shape[-1])  # (..., H, d, S)
    vh = v_cf.reshape(*v_cf.shape[:-2], n_head, d, v_cf.shape[-1])  # (..., H, d, S)
    scores = qh @ kh  # (..., H, T, S)
    if mask is not None:
        scores = scores + mask
    weights = softmax(scores.astype(np.float32, copy=False))
    out = weights @ np.swapaxes(vh, -1, -2)  # (..., H, T, d)
    return _merge_heads(out).astype(np.float32, copy=False), weights


# ------------------------------------------------------------------ encoder


def _conv1d_k3(x_tc: F32, weight: F32, bias: F32, stride: int) -> F32:
    """Conv1d with kernel 3 and padding 1 as one matrix product (im2col).

    x is time-major (T, C_in); weight is torch's (C_out, C_in, 3). Each output
    frame's receptive field, flattened as (C_in, 3), lines up with the flattened
    weight, so the whole convolution is (T_out, 3*C_in) @ (3*C_in, C_out).
    """
    padded = np.pad(x_tc, ((1, 1), (0, 0)))
    cols = np.lib.stride_tricks.sliding_window_view(padded, 3, axis=0)[::stride]  # (T_out, C_in, 3)
    cols = np.ascontiguousarray(cols).reshape(cols.shape[0], -1)
    return cols @ weight.reshape(weight.shape[0], -1).T + bias


def encode(weights: WhisperWeights, mel: ArrayLike) -> F32:
    """The audio encoder: log-mel (n_mels, 3000) -> audio features (1500, n_audio_state).

    A leading batch axis of 1, as in the encoder package's input, is accepted.
    """
    dims = weights.dims
    x = np.asarray(mel, dtype=np.float32)
    if x.ndim == 3 and x.shape[0] == 1:
        x = x[0]
    if x.shape != (dims.n_mels, N_FRAMES):
        raise ValueError(f"mel must be ({dims.n_mels}, {N_FRAMES}), got {x.shape}")

    h = gelu(_conv1d_k3(x.T, weights["encoder.conv1.weight"], weights["encoder.conv1.bias"], 1))
    h = gelu(_conv1d_k3(h, weights["encoder.conv2.weight"], weights["encoder.conv2.bias"], 2))
    h = (h + weights["encoder.positional_embedding"]).astype(np.float32, copy=False)

    for i in range(dims.n_audio_layer):
        p = f"encoder.blocks.{i}"
        a = _ln(weights, f"{p}.attn_ln", h)
        q = _linear(weights, f"{p}.attn.query", a)
        k = _linear(weights, f"{p}.attn.key", a).T
        v = _linear(weights, f"{p}.attn.value", a).T
        out, _ = _attend(q, k, v, dims.n_audio_head, None)
        h = h + _linear(weights, f"{p}.attn.out", out)
        h = (h + _mlp(weights, p, h)).astype(np.float32, copy=False)

    return _ln(weights, "encoder.ln_post", h)


def cross_kv(weights: WhisperWeights, audio_features: ArrayLike) -> tuple[F32, F32]:
    """Every decoder layer's cross-attention keys and values, (L, 1, C, S) each.

    These depend on the audio alone, which is why the encoder package emits
    them rather than the decoder recomputing them per token.
    """
    xa = np.asarray(audio_features, dtype=np.float32)
    if xa.ndim == 3 and xa.shape[0] == 1:
        xa = xa[0]
    ks, vs = [], []
    for i in range(weights.dims.n_text_layer):
        p = f"decoder.blocks.{i}.cross_attn"
        ks.append(_linear(weights, f"{p}.key", xa).T)
        vs.append(_linear(weights, f"{p}.value", xa).T)
    return (
        np.stack(ks)[:, None].astype(np.float32, copy=False),
        np.stack(vs)[:, None].astype(np.float32, copy=False),
    )


# ------------------------------------------------------------------ decoder


def causal_mask(positions: ArrayLike, cache_len: int) -> F32:
    """The interface's additive mask (T, N + T) for tokens at ``positions``.

    Cache slots [0, positions[0]) hold the tokens before this call (the runtime
    writes position p to slot p); the T new tokens see each other causally.
    """
    pos = np.asarray(positions).reshape(-1)
    t = pos.shape[0]
    start = int(pos[0]) if t else 0
    cache_part = np.where(np.arange(cache_len)[None, :] < start, 0.0, MASK_NEG)
    new_part = np.where(np.arange(t)[None, :] <= np.arange(t)[:, None], 0.0, MASK_NEG)
    return np.concatenate([np.broadcast_to(cache_part, (t, cache_len)), new_part], axis=1).astype(
        np.float32
    )


def _alignment_index(weights: WhisperWeights) -> dict[int, list[tuple[int, int]]]:
    """layer -> [(row in the alignment output, head)] for weights.alignment_heads."""
    by_layer: dict[int, list[tuple[int, int]]] = {}
    for row, (layer, head) in enumerate(np.asarray(weights.alignment_heads).reshape(-1, 2)):
        by_layer.setdefault(int(layer), []).append((row, int(head)))
    return by_layer


def decode(
    weights: WhisperWeights,
    tokens: ArrayLike,
    positions: ArrayLike,
    k_cache: ArrayLike | None,
    v_cache: ArrayLike | None,
    cross_k: ArrayLike,
    cross_v: ArrayLike,
    mask: ArrayLike | None = None,
) -> DecoderOutput:
    """One call of the explicit-cache decoder, in the interface's shapes.

    tokens (B, T) at ``positions`` (T,); k_cache/v_cache (L, B, C, N) hold the
    earlier tokens (N may be anything, including None for no cache); mask is
    (T, N + T) additive, defaulting to ``causal_mask(positions, N)``. The caches
    are not modified: like the package, this returns the new K/V for the caller
    to write at positions.
    """
    dims = weights.dims
    tok = np.asarray(tokens, dtype=np.int64)
    pos = np.asarray(positions, dtype=np.int64).reshape(-1)
    if tok.ndim != 2 or tok.shape[1] != pos.shape[0]:
        raise ValueError(f"tokens must be (B, T) with T = len(positions), got {tok.shape}")
    b, t = tok.shape
    c, n_layer, n_head = dims.n_text_state, dims.n_text_layer, dims.n_text_head
    if k_cache is None or v_cache is None:
        kc = vc = np.zeros((n_layer, b, c, 0), np.float32)
    else:
        kc = np.asarray(k_cache, dtype=np.float32)
        vc = np.asarray(v_cache, dtype=np.float32)
    n = kc.shape[-1]
    m = causal_mask(pos, n) if mask is None else np.asarray(mask, dtype=np.float32)
    if m.shape != (t, n + t):
        raise ValueError(f"mask must be ({t}, {n + t}), got {m.shape}")
    ck = np.asarray(cross_k, dtype=np.float32)
    cv = np.asarray(cross_v, dtype=np.float32)
    align_index = _alignment_index(weights)
    alignment = np.zeros(
        (b, len(np.asarray(weights.alignment_heads).reshape(-1, 2)), t, ck.shape[-1]), np.float32
    )

    x = (
        weights["decoder.token_embedding.weight"][tok]
        + weights["decoder.positional_embedding"][pos]
    )
    x = x.astype(np.float32, copy=False)  # (B, T, C)
    k_new = np.empty((n_layer, b, c, t), np.float32)
    v_new = np.empty((n_layer, b, c, t), np.float32)

    for i in range(n_layer):
        p = f"decoder.blocks.{i}"
        a = _ln(weights, f"{p}.attn_ln", x)
        q = _linear(weights, f"{p}.attn.query", a)
        k_new[i] = np.swapaxes(_linear(weights, f"{p}.attn.key", a), -1, -2)
        v_new[i] = np.swapaxes(_linear(weights, f"{p}.attn.value", a), -1, -2)
        keys = np.concatenate([kc[i], k_new[i]], axis=-1)  # (B, C, N + T)
        values = np.concatenate([vc[i], v_new[i]], axis=-1)
        out, _ = _attend(q, keys, values, n_head, m)
        x = x + _linear(weights, f"{p}.attn.out", out)

        a = _ln(weights, f"{p}.cross_attn_ln", x)
        q = _linear(weights, f"{p}.cross_attn.query", a)
        out, w_cross = _attend(q, ck[i], cv[i], n_head, None)  # (1, C, S) broadcasts over B
        x = x + _linear(weights, f"{p}.cross_attn.out", out)
        for row, head in align_index.get(i, []):
            alignment[:, row] = w_cross[:, head]

        x = (x + _mlp(weights, p, x)).astype(np.float32, copy=False)

    x = _ln(weights, "decoder.ln", x)
    logits = (x @ weights["decoder.token_embedding.weight"].T).astype(np.float32, copy=False)
    return DecoderOutput(logits, k_new, v_new, alignment)


def logits_for_sequence(
    weights: WhisperWeights, tokens: ArrayLike, audio_features: ArrayLike
) -> F32:
    """Logits for a whole token prefix at once (causal), as openai-whisper's model.logits.

    tokens (B, T) -> (B, T, V); a 1-D (T,) sequence gives (T, V).
    """
    tok = np.asarray(tokens, dtype=np.int64)
    batched = tok.ndim == 2
    tok = np.atleast_2d(tok)
    ck, cv = cross_kv(weights, audio_features)
    out = decode(weights, tok, np.arange(tok.shape[1]), None, None, ck, cv)
    return out.logits if batched else out.logits[0]


def default_eot(weights: WhisperWeights) -> int:
    """<|endoftext|>: 50256 in the English-only (GPT-2) vocabulary, 50257 in the multilingual one."""
    return 50257 if weights.dims.is_multilingual else 50256


def greedy_tokens(
    weights: WhisperWeights,
    mel: ArrayLike | None,
    prompt_tokens: ArrayLike,
    max_tokens: int = 224,
    eot: int | None = None,
    audio_features: ArrayLike | None = None,
    mask: Callable[[Sequence[int], NDArray[np.float32]], None] | None = None,
) -> list[int]:
    """Plain argmax decoding of one window, no logit filters: the reference for comparisons.

    Returns the generated tokens after the prompt, without the end token. Runs
    the prompt in one call, then one token per call through a full-length
    (n_text_ctx) cache, the way the packaged decoder is driven. Pass
    ``audio_features`` (from ``encode``) to skip the encoder; ``mel`` may then be None.

    ``mask(generated, logits)``, if given, may set the next token's logits to -inf in
    place before the argmax, knowing the tokens generated so far: a caller's own few
    rules (no <|notimestamps|>, a timestamp first), not the decoder's full grammar.
    """
    eot = default_eot(weights) if eot is None else eot
    dims = weights.dims
    if audio_features is None:
        if mel is None:
            raise ValueError("greedy_tokens needs mel or audio_features")
        audio_features = encode(weights, mel)
    ck, cv = cross_kv(weights, audio_features)
    prompt = np.asarray(prompt_tokens, dtype=np.int64).reshape(-1)
    n = dims.n_text_ctx
    k_cache = np.zeros((dims.n_text_layer, 1, dims.n_text_state, n), np.float32)
    v_cache = np.zeros_like(k_cache)

    generated: list[int] = []
    step_tokens, pos = prompt, 0
    while True:
        positions = np.arange(pos, pos + len(step_tokens))
        out = decode(weights, step_tokens[None], positions, k_cache, v_cache, ck, cv)
        k_cache[..., positions] = out.k_new
        v_cache[..., positions] = out.v_new
        pos += len(step_tokens)
        row = out.logits[0, -1]
        if mask is not None:
            row = row.copy()
            mask(generated, row)
        nxt = int(np.argmax(row))
        if nxt == eot:
            break
        generated.append(nxt)
        if len(generated) >= max_tokens or pos >= n:
            break
        step_tokens = np.array([nxt], dtype=np.int64)
    return generated
