"""python pcs.py: weight noise of grouped k-means tables with and without coremltools'
enable_per_channel_scale (rows divided by their max |w| before clustering), tiny.en."""

import numpy as np

from wruntime.build.compress import CompressionRule, simulate
from wruntime.catalog import load_architecture_weights

w = load_architecture_weights("tiny.en")


def rule(nbits: int, group: int) -> CompressionRule:
    spec = {"target": "global", "kind": "palettize", "nbits": nbits, "mode": "kmeans"}
    spec |= {"granularity": "per_grouped_channel", "group_size": group}
    return CompressionRule.from_dict(spec, "pcs.py")


def noise(v: np.ndarray, q: np.ndarray) -> float:
    return float(np.sum((q - v) ** 2) / np.sum(v**2))


for name, rows in [
    ("decoder.token_embedding.weight", slice(0, 12576)),
    ("decoder.token_embedding.weight", slice(37728, 50256)),
    ("decoder.blocks.0.mlp.0.weight", slice(None)),
    ("encoder.blocks.2.attn.query.weight", slice(None)),
]:
    v = w[name][rows].astype(np.float16).astype(np.float32)
    s = np.max(np.abs(v), axis=1, keepdims=True)
    s[s == 0] = 1
    for nbits, group in [(3, 16), (4, 16), (3, 1), (4, 1)]:
        r = rule(nbits, group)
        plain = noise(v, simulate(v.astype(np.float16), r).astype(np.float32))
        scaled = noise(v, simulate((v / s).astype(np.float16), r).astype(np.float32) * s)
        print(
            name, rows, f"pal{nbits}/g{group}", f"plain {plain:.4f}  per-channel scale {scaled:.4f}"
        )
