"""python rows.py: the KL (text probe, the catalog's probe clips) of compressing only some
rows of tiny.en's token embedding, the rest kept at fp16: where the vocabulary's error is."""

import dataclasses
import time

import numpy as np

from wruntime.build import sensitivity as S
from wruntime.build.compress import CompressionRule, simulate
from wruntime.catalog import load_architecture_weights

probe = S._Probe(load_architecture_weights("tiny.en"), S.default_clips(), False)
E = probe.base.params["decoder.token_embedding.weight"]


def rule(nbits: int, group: int) -> CompressionRule:
    spec = {"target": "global", "kind": "palettize", "nbits": nbits, "mode": "kmeans"}
    spec |= {"granularity": "per_grouped_channel", "group_size": group}
    return CompressionRule.from_dict(spec, "rows.py")


def kl_rows(a: int, b: int, r: CompressionRule) -> float:
    e = E.copy()
    e[a:b] = simulate(E[a:b].astype(np.float16), r).astype(e.dtype)
    params = dict(probe.base.params, **{"decoder.token_embedding.weight": e})
    return probe.kl(dataclasses.replace(probe.base, params=params), encoder_changed=False)


ranges = [(0, 12576), (0, 768), (768, 1536), (1536, 2304), (2304, 3072), (3072, 4608)]
ranges += [(4608, 6144), (6144, 12576), (0, 3072), (3072, 12576)]
for a, b in ranges:
    t = time.time()
    kls = {f"pal{n}/g{g}": kl_rows(a, b, rule(n, g)) for n, g in ((4, 16), (4, 1), (3, 1))}
    print(a, b, "  ".join(f"{k} {v:.2e}" for k, v in kls.items()), f"({time.time() - t:.0f} s)")
