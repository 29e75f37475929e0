"""Whisper's tokenizer as a tiktoken `Encoding` built from the model's own vocabulary.

A weight directory (CTranslate2 or Hugging Face) ships `tokenizer.json` (a
Hugging Face byte-level BPE: every byte is spelled as a printable unicode
symbol, GPT-2 style) and/or `vocabulary.txt` / `vocabulary.json` (the same
symbol strings in id order); openai-whisper's own `.tiktoken` files are read
too. All list tokens in merge order, so a token's id is its BPE rank, which is
exactly what tiktoken's `mergeable_ranks` wants: we turn the symbols back into
bytes and hand tiktoken the vocabulary as is. For the two vocabularies Whisper
uses (GPT-2 for English-only models, the multilingual one for the rest) this
gives the very ranks openai-whisper ships as gpt2.tiktoken / multilingual.tiktoken.

The special tokens follow the regular vocabulary in a fixed order:
<|endoftext|>, <|startoftranscript|>, one token per language (99, or 100 from
large-v3 on), <|translate|>, <|transcribe|>, <|startoflm|>, <|startofprev|>,
<|nospeech|> (called <|nocaptions|> in older vocabularies), <|notimestamps|>
and 1501 timestamps <|0.00|> ... <|30.00|>. We lay them out ourselves and check
them against whatever the files list, so a vocabulary from another model
fails loudly instead of decoding garbage.
"""

from __future__ import annotations

import base64
import json
import os
import string
import threading
from collections.abc import Iterable, Sequence
from functools import cache, cached_property
from pathlib import Path

import tiktoken

from wruntime.errors import WeightsError, WruntimeError

# Code → name. The order is the order of the language tokens, so it defines their ids.
LANGUAGES: dict[str, str] = {
    "en": "english",
    "zh": "chinese",
    "de": "german",
    "es": "spanish",
    "ru": "russian",
    "ko": "korean",
    "fr": "french",
    "ja": "japanese",
    "pt": "portuguese",
    "tr": "turkish",
    "pl": "polish",
    "ca": "catalan",
    "nl": "dutch",
    "ar": "arabic",
    "sv": "swedish",
    "it": "italian",
    "id": "indonesian",
    "hi": "hindi",
    "fi": "finnish",
    "vi": "vietnamese",
    "he": "hebrew",
    "uk": "ukrainian",
    "el": "greek",
    "ms": "malay",
    "cs": "czech",
    "ro": "romanian",
    "da": "danish",
    "hu": "hungarian",
    "ta": "tamil",
    "no": "norwegian",
    "th": "thai",
    "ur": "urdu",
    "hr": "croatian",
    "bg": "bulgarian",
    "lt": "lithuanian",
    "la": "latin",
    "mi": "maori",
    "ml": "malayalam",
    "cy": "welsh",
    "sk": "slovak",
    "te": "telugu",
    "fa": "persian",
    "lv": "latvian",
    "bn": "bengali",
    "sr": "serbian",
    "az": "azerbaijani",
    "sl": "slovenian",
    "kn": "kannada",
    "et": "estonian",
    "mk": "macedonian",
    "br": "breton",
    "eu": "basque",
    "is": "icelandic",
    "hy": "armenian",
    "ne": "nepali",
    "mn": "mongolian",
    "bs": "bosnian",
    "kk": "kazakh",
    "sq": "albanian",
    "sw": "swahili",
    "gl": "galician",
    "mr": "marathi",
    "pa": "punjabi",
    "si": "sinhala",
    "km": "khmer",
    "sn": "shona",
    "yo": "yoruba",
    "so": "somali",
    "af": "afrikaans",
    "oc": "occitan",
    "ka": "georgian",
    "be": "belarusian",
    "tg": "tajik",
    "sd": "sindhi",
    "gu": "gujarati",
    "am": "amharic",
    "yi": "yiddish",
    "lo": "lao",
    "uz": "uzbek",
    "fo": "faroese",
    "ht": "haitian creole",
    "ps": "pashto",
    "tk": "turkmen",
    "nn": "nynorsk",
    "mt": "maltese",
    "sa": "sanskrit",
    "lb": "luxembourgish",
    "my": "myanmar",
    "bo": "tibetan",
    "tl": "tagalog",
    "mg": "malagasy",
    "as": "assamese",
    "tt": "tatar",
    "haw": "hawaiian",
    "ln": "lingala",
    "ha": "hausa",
    "ba": "bashkir",
    "jw": "javanese",
    "su": "sundanese",
    "yue": "cantonese",  # the 100th: only large-v3 and later have it
}

# Name or alias → code, for --language arguments such as "German" or "Mandarin".
TO_LANGUAGE_CODE: dict[str, str] = {
    **{name: code for code, name in LANGUAGES.items()},
    "burmese": "my",
    "valencian": "ca",
    "flemish": "nl",
    "haitian": "ht",
    "letzeburgesch": "lb",
    "pushto": "ps",
    "panjabi": "pa",
    "moldavian": "ro",
    "moldovan": "ro",
    "sinhalese": "si",
    "castilian": "es",
    "mandarin": "zh",
}

TASKS = ("transcribe", "translate")
N_TIMESTAMPS = 1501  # <|0.00|> ... <|30.00|> in steps of 20 ms
TIMESTAMP_STEP = 0.02

# Languages written without spaces between words: word timestamps split them
# wherever the tokens decode to whole unicode characters instead.
_NO_SPACE_LANGUAGES = frozenset({"zh", "ja", "th", "lo", "my", "yue"})

# GPT-2's pre-tokenizer split (the ByteLevel pre-tokenizer's regex in tokenizer.json).
_GPT2_SPLIT = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""

# Older vocabularies (the Hugging Face conversions) spell a few specials differently.
_OLD_SPELLINGS = {"<|nospeech|>": "<|nocaptions|>", "<|he|>": "<|iw|>"}

PathLike = str | os.PathLike


def special_token_names(num_languages: int = 99) -> list[str]:
    """Whisper's special tokens in id order; the first takes the id after the last BPE token."""
    if not 1 <= num_languages <= len(LANGUAGES):
        raise ValueError(f"num_languages must be in 1..{len(LANGUAGES)}, got {num_languages}")
    return [
        "<|endoftext|>",
        "<|startoftranscript|>",
        *[f"<|{code}|>" for code in list(LANGUAGES)[:num_languages]],
        "<|translate|>",
        "<|transcribe|>",
        "<|startoflm|>",
        "<|startofprev|>",
        "<|nospeech|>",
        "<|notimestamps|>",
        *[f"<|{i * TIMESTAMP_STEP:.2f}|>" for i in range(N_TIMESTAMPS)],
    ]


def normalize_language(language: str) -> str:
    """A language code from a code, a name or an alias ("en", "English", "castilian")."""
    key = language.strip().lower()
    if key in LANGUAGES:
        return key
    if key in TO_LANGUAGE_CODE:
        return TO_LANGUAGE_CODE[key]
    raise WruntimeError(
        f"Unsupported language {language!r}; use a code such as 'en' or a name such as 'german'."
    )


# ----------------------------------------------------------------------------
# Reading the model's vocabulary
# ----------------------------------------------------------------------------


@cache
def _symbol_table() -> dict[int, int]:
    """GPT-2's byte-level alphabet, inverted for str.translate: symbol → the byte it spells.

    Bytes that are printable latin-1 characters stand for themselves; the other
    68 (controls, space, soft hyphen ...) are spelled with code points from 256
    up, in byte order. Translating then encoding as latin-1 turns a symbol
    string into its bytes in C, 50k tokens in a few milliseconds.
    """
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    table = {b: b for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[256 + extra] = b
            extra += 1
    return table


def _split_vocabulary(
    tokens: dict[int, str], source: Path
) -> tuple[dict[bytes, int], dict[int, str]]:
    """id → symbol string  ⇒  (mergeable ranks, id → special token name)."""
    eot_ids = [i for i, s in tokens.items() if s == "<|endoftext|>"]
    if not eot_ids:
        raise WeightsError(
            f"{source} has no <|endoftext|> token, so it is not a Whisper vocabulary."
        )
    eot = eot_ids[0]
    table = _symbol_table()
    regular = {i: s for i, s in tokens.items() if i < eot}
    specials = {i: s for i, s in tokens.items() if i >= eot}
    alien = set("".join(regular.values())) - {chr(c) for c in table}
    if alien:
        raise WeightsError(
            f"{source} is not a GPT-2 byte-level vocabulary (it uses symbols such as "
            f"{sorted(alien)[0]!r} outside the byte alphabet)."
        )
    ranks = {s.translate(table).encode("latin-1"): i for i, s in regular.items()}
    if len(ranks) != eot or sorted(ranks.values()) != list(range(eot)):
        raise WeightsError(
            f"{source} does not number its {eot} BPE tokens 0..{eot - 1} with distinct byte strings."
        )
    return ranks, specials


def _read_json(path: Path) -> tuple[dict[bytes, int], dict[int, str]]:
    """tokenizer.json (Hugging Face), or vocabulary.json (CTranslate2: a list of tokens)."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        if isinstance(data, list) and all(isinstance(t, str) for t in data):
            return _split_vocabulary(dict(enumerate(data)), path)
        model = data["model"]
        vocab: dict[str, int] = model["vocab"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise WeightsError(
            f"{path} is not a readable Hugging Face tokenizer.json ({exc})."
        ) from exc
    if model.get("type") != "BPE":
        raise WeightsError(f"{path} is not a BPE tokenizer (type {model.get('type')!r}).")
    tokens = {int(i): s for s, i in vocab.items()}
    for added in data.get("added_tokens", []):
        tokens[int(added["id"])] = added["content"]
    ranks, specials = _split_vocabulary(tokens, path)
    _check_merge_order(model.get("merges", []), vocab, path)
    return ranks, specials


def _check_merge_order(merges: list, vocab: dict[str, int], path: Path) -> None:
    """tiktoken merges by rank; that equals HF's merge list only if ids follow merge order.

    In a GPT-2-style vocabulary the token made by merge k has id 256 + k (the
    256 single bytes come first). We check that ids rise along the merge list.
    """
    previous = -1
    for merge in merges:
        left, right = merge.split(" ", 1) if isinstance(merge, str) else merge
        rank = vocab.get(left + right)
        if rank is None or rank <= previous:
            raise WeightsError(
                f"{path} lists merges out of id order (at {left!r} + {right!r}), so token ids "
                "are not BPE ranks and tiktoken cannot reproduce it."
            )
        previous = rank


def _read_vocabulary_txt(path: Path) -> tuple[dict[bytes, int], dict[int, str]]:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise WeightsError(f"{path} is not a readable vocabulary.txt ({exc}).") from exc
    # Split on "\n" only: a token may be the empty string (id 50256 of the
    # multilingual vocabulary is), so blank lines are tokens too.
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return _split_vocabulary(dict(enumerate(lines)), path)


def _read_tiktoken(path: Path) -> tuple[dict[bytes, int], dict[int, str]]:
    """openai-whisper's own format ("<base64 bytes> <rank>" per line); it lists no specials."""
    ranks: dict[bytes, int] = {}
    try:
        for line in path.read_text(encoding="ascii").splitlines():
            if line:
                token, _, rank = line.strip().rpartition(" ")  # the empty token may be ""
                ranks[base64.b64decode(token)] = int(rank)
    except (OSError, ValueError) as exc:
        raise WeightsError(f"{path} is not a readable .tiktoken vocabulary ({exc}).") from exc
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise WeightsError(f"{path} does not number its tokens 0..{len(ranks) - 1}.")
    return ranks, {}


# Best first: tokenizer.json lets us check the merge order too.
_VOCABULARY_FILES = ("tokenizer.json", "vocabulary.json", "vocabulary.txt")


def find_vocabulary_files(source: PathLike | Sequence[PathLike]) -> list[Path]:
    """The vocabulary files to read, best first (tokenizer.json, vocabulary.json/.txt, .tiktoken)."""
    paths = [Path(source)] if isinstance(source, str | os.PathLike) else [Path(p) for p in source]
    found: list[Path] = []
    for p in paths:
        if p.is_dir():
            found += [p / name for name in _VOCABULARY_FILES if (p / name).is_file()]
            found += sorted(p.glob("*.tiktoken"))
        elif p.is_file():
            found.append(p)
        else:
            raise WeightsError(f"Tokenizer path {p} does not exist.")
    usable = [p for p in found if p.suffix in (".json", ".txt", ".tiktoken")]
    if not usable:
        raise WeightsError(
            f"No tokenizer.json, vocabulary.json/.txt or .tiktoken file found in "
            f"{', '.join(map(str, paths))}."
        )
    order = {".json": 0, ".txt": 1, ".tiktoken": 2}
    return sorted(usable, key=lambda p: (order[p.suffix], p.name != "tokenizer.json"))


def _read_vocabulary(path: Path) -> tuple[dict[bytes, int], dict[int, str]]:
    if path.suffix == ".json":
        return _read_json(path)
    if path.suffix == ".tiktoken":
        return _read_tiktoken(path)
    return _read_vocabulary_txt(path)


# ----------------------------------------------------------------------------
# Building the tiktoken Encoding
# ----------------------------------------------------------------------------

_cache_lock = threading.Lock()
_encoding_cache: dict[tuple, tuple[tiktoken.Encoding, int]] = {}


def _count_languages(specials: dict[int, str]) -> int | None:
    """Language tokens are those between <|startoftranscript|> and <|translate|>."""
    ids = {name: i for i, name in specials.items()}
    if "<|translate|>" not in ids or "<|startoftranscript|>" not in ids:
        return None  # the file lists too few specials to tell
    return ids["<|translate|>"] - ids["<|startoftranscript|>"] - 1


def _check_specials(
    specials: dict[int, str], names: list[str], first_id: int, source: Path
) -> None:
    for offset, name in enumerate(names):
        listed = specials.get(first_id + offset)
        if listed is None:
            continue  # tokenizer.json lists no timestamps; vocabulary.txt does
        if listed != name and listed != _OLD_SPELLINGS.get(name):
            raise WeightsError(
                f"{source} has {listed!r} at id {first_id + offset} where Whisper expects {name!r}; "
                "is num_languages right for this model?"
            )


def build_encoding(
    source: PathLike | Sequence[PathLike], num_languages: int | None = None
) -> tuple[tiktoken.Encoding, int]:
    """(Encoding, num_languages) for a model's vocabulary, cached per file and size.

    `num_languages=None` takes the count from the files' own language tokens
    (99, or 100 for large-v3); an explicit count that the files contradict is
    an error rather than silently shifted ids.
    """
    path = find_vocabulary_files(source)[0]
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns, num_languages)
    with _cache_lock:
        cached = _encoding_cache.get(key)
    if cached is not None:
        return cached

    ranks, specials = _read_vocabulary(path)
    listed = _count_languages(specials)
    if listed is not None and not 1 <= listed <= len(LANGUAGES):
        raise WeightsError(f"{path} has {listed} language tokens; Whisper has 99 or 100.")
    if num_languages is None:
        num_languages = listed if listed else 99
    elif listed is not None and listed != num_languages:
        raise WeightsError(
            f"{path} has {listed} language tokens but num_languages={num_languages} was asked for."
        )
    names = special_token_names(num_languages)
    first_id = len(ranks)
    _check_specials(specials, names, first_id, path)
    special_ids = {name: first_id + i for i, name in enumerate(names)}
    encoding = tiktoken.Encoding(
        name=f"whisper-{'multilingual' if first_id > 50256 else 'gpt2'}-{num_languages}",
        pat_str=_GPT2_SPLIT,
        mergeable_ranks=ranks,
        special_tokens=special_ids,
        explicit_n_vocab=first_id + len(names),
    )
    result = (encoding, num_languages)
    with _cache_lock:
        _encoding_cache[key] = result
    return result


# ----------------------------------------------------------------------------
# The tokenizer the decoding loop uses
# ----------------------------------------------------------------------------


class Tokenizer:
    """Text ↔ ids plus Whisper's special ids, for one (language, task) setting.

    Cheap to create: the Encoding is shared and cached by `build_encoding`.
    """

    def __init__(
        self,
        encoding: tiktoken.Encoding,
        num_languages: int,
        language: str | None = None,
        task: str | None = None,
    ) -> None:
        self.encoding = encoding
        self.num_languages = num_languages
        self.language = language
        self.task = task
        self.special_tokens: dict[str, int] = {
            name: encoding.encode_single_token(name) for name in encoding.special_tokens_set
        }
        # Older vocabularies' spellings (<|nocaptions|>, <|iw|>) name the same ids.
        for name, old in _OLD_SPELLINGS.items():
            if name in self.special_tokens:
                self.special_tokens.setdefault(old, self.special_tokens[name])
        if language is not None:
            self.to_language_token(language)  # fail now, not in the middle of decoding
        if task is not None and task not in TASKS:
            raise WruntimeError(f"Unknown task {task!r}; use 'transcribe' or 'translate'.")

    def __repr__(self) -> str:
        return (
            f"Tokenizer({self.encoding.name}, n_vocab={self.n_vocab}, "
            f"language={self.language!r}, task={self.task!r})"
        )

    # -- text --------------------------------------------------------------

    def encode(self, text: str, **kwargs) -> list[int]:
        """Ids of plain text. Text that looks like a special token ("<|en|>")
        is encoded as ordinary text unless `allowed_special` says otherwise, so a
        user's prompt can never smuggle in control tokens or raise mid-run."""
        kwargs.setdefault("disallowed_special", ())
        return self.encoding.encode(text, **kwargs)

    def decode(self, token_ids: Iterable[int], **kwargs) -> str:
        """Text of the ids, without timestamp tokens (other specials are kept)."""
        begin = self.timestamp_begin
        return self.encoding.decode([t for t in token_ids if t < begin], **kwargs)

    def decode_with_timestamps(self, token_ids: Iterable[int], **kwargs) -> str:
        """Text with timestamps written inline, e.g. "<|0.00|> Hello.<|1.08|>"."""
        return self.encoding.decode(list(token_ids), **kwargs)

    @property
    def n_vocab(self) -> int:
        return self.encoding.n_vocab

    # -- special ids -------------------------------------------------------

    @cached_property
    def eot(self) -> int:
        return self.special_tokens["<|endoftext|>"]

    @cached_property
    def sot(self) -> int:
        return self.special_tokens["<|startoftranscript|>"]

    @cached_property
    def transcribe(self) -> int:
        return self.special_tokens["<|transcribe|>"]

    @cached_property
    def translate(self) -> int:
        return self.special_tokens["<|translate|>"]

    @cached_property
    def sot_lm(self) -> int:
        return self.special_tokens["<|startoflm|>"]

    @cached_property
    def sot_prev(self) -> int:
        return self.special_tokens["<|startofprev|>"]

    @cached_property
    def no_speech(self) -> int:
        return self.special_tokens["<|nospeech|>"]

    @cached_property
    def no_timestamps(self) -> int:
        return self.special_tokens["<|notimestamps|>"]

    @cached_property
    def timestamp_begin(self) -> int:
        return self.special_tokens["<|0.00|>"]

    @cached_property
    def language_token(self) -> int:
        if self.language is None:
            raise ValueError("this tokenizer has no language set")
        return self.to_language_token(self.language)

    def to_language_token(self, language: str) -> int:
        code = normalize_language(language)
        token = self.special_tokens.get(f"<|{code}|>")
        if token is None:
            raise WruntimeError(
                f"Language {language!r} is not one of this model's {self.num_languages} languages."
            )
        return token

    @cached_property
    def all_language_codes(self) -> tuple[str, ...]:
        return tuple(LANGUAGES)[: self.num_languages]

    @cached_property
    def all_language_tokens(self) -> tuple[int, ...]:
        return tuple(self.special_tokens[f"<|{c}|>"] for c in self.all_language_codes)

    @cached_property
    def sot_sequence(self) -> tuple[int, ...]:
        """<|startoftranscript|> [<|lang|>] [<|task|>]: the prompt every window starts with."""
        sequence = [self.sot]
        if self.language is not None:
            sequence.append(self.to_language_token(self.language))
        if self.task is not None:
            sequence.append(self.transcribe if self.task == "transcribe" else self.translate)
        return tuple(sequence)

    @cached_property
    def sot_sequence_including_notimestamps(self) -> tuple[int, ...]:
        return (*self.sot_sequence, self.no_timestamps)

    @cached_property
    def non_speech_tokens(self) -> tuple[int, ...]:
        """Ids suppressed by suppress_tokens="-1": speaker tags, music notes, brackets.

        Keeps ordinary punctuation (, . ? !) and allows "-" and "'" inside words,
        so the model transcribes speech rather than captions like "[MUSIC]" or
        "(SPEAKING FRENCH)". A symbol is suppressed when it is a single token,
        with or without a leading space; the musical signs U+2640..U+267F may
        be several tokens, and suppressing their first token (shared by the
        whole block in UTF-8) is harmless.
        """
        symbols = [*'"#()*+/:;<=>@[\\]^_`{|}~「」『』']
        symbols += [
            "<<",
            ">>",
            "<<<",
            ">>>",
            "--",
            "---",
            "-(",
            "-[",
            "('",
            '("',
            "((",
            "))",
            "(((",
            ")))",
            "[[",
            "]]",
            "{{",
            "}}",
            "♪♪",
            "♪♪♪",
        ]
        music = set("♩♪♫♬♭♮♯")
        suppressed = {self.encode(" -")[0], self.encode(" '")[0]}
        for symbol in [*symbols, *sorted(music)]:
            for ids in (self.encode(symbol), self.encode(" " + symbol)):
                if len(ids) == 1 or symbol in music:
                    suppressed.add(ids[0])
        return tuple(sorted(suppressed))

    # -- words, for word-level timestamps ---------------------------------

    def split_to_word_tokens(self, tokens: Sequence[int]) -> tuple[list[str], list[list[int]]]:
        """Group tokens into words: at spaces, or at character boundaries for
        languages written without spaces."""
        if self.language in _NO_SPACE_LANGUAGES:
            return self.split_tokens_on_unicode(tokens)
        return self.split_tokens_on_spaces(tokens)

    def split_tokens_on_unicode(self, tokens: Sequence[int]) -> tuple[list[str], list[list[int]]]:
        """Cut wherever the tokens so far decode to complete characters.

        A token can end in the middle of a multi-byte character; such a token
        decodes with U+FFFD and is kept with the tokens that complete it, unless
        the full text really has U+FFFD at that place.
        """
        full = self.decode_with_timestamps(tokens)
        words: list[str] = []
        groups: list[list[int]] = []
        pending: list[int] = []
        offset = 0
        for token in tokens:
            pending.append(token)
            text = self.decode_with_timestamps(pending)
            bad = text.find("\ufffd")
            if bad < 0 or (offset + bad < len(full) and full[offset + bad] == "\ufffd"):
                words.append(text)
                groups.append(pending)
                pending = []
                offset += len(text)
        return words, groups

    def split_tokens_on_spaces(self, tokens: Sequence[int]) -> tuple[list[str], list[list[int]]]:
        """Words start at a leading space, a special token or a punctuation mark."""
        pieces, piece_tokens = self.split_tokens_on_unicode(tokens)
        words: list[str] = []
        groups: list[list[int]] = []
        for piece, ids in zip(pieces, piece_tokens, strict=True):
            starts_word = (
                not words
                or ids[0] >= self.eot
                or piece.startswith(" ")
                or piece.strip() in string.punctuation
            )
            if starts_word:
                words.append(piece)
                groups.append(list(ids))
            else:
                words[-1] += piece
                groups[-1].extend(ids)
        return words, groups


def get_tokenizer(
    tokenizer_dir_or_files: PathLike | Sequence[PathLike],
    *,
    multilingual: bool,
    num_languages: int | None = 99,
    language: str | None = None,
    task: str | None = None,
) -> Tokenizer:
    """The tokenizer for a model directory (or its tokenizer.json / vocabulary.txt).

    As openai-whisper: a multilingual model defaults to English transcription;
    an English-only model ignores language and task (its prompt is
    <|startoftranscript|> alone). `num_languages=None` reads the count from
    the vocabulary.
    """
    if language is not None:
        language = normalize_language(language)
    if task is not None and task not in TASKS:
        raise WruntimeError(f"Unknown task {task!r}; use 'transcribe' or 'translate'.")
    if multilingual:
        language = language or "en"
        task = task or "transcribe"
    else:
        language = None
        task = None
    encoding, n_languages = build_encoding(tokenizer_dir_or_files, num_languages)
    return Tokenizer(encoding, n_languages, language=language, task=task)
