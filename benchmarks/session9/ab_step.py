"""python ab_step.py DIR_A DIR_B [ROUNDS]: the decoder step of two tiny.en-fp32 directories
(e.g. two builder versions), interleaved call by call in one process, so both see the same
load; the interpreter is the same code for both."""

import statistics
import sys
import time

import numpy as np

from wruntime.build.interface import MASK_NEG
from wruntime.executors import load_executor

dirs = sys.argv[1:3]
rounds = int(sys.argv[3]) if len(sys.argv) > 3 else 300
mel = np.random.default_rng(0).standard_normal((1, 80, 3000)).astype(np.float32) * 0.3
cross = load_executor(f"{dirs[0]}/encoder.mlpackage").predict({"mel": mel})
decoders = {d: load_executor(f"{d}/decoder.mlpackage") for d in dirs}
n = 448
layers, _, width, _ = cross["cross_k"].shape
k_cache = np.zeros((layers, 1, width, n), np.float32)
v_cache = np.zeros_like(k_cache)
token = np.array([[50257]], np.int32)


def step(decoder, start: int) -> None:
    mask = np.full((1, n + 1), MASK_NEG, np.float32)
    mask[:, :start] = 0
    mask[:, n:] = 0
    positions = np.array([start], np.int32)
    feeds = {"tokens": token, "positions": positions, "k_cache": k_cache, "v_cache": v_cache}
    decoder.predict({**feeds, "mask": mask, **cross})


times: dict[str, list[float]] = {d: [] for d in dirs}
for r in range(rounds):
    for d, decoder in decoders.items():
        t0 = time.perf_counter()
        step(decoder, 10 + r % 100)
        times[d].append(time.perf_counter() - t0)
for d, ts in times.items():
    ms = 1e3 * np.array(ts[5:])
    q1, q3 = np.percentile(ms, [25, 75])
    print(f"{d}: median {statistics.median(ms):.2f} ms (quartiles {q1:.2f} .. {q3:.2f})")
