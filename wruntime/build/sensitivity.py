"""Per-layer sensitivity to compression, and the `auto` precision chosen from it.

How much does compressing one weight, alone, hurt? Measured end to end: the
weight is compressed and decompressed exactly as coremltools would store it
(`compress.simulate` on the weight as it sits in the fp16 package, fused q/k/v
and vocabulary chunks included), mapped back onto the canonical weights, and the
numpy reference forward pass (`wruntime.oracle`) is run on real speech: the clips
packed end to end into 30-second windows (`probe_windows`), since the encoder pays
for a whole window however short the clip. The error is the KL divergence of the
decoder's next-token distribution from the uncompressed (fp16-rounded) model's,
over the tokens the uncompressed model itself decodes (teacher forcing), averaged
over every decoded position. The reference decodes in one of three modes (the
precision's ``probe``): "text", without timestamps; "timestamps", as `transcribe`
does by default, so the segment ends are measured too (the KL counts the
timestamps as one outcome: a segment ends here or not); or "both", the two
tables averaged. Without timestamps a 30% base model repeated its last sentence
at segment ends it was never measured on; with them alone, tiny.en gave the
decoder bits its encoder needed (benchmarks/RESULTS.md, sessions 5 and 6).

Measuring every candidate of every layer would cost one forward pass each; by
default a layer is measured with its most aggressive candidate and its median one
in relative weight noise (||W - Wq||^2 / ||W||^2), and each other candidate's
error is scaled from the measured one nearest in noise: for small perturbations
the KL is quadratic in the perturbation, so linear in that noise. That scaling is
only safe between neighbours: on tiny.en's first vocabulary chunk the KL per unit
of noise ranges from 0.6 (int8) and 0.9 (int4 per block) to 1.7 (a 4-bit table
per row) and 5.2 (one 4-bit table for the chunk), since which rows an error lands
on matters. So the few weights that hold most of the bytes (each at least
`FULL_SHARE` of the searched bytes: the vocabulary chunks) have every candidate
measured, where a mis-scaled error would move the whole choice.
``exhaustive=True`` measures every layer fully. Measurements are cached per set of
clips and reused (asking for more measures only what is missing); bits and noise
depend on the weights alone and are cached once for any clips.

`choose` then spends a budget greedily: from fp16 everywhere, it repeatedly
takes the move (a layer to a smaller candidate) that adds the least error per
byte saved, until the model fits a size budget, or while it stays under an
error budget. The table it chose from is returned with the choice.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from wruntime.atomic import write_text
from wruntime.build.compress import (
    KEEP,
    PackageWeight,
    effective_rule,
    first_match,
    identify_weights,
    rule_bits,
    rule_label,
    simulate,
)
from wruntime.catalog import CompressionRule, PrecisionSpec
from wruntime.errors import WruntimeError
from wruntime.weights.canonical import WhisperWeights

if TYPE_CHECKING:
    from wruntime.tokenizer import Tokenizer

__all__ = [
    "Budget",
    "Choice",
    "LayerSensitivity",
    "SensitivityTable",
    "choices_for_precision",
    "choose",
    "default_clips",
    "measure_sensitivity",
    "sensitivity_report",
]

#: progress(weights measured so far, weights to measure, the one about to be measured).
SensitivityProgress = Callable[[int, int, str], None]

#: How many times a decoder weight is stored in a model directory (decoder.mlpackage
#: and decoder_stateful.mlpackage; the stateful functions share theirs).
DECODER_COPIES = 2

#: A weight holding at least this share of the searched bytes has every candidate measured.
FULL_SHARE = 0.05
#: The tied token embedding's layer keys start so (one per vocabulary chunk).
VOCABULARY = "decoder.token_embedding.weight["

#: Sizes are predicted from bits per weight; the packages carry a little more (table
#: scales, metadata): a tiny.en model predicted at 29.98% of fp16 was 30.03% on disk.
#: A size budget is aimed this far under, so the built model meets it.
SIZE_MARGIN = 0.995

#: Clips are packed into 30-second windows with this much silence between them.
GAP_SECONDS = 0.5

#: Tokens the reference decodes per window (openai-whisper's own sample length).
PROBE_TOKENS = 224

#: How the probe's reference decodes: without timestamps, with them, or both (averaged).
ProbeMode = Literal["text", "timestamps", "both"]
PROBE_MODES: tuple[ProbeMode, ...] = ("text", "timestamps", "both")


def default_clips() -> list[Path]:
    """The catalog's probe clips (models/probe: 16 s of real speech, one window).

    They ship inside the package, so `--model tiny.en-auto@0.3` builds from an installed
    wheel too, not only from a checkout.
    """
    from wruntime.catalog import data_dir

    clips = sorted((data_dir() / "probe").glob("*.flac"))
    if not clips:
        raise WruntimeError("No clips to measure sensitivity on: pass some audio files.")
    return clips


@dataclass
class LayerSensitivity:
    """One compressible unit (a package constant) and what each candidate costs."""

    layer: str
    package: str  # "encoder" or "decoder"
    size: int  # elements
    copies: int  # times stored in a model directory
    fixed: str | None  # a recipe rule took it out of the search: that rule's label
    #: candidate label -> bits per weight (scales and tables included)
    bits: dict[str, float] = field(default_factory=dict)
    #: candidate label -> relative weight noise ||W - Wq||^2 / ||W||^2
    noise: dict[str, float] = field(default_factory=dict)
    #: candidate label -> KL divergence (measured or scaled from the measured one)
    error: dict[str, float] = field(default_factory=dict)
    measured: list[str] = field(default_factory=list)

    def size_bytes(self, label: str) -> float:
        return self.size * self.bits[label] / 8 * self.copies

    @property
    def fp16_bytes(self) -> int:
        """What the weight takes in an fp16 model directory, all copies counted."""
        return self.size * 2 * self.copies


@dataclass
class SensitivityTable:
    architecture: str
    clips: list[str]
    candidates: list[dict[str, Any]]
    layers: list[LayerSensitivity]
    #: Bytes of a model directory that no choice changes (fixed weights, biases, tokenizer).
    other_bytes: float
    #: The fp16 model directory's size in bytes.
    fp16_bytes: float
    seconds: float = 0.0

    def to_json(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> SensitivityTable:
        layers = [LayerSensitivity(**layer) for layer in data.pop("layers")]
        return cls(layers=layers, **data)

    def candidate_rules(self) -> dict[str, CompressionRule]:
        rules = [
            CompressionRule.from_dict({"target": "global", **c}, "sensitivity")
            for c in self.candidates
        ]
        return {rule_label(r): r for r in rules}


@dataclass(frozen=True)
class Budget:
    """What `choose` must meet: a size (MB, or a fraction of the fp16 model) or an error."""

    max_mb: float | None = None
    max_fraction: float | None = None
    max_error: float | None = None

    @classmethod
    def from_spec(cls, spec: dict[str, Any]) -> Budget:
        metric, value = spec.get("metric"), float(spec.get("max", 0))
        if metric == "size_fraction":
            return cls(max_fraction=value)
        if metric == "size_mb":
            return cls(max_mb=value)
        if metric == "kl":
            return cls(max_error=value)
        raise WruntimeError(f"Unknown sensitivity budget metric {metric!r}.")

    def describe(self) -> str:
        if self.max_mb is not None:
            return f"<= {self.max_mb:g} MB"
        if self.max_fraction is not None:
            return f"<= {self.max_fraction:.0%} of fp16"
        return f"summed KL <= {self.max_error:g}"


@dataclass
class Choice:
    """The per-layer candidates chosen, the predicted size and error, and the table."""

    rules: dict[str, CompressionRule]
    labels: dict[str, str]
    size_bytes: float
    fraction: float
    predicted_error: float
    budget: Budget
    met: bool
    table: SensitivityTable

    def rows(self) -> list[dict[str, Any]]:
        """One row per layer, most sensitive first: what was chosen among what."""
        out = []
        for layer in sorted(self.table.layers, key=lambda x: -max(x.error.values(), default=0)):
            out.append(
                {
                    "layer": layer.layer,
                    "params": layer.size,
                    "chosen": self.labels.get(layer.layer, layer.fixed or "fp16"),
                    **{f"kl[{k}]": v for k, v in layer.error.items()},
                }
            )
        return out


# ------------------------------------------------------------------ measuring


def _fp16_packages(arch: str, weights: WhisperWeights | None) -> tuple[Path, float]:
    from wruntime.build.model_dir import directory_size
    from wruntime.build.pipeline import ensure_model

    model = ensure_model(f"{arch}-fp16", progress=False, weights=weights)
    return Path(model.path), float(directory_size(Path(model.path)))


def _package_values(path: Path, weights: WhisperWeights) -> list[tuple[PackageWeight, np.ndarray]]:
    import coremltools as ct

    from wruntime.build.compress import model_program

    model = ct.models.MLModel(str(path), skip_model_load=True)
    program = model_program(model)
    values = {}
    for function in program.functions.values():
        for op in function.operations:
            if op.op_type == "const" and op.name not in values:
                values[op.name] = op.outputs[0].val
    return [(w, np.asarray(values[w.const])) for w in identify_weights(program, weights)]


def _write_back(params: dict[str, np.ndarray], w: PackageWeight, value: np.ndarray) -> None:
    """Put a package-layout value back onto the canonical weights it came from."""
    rows = value.squeeze().T if w.segments and w.segments[0].transposed else value
    rows = np.asarray(rows, dtype=np.float32).reshape(rows.shape[0], -1)
    for s in w.segments:
        target = params[s.name]
        flat = np.array(target.reshape(target.shape[0], -1), dtype=np.float32)
        flat[s.source_row : s.source_row + (s.stop - s.start)] = rows[s.start : s.stop] / s.scale
        params[s.name] = flat.reshape(target.shape)


def _round_fp16(weights: WhisperWeights) -> WhisperWeights:
    params = {k: v.astype(np.float16).astype(np.float32) for k, v in weights.params.items()}
    return dataclasses.replace(weights, params=params)


def probe_windows(clips: Sequence[Path]) -> list[np.ndarray]:
    """The clips packed end to end into windows of up to 30 s, a short pause between them.

    The encoder always runs on a 30-second window, so measuring a 3-second clip alone
    pays for 27 seconds of padding: packed, the same encoder passes see up to ten
    times more speech, and the KL averages over that many more decoded tokens. A clip
    longer than a window is cut into windows of its own.
    """
    return [audio for audio, _ in _pack(clips)]


def _pack(clips: Sequence[Path]) -> list[tuple[np.ndarray, float]]:
    """`probe_windows`, each window with the second its last piece is halfway through."""
    from wruntime.audio import SAMPLE_RATE, load_audio
    from wruntime.features import N_SAMPLES, pad_or_trim

    gap = np.zeros(int(GAP_SECONDS * SAMPLE_RATE), dtype=np.float32)
    pieces = []
    for clip in clips:
        audio = load_audio(clip)
        pieces += [audio[i : i + N_SAMPLES] for i in range(0, max(len(audio), 1), N_SAMPLES)]
    # First fit, longest first: the fewest windows, so the fewest encoder passes.
    windows: list[list[np.ndarray]] = []
    room: list[int] = []
    for piece in sorted(pieces, key=len, reverse=True):
        need = len(piece) + len(gap)
        slot = next((i for i, free in enumerate(room) if need <= free), None)
        if slot is None:
            windows.append([])
            room.append(N_SAMPLES + len(gap))  # the first piece of a window needs no gap
            slot = len(windows) - 1
        windows[slot] += [gap, piece] if windows[slot] else [piece]
        room[slot] -= need
    return [
        (pad_or_trim(np.concatenate(w)), (sum(map(len, w)) - len(w[-1]) / 2) / SAMPLE_RATE)
        for w in windows
    ]


def _reference_rules(
    tokenizer: Tokenizer, last_middle: float
) -> Callable[[Sequence[int], np.ndarray], None]:
    """What the reference decode of a packed window may not pick next.

    The probe decodes with timestamps, as `transcribe` does by default: the segment
    ends (a timestamp after text, then the next segment or the end) are where a
    weakened model repeats its last sentence, and decoding without timestamps never
    asks for them. Two rules a plain argmax needs to stay in that mode: never
    <|notimestamps|>, and a timestamp first. And one the packing needs: no end
    before a timestamp passes the middle of the window's last clip (the end of its
    segment, not the start). Whisper takes the pause after a clip for the end of
    the speech, and the clips after it would go unheard.
    """
    from wruntime.tokenizer import TIMESTAMP_STEP

    first_ts, eot, none = tokenizer.timestamp_begin, tokenizer.eot, tokenizer.no_timestamps
    last_index = int(last_middle / TIMESTAMP_STEP)

    def rules(generated: Sequence[int], logits: np.ndarray) -> None:
        logits[none] = -np.inf
        if not generated:
            logits[:first_ts] = -np.inf
        if not any(t >= first_ts + last_index for t in generated):
            logits[eot] = -np.inf

    return rules


class _Probe:
    """The reference forward pass on a few clips, and the KL of a perturbed model from it."""

    def __init__(
        self, weights: WhisperWeights, clips: Sequence[Path], timestamps: bool = True
    ) -> None:
        from wruntime import oracle
        from wruntime.features import log_mel_spectrogram
        from wruntime.tokenizer import get_tokenizer

        self.oracle = oracle
        self.base = _round_fp16(weights)
        dims = weights.dims
        tokenizer = get_tokenizer(
            list(weights.tokenizer_files.values()),
            multilingual=dims.is_multilingual,
            num_languages=None,
        )
        if timestamps:
            sot = list(tokenizer.sot_sequence)
            self.first_ts: int | None = tokenizer.timestamp_begin
        else:  # no rules: nothing tells how far into the window the decode has got
            sot = list(tokenizer.sot_sequence_including_notimestamps)
            self.first_ts = None
        self.items = []
        for audio, last_middle in _pack(clips):
            mel = log_mel_spectrogram(audio, dims.n_mels)
            feats = oracle.encode(self.base, mel)
            tokens = oracle.greedy_tokens(
                self.base,
                None,
                sot,
                max_tokens=PROBE_TOKENS,
                audio_features=feats,
                mask=_reference_rules(tokenizer, last_middle) if timestamps else None,
            )
            seq = np.array(sot + tokens, dtype=np.int64)
            logp = self._logp(self.base, seq, feats)
            self.items.append((mel, feats, seq, logp))

    @staticmethod
    def _log_sum_exp(x: np.ndarray) -> np.ndarray:
        top = x.max(axis=-1, keepdims=True)
        return top + np.log(np.exp(x - top).sum(axis=-1, keepdims=True))

    def _logp(self, w: WhisperWeights, seq: np.ndarray, feats: np.ndarray) -> np.ndarray:
        """Log-probabilities of the text tokens, the end token and *a* timestamp.

        The timestamps count as one outcome: whether a segment ends here changes the
        transcript, which 20-ms step it ends on hardly does. Counted one by one, the
        timestamp rows (the last vocabulary chunk) and the decoder layers that place
        them looked several times more sensitive than they are, and on tiny.en the
        30% model paid for them with encoder bits: +2.0 WER points against +0.9.
        """
        logits = self.oracle.logits_for_sequence(w, seq, feats).astype(np.float64)
        if self.first_ts is not None:
            ts = self.first_ts
            logits = np.concatenate([logits[:, :ts], self._log_sum_exp(logits[:, ts:])], axis=-1)
        return logits - self._log_sum_exp(logits)

    def kl(self, weights: WhisperWeights, encoder_changed: bool) -> float:
        """Mean KL per decoded position, over every window's positions together."""
        total, positions = 0.0, 0
        for mel, feats, seq, ref in self.items:
            if encoder_changed:
                feats = self.oracle.encode(weights, mel)
            logp = self._logp(weights, seq, feats)
            total += float(np.sum(np.exp(ref) * (ref - logp)))
            positions += len(seq)
        return total / positions


def _cache_path(
    arch: str,
    clips: Sequence[Path],
    fixed: Sequence[CompressionRule] = (),
    timestamps: bool = True,
) -> Path:
    """One file per architecture, clips and fixed rules; candidates accumulate inside it."""
    from wruntime.build.model_dir import BUILDER_VERSION, wruntime_home

    what: dict[str, Any] = {
        "arch": arch,
        # the layer keys and values come from the builder's packages (vocabulary chunks)
        "builder": BUILDER_VERSION,
        "clips": sorted(str(Path(c).resolve()) for c in clips),  # packed: order is moot
        # 3: clips packed into windows, KL averaged over all decoded positions (still
        # what a probe without timestamps measures); 4: the reference decodes with
        # timestamps, every packed clip heard; 5: the timestamps one outcome in the KL
        "v": 5 if timestamps else 3,
    }
    if fixed:
        what["fixed"] = [r.to_dict() for r in fixed]
    key = json.dumps(what, sort_keys=True)
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    return wruntime_home() / "sensitivity" / f"{arch}-{digest}.json"


def _noise_cache_path(arch: str, fixed: Sequence[CompressionRule] = ()) -> Path:
    """Each candidate's bits and weight noise, per weight: the same whatever the clips."""
    from wruntime.build.model_dir import BUILDER_VERSION, wruntime_home

    what: dict[str, Any] = {
        "arch": arch,
        "builder": BUILDER_VERSION,
        "fixed": [r.to_dict() for r in fixed],
        "v": 1,
    }
    digest = hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:12]
    return wruntime_home() / "sensitivity" / f"{arch}-noise-{digest}.json"


def _labels_to_measure(
    row: LayerSensitivity, rules: dict[str, CompressionRule], share: float, exhaustive: bool
) -> list[str]:
    """Every candidate of a weight that holds many bytes, else the most aggressive one and
    the median one in noise, so the candidates a size budget lands on (4-bit, mostly) are
    scaled from a measurement nearby, not from one 3-bit table four times noisier."""
    lossy = [label for label, rule in rules.items() if rule.kind != "none"]
    # The vocabulary's chunks too, however small: per byte they cost the most KL of all
    # weights (tiny.en's commonest 768 tokens, 1% of the bytes: a fifth of the error).
    if exhaustive or share >= FULL_SHARE or row.layer.startswith(VOCABULARY):
        return lossy
    ranked = sorted(lossy, key=lambda label: -row.noise[label])
    return list(dict.fromkeys([ranked[0], ranked[len(ranked) // 2]]))


def _scale_unmeasured(row: LayerSensitivity) -> None:
    """Scale each unmeasured candidate's error from the measured one nearest in noise."""
    for label, noise in row.noise.items():
        if label in row.measured:
            continue
        if noise <= 0:
            row.error[label] = 0.0
            continue
        ref = min(row.measured, key=lambda m: abs(np.log(max(row.noise[m], 1e-30) / noise)))
        ratio = row.error[ref] / row.noise[ref] if row.noise[ref] > 0 else 0.0
        row.error[label] = ratio * noise


def _restrict(row: LayerSensitivity, labels: Sequence[str]) -> LayerSensitivity:
    """A row with only some candidates, unmeasured ones scaled from those measured."""
    keep = [label for label in labels if label in row.noise]
    out = dataclasses.replace(
        row,
        bits={k: row.bits[k] for k in keep},
        noise={k: row.noise[k] for k in keep},
        error={k: row.error[k] for k in keep if k in row.measured},
        measured=[k for k in row.measured if k in keep],
    )
    if out.measured:
        _scale_unmeasured(out)
    return out


def _missing(
    row: LayerSensitivity,
    rules: dict[str, CompressionRule],
    share: float,
    exhaustive: bool,
) -> bool:
    """Whether a row lacks a candidate's noise or a measurement the policy wants."""
    if set(rules) - set(row.noise):
        return True
    return bool(set(_labels_to_measure(row, rules, share, exhaustive)) - set(row.measured))


def measure_sensitivity(
    arch: str,
    candidates: Sequence[dict[str, Any]],
    *,
    fixed: Sequence[CompressionRule] = (),
    weights: WhisperWeights | None = None,
    clips: Sequence[Path] | None = None,
    exhaustive: bool = False,
    layers: Sequence[str] | None = None,
    cache: bool = True,
    probe: ProbeMode = "timestamps",
    log: Callable[[str], None] | None = None,
    progress: SensitivityProgress | None = None,
) -> SensitivityTable:
    """The sensitivity table of an architecture's compressible weights (cached on disk).

    ``candidates`` are rule dicts without a target (models/precisions.json's form);
    weights a ``fixed`` rule matches are taken out of the search. ``layers`` limits
    the measurement to some layer keys (for tests); the others get no error.
    ``probe``: "timestamps" decodes the reference as `transcribe` does by default,
    timestamps and all; "text" decodes without them, and the decode may end before
    the last packed clip; "both" measures each (each cached on its own) and averages
    them (the precision's ``probe``; see `_mean_of`). ``progress(done, total, layer)``
    is called before each weight is measured and once at the end: the pass takes
    minutes, a bar beats silence. The cache keeps every candidate ever measured for
    these clips, so trying another candidate costs its weight noise plus the few
    measurements the policy asks for.
    """
    from wruntime.catalog import load_architecture_weights

    if probe not in PROBE_MODES:
        raise WruntimeError(f"Unknown probe mode {probe!r}: use one of {', '.join(PROBE_MODES)}.")
    if probe == "both":
        return _mean_of(
            [
                measure_sensitivity(
                    arch,
                    candidates,
                    fixed=fixed,
                    weights=weights,
                    clips=clips,
                    exhaustive=exhaustive,
                    layers=layers,
                    cache=cache,
                    probe=mode,
                    log=log,
                    progress=progress,
                )
                for mode in ("text", "timestamps")
            ]
        )
    timestamps = probe == "timestamps"
    say = log or (lambda _: None)
    candidates = [dict(c) for c in candidates]
    clips = [Path(c) for c in (clips or default_clips())]
    path = _cache_path(arch, clips, fixed, timestamps)
    parsed = [
        CompressionRule.from_dict({"target": "global", **c}, "candidates") for c in candidates
    ]
    rules = {rule_label(r): r for r in parsed}

    def view(table: SensitivityTable) -> SensitivityTable:
        return dataclasses.replace(
            table,
            candidates=candidates,
            layers=[_restrict(r, list(rules)) if r.noise else r for r in table.layers],
        )

    previous: dict[str, LayerSensitivity] = {}
    known: list[dict[str, Any]] = []  # candidates the cached table holds
    spent = 0.0  # seconds the cached measurements took
    if layers is None and cache and path.is_file():
        table = SensitivityTable.from_json(json.loads(path.read_text()))
        searched = sum(r.fp16_bytes for r in table.layers if r.noise)
        if not any(
            _missing(r, rules, r.fp16_bytes / searched, exhaustive) for r in table.layers if r.noise
        ):
            return view(table)
        previous, known, spent = {r.layer: r for r in table.layers}, table.candidates, table.seconds
    started = time.perf_counter()
    w = weights if weights is not None else load_architecture_weights(arch)
    fp16_dir, fp16_bytes = _fp16_packages(arch, weights)
    found = [
        (package, copies, pw, value)
        for package, file, copies in (
            ("encoder", "encoder.mlpackage", 1),
            ("decoder", "decoder.mlpackage", DECODER_COPIES),
        )
        for pw, value in _package_values(fp16_dir / file, w)
    ]
    searched = [
        (package, copies, pw, value)
        for package, copies, pw, value in found
        if first_match(fixed, pw) is None and pw.segments
    ]
    variable = float(sum(pw.size * 2 * copies for _, copies, pw, _ in searched))
    if layers is not None:
        # A misspelt name (or a chunk of an older layout) would otherwise measure nothing.
        names = {pw.layer for _, _, pw, _ in searched}
        unknown = [name for name in layers if name not in names]
        if unknown:
            raise WruntimeError(
                f"{arch} has no searched weight {', '.join(map(repr, unknown))}; the names "
                f"are the table's layer column (e.g. {min(names)!r})."
            )

    # Bits and weight noise of every new candidate (k-means tables: on a fresh cache the
    # longest part of a pass), then what is left to measure. They depend on the weights
    # alone, not the clips, so they have their own cache.
    noise_path = _noise_cache_path(arch, fixed)
    noise_cache: dict[str, dict[str, list[float]]] = {}
    if cache and noise_path.is_file():
        noise_cache = json.loads(noise_path.read_text())
    rows: dict[str, LayerSensitivity] = {}
    for package, copies, pw, value in searched:
        if layers is not None and pw.layer not in layers:
            continue
        row = previous.get(pw.layer) or LayerSensitivity(pw.layer, package, pw.size, copies, None)
        row.error = {k: v for k, v in row.error.items() if k in row.measured}
        known_noise = noise_cache.setdefault(pw.layer, {})
        base = value.astype(np.float32)
        power = float(np.sum(base**2)) or 1.0
        for label, rule in rules.items():
            if label in row.noise:
                continue
            if label not in known_noise:
                eff = effective_rule(rule, pw)
                q = value if eff.kind == "none" else simulate(value, eff)
                noise = float(np.sum((q.astype(np.float32) - base) ** 2)) / power
                known_noise[label] = [rule_bits(eff, pw), noise]
            row.bits[label], row.noise[label] = known_noise[label]
        rows[pw.layer] = row
    if cache:
        noise_path.parent.mkdir(parents=True, exist_ok=True)
        write_text(noise_path, json.dumps(noise_cache))
    todo = [
        (package, pw, value)
        for package, _, pw, value in searched
        if pw.layer in rows
        and _missing(rows[pw.layer], rules, rows[pw.layer].fp16_bytes / variable, exhaustive)
    ]
    tick = progress or (lambda *_: None)
    probe = None
    for done, (package, pw, value) in enumerate(todo):
        tick(done, len(todo), pw.layer)
        row = rows[pw.layer]
        t0 = time.perf_counter()
        for label in _labels_to_measure(row, rules, row.fp16_bytes / variable, exhaustive):
            if label in row.measured:
                continue
            if probe is None:
                say(f"reference pass on {len(clips)} clips")
                probe = _Probe(w, clips, timestamps)
            params = dict(probe.base.params)
            _write_back(params, pw, simulate(value, effective_rule(rules[label], pw)))
            perturbed = dataclasses.replace(probe.base, params=params)
            row.error[label] = probe.kl(perturbed, encoder_changed=package == "encoder")
            row.measured.append(label)
        say(
            f"{pw.layer}: "
            + ", ".join(f"{k} {v:.2e}" for k, v in _restrict(row, list(rules)).error.items())
            + f" ({time.perf_counter() - t0:.1f} s)"
        )
    tick(len(todo), len(todo), "")

    table_layers = []
    fixed_saving = 0.0  # what the fixed rules take off the fp16 directory
    for package, copies, pw, _ in found:
        fixed_rule = first_match(fixed, pw)
        if pw.layer in rows:
            row = rows[pw.layer]
            if row.measured:
                _scale_unmeasured(row)
            table_layers.append(row)
        else:
            label = rule_label(effective_rule(fixed_rule, pw)) if fixed_rule else None
            table_layers.append(LayerSensitivity(pw.layer, package, pw.size, copies, label))
            if fixed_rule is not None:
                fixed_saving += pw.size * copies * (2 - rule_bits(fixed_rule, pw) / 8)
    held = {
        rule_label(CompressionRule.from_dict({"target": "global", **c}, "cache")) for c in known
    }
    table = SensitivityTable(
        architecture=arch,
        clips=[str(c) for c in clips],
        candidates=known
        + [c for c, r in zip(candidates, parsed, strict=True) if rule_label(r) not in held],
        layers=table_layers,
        # The fixed weights at their rule's size: counted at fp16, the int8 control-token
        # rows made tiny.en's 30% choice 0.8% of fp16 smaller than its budget.
        other_bytes=fp16_bytes - variable - fixed_saving,
        fp16_bytes=fp16_bytes,
        seconds=round(spent + time.perf_counter() - started, 1),
    )
    if layers is None and cache:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_text(path, json.dumps(table.to_json(), indent=1))
    return view(table)


def _mean_of(tables: Sequence[SensitivityTable]) -> SensitivityTable:
    """One table whose errors are the mean of several probes' (same weights, same clips).

    Each probe mode weighs the same, whatever its count of decoded positions: the
    timestamp decode has more of them (a timestamp at every segment edge), and
    pooling positions would let segment ends outweigh the text again.
    """
    first = tables[0]
    layers = []
    for rows in zip(*(t.layers for t in tables), strict=True):
        row = rows[0]
        if row.error:
            labels = [k for k in row.error if all(k in r.error for r in rows)]
            row = dataclasses.replace(
                row,
                error={k: float(np.mean([r.error[k] for r in rows])) for k in labels},
                measured=[k for k in row.measured if all(k in r.measured for r in rows)],
            )
        layers.append(row)
    return dataclasses.replace(
        first, layers=layers, seconds=round(sum(t.seconds for t in tables), 1)
    )


# ------------------------------------------------------------------ choosing


def choose(table: SensitivityTable, budget: Budget, max_noise: float | None = None) -> Choice:
    """Per-layer candidates meeting the budget, greedily by error added per byte saved.

    ``max_noise`` rules out any candidate whose relative weight noise is above it. The
    KL is measured on a few clips, and cannot see rows of the vocabulary those clips
    never use: on tiny.en it rated 3-bit tables (5% noise) on the rarest-token chunk as
    nearly free, and the 30-32% models that used them lost 1.7-2.1 WER points on the
    whole speech set, where 30% models without them lost 0.8-1.3.
    """
    rules = table.candidate_rules()
    search = [layer for layer in table.layers if layer.fixed is None and layer.error]
    if max_noise is not None:
        search = [
            dataclasses.replace(
                layer,
                error={k: v for k, v in layer.error.items() if layer.noise[k] <= max_noise},
            )
            for layer in search
        ]
    current = {layer.layer: "fp16" for layer in search}
    fp16_label = next((lab for lab, r in rules.items() if r.kind == "none"), None)

    def bits(layer: LayerSensitivity, label: str) -> float:
        return 16.0 if label == "fp16" else layer.bits[label]

    def err(layer: LayerSensitivity, label: str) -> float:
        return 0.0 if label in ("fp16", fp16_label) else layer.error[label]

    def size() -> float:
        return table.other_bytes + sum(
            layer.size * bits(layer, current[layer.layer]) / 8 * layer.copies for layer in search
        )

    def total_error() -> float:
        return sum(err(layer, current[layer.layer]) for layer in search)

    target = None
    if budget.max_mb is not None:
        target = budget.max_mb * 1e6 * SIZE_MARGIN
    elif budget.max_fraction is not None:
        target = budget.max_fraction * table.fp16_bytes * SIZE_MARGIN
    while True:
        if target is not None and size() <= target:
            break
        best = None
        for layer in search:
            now = current[layer.layer]
            for label in layer.error:
                saved = (bits(layer, now) - bits(layer, label)) * layer.size / 8 * layer.copies
                if saved <= 0:
                    continue
                cost = max(err(layer, label) - err(layer, now), 0.0) / saved
                if best is None or cost < best[0]:
                    best = (cost, layer, label)
        if best is None:
            break
        _, layer, label = best
        if budget.max_error is not None:
            extra = err(layer, label) - err(layer, current[layer.layer])
            if total_error() + extra > budget.max_error:
                break
        current[layer.layer] = label
    final = size()
    met = (target is None or final <= target) and (
        budget.max_error is None or total_error() <= budget.max_error
    )
    chosen_rules = {
        name: (KEEP if label == "fp16" else rules[label]) for name, label in current.items()
    }
    return Choice(
        rules=chosen_rules,
        labels=current,
        size_bytes=final,
        fraction=final / table.fp16_bytes,
        predicted_error=total_error(),
        budget=budget,
        met=met,
        table=table,
    )


def choices_for_precision(
    precision: PrecisionSpec,
    weights: WhisperWeights,
    *,
    arch: str | None = None,
    budget: Budget | None = None,
    log: Callable[[str], None] | None = None,
    progress: SensitivityProgress | None = None,
) -> dict[str, CompressionRule]:
    """Per-layer rules for a precision with a ``sensitivity`` search (the builder's hook)."""
    from wruntime.catalog import architectures

    spec = precision.sensitivity or {}
    if arch is None:
        arch = next((a.name for a in architectures().values() if a.dims == weights.dims), None)
        if arch is None:
            raise WruntimeError("The weights match no catalog architecture to search.")
    table = measure_sensitivity(
        arch,
        spec.get("candidates", []),
        fixed=precision.compression,
        weights=weights,
        probe=probe_mode(precision),
        log=log,
        progress=progress,
    )
    choice = choose(
        table, budget or Budget.from_spec(spec.get("budget", {})), spec.get("max_noise")
    )
    if log:
        log(
            f"auto: {choice.fraction:.1%} of fp16 ({choice.size_bytes / 1e6:.1f} MB), "
            f"predicted KL {choice.predicted_error:.3g}, budget {choice.budget.describe()}"
            + ("" if choice.met else " (NOT met: smallest candidates everywhere)")
        )
    return choice.rules


def probe_mode(precision: PrecisionSpec) -> ProbeMode:
    """How a precision's search decodes its probe clips (its ``probe``, else "timestamps")."""
    mode = (precision.sensitivity or {}).get("probe", "timestamps")
    if mode not in PROBE_MODES:
        raise WruntimeError(
            f"The precision {precision.name!r} has an unknown probe mode {mode!r}: "
            f"use one of {', '.join(PROBE_MODES)}."
        )
    return mode


def sensitivity_report(
    architecture: str,
    *,
    budget: Budget | None = None,
    clips: Sequence[Path] | None = None,
    precision: str = "auto",
    exhaustive: bool = False,
    probe: ProbeMode | None = None,
    log: Callable[[str], None] | None = None,
) -> Choice:
    """What `wruntime sensitivity ARCH` shows: the per-layer table and the choice for a budget.

    The candidates, fixed rules and default budget are the catalog precision's
    (``auto``); the table is cached, so asking again with another budget is instant.
    """
    from wruntime.catalog import architecture as find_architecture
    from wruntime.catalog import precisions

    find_architecture(architecture)  # unknown names fail here, with the valid ones
    spec = precisions().get(precision)
    if spec is None or spec.sensitivity is None:
        raise WruntimeError(f"The precision {precision!r} has no sensitivity search.")
    table = measure_sensitivity(
        architecture,
        spec.sensitivity.get("candidates", []),
        fixed=spec.compression,
        clips=clips,
        exhaustive=exhaustive,
        probe=probe_mode(spec) if probe is None else probe,
        log=log,
    )
    return choose(
        table,
        budget or Budget.from_spec(spec.sensitivity.get("budget", {})),
        spec.sensitivity.get("max_noise"),
    )
