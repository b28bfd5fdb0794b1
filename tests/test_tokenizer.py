"""Tests for neolm.tokenizer: ids against independent references, loading rules, streaming decode.

The reference ids come from two places:
- transformers' tokenizers (`GPT2Tokenizer`, `PreTrainedTokenizerFast`). In transformers 5 these are thin
  wrappers around the same Rust `tokenizers` library that neolm uses, so they mainly check our pipeline
  set-up (pre-tokenizer, added tokens, no normaliser / NFC);
- `ReferenceBPE` below, a pure-Python port of OpenAI's original GPT-2 `encoder.py` (regex split, byte ->
  unicode map, rank-ordered merges). transformers 5 no longer has the slow Python GPT2Tokenizer
  (`GPT2Tokenizer(vocab_file=..., merges_file=...)` now silently builds an *empty* tokenizer), so this is the
  independent implementation.
"""

import hashlib
import json
import random
import unicodedata
from pathlib import Path

import pytest
import regex

from neolm.errors import NeolmError
from neolm.tokenizer import BUILTIN, StreamDecoder, Tokenizer, load_tokenizer

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
PACKAGED = Path(__file__).resolve().parents[1] / "neolm" / "tokenizers"
GPT2_VOCAB, GPT2_MERGES = PACKAGED / "gpt2" / "vocab.json", PACKAGED / "gpt2" / "merges.txt"
NEOX_JSON = PACKAGED / "gpt-neox-20b" / "tokenizer.json"

TEXTS = [
    "",
    "Hello world",
    " ",
    "  ",
    "a  b",
    "   leading spaces",
    "trailing spaces   ",
    "a" + " " * 30 + "b",
    "  multiple   spaces    between     words      ",
    "tabs\tand\t\ttabs \t mixed\t",
    "\t\t\t",
    "line1\nline2\n\n\nline3\n",
    "windows\r\nline endings\r\n\r\n",
    "\n",
    "digits 1234567890 3.14159 1,000,000 and 000000000000000000123456789012345678901234567890",
    "punctuation!?... (yes) [no] {maybe} <tag/> @#$%^&*_+=~`|\\ \"quoted\" 'single'",
    "don't I'll we've they're she's it'd I'm DON'T YOU'LL",
    "naïve café résumé Ærøskøbing Straße Œuvre Ångström",
    "日本語のテキスト、中文文本。한국어 텍스트",
    "العربية: مرحبا بالعالم",
    "combining: e\u0301 vs \u00e9, A\u030a vs \u00c5, q\u0307\u0323",
    unicodedata.normalize("NFD", "Éléphant déjà vu à Noël"),
    unicodedata.normalize("NFC", "Éléphant déjà vu à Noël"),
    "emoji 😀😃 👍🏽 👨‍👩‍👧‍👦 🏳️‍🌈 🇺🇸🇯🇵 ❤️ 🤖",
    "<|endoftext|>",
    "before<|endoftext|>after",
    "x <|endoftext|> y<|endoftext|><|endoftext|>",
    "<|padding|> is special in NeoX only",
    "def f(x):\n    return x**2  # comment\n\n\tpass\n",
    "nbsp\u00a0and\u3000ideographic space, zero\u200bwidth",
    "math 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 ∑∫√∞ ≠ ≤",
    "control \x00\x01\x7f chars",
    "Ġ Ċ ĠĠ byte-level look-alikes",
    "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa !!!!!!!!!!????",
    "It is a truth universally acknowledged, that a single man in possession of a good fortune, "
    "must be in want of a wife.",
]


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def shared(*parts: str) -> Path:
    path = DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"shared data not available: {path} is missing")
    return path


# ---------------------------------------------------------------------------------------------------
# An independent byte-level BPE (OpenAI's GPT-2 encoder.py, in pure Python)


def bytes_to_unicode() -> dict[int, str]:
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    keep += list(range(ord("®"), ord("ÿ") + 1))
    mapping, extra = {}, 0
    for b in range(256):
        if b in keep:
            mapping[b] = chr(b)
        else:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


class ReferenceBPE:
    """GPT-2 BPE as in OpenAI's encoder.py. `added` are literal strings split off before BPE (leftmost,
    longest first), which is how Hugging Face treats added tokens; their ids are given explicitly."""

    pattern = regex.compile(r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""")

    def __init__(self, vocab: dict[str, int], merges: list[tuple[str, str]], added: dict[str, int]):
        self.vocab = vocab
        self.ranks = {pair: rank for rank, pair in enumerate(merges)}
        self.byte_map = bytes_to_unicode()
        self.added = added
        longest_first = sorted(added, key=len, reverse=True)
        self.added_re = regex.compile("|".join(regex.escape(t) for t in longest_first)) if added else None
        self.cache: dict[str, list[str]] = {}

    def bpe(self, word: str) -> list[str]:
        if word in self.cache:
            return self.cache[word]
        parts = list(word)
        while len(parts) > 1:
            pairs = {(a, b) for a, b in zip(parts, parts[1:])}
            best = min(pairs, key=lambda p: self.ranks.get(p, float("inf")))
            if best not in self.ranks:
                break
            merged, i = [], 0
            while i < len(parts):
                if i < len(parts) - 1 and (parts[i], parts[i + 1]) == best:
                    merged.append(parts[i] + parts[i + 1])
                    i += 2
                else:
                    merged.append(parts[i])
                    i += 1
            parts = merged
        self.cache[word] = parts
        return parts

    def encode_plain(self, text: str) -> list[int]:
        ids = []
        for piece in self.pattern.findall(text):
            word = "".join(self.byte_map[b] for b in piece.encode("utf-8"))
            ids.extend(self.vocab[token] for token in self.bpe(word))
        return ids

    def encode(self, text: str) -> list[int]:
        if self.added_re is None:
            return self.encode_plain(text)
        ids, start = [], 0
        for match in self.added_re.finditer(text):
            ids += self.encode_plain(text[start : match.start()]) + [self.added[match.group()]]
            start = match.end()
        return ids + self.encode_plain(text[start:])


def read_merges(path: Path) -> list[tuple[str, str]]:
    lines = path.read_text(encoding="utf-8").splitlines()
    return [tuple(line.split(" ")) for line in lines if line and not line.startswith("#version")]


@pytest.fixture(scope="module")
def gpt2_files():
    return shared("tokenizers", "gpt2", "encoder.json"), shared("tokenizers", "gpt2", "vocab.bpe")


@pytest.fixture(scope="module")
def neox_file():
    return shared("tokenizers", "gpt-neox-20b", "tokenizer.json")


@pytest.fixture(scope="module")
def gpt2_reference(gpt2_files):
    vocab_path, merges_path = gpt2_files
    vocab = json.loads(vocab_path.read_text(encoding="utf-8"))
    # HF's gpt2 treats "<|endoftext|>" in text as the special token; OpenAI's encoder.py would BPE it.
    return ReferenceBPE(vocab, read_merges(merges_path), {"<|endoftext|>": vocab["<|endoftext|>"]})


@pytest.fixture(scope="module")
def neox_json(neox_file):
    return json.loads(neox_file.read_text(encoding="utf-8"))


# ---------------------------------------------------------------------------------------------------
# shipped files


def test_shipped_files_are_copies_of_the_shared_data_and_listed_in_readme():
    readme = (PACKAGED / "README.md").read_text(encoding="utf-8")
    pairs = [
        (GPT2_VOCAB, ("tokenizers", "gpt2", "encoder.json")),
        (GPT2_MERGES, ("tokenizers", "gpt2", "vocab.bpe")),
        (NEOX_JSON, ("tokenizers", "gpt-neox-20b", "tokenizer.json")),
    ]
    for shipped, _ in pairs:
        assert sha256(shipped) in readme, f"README.md lacks the SHA-256 of {shipped.name}"
    for shipped, source in pairs:
        assert shipped.read_bytes() == shared(*source).read_bytes()


def test_the_library_does_not_read_shared_data():
    source = (PACKAGED.parent / "tokenizer.py").read_text(encoding="utf-8")
    assert "shared/" not in source and '"shared"' not in source and "transformers" not in source


# ---------------------------------------------------------------------------------------------------
# gpt2


def test_gpt2_hello_world_and_metadata():
    tok = Tokenizer.builtin("gpt2")
    assert tok.encode("Hello world") == [15496, 995]
    assert tok.decode([15496, 995]) == "Hello world"
    assert (tok.eos_token_id, tok.bos_token_id, tok.vocab_size) == (50256, 50256, 50257)
    assert tok.token_to_id("<|endoftext|>") == 50256 and tok.token_to_id("Ġworld") == 995
    assert tok.token_to_id("no such token") is None
    assert tok.name == "gpt2 (built-in)"


def test_gpt2_ids_match_references(gpt2_files, gpt2_reference):
    from transformers import GPT2Tokenizer

    vocab_path, merges_path = gpt2_files
    hf = GPT2Tokenizer(vocab=str(vocab_path), merges=str(merges_path))
    mine = Tokenizer.from_vocab_merges(vocab_path, merges_path)
    builtin = Tokenizer.builtin("gpt2")
    assert mine.vocab_size == builtin.vocab_size == len(hf) == 50257
    for text in TEXTS:
        expected = gpt2_reference.encode(text)
        assert hf(text, add_special_tokens=False)["input_ids"] == expected, text
        assert mine.encode(text) == expected, text
        assert builtin.encode(text) == expected, text
    assert builtin.encode_batch(TEXTS) == [builtin.encode(t) for t in TEXTS]


def test_gpt2_round_trip():
    tok = Tokenizer.builtin("gpt2")
    for text in TEXTS:
        assert tok.decode(tok.encode(text), skip_special_tokens=False) == text
    assert tok.decode(tok.encode("a<|endoftext|>b")) == "ab"  # special tokens skipped by default


# ---------------------------------------------------------------------------------------------------
# gpt-neox-20b


def test_neox_hello_world_and_metadata():
    tok = Tokenizer.builtin("gpt-neox-20b")
    assert tok.encode("Hello world") == [12092, 1533]
    assert (tok.eos_token_id, tok.bos_token_id, tok.vocab_size) == (0, 0, 50277)
    assert tok.token_to_id("<|padding|>") == 1
    assert tok.name == "gpt-neox-20b (built-in)"


def test_neox_ids_match_transformers(neox_file):
    from transformers import PreTrainedTokenizerFast

    hf = PreTrainedTokenizerFast(tokenizer_file=str(neox_file))
    tok = Tokenizer.builtin("gpt-neox-20b")
    assert tok.vocab_size == len(hf) == 50277
    for text in TEXTS:
        assert tok.encode(text) == hf(text, add_special_tokens=False)["input_ids"], text
    assert tok.encode_batch(TEXTS) == [tok.encode(t) for t in TEXTS]


def test_neox_ids_match_independent_bpe(neox_json, tmp_path):
    """The slow-style BPE built from the vocab/merges inside the NeoX tokenizer.json, applied to
    NFC-normalised text, must give NeoX's ids on every text without added tokens.

    NeoX's added tokens are "<|endoftext|>", "<|padding|>" and 23 runs of 2..24 spaces (ids 50254..50276).
    Hugging Face splits added tokens off *before* BPE, so any text with two or more consecutive spaces
    legitimately tokenizes differently from plain GPT-2-style BPE ("a  b" -> a, "  ", b instead of
    a, " ", " b"); those texts are excluded here and covered by the next test.
    """
    from transformers import GPT2Tokenizer

    model = neox_json["model"]
    vocab_path, merges_path = tmp_path / "vocab.json", tmp_path / "merges.txt"
    vocab_path.write_text(json.dumps(model["vocab"], ensure_ascii=False), encoding="utf-8")
    merges_path.write_text("#version: 0.2\n" + "\n".join(model["merges"]) + "\n", encoding="utf-8")
    reference = ReferenceBPE(model["vocab"], read_merges(merges_path), {})
    hf_plain = GPT2Tokenizer(vocab=str(vocab_path), merges=str(merges_path))
    tok = Tokenizer.builtin("gpt-neox-20b")

    added = [t["content"] for t in neox_json["added_tokens"]]
    plain = [t for t in TEXTS if not any(a in unicodedata.normalize("NFC", t) for a in added)]
    assert len(plain) >= 20
    for text in plain:
        nfc = unicodedata.normalize("NFC", text)
        assert tok.encode(text) == reference.encode(nfc), text
        assert tok.encode(text) == hf_plain(nfc, add_special_tokens=False)["input_ids"], text
    # ... and the excluded case really is different:
    assert tok.encode("a  b") != reference.encode("a  b")


def test_neox_ids_match_independent_bpe_with_added_tokens(neox_json):
    """With added tokens split off first (leftmost, longest), the independent BPE matches on every text."""
    model = neox_json["model"]
    added = {t["content"]: t["id"] for t in neox_json["added_tokens"]}
    reference = ReferenceBPE(model["vocab"], [tuple(m.split(" ")) for m in model["merges"]], added)
    tok = Tokenizer.builtin("gpt-neox-20b")
    for text in TEXTS:
        assert tok.encode(text) == reference.encode(unicodedata.normalize("NFC", text)), text
    assert tok.encode("a" + " " * 30 + "b") == [66, 50254, 50272, 67]  # 24 spaces, then 6


def test_neox_round_trip_is_nfc():
    tok = Tokenizer.builtin("gpt-neox-20b")
    for text in TEXTS:
        assert tok.decode(tok.encode(text), skip_special_tokens=False) == unicodedata.normalize("NFC", text)
    assert tok.decode(tok.encode("<|padding|>a<|endoftext|>b")) == "ab"


# ---------------------------------------------------------------------------------------------------
# loading


def test_builtin_unknown_name_lists_known_ones():
    with pytest.raises(NeolmError) as info:
        Tokenizer.builtin("nope")
    for name in BUILTIN:
        assert name in str(info.value)


def test_load_tokenizer_prefers_folder_tokenizer_json(tmp_path):
    (tmp_path / "tokenizer.json").write_bytes(NEOX_JSON.read_bytes())
    (tmp_path / "vocab.json").write_bytes(GPT2_VOCAB.read_bytes())
    (tmp_path / "merges.txt").write_bytes(GPT2_MERGES.read_bytes())
    tok = load_tokenizer(tmp_path, default="gpt2")
    assert tok.encode("Hello world") == [12092, 1533]
    assert tok.name == str(tmp_path / "tokenizer.json")


def test_load_tokenizer_vocab_and_merges(tmp_path):
    (tmp_path / "vocab.json").write_bytes(GPT2_VOCAB.read_bytes())
    (tmp_path / "merges.txt").write_bytes(GPT2_MERGES.read_bytes())
    tok = load_tokenizer(str(tmp_path), default="gpt-neox-20b")
    assert tok.encode("Hello world<|endoftext|>") == [15496, 995, 50256]
    assert (tok.eos_token_id, tok.vocab_size) == (50256, 50257)


def test_load_tokenizer_falls_back_to_builtin(tmp_path):
    assert load_tokenizer(tmp_path, default="gpt-neox-20b").encode("Hello world") == [12092, 1533]
    assert load_tokenizer(None, default="gpt2").encode("Hello world") == [15496, 995]
    assert load_tokenizer(None, default="gpt2").name == "gpt2 (built-in)"
    with pytest.raises(NeolmError):
        load_tokenizer(None, default="nope")


def test_load_tokenizer_corrupt_files_name_the_file(tmp_path):
    bad = tmp_path / "tokenizer.json"
    bad.write_text('{"version": "1.0", "model": {', encoding="utf-8")
    with pytest.raises(NeolmError) as info:
        load_tokenizer(tmp_path, default="gpt2")
    assert str(bad) in str(info.value) and "\n" not in str(info.value)

    bad.unlink()
    (tmp_path / "vocab.json").write_text("not json", encoding="utf-8")
    (tmp_path / "merges.txt").write_text("#version: 0.2\na b\n", encoding="utf-8")
    with pytest.raises(NeolmError, match="vocab.json"):
        load_tokenizer(tmp_path, default="gpt2")

    (tmp_path / "vocab.json").write_text('{"a": 0, "b": 1, "ab": 2}', encoding="utf-8")
    (tmp_path / "merges.txt").write_text("#version: 0.2\na b c\n", encoding="utf-8")
    with pytest.raises(NeolmError, match="merges.txt"):
        load_tokenizer(tmp_path, default="gpt2")

    (tmp_path / "merges.txt").write_text("#version: 0.2\na x\n", encoding="utf-8")  # x not in vocab
    with pytest.raises(NeolmError, match="merges.txt"):
        load_tokenizer(tmp_path, default="gpt2")

    (tmp_path / "merges.txt").unlink()
    with pytest.raises(NeolmError, match="merges.txt"):
        load_tokenizer(tmp_path, default="gpt2")


# ---------------------------------------------------------------------------------------------------
# streaming


def stream(tok, ids, **kwargs) -> list[str]:
    decoder = StreamDecoder(tok, **kwargs)
    return [decoder.push(i) for i in ids] + [decoder.flush()]


@pytest.mark.parametrize("name", BUILTIN)
def test_stream_decoder_matches_decode(name):
    tok = Tokenizer.builtin(name)
    for text in TEXTS:
        ids = tok.encode(text)
        for skip in (True, False):
            pieces = stream(tok, ids, skip_special_tokens=skip)
            assert "".join(pieces) == tok.decode(ids, skip_special_tokens=skip), text
            if "\ufffd" not in text:
                assert not any("\ufffd" in p for p in pieces), (text, pieces)


@pytest.mark.parametrize("name", BUILTIN)
def test_stream_decoder_holds_split_characters(name):
    tok = Tokenizer.builtin(name)
    for char in ["🤖", "👍🏽", "鬱", "𝔘", "🇯🇵"]:
        ids = tok.encode(char)
        assert len(ids) > 1, f"{char!r} is a single token; pick another character"
        pieces = stream(tok, ids)
        assert "".join(pieces) == char
        # Every emitted piece is whole characters: the text so far is always a prefix of the full text
        # made of complete code points, and the first byte tokens yield nothing.
        assert pieces[0] == ""
        emitted = ""
        for piece in pieces:
            emitted += piece
            assert char.startswith(emitted)
        assert all(unicodedata.category(c) != "Cs" for c in emitted)


def test_stream_decoder_random_ids_and_small_window():
    """Arbitrary ids (invalid UTF-8 included) still join to decode(); each push decodes a short window."""
    tok = Tokenizer.builtin("gpt2")
    window = []

    class Spy:
        def decode(self, ids, skip_special_tokens=True):
            window.append(len(ids))
            return tok.decode(ids, skip_special_tokens=skip_special_tokens)

    rng = random.Random(0)
    byte_map = bytes_to_unicode()
    raw_bytes = [tok.token_to_id(byte_map[b]) for b in range(128, 256)]  # lone high bytes: invalid alone
    for _ in range(5):
        ids = [rng.choice(raw_bytes) if rng.random() < 0.3 else rng.randrange(tok.vocab_size) for _ in range(400)]
        window.clear()
        assert "".join(stream(Spy(), ids)) == tok.decode(ids)
        assert max(window) <= 2 * StreamDecoder.max_held + 2

    decoder = StreamDecoder(tok)
    for i in tok.encode("first") + [50256]:
        decoder.push(i)
    assert decoder.flush() == ""
    assert "".join(decoder.push(i) for i in tok.encode(" again")) + decoder.flush() == " again"


@pytest.mark.parametrize("name", BUILTIN)
def test_token_bytes_join_to_the_text(name):
    """Each token's bytes (byte-level BPE splits characters between tokens) join to the text's UTF-8."""
    tokenizer = Tokenizer.builtin(name)
    text = "Héllo wörld — 日本語 😀<|endoftext|> ok\n\t end"
    ids = tokenizer.encode(text)
    pieces = [tokenizer.token_bytes(i) for i in ids]
    assert b"".join(pieces) == text.encode()
    assert b"<|endoftext|>" in pieces and any(len(p) == 1 and p[0] >= 0x80 for p in pieces)  # a lone UTF-8 byte
    assert tokenizer.token_bytes(10**7) == b""
