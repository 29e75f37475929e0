"""Weight compression of converted packages: a precision's recipe applied with coremltools.

A recipe (models/precisions.json, read into `CompressionRule`s by the catalog) is a
first-match-wins list of rules. The builder's constants carry generated names
(``conv_12_weight_0_to_fp16``), so before any rule is matched each compressible
constant is *identified*: its rows are matched to the rows of the canonical
openai-whisper weights it was made from (`identify_weights`). A rule's ``op_name``
glob is then matched against those names (``*mlp*``, ``encoder.conv1*``), and a
per-layer choice made once (mixed, auto) applies the same way to the explicit-cache
decoder and to every function of the stateful decoder, whose constant names differ.

Every decision ends up as an ``op_name_configs`` entry keyed by the constant's own
name, never as an ``op_type`` config: a constant shared by two op types (the tied
token embedding feeds a gather and a linear) cannot then hit coremltools'
"compression config conflict".

Shapes a rule cannot take fall back instead of being skipped silently: int4 per
block needs an input width divisible by the block (Whisper's first convolution
has 80 mel channels), so such a weight gets int8 per channel; a grouped-channel
table needs the output channels divisible by the group, else one table per tensor.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import hashlib
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from wruntime.catalog import CompressionRule, PrecisionSpec
from wruntime.errors import WruntimeError
from wruntime.weights.canonical import WhisperWeights

__all__ = [
    "DEFAULT_THRESHOLD",
    "CompressionStage",
    "OptimalLut",
    "PackageWeight",
    "Segment",
    "compress_model",
    "compression_stages",
    "effective_rule",
    "identify_weights",
    "lut_config",
    "model_program",
    "op_config",
    "plan_package",
    "rule_bits",
    "rule_label",
    "simulate",
]

#: Weights with fewer elements stay in the compute precision (norms, biases).
DEFAULT_THRESHOLD = 2048

#: A rule that keeps a weight as it is.
KEEP = CompressionRule(target="global", kind="none")

_INT8 = CompressionRule(
    target="global",
    kind="linear_quantize",
    dtype="int8",
    mode="linear_symmetric",
    granularity="per_channel",
)


# ------------------------------------------------------------------ identifying weights


@dataclass(frozen=True)
class Segment:
    """Rows [start, stop) of a constant (viewed as (rows, -1)) that are rows of one
    canonical weight, starting at ``source_row``, multiplied by ``scale``."""

    name: str
    start: int
    stop: int
    source_row: int
    scale: float
    transposed: bool = False
    #: Rows of the whole canonical weight.
    source_rows: int = 0


@dataclass(frozen=True)
class PackageWeight:
    """A compressible constant of a package and what it is."""

    const: str
    shape: tuple[int, ...]
    #: Types of the ops that read it (a tied embedding: gather and linear).
    consumers: tuple[str, ...]
    segments: tuple[Segment, ...] = ()

    @property
    def size(self) -> int:
        return int(np.prod(self.shape))

    @property
    def names(self) -> tuple[str, ...]:
        """The canonical weights it holds (several for a fused q/k/v projection)."""
        return tuple(dict.fromkeys(s.name for s in self.segments))

    @property
    def layer(self) -> str:
        """A stable key for per-layer choices, the same in every package and function.

        The canonical names, joined with '+'; a row range when the constant holds only
        part of a weight (the vocabulary chunks of the token embedding); the constant's
        own name when nothing matched.
        """
        if not self.segments:
            return self.const
        parts = []
        for name in self.names:
            segs = [s for s in self.segments if s.name == name]
            lo = min(s.source_row for s in segs)
            hi = max(s.source_row + s.stop - s.start for s in segs)
            parts.append((name, lo, hi))
        return "+".join(self._part(n, lo, hi) for n, lo, hi in parts)

    def _part(self, name: str, lo: int, hi: int) -> str:
        full = next(s.source_rows for s in self.segments if s.name == name)
        if lo == 0 and hi == full:
            return name
        return f"{name}[{lo}:{hi}]"


def model_program(model: Any) -> Any:
    """The MIL program of a converted (or saved) ``ct.models.MLModel``."""
    program = getattr(model, "_mil_program", None)
    if program is not None:
        return program
    from coremltools.converters.mil.frontend.milproto.load import load as milproto_load

    from wruntime.build.convert import quiet

    spec = model.get_spec()
    with quiet():
        return milproto_load(
            spec,
            specification_version=spec.specificationVersion,
            file_weights_dir=model.weights_dir,
        )


def _consts(program: Any, threshold: int) -> list[tuple[Any, np.ndarray]]:
    """Float constants with at least ``threshold`` elements, each once (first function wins)."""
    seen: set[str] = set()
    out = []
    for function in program.functions.values():
        for op in function.operations:
            if op.op_type != "const" or op.name in seen:
                continue
            value = op.outputs[0].val
            if not isinstance(value, np.ndarray) or value.dtype.kind != "f" or value.ndim < 2:
                continue  # biases and norms stay in the compute precision
            if value.size < threshold:
                continue
            seen.add(op.name)
            out.append((op, value))
    return out


_N_PROJ = 8
_MATCH_TOL = 2e-3


def _signatures(rows: np.ndarray, proj: np.ndarray) -> np.ndarray:
    """Scale-invariant row signatures: cosines with a few fixed random directions."""
    rows = rows.astype(np.float32, copy=False)
    norms = np.linalg.norm(rows, axis=1, keepdims=True)
    norms[norms == 0] = 1.0
    return (rows @ proj) / norms


class _RowIndex:
    """Every row of the canonical weights, indexed by row length, for nearest matching."""

    def __init__(self, weights: WhisperWeights) -> None:
        from scipy.spatial import cKDTree

        by_len: dict[int, list[tuple[str, np.ndarray]]] = {}
        self.rows_of: dict[str, int] = {}
        for name, array in weights.params.items():
            if array.ndim < 2 or array.dtype.kind != "f":
                continue
            rows = array.reshape(array.shape[0], -1)
            by_len.setdefault(rows.shape[1], []).append((name, rows))
            self.rows_of[name] = rows.shape[0]
        self._proj: dict[int, np.ndarray] = {}
        self._trees: dict[int, Any] = {}
        self._owners: dict[int, tuple[list[str], np.ndarray, np.ndarray]] = {}
        rng = np.random.default_rng(0)
        for length, items in by_len.items():
            proj = rng.standard_normal((length, _N_PROJ)).astype(np.float32)
            proj /= np.linalg.norm(proj, axis=0, keepdims=True)
            sigs = np.concatenate([_signatures(r, proj) for _, r in items])
            names = [n for n, _ in items]
            which = np.concatenate([np.full(len(r), i) for i, (_, r) in enumerate(items)])
            local = np.concatenate([np.arange(len(r)) for _, r in items])
            self._proj[length] = proj
            self._trees[length] = cKDTree(sigs)
            self._owners[length] = (names, which, local)
        self._norms = {
            name: np.linalg.norm(a.reshape(a.shape[0], -1).astype(np.float32), axis=1)
            for name, a in weights.params.items()
            if name in self.rows_of
        }

    def match(self, rows: np.ndarray, transposed: bool = False) -> list[Segment] | None:
        """Segments covering every row, or None if any row matches no canonical row."""
        length = rows.shape[1]
        if length not in self._trees:
            return None
        dist, idx = self._trees[length].query(_signatures(rows, self._proj[length]))
        if not np.all(dist < _MATCH_TOL):
            return None
        names, which, local = self._owners[length]
        sigs = self._trees[length].data
        mine = _signatures(rows, self._proj[length])
        # Identical rows (unused tokens share an embedding) match anywhere: prefer
        # the row that continues the run when it matches as well.
        for i in range(1, len(idx)):
            nxt = idx[i - 1] + 1
            if (
                idx[i] != nxt
                and nxt < len(which)
                and which[nxt] == which[idx[i - 1]]
                and np.linalg.norm(sigs[nxt] - mine[i]) < _MATCH_TOL
            ):
                idx[i] = nxt
        owner, source = which[idx], local[idx]
        norms = np.linalg.norm(rows.astype(np.float32), axis=1)
        segments = []
        start = 0
        for i in range(1, len(rows) + 1):
            if i < len(rows) and owner[i] == owner[start] and source[i] == source[i - 1] + 1:
                continue
            name = names[owner[start]]
            ref = self._norms[name][source[start] : source[start] + (i - start)]
            good = ref > 0
            scale = float(np.median(norms[start:i][good] / ref[good])) if good.any() else 1.0
            segments.append(
                Segment(
                    name,
                    start,
                    i,
                    int(source[start]),
                    round(scale, 6),
                    transposed,
                    self.rows_of[name],
                )
            )
            start = i
        return segments


_INDEX_CACHE: dict[int, tuple[WhisperWeights, _RowIndex]] = {}


def _row_index(weights: WhisperWeights) -> _RowIndex:
    """One index per weights object (a build identifies four packages against it)."""
    hit = _INDEX_CACHE.get(id(weights))
    if hit is None or hit[0] is not weights:
        _INDEX_CACHE.clear()
        hit = _INDEX_CACHE[id(weights)] = (weights, _RowIndex(weights))
    return hit[1]


def identify_weights(
    model_or_program: Any, weights: WhisperWeights | None, threshold: int = DEFAULT_THRESHOLD
) -> list[PackageWeight]:
    """The compressible constants of a package, each matched to canonical weights.

    Matching is by value (row signatures), so it does not depend on the builder's op
    order or names; query rows (scaled by d^-0.5 in the package) and transposed
    positional embeddings are matched too. Without ``weights`` nothing is named.
    """
    program = model_or_program
    if not hasattr(program, "functions"):
        program = model_program(model_or_program)
    index = _row_index(weights) if weights is not None else None
    out = []
    for op, value in _consts(program, threshold):
        consumers = tuple(sorted({c.op_type for c in op.outputs[0].child_ops}))
        segments: list[Segment] | None = None
        if index is not None:
            segments = index.match(value.reshape(value.shape[0], -1))
            squeezed = value.squeeze()
            if segments is None and squeezed.ndim == 2:
                segments = index.match(np.ascontiguousarray(squeezed.T), transposed=True)
        shape = tuple(int(s) for s in value.shape)
        out.append(PackageWeight(op.name, shape, consumers, tuple(segments or ())))
    return out


# ------------------------------------------------------------------ rules


def _matches(rule: CompressionRule, weight: PackageWeight) -> bool:
    if rule.target == "global":
        return True
    pattern = rule.pattern or ""
    if rule.target == "op_type":
        return any(fnmatch.fnmatchcase(c, pattern) for c in weight.consumers)
    candidates = (weight.const, weight.layer, *weight.names)
    return any(fnmatch.fnmatchcase(c, pattern) for c in candidates)


def first_match(rules: Iterable[CompressionRule], weight: PackageWeight) -> CompressionRule | None:
    for rule in rules:
        if _matches(rule, weight):
            return rule
    return None


def effective_rule(rule: CompressionRule | None, weight: PackageWeight) -> CompressionRule:
    """The rule as it will be applied to this weight's shape (fallbacks, threshold)."""
    if rule is None or rule.kind == "none":
        return KEEP
    threshold = rule.weight_threshold if rule.weight_threshold is not None else DEFAULT_THRESHOLD
    if weight.size < threshold:
        return KEEP
    if rule.kind == "linear_quantize" and rule.granularity == "per_block":
        block = rule.block_size or 32
        if len(weight.shape) < 2 or weight.shape[1] % block:
            # int4 per block cannot take this input width: int8 per channel instead.
            return dataclasses.replace(_INT8, weight_threshold=rule.weight_threshold)
    if rule.kind == "palettize" and rule.granularity == "per_grouped_channel":
        group = rule.group_size or 32
        if weight.shape[0] % group:
            return dataclasses.replace(rule, granularity="per_tensor", group_size=None)
    return rule


def rule_bits(rule: CompressionRule, weight: PackageWeight, fp_bits: int = 16) -> float:
    """Stored bits per element of a weight under a rule, its scales and tables included."""
    rule = effective_rule(rule, weight)
    n = weight.size
    rows = weight.shape[0] if weight.shape else 1
    if rule.kind == "none":
        return float(fp_bits)
    if rule.kind == "linear_quantize":
        bits = 8 if rule.dtype in ("int8", "uint8") else 4
        if rule.granularity == "per_block":
            scales = n / (rule.block_size or 32)
        elif rule.granularity == "per_channel":
            scales = rows
        else:
            scales = 1
        return bits + scales * 16 / n
    nbits = rule.nbits or 8
    tables = rows / (rule.group_size or 32) if rule.granularity == "per_grouped_channel" else 1
    if rule.lut_dtype == "int8":  # int8 entries and one fp16 scale for all the tables
        return nbits + (tables * (2**nbits) * 8 + 16) / n
    return nbits + tables * (2**nbits) * 16 / n


def rule_label(rule: CompressionRule | None) -> str:
    """A short name for a rule: int8, int4/32, pal4/g16, pal4/g16+lut8, pal6, fp16."""
    if rule is None or rule.kind == "none":
        return "fp16"
    if rule.kind == "linear_quantize":
        label = (rule.dtype or "int8").replace("uint", "u")
        if rule.granularity == "per_block":
            label += f"/{rule.block_size or 32}"
        elif rule.granularity == "per_tensor":
            label += "/t"
        return label
    label = f"pal{rule.nbits}"
    if rule.granularity == "per_grouped_channel":
        label += f"/g{rule.group_size or 32}"
    if rule.lut_dtype == "int8":
        label += "+lut8"
    return label


def op_config(rule: CompressionRule) -> Any:
    """The coremltools op config of a rule (None for "none")."""
    from coremltools.optimize.coreml import OpLinearQuantizerConfig, OpPalettizerConfig

    if rule.kind == "none":
        return None
    threshold = rule.weight_threshold if rule.weight_threshold is not None else DEFAULT_THRESHOLD
    if rule.kind == "linear_quantize":
        kwargs: dict[str, Any] = {
            "mode": rule.mode or "linear_symmetric",
            "dtype": rule.dtype or "int8",
            "granularity": rule.granularity or "per_channel",
            "weight_threshold": threshold,
        }
        if rule.granularity == "per_block":
            kwargs["block_size"] = rule.block_size or 32
        return OpLinearQuantizerConfig(**kwargs)
    kwargs = {"granularity": rule.granularity or "per_tensor", "weight_threshold": threshold}
    lut_function = _lut_function(rule)
    if lut_function is not None:
        kwargs.update(mode="custom", lut_function=lut_function)
    else:
        kwargs.update(mode=rule.mode, nbits=rule.nbits)
    if rule.granularity == "per_grouped_channel":
        kwargs["group_size"] = rule.group_size or 32
    return OpPalettizerConfig(**kwargs)


def _lut_function(rule: CompressionRule) -> OptimalLut | None:
    """Our k-means tables for a "kmeans" palettize rule (None: coremltools' own mode)."""
    return OptimalLut(rule.nbits or 8) if (rule.mode or "kmeans") == "kmeans" else None


def lut_config() -> Any:
    """The coremltools config that stores a palettized weight's tables as int8.

    Joint compression quantizes the ``lut`` input of a ``constexpr_lut_to_dense``:
    the tables become a ``constexpr_blockwise_shift_scale`` of int8 entries. coremltools
    accepts only per-tensor granularity there (one scale for all of a weight's tables,
    which are not laid out along the weight's channel axes), and only from iOS18. The
    palettization rule already applied the weight threshold.
    """
    from coremltools.optimize.coreml import OpLinearQuantizerConfig

    return OpLinearQuantizerConfig(
        mode="linear_symmetric", dtype="int8", granularity="per_tensor", weight_threshold=0
    )


#: Tables already solved in this process (see OptimalLut), up to this many indices in all.
_LUT_MEMO: dict[tuple[int, str, bytes], tuple[np.ndarray, np.ndarray]] = {}
_LUT_MEMO_VALUES = 200_000_000
_lut_memo_held = 0  # indices the memo holds
#: Exact 1-D k-means (kmeans1d) up to this many values: groups and rows. Larger
#: tensors go to `_weighted_kmeans`: 5-8x faster on a 590k-value layer, within 0.5%
#: of the optimal squared error, and without kmeans1d's k x n table (17 GB at k = 256
#: on an embedding chunk).
_EXACT_VALUES = 1 << 16


@dataclass(frozen=True)
class OptimalLut:
    """k-means palettization by the exact 1-D k-means (kmeans1d), as a coremltools lut_function.

    coremltools' "kmeans" mode runs scikit-learn's KMeans (several random restarts)
    on every table smaller than 10,000 values: per grouped channel that is one
    restart loop per group of 16 rows, and tiny.en's palettized builds took minutes
    (a table per vocabulary row, hours). In one dimension the optimal clustering
    is found exactly by dynamic programming, in O(k n log n): the tables are never
    worse than scikit-learn's local optimum, the result is deterministic (so the
    functions of a multifunction package still share their weights), and a group
    takes milliseconds (a table per row of tiny.en's embedding: about a minute).
    A table over more than `_EXACT_VALUES` values goes to `_weighted_kmeans`. The
    package is the same constexpr_lut_to_dense either way.
    """

    nbits: int

    def __call__(self, weight: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        values = np.ascontiguousarray(weight).ravel()
        # A build compresses each decoder weight once per function (explicit decoder,
        # then each stateful batch): the same values, so the same table, found again.
        key = (self.nbits, values.dtype.str, hashlib.blake2b(values.view(np.uint8)).digest())
        global _lut_memo_held
        found = _LUT_MEMO.get(key)
        if found is None:
            found = self._solve(values)
            if _lut_memo_held + values.size > _LUT_MEMO_VALUES:
                _LUT_MEMO.clear()
                _lut_memo_held = 0
            _LUT_MEMO[key] = found
            _lut_memo_held += values.size
        return found[0].copy(), found[1].copy()

    def _solve(self, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        import kmeans1d

        k = 1 << self.nbits
        unique = np.unique(values)
        if unique.size <= k:  # nothing to cluster: the values are their own table
            lut = np.zeros(k, dtype=values.dtype)
            lut[: unique.size] = unique
            return lut, np.searchsorted(unique, values).astype(np.uint8)
        if values.size <= _EXACT_VALUES:
            clusters, centroids = kmeans1d.cluster(values.astype(np.float64), k)
            lut = np.asarray(centroids, dtype=values.dtype)
            return lut, np.asarray(clusters, dtype=np.uint8)
        return _weighted_kmeans(values, k)


def _weighted_kmeans(values: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """k-means of a large tensor over its distinct values, each weighted by its count.

    kmeans1d keeps a k x n table (a 5 M-value embedding chunk at k = 256 took 17 GB
    and was killed), is slow past a few hundred thousand values, and takes no weights.
    The same objective over the distinct values (fp16 has at most 65,536) is small:
    scikit-learn's k-means++ with a fixed seed solves it in seconds, deterministically.
    """
    from sklearn.cluster import KMeans

    unique, inverse, counts = np.unique(values, return_inverse=True, return_counts=True)
    points = unique.astype(np.float64).reshape(-1, 1)
    fit = KMeans(k, init="k-means++", n_init=1, random_state=0, tol=1e-6)
    fit.fit(points, sample_weight=counts.astype(np.float64))
    order = np.argsort(fit.cluster_centers_.ravel())
    rank = np.empty(k, dtype=np.int64)
    rank[order] = np.arange(k)
    lut = fit.cluster_centers_.ravel()[order].astype(values.dtype)
    return lut, rank[fit.labels_][inverse.ravel()].astype(np.uint8)


def plan_package(
    package_weights: Iterable[PackageWeight],
    rules: Iterable[CompressionRule],
    choices: Mapping[str, CompressionRule] | None = None,
) -> dict[str, tuple[PackageWeight, CompressionRule]]:
    """const name -> (weight, effective rule): ``choices`` (by layer key) first, then rules."""
    rules = tuple(rules)
    out = {}
    for w in package_weights:
        rule = (choices or {}).get(w.layer)
        if rule is None:
            rule = first_match(rules, w)
        out[w.const] = (w, effective_rule(rule, w))
    return out


# ------------------------------------------------------------------ applying


def compress_model(
    model: Any,
    assignments: Mapping[str, CompressionRule],
    log: Callable[[str], None] | None = None,
) -> Any:
    """Compress the constants named in ``assignments`` (const name -> rule) of a model.

    coremltools' palettization and quantization passes run on the model's program
    with per-constant configs (palettization first), as its public
    ``palettize_weights`` / ``linear_quantize_weights`` do; but the program is then
    serialised without rerunning the default pass pipeline, whose batch-norm fusion
    rejects the builder's fp16 programs (see `convert.pass_pipeline`) and which
    would only redo the conversion's work.

    Palettize rules with ``lut_dtype`` "int8" then get their tables quantized by a
    third pass, coremltools' quantization with ``joint_compression``, configured by
    the name palettization gives the ``constexpr_lut_to_dense`` (``<const>_palettized``)
    and nothing else, so weights quantized by the second pass are left alone.
    """
    import coremltools as ct
    from coremltools.converters.mil.converter import mil_convert
    from coremltools.converters.mil.mil.passes.graph_pass import PassOption
    from coremltools.converters.mil.mil.passes.pass_registry import PASS_REGISTRY
    from coremltools.models.utils import _apply_graph_pass
    from coremltools.optimize.coreml import OptimizationConfig
    from coremltools.optimize.coreml._quantization_passes import linear_quantize_weights

    from wruntime.build.convert import quiet

    say = log or (lambda _: None)
    passes = []
    for kind, pass_name in (
        ("palettize", "compression::palettize_weights"),
        ("linear_quantize", "compression::linear_quantize_weights"),
    ):
        configs = {c: op_config(r) for c, r in assignments.items() if r.kind == kind}
        if not configs:
            continue
        graph_pass = PASS_REGISTRY[pass_name]
        graph_pass.set_options(
            [
                PassOption("config", OptimizationConfig(op_name_configs=configs)),
                PassOption("joint_compression", False),
            ]
        )
        passes.append((kind, len(configs), graph_pass))
    joint = {
        f"{c}_palettized": lut_config()
        for c, r in assignments.items()
        if r.kind == "palettize" and r.lut_dtype == "int8"
    }
    if joint:
        # A pass object of its own: the registry's instance above keeps its options.
        lut_pass = linear_quantize_weights()
        lut_pass.set_options(
            [
                PassOption("config", OptimizationConfig(op_name_configs=joint)),
                PassOption("joint_compression", True),
            ]
        )
        passes.append(("int8 table", len(joint), lut_pass))
    if not passes:
        return model
    started = time.perf_counter()
    spec = model.get_spec()
    with quiet():
        program = _apply_graph_pass(model, [p for _, _, p in passes], return_pymil_prog=True)
        compressed = mil_convert(
            program,
            convert_to="mlprogram",
            convert_from="milinternal",
            specification_version=spec.specificationVersion,
            compute_units=model.compute_unit,
            model_description=spec.description,
            skip_model_load=True,
            pass_pipeline=ct.PassPipeline(
                pass_names=["common::dead_code_elimination"], pipeline_name="compressed"
            ),
        )
    counts = ", ".join(f"{n} {kind}" for kind, n, _ in passes)
    say(f"compressed {counts} in {time.perf_counter() - started:.1f} s")
    return compressed


@dataclass
class CompressionStage:
    """A builder package stage: (converted model, role) -> compressed model.

    Identifies the weights of each package, plans them with the recipe (and any
    per-layer ``choices``), compresses, and keeps what it did in ``report`` (role ->
    rows of const, layer, rule, seconds) for the manifest or a table.
    """

    precision: PrecisionSpec
    weights: WhisperWeights | None
    choices: Mapping[str, CompressionRule] | None = None
    log: Callable[[str], None] | None = None
    report: dict[str, Any] = field(default_factory=dict)

    def __call__(self, model: Any, role: str) -> Any:
        started = time.perf_counter()
        found = identify_weights(model, self.weights)
        plan = plan_package(found, self.precision.compression, self.choices)
        assignments = {c: r for c, (_, r) in plan.items() if r.kind != "none"}
        if self.log:
            self.log(f"{role}: compressing {len(assignments)} of {len(plan)} weights")
        model = compress_model(model, assignments, self.log)
        entry = self.report.setdefault(role, {"seconds": 0.0, "weights": []})
        entry["seconds"] += round(time.perf_counter() - started, 2)
        if not entry["weights"]:
            entry["weights"] = [
                {"const": c, "layer": w.layer, "shape": list(w.shape), "rule": rule_label(r)}
                for c, (w, r) in plan.items()
            ]
        return model


def compression_stages(
    precision: PrecisionSpec,
    weights: WhisperWeights | None,
    choices: Mapping[str, CompressionRule] | None = None,
    log: Callable[[str], None] | None = None,
    progress: Callable[[int, int, str], None] | None = None,
) -> list[CompressionStage]:
    """The package stages of a precision (none for fp32/fp16).

    A precision with a ``sensitivity`` search (mixed, auto) needs its per-layer
    ``choices``: `wruntime.build.sensitivity.choices_for_precision` makes them
    (``progress`` follows its measuring pass, minutes on a first build).
    """
    if not precision.is_compressed:
        return []
    if precision.sensitivity is not None and choices is None:
        from wruntime.build.sensitivity import choices_for_precision

        if weights is None:
            raise WruntimeError(f"The {precision.name} precision needs the weights to search.")
        choices = choices_for_precision(precision, weights, log=log, progress=progress)
    return [CompressionStage(precision, weights, choices, log)]


# ------------------------------------------------------------------ simulating


def simulate(value: np.ndarray, rule: CompressionRule) -> np.ndarray:
    """``value`` compressed with a rule and decompressed again, as coremltools does it.

    The same coremltools routines the passes call, so the result equals what the
    package's constexpr op decompresses to; used to measure sensitivity without
    building a package per candidate.
    """
    from coremltools.optimize.coreml._quantization_passes import (
        linear_quantize_weights,
        palettize_weights,
    )

    if rule.kind == "none":
        return value
    dtype = value.dtype
    if rule.kind == "linear_quantize":
        bits = 8 if rule.dtype in ("int8", "uint8") else 4
        blocks = [0] * value.ndim
        if rule.granularity == "per_block":
            blocks[0], blocks[1] = 1, rule.block_size or 32
        elif rule.granularity == "per_channel":
            blocks[0] = 1
        params = linear_quantize_weights.blockwise_compress(
            value,
            nbits=bits,
            mode=(rule.mode or "linear_symmetric").upper(),
            signed=not (rule.dtype or "").startswith("u"),
            block_sizes=blocks,
        )
        if params is None:
            raise ValueError(f"cannot quantize a {value.shape} weight with {rule_label(rule)}")
        return np.asarray(linear_quantize_weights.decompress(params), dtype=dtype)
    group = value.shape[0] if rule.granularity != "per_grouped_channel" else rule.group_size or 32
    lut_function = _lut_function(rule)
    if lut_function is not None:  # as op_config does it
        params = palettize_weights.grouped_channelwise_compress(
            value, "CUSTOM", None, 0, group, lut_function=lut_function
        )
    else:
        params = palettize_weights.grouped_channelwise_compress(
            value, (rule.mode or "").upper(), rule.nbits, 0, group
        )
    if params is None:
        raise ValueError(f"cannot palettize a {value.shape} weight with {rule_label(rule)}")
    if rule.lut_dtype == "int8":  # the tables quantized as the joint-compression pass does
        lut = params.lut
        quantized = linear_quantize_weights.blockwise_compress(
            lut, nbits=8, mode="LINEAR_SYMMETRIC", signed=True, block_sizes=[0] * lut.ndim
        )
        if quantized is None:
            raise ValueError(f"cannot quantize the tables of a {value.shape} weight to int8")
        lut = np.asarray(linear_quantize_weights.decompress(quantized), dtype=lut.dtype)
        params = params._replace(lut=lut)
    return np.asarray(palettize_weights.decompress(params), dtype=dtype)
