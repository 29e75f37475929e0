"""Per-layer sensitivity and the auto chooser, on real tiny.en weights and packages.

The measurement itself runs on two layers and one short clip (the whole table is
a benchmark-sized job, cached under the model home by `measure_sensitivity`).
"""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from wruntime.build.sensitivity import Budget, LayerSensitivity, SensitivityTable, choose

pytestmark = pytest.mark.filterwarnings("ignore")

INT4 = {
    "kind": "linear_quantize",
    "dtype": "int4",
    "mode": "linear_symmetric",
    "granularity": "per_block",
    "block_size": 32,
}
INT8 = {
    "kind": "linear_quantize",
    "dtype": "int8",
    "mode": "linear_symmetric",
    "granularity": "per_channel",
}
INT4_16 = {**INT4, "block_size": 16}
NONE = {"kind": "none"}


def _fp16_dir():
    from wruntime.build.pipeline import ensure_model

    return ensure_model("tiny.en-fp16", progress=False).path


def test_package_values_map_back_onto_the_canonical_weights(tiny_weights):
    """Fused q/k/v, the scaled query and the transposed positional embedding all land
    on the right canonical rows (what a simulated compression is written through)."""
    from wruntime.build.sensitivity import _package_values, _write_back

    path = _fp16_dir()
    for package in ("encoder.mlpackage", "decoder.mlpackage"):
        for pw, value in _package_values(path / package, tiny_weights):
            if not pw.segments:
                continue
            params = {n: np.zeros_like(tiny_weights[n]) for n in pw.names}
            _write_back(params, pw, value)
            for s in pw.segments:
                got = params[s.name].reshape(params[s.name].shape[0], -1)
                want = tiny_weights[s.name].reshape(got.shape[0], -1)
                rows = slice(s.source_row, s.source_row + s.stop - s.start)
                np.testing.assert_allclose(got[rows], want[rows], rtol=2e-3, atol=2e-4)


def test_simulation_equals_what_the_int8_package_stores(tiny_weights):
    """`simulate` is coremltools' own arithmetic: it reproduces the built package's weight."""
    from wruntime.build.compress import simulate
    from wruntime.build.convert import load_program
    from wruntime.build.pipeline import ensure_model
    from wruntime.build.sensitivity import _package_values
    from wruntime.catalog import CompressionRule

    int8 = ensure_model("tiny.en-int8", progress=False).path
    stored = {
        re.sub(r"_quantized$", "", op.name): op.materialized_val_inference()
        for op in load_program(int8 / "encoder.mlpackage").functions["main"].operations
        if op.op_type.startswith("constexpr_")
    }
    rule = CompressionRule.from_dict({"target": "global", **INT8}, "test")
    checked = 0
    for pw, value in _package_values(_fp16_dir() / "encoder.mlpackage", tiny_weights):
        if pw.layer.endswith(("mlp.0.weight", "attn.key.weight")):
            np.testing.assert_allclose(
                simulate(value, rule).astype(np.float32),
                np.asarray(stored[pw.const], dtype=np.float32),
                rtol=1e-3,
                atol=1e-5,
            )
            checked += 1
    assert checked == 12  # 4 mlp.0, 4 attn.key, 4 cross_attn.key (computed by the encoder)


def test_measured_sensitivity_ranks_the_tied_embedding_above_an_encoder_layer(tiny_weights):
    from conftest import CLIPS

    from wruntime.build.sensitivity import measure_sensitivity

    layers = ["encoder.blocks.1.attn.key.weight", "decoder.token_embedding.weight[0:768]"]
    ticks = []
    table = measure_sensitivity(
        "tiny.en",
        [INT4, INT4_16, INT8, NONE],
        weights=tiny_weights,
        clips=[CLIPS["experience"][0]],
        layers=layers,
        progress=lambda *tick: ticks.append(tick),
    )
    # The progress callback counts the measured weights, in order, and ends at the total.
    assert ticks == [(0, 2, layers[0]), (1, 2, layers[1]), (2, 2, "")]
    rows = {row.layer: row for row in table.layers}
    key, emb = rows[layers[0]], rows[layers[1]]
    # The encoder weight: its most aggressive and its median candidate in noise measured,
    # int8 scaled from its neighbour int4/16. A vocabulary chunk, even one of 1% of the
    # bytes: every candidate measured.
    assert key.measured == ["int4/32", "int4/16"]
    assert emb.measured == ["int4/32", "int4/16", "int8"]
    ratio = key.error["int4/16"] / key.noise["int4/16"]
    assert key.error["int8"] == pytest.approx(ratio * key.noise["int8"])
    for row in (key, emb):
        assert row.error["int4/32"] > row.error["int8"] > 0 == row.error["fp16"]
        assert row.noise["int4/32"] > row.noise["int4/16"] > 10 * row.noise["int8"]
        assert row.bits["int4/32"] == pytest.approx(4.5)
        assert row.bits["int4/16"] == pytest.approx(5.0)
    assert emb.error["int4/32"] > 3 * key.error["int4/32"]
    assert emb.copies == 2 and key.copies == 1  # decoder weights live in two packages
    assert not rows["encoder.blocks.2.mlp.0.weight"].error  # not measured: not searched
    assert 100e6 < table.fp16_bytes < 200e6


def test_the_catalog_auto_keeps_the_control_tokens_at_int8_and_counts_them_so(tiny_weights):
    """The control tokens' rows (end of text, timestamps) are fixed at int8 by the catalog,
    out of the search; the size a choice is held to counts them at int8, not fp16."""
    from conftest import CLIPS

    from wruntime.build.sensitivity import measure_sensitivity
    from wruntime.catalog import precisions

    fixed = precisions()["auto"].compression
    special = "decoder.token_embedding.weight[50256:51864]"
    kwargs = dict(
        weights=tiny_weights,
        clips=[CLIPS["experience"][0]],
        layers=["encoder.blocks.1.attn.key.weight"],
    )
    table = measure_sensitivity("tiny.en", [INT8, NONE], fixed=fixed, **kwargs)
    plain = measure_sensitivity("tiny.en", [INT8, NONE], **kwargs)
    row = {r.layer: r for r in table.layers}[special]
    assert row.fixed == "int8" and not row.error and row.size == 1608 * 384
    assert special not in choose(table, Budget(max_fraction=0.5)).labels
    # int8 with an fp16 scale per row: a little under half of the rows' fp16 bytes saved.
    saved = plain.other_bytes + row.fp16_bytes - table.other_bytes
    assert 0.99 * 0.5 * row.fp16_bytes < saved < 0.5 * row.fp16_bytes


def _table() -> SensitivityTable:
    def layer(name: str, size: int, e4: float, e8: float) -> LayerSensitivity:
        return LayerSensitivity(
            layer=name,
            package="encoder",
            size=size,
            copies=1,
            fixed=None,
            bits={"int4/32": 4.5, "int8": 8.0, "fp16": 16.0},
            noise={"int4/32": 1e-2, "int8": 1e-4, "fp16": 0.0},
            error={"int4/32": e4, "int8": e8, "fp16": 0.0},
            measured=["int4/32"],
        )

    return SensitivityTable(
        architecture="test",
        clips=[],
        candidates=[INT4, INT8, NONE],
        layers=[layer("robust", 1_000_000, 1e-4, 1e-6), layer("fragile", 1_000_000, 1e-1, 1e-3)],
        other_bytes=0.0,
        fp16_bytes=4_000_000.0,
    )


def test_choose_spends_bits_on_the_sensitive_layer():
    choice = choose(_table(), Budget(max_fraction=0.4))
    assert choice.met and choice.size_bytes <= 0.4 * 4_000_000
    assert choice.labels == {"robust": "int4/32", "fragile": "int8"}
    assert choice.predicted_error == pytest.approx(1e-4 + 1e-3)
    assert [r["layer"] for r in choice.rows()] == ["fragile", "robust"]


def test_choose_to_an_error_budget_and_an_impossible_size():
    loose = choose(_table(), Budget(max_error=2e-3))
    assert loose.labels == {"robust": "int4/32", "fragile": "int8"}
    tight = choose(_table(), Budget(max_error=1e-5))
    assert tight.labels == {"robust": "int8", "fragile": "fp16"}
    impossible = choose(_table(), Budget(max_mb=0.1))
    assert not impossible.met
    assert set(impossible.labels.values()) == {"int4/32"}


def test_sensitivity_command_measures_chooses_and_refuses_bad_budgets(tmp_path):
    """`wruntime sensitivity`: a quick look at two real layers on a real clip, then the errors."""
    from conftest import CLIPS
    from typer.testing import CliRunner

    from wruntime.cli import app

    runner = CliRunner()
    out_json = tmp_path / "table.json"
    layers = ["encoder.blocks.1.attn.key.weight", "decoder.token_embedding.weight[0:768]"]
    args = ["sensitivity", "tiny.en", "--clip", str(CLIPS["experience"][0]), "--max-kl", "1"]
    args += ["--probe", "both"]  # each mode measured, then averaged
    for name in layers:
        args += ["--layer", name]
    result = runner.invoke(app, [*args, "--json", str(out_json)], env={"COLUMNS": "250"})
    assert result.exit_code == 0, result.output
    assert "kl[int8]" in result.stdout and "meets the budget" in result.stdout
    saved = json.loads(out_json.read_text())
    assert saved["probe"] == "both"
    rows = saved["rows"]
    measured = {r["layer"]: r for r in rows if "kl[int8]" in r}
    assert set(measured) == set(layers)
    emb = measured[layers[1]]
    assert emb["kl[int4/32]"] > emb["kl[int8]"] > 0

    both = runner.invoke(app, ["sensitivity", "tiny.en", "--max-mb", "10", "--max-kl", "1"])
    assert both.exit_code == 1 and "Give one budget" in both.stderr
    partial = runner.invoke(app, ["sensitivity", "tiny.en", "--layer", layers[0], "--build"])
    assert partial.exit_code == 1 and "--build needs the whole table" in partial.stderr
    unknown = runner.invoke(app, ["sensitivity", "tiny.xx"])
    assert unknown.exit_code == 1 and len(unknown.stderr.strip().splitlines()) == 1
    sideways = runner.invoke(app, ["sensitivity", "tiny.en", "--probe", "sideways"])
    assert sideways.exit_code == 1 and "text, timestamps, both" in sideways.stderr
    # The 4-chunk layout of builder 1.3 named its first chunk [0:12966].
    stale = ["--layer", "decoder.token_embedding.weight[0:12966]"]
    misspelt = runner.invoke(app, ["sensitivity", "tiny.en", *stale])
    assert misspelt.exit_code == 1 and "no searched weight" in misspelt.stderr
    assert len(misspelt.stderr.strip().splitlines()) == 1


def test_the_both_probe_weighs_each_mode_the_same():
    """The "both" table is the mean of the text and timestamp tables, candidate by
    candidate, and counts as measured only what both measured."""
    import dataclasses

    from wruntime.build.sensitivity import _mean_of

    text, stamps = _table(), _table()
    for row in stamps.layers:
        row.error = {k: 3 * v for k, v in row.error.items()}
        row.measured = ["int4/32", "int8"]
    stamps = dataclasses.replace(stamps, seconds=5.0)
    both = _mean_of([text, stamps])
    for a, b, m in zip(text.layers, stamps.layers, both.layers, strict=True):
        assert m.error == pytest.approx({k: (a.error[k] + b.error[k]) / 2 for k in a.error})
        assert m.measured == ["int4/32"]
    assert both.seconds == 5.0
    # The order of layers and what a choice costs in bytes are untouched.
    assert choose(both, Budget(max_fraction=0.4)).labels == {
        "robust": "int4/32",
        "fragile": "int8",
    }


def test_a_catalog_probe_mode_must_be_one_of_the_three():
    from wruntime.build.sensitivity import probe_mode
    from wruntime.catalog import PrecisionSpec
    from wruntime.errors import WruntimeError

    def spec(**search):
        return PrecisionSpec("auto", "", "float16", "iOS18", (), {"candidates": [], **search})

    assert probe_mode(spec()) == "timestamps"
    assert probe_mode(spec(probe="both")) == "both"
    with pytest.raises(WruntimeError, match="unknown probe mode 'sideways'"):
        probe_mode(spec(probe="sideways"))


def test_unmeasured_candidates_scale_from_the_measured_one_nearest_in_noise():
    from wruntime.build.sensitivity import _scale_unmeasured

    row = LayerSensitivity(
        layer="x",
        package="decoder",
        size=10,
        copies=1,
        fixed=None,
        bits={"pal3": 3.0, "pal4": 4.0, "pal6": 6.0, "int8": 8.0, "fp16": 16.0},
        noise={"pal3": 0.07, "pal4": 0.017, "pal6": 1.3e-3, "int8": 7e-4, "fp16": 0.0},
        # Large errors compound: KL per unit of noise is 5x higher at 3 bits than at 4.
        error={"pal3": 0.33, "pal4": 0.016},
        measured=["pal3", "pal4"],
    )
    _scale_unmeasured(row)
    assert row.error["pal3"] == 0.33 and row.error["pal4"] == 0.016  # measured: kept
    assert row.error["pal6"] == pytest.approx(0.016 / 0.017 * 1.3e-3)  # from pal4, not pal3
    assert row.error["int8"] == pytest.approx(0.016 / 0.017 * 7e-4)
    assert row.error["fp16"] == 0.0


def test_a_cached_row_restricted_to_some_candidates_rescales_from_what_remains():
    """The cache holds every candidate ever measured; a search sees only its own."""
    from wruntime.build.sensitivity import _restrict

    row = LayerSensitivity(
        layer="x",
        package="encoder",
        size=10,
        copies=1,
        fixed=None,
        bits={"pal3": 3.0, "int4": 4.5, "int8": 8.0, "fp16": 16.0},
        noise={"pal3": 0.05, "int4": 0.02, "int8": 1e-4, "fp16": 0.0},
        error={"pal3": 0.2, "int4": 0.01, "int8": 1e-4 * 0.5, "fp16": 0.0},
        measured=["pal3", "int4"],
    )
    both = _restrict(row, ["pal3", "int4", "int8", "fp16"])
    assert both.error["int8"] == pytest.approx(0.01 / 0.02 * 1e-4)  # nearest measured: int4
    only = _restrict(row, ["pal3", "int8", "fp16"])
    assert set(only.error) == {"pal3", "int8", "fp16"} and only.measured == ["pal3"]
    assert only.error["int8"] == pytest.approx(0.2 / 0.05 * 1e-4)  # now from pal3
    assert row.measured == ["pal3", "int4"] and "int4" in row.error  # the cached row is intact


def test_a_noise_ceiling_rules_out_candidates_the_kl_rates_as_free():
    """A few clips' KL cannot see damage to rows they never use: `max_noise` guards it."""
    table = _table()
    rare = table.layers[0]  # "robust": its int4 error looks tiny on the clips
    free = choose(table, Budget(max_fraction=0.5))
    assert free.labels["robust"] == "int4/32"
    capped = choose(table, Budget(max_fraction=0.5), max_noise=1e-3)  # int4 noise is 1e-2
    assert capped.labels["robust"] != "int4/32" and capped.labels["fragile"] != "int4/32"
    assert rare.error["int4/32"] == 1e-4  # the table itself is untouched
    # Nothing but int8 may go: 8 bits on both layers cannot fit 40%.
    assert not choose(table, Budget(max_fraction=0.4), max_noise=1e-3).met


def test_probe_windows_pack_clips_into_as_few_encoder_windows_as_fit():
    """Short clips share a 30-second window; the speech inside is the clips', unchanged."""
    from conftest import CLIPS, SHARED_SPEECH

    from wruntime.audio import load_audio
    from wruntime.build.sensitivity import GAP_SECONDS, probe_windows
    from wruntime.features import N_SAMPLES

    clips = [CLIPS[k][0] for k in ("jfk", "belly", "experience")]
    (window,) = probe_windows(clips)  # 11 + 3.3 + 2 s: one window, not three
    audio = [load_audio(c) for c in clips]
    assert window.shape == (N_SAMPLES,)
    # Longest first, a pause between clips, zeros after.
    gap = int(GAP_SECONDS * 16000)
    at = 0
    for a in sorted(audio, key=len, reverse=True):
        assert np.array_equal(window[at : at + len(a)], a)
        at += len(a)
        assert not window[at : at + gap].any()
        at += gap
    assert not window[at:].any()

    long = sorted(SHARED_SPEECH.glob("earnings-22/*.wav"))[:1]
    if long:  # a 60-second file is cut into windows of its own
        whole = load_audio(long[0])
        windows = probe_windows(long)
        assert len(windows) == -(-len(whole) // N_SAMPLES)
        assert np.array_equal(np.concatenate(windows)[: len(whole)], whole)


def test_the_default_probe_ships_in_the_package_and_is_the_test_clips():
    """models/probe (in the wheel) holds the test clips at 16 kHz: one encoder window."""
    from conftest import CLIPS

    from wruntime.audio import load_audio
    from wruntime.build.sensitivity import default_clips, probe_windows
    from wruntime.catalog import data_dir

    clips = default_clips()
    assert [c.parent for c in clips] == [data_dir() / "probe"] * 3
    originals = {CLIPS[k][0].stem: load_audio(CLIPS[k][0]) for k in CLIPS}
    for clip in clips:
        ours, theirs = load_audio(clip), originals[clip.stem]
        assert ours.shape == theirs.shape
        assert np.max(np.abs(ours - theirs)) < 1e-4  # 16-bit storage of the same speech
    assert len(probe_windows(clips)) == 1


def test_the_probe_reference_decodes_with_timestamps_and_hears_every_packed_clip(tiny_weights):
    """The KL is measured against transcribe's default mode, timestamps and all, and
    the reference reaches the window's last clip: left to end when it likes, whisper
    takes the pause after the first clip for the end of the speech."""
    from wruntime import oracle
    from wruntime.build.sensitivity import _pack, _Probe, _reference_rules, default_clips
    from wruntime.tokenizer import get_tokenizer

    tok = get_tokenizer(
        list(tiny_weights.tokenizer_files.values()), multilingual=False, num_languages=None
    )
    clips = default_clips()
    ((_, middle),) = _pack(clips)
    assert 15.0 < middle < 17.0  # 11 s + pause + 3.3 s + pause, then half of 2 s
    probe = _Probe(tiny_weights, clips)
    ((_, feats, seq, logp),) = probe.items
    # Text tokens and the end token one by one, the timestamps as one outcome.
    assert logp.shape == (len(seq), tok.timestamp_begin + 1)
    np.testing.assert_allclose(np.exp(logp).sum(axis=-1), 1.0, rtol=1e-9)
    sampled = seq[len(tok.sot_sequence) :]
    assert sampled[0] >= tok.timestamp_begin  # it opens with a timestamp
    assert tok.no_timestamps not in seq
    assert np.sum(sampled >= tok.timestamp_begin) >= 4  # a segment per clip, at least
    text = tok.decode([t for t in sampled if t < tok.eot]).lower()
    for word in ("country", "belly", "experience"):  # one word of each clip
        assert word in text

    free = oracle.greedy_tokens(
        probe.base,
        None,
        list(tok.sot_sequence),
        audio_features=feats,
        mask=_reference_rules(tok, 0.0),  # the end allowed from the first timestamp on
    )
    heard = tok.decode([t for t in free if t < tok.eot]).lower()
    assert "country" in heard and "belly" not in heard
    assert len(free) < len(sampled)

    # Without timestamps (`probe: "text"`): the whole vocabulary, and nothing
    # to tell how far the decode has got, so it ends where whisper likes.
    plain = _Probe(tiny_weights, clips, timestamps=False)
    ((_, _, seq, logp),) = plain.items
    assert list(seq[: len(tok.sot_sequence_including_notimestamps)]) == list(
        tok.sot_sequence_including_notimestamps
    )
    assert logp.shape == (len(seq), tiny_weights.dims.n_vocab)
    sampled = seq[len(tok.sot_sequence_including_notimestamps) :]
    assert not np.any(sampled >= tok.timestamp_begin)
    assert "country" in tok.decode(list(sampled)).lower()
