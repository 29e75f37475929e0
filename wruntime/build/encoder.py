"""The encoder program: log-mel in, every decoder layer's cross-attention K/V out.

The decoder's cross-attention keys and values depend on the audio alone, so
the encoder computes them once per 30 s window (one 1x1 convolution per layer
and per K/V on the encoder output) and the decoder loop never recomputes them.
The whole program has static shapes and runs on the Neural Engine.
"""

from __future__ import annotations

import numpy as np
from coremltools.converters.mil import Builder as mb
from coremltools.converters.mil.mil import Program, types

from wruntime.build import interface as io
from wruntime.build.layers import (
    compute_dtype,
    layer_norm_c,
    mlp,
    output,
    project,
    query_projection,
    split_heads_attention,
    to_compute,
    wt,
)
from wruntime.weights.canonical import WhisperWeights


def _conv_k3(x, weight: np.ndarray, bias: np.ndarray, stride: int):
    """Whisper's width-3 convolutions over time, as (1, 3) kernels on (1, C, 1, T)."""
    kernel = wt(weight)[:, :, None, :]  # (out, in, 3) -> (out, in, 1, 3)
    return mb.conv(
        x=x,
        weight=kernel,
        bias=wt(bias),
        strides=[1, stride],
        pad_type="custom",
        pad=[0, 0, 1, 1],
    )


def build_encoder_program(weights: WhisperWeights, *, fp16: bool, target: object) -> Program:
    """A fresh MIL program for the encoder (ct.convert mutates what it is given).

    ``target`` is the ``ct.target`` whose opset the ops are taken from.
    """
    # ANE: static shapes only; a flexible dimension would keep the encoder off the
    # Neural Engine (one 30 s window per call, always 3000 frames).
    spec = mb.TensorSpec(shape=(1, weights.dims.n_mels, io.N_FRAMES), dtype=types.fp32)
    with compute_dtype(fp16):
        return _encoder_program(weights, spec, target)


def _encoder_program(weights: WhisperWeights, spec, target) -> Program:
    d = weights.dims
    w = weights
    n_layers, n_state, n_ctx = d.n_text_layer, d.n_text_state, d.n_audio_ctx

    @mb.program(input_specs=[spec], opset_version=target)
    def encoder(mel):
        # ANE: channels-first (B, C, 1, S) from the start: the mel bins are the
        # channels, time is the last axis, the singleton axis 2 is "height".
        x = mb.expand_dims(x=to_compute(mel), axes=[2])
        x = mb.gelu(
            x=_conv_k3(x, w["encoder.conv1.weight"], w["encoder.conv1.bias"], 1), mode="EXACT"
        )
        x = mb.gelu(
            x=_conv_k3(x, w["encoder.conv2.weight"], w["encoder.conv2.bias"], 2), mode="EXACT"
        )
        pos = wt(w["encoder.positional_embedding"]).T[None, :, None, :]  # (1, C, 1, S)
        x = mb.add(x=x, y=pos)
        for i in range(d.n_audio_layer):
            p = f"encoder.blocks.{i}"
            h = layer_norm_c(x, w[f"{p}.attn_ln.weight"], w[f"{p}.attn_ln.bias"])
            q_w, q_b = query_projection(w, f"{p}.attn", d.n_audio_head)
            q = project(h, q_w, q_b)
            k = project(h, w[f"{p}.attn.key.weight"], None)
            v = project(h, w[f"{p}.attn.value.weight"], w[f"{p}.attn.value.bias"])
            a = split_heads_attention(q, k, v, d.n_audio_head)
            x = mb.add(x=x, y=project(a, w[f"{p}.attn.out.weight"], w[f"{p}.attn.out.bias"]))
            h = layer_norm_c(x, w[f"{p}.mlp_ln.weight"], w[f"{p}.mlp_ln.bias"])
            x = mb.add(x=x, y=mlp(h, w, f"{p}.mlp"))
        x = layer_norm_c(x, w["encoder.ln_post.weight"], w["encoder.ln_post.bias"])

        # Cross-attention K/V for every decoder layer. ANE: one convolution per
        # layer rather than one (L*C)-wide convolution, whose output channels
        # would pass the ANE's 16384 limit on the large models.
        outs = []
        for kind, bias_name in (("key", None), ("value", "bias")):
            per_layer = []
            for i in range(n_layers):
                p = f"decoder.blocks.{i}.cross_attn.{kind}"
                bias = w[f"{p}.{bias_name}"] if bias_name else None
                per_layer.append(project(x, w[f"{p}.weight"], bias))  # (1, C, 1, S)
            stacked = mb.concat(values=per_layer, axis=0)  # (L, C, 1, S)
            name = io.ENCODER_OUTPUTS[len(outs)]
            # Interface layout (L, 1, C, S): a head's keys are one contiguous block.
            outs.append(output(mb.reshape(x=stacked, shape=[n_layers, 1, n_state, n_ctx]), name))
        return tuple(outs)

    return encoder
