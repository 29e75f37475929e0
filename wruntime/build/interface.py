"""The contract between the built packages and everything that runs them.

The builder emits exactly these names, shapes and dtypes; the manifest records
them; the executors and the decoding loop rely on them and on nothing else.
Shapes use: L = n_text_layer, C = n_text_state, S = n_audio_ctx (1500),
N = n_text_ctx (448, the self-attention cache length), B = batch (beams),
T = tokens in this call (1 for a step, more for the prompt prefill),
A = number of alignment heads, V = n_vocab.

Encoder (``encoder.mlpackage``, function ``main``, static shapes for the ANE)
    in   mel      (1, n_mels, 3000)  fp32   log-mel of one 30 s window
    out  cross_k  (L, 1, C, S)       fp32   cross-attention keys, every layer
    out  cross_v  (L, 1, C, S)       fp32   cross-attention values, every layer

Channels-first, as the Neural Engine wants (B, C, 1, S): a head's keys are
the contiguous block cross_k[l, 0, h*d:(h+1)*d, :], so q @ K needs no
transpose in the decoder. Keys and values are the raw projections (no bias
on keys, no d^-0.25 scaling): the builder folds the whole attention scale into
the query, so every cache and cross tensor compares directly with the oracle.

Decoder with an explicit cache (``decoder.mlpackage``, function ``main``;
B flexible in [1, MAX_BATCH], T flexible in [1, N])
    in   tokens     (B, T)          int32
    in   positions  (T,)            int32  absolute positions of the T tokens
    in   k_cache    (L, B, C, N)    fp32   self-attention keys so far
    in   v_cache    (L, B, C, N)    fp32   self-attention values so far
    in   mask       (T, N + T)      fp32   additive: 0 where a query may look,
                                            MASK_NEG elsewhere; columns [0, N)
                                            are cache slots, [N, N+T) the new
                                            tokens of this call (causal)
    in   cross_k    (L, 1, C, S)    fp32   from the encoder (broadcast over B)
    in   cross_v    (L, 1, C, S)    fp32
    out  logits     (B, T, V)       fp32
    out  k_new      (L, B, C, T)    fp32   the new keys; the runtime writes them
    out  v_new      (L, B, C, T)    fp32   into k_cache[..., pos:pos+T] itself
    out  alignment  (B, A, T, S)    fp32   softmaxed cross-attention weights of
                                            the alignment heads (word timestamps)

Decoder with the cache in MLState (``decoder_stateful.mlpackage``, iOS 18;
one function per batch size, named in the manifest, fixed B)
    state k_cache   (L, B, C, N)    fp16
    state v_cache   (L, B, C, N)    fp16
    in   tokens     (B, T)          int32
    in   positions  (T,)            int32  the new entries land at positions[0]
    in   beam_order (B,)            int32  rows of the cache each beam continues
                                            (arange(B) when not reordering)
    in   mask       (T, N)          fp32   additive, over the updated cache
    in   cross_k, cross_v           as above
    out  logits, alignment          as above
"""

from __future__ import annotations

#: Length of one audio window in mel frames, and in encoder positions.
N_FRAMES = 3000
#: The largest beam batch the explicit-cache decoder accepts.
MAX_BATCH = 8
#: Batch sizes that get a function of their own in the stateful decoder.
STATEFUL_BATCHES = (1, 5)
#: Additive mask value. -1e4 rather than -inf: finite in fp16 (max 65504) and
#: exp(-1e4) is 0 in every precision, so masked slots never produce NaN.
MASK_NEG = -1.0e4
#: The Neural Engine cannot hold a tensor dimension above this.
ANE_MAX_DIM = 16384

ENCODER_INPUT = "mel"
ENCODER_OUTPUTS = ("cross_k", "cross_v")
DECODER_INPUTS = ("tokens", "positions", "k_cache", "v_cache", "mask", "cross_k", "cross_v")
DECODER_OUTPUTS = ("logits", "k_new", "v_new", "alignment")
STATEFUL_INPUTS = ("tokens", "positions", "beam_order", "mask", "cross_k", "cross_v")
STATEFUL_STATES = ("k_cache", "v_cache")
STATEFUL_OUTPUTS = ("logits", "alignment")

ENCODER_FILE = "encoder.mlpackage"
DECODER_FILE = "decoder.mlpackage"
STATEFUL_DECODER_FILE = "decoder_stateful.mlpackage"
MANIFEST_FILE = "manifest.json"


def stateful_function_name(batch: int) -> str:
    """The stateful decoder's function for a batch size ("main" for batch 1)."""
    return "main" if batch == 1 else f"batch{batch}"
