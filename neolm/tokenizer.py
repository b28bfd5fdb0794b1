"""Byte-level BPE tokenizers for GPT-Neo (GPT-2 vocabulary) and GPT-NeoX, on top of `tokenizers`.

Two tokenizers ship inside the package (see `neolm/tokenizers/README.md` for provenance):

- ``gpt2``: GPT-2's vocab.json + merges.txt, used by GPT-Neo (50,257 ids, "<|endoftext|>" = 50256);
- ``gpt-neox-20b``: the GPT-NeoX-20B / Pythia tokenizer.json (50,277 ids, "<|endoftext|>" = 0).

A checkpoint folder may bring its own tokenizer; `load_tokenizer` picks it. `StreamDecoder` turns a
stream of generated ids into text pieces without ever cutting a UTF-8 character in half.
"""

from __future__ import annotations

import functools
import json
import logging
from pathlib import Path
from typing import Iterable

import tokenizers
from tokenizers import AddedToken, decoders, models, pre_tokenizers, processors

from neolm.errors import NeolmError

logger = logging.getLogger(__name__)

BUILTIN = ("gpt2", "gpt-neox-20b")
"""Names of the tokenizers shipped in the package."""

_BUILTIN_DIR = Path(__file__).resolve().parent / "tokenizers"
_EOS = "<|endoftext|>"


def _byte_alphabet() -> dict[str, int]:
    """Byte-level BPE's spelling of bytes as characters (GPT-2's): printable Latin-1 bytes stand for
    themselves, the other bytes, in order, for U+0100 onwards. Returns character -> byte."""
    kept = [*range(ord("!"), ord("~") + 1), *range(ord("\u00a1"), ord("\u00ac") + 1), *range(ord("\u00ae"), 256)]
    others = [b for b in range(256) if b not in kept]
    return {chr(b): b for b in kept} | {chr(256 + i): b for i, b in enumerate(others)}


_BYTE_OF = _byte_alphabet()


def _one_line(error: BaseException) -> str:
    """The first line of an exception's message (library errors can span several lines)."""
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__


def _check_text(text) -> None:
    """Text must be a str of real characters: lone surrogates (undecodable bytes) cannot be encoded."""
    if not isinstance(text, str):
        raise NeolmError(f"text to encode must be a string, not {type(text).__name__}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise NeolmError(f"the text is not valid Unicode (undecodable bytes at position {e.start})") from None


class Tokenizer:
    """A loaded tokenizer: text <-> token ids. Build it with one of the class methods."""

    def __init__(self, backend: tokenizers.Tokenizer, name: str):
        self._backend = backend
        self.name = name
        # GPT-2 and GPT-NeoX use "<|endoftext|>" both to end and to start a document.
        self.eos_token_id: int | None = backend.token_to_id(_EOS)
        self.bos_token_id: int | None = self.eos_token_id
        vocab = backend.get_vocab(with_added_tokens=True)
        self.vocab_size: int = max(vocab.values()) + 1 if vocab else 0
        self._skipped_ids: dict[tuple[str, ...], frozenset[int]] = {}  # decode(keep=...)'s, by keep

    def __repr__(self) -> str:
        return f"Tokenizer({self.name!r}, vocab_size={self.vocab_size})"

    def same_vocabulary(self, other: Tokenizer) -> bool:
        """Whether both map the same strings to the same ids (the tokenizer of two Pythias or two GPT-Neos)."""
        return self is other or self._vocabulary == other._vocabulary

    @functools.cached_property
    def _vocabulary(self) -> dict[str, int]:  # (read once: the library builds it anew on every call, ~30 ms)
        return self._backend.get_vocab(with_added_tokens=True)

    @classmethod
    def from_file(cls, path) -> Tokenizer:
        """Load a Hugging Face ``tokenizer.json``."""
        path = Path(path)
        if not path.is_file():
            raise NeolmError(f"tokenizer file not found: {path}")
        try:
            backend = tokenizers.Tokenizer.from_file(str(path))
        except Exception as error:  # the library raises plain Exception for malformed files
            raise NeolmError(f"cannot read tokenizer file {path}: {_one_line(error)}") from error
        return cls(backend, str(path))

    @classmethod
    def from_vocab_merges(cls, vocab, merges) -> Tokenizer:
        """Build a GPT-2-style byte-level BPE from ``vocab.json`` and ``merges.txt``.

        Same pipeline as Hugging Face's gpt2 tokenizer.json: no normaliser, ByteLevel pre-tokenizer
        without prefix space, ByteLevel decoder, and "<|endoftext|>" as a special added token.
        """
        vocab, merges = Path(vocab), Path(merges)
        try:
            token_ids = json.loads(vocab.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError) as error:
            raise NeolmError(f"cannot read vocabulary file {vocab}: {_one_line(error)}") from error
        if not isinstance(token_ids, dict) or not all(
            isinstance(k, str) and isinstance(v, int) for k, v in token_ids.items()
        ):
            raise NeolmError(f"vocabulary file {vocab} is not a JSON object of token -> id")
        try:
            lines = merges.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as error:
            raise NeolmError(f"cannot read merges file {merges}: {_one_line(error)}") from error
        pairs = []
        for number, line in enumerate(lines, 1):
            if not line or (number == 1 and line.startswith("#version")):
                continue
            parts = line.split(" ")
            if len(parts) != 2 or not all(parts):
                raise NeolmError(f"merges file {merges}, line {number}: expected two tokens, got {line!r}")
            pairs.append((parts[0], parts[1]))
        try:
            model = models.BPE(vocab=token_ids, merges=pairs, fuse_unk=False)
        except Exception as error:  # e.g. a merge whose tokens are not in the vocabulary
            raise NeolmError(f"merges file {merges} does not fit {vocab}: {_one_line(error)}") from error
        backend = tokenizers.Tokenizer(model)
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        backend.decoder = decoders.ByteLevel()
        backend.post_processor = processors.ByteLevel(trim_offsets=False)
        backend.add_special_tokens([AddedToken(_EOS, special=True)])
        return cls(backend, f"{vocab} + {merges.name}")

    @classmethod
    def builtin(cls, name: str) -> Tokenizer:
        """One of the tokenizers shipped with neolm (see `BUILTIN`)."""
        if name not in BUILTIN:
            raise NeolmError(f"unknown built-in tokenizer {name!r}; known: {', '.join(BUILTIN)}")
        return _load_builtin(name)

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`. No special tokens are added (GPT-2 and NeoX add none)."""
        _check_text(text)
        return self._backend.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """`encode` for many texts at once (parallel batch encoding)."""
        for text in texts:
            _check_text(text)
        return [e.ids for e in self._backend.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True, keep: Iterable[str] = ()) -> str:
        """Text of `ids` (any iterable of ints, e.g. a 1-D tensor). Ids outside the vocabulary are dropped;
        byte sequences that are not valid UTF-8 come out as U+FFFD. keep: special tokens (as written) that stay
        in the text when the others are skipped (a tool-call format's markers, such as Mistral's [TOOL_CALLS])."""
        ids = [int(i) for i in ids]
        keep = tuple(keep)
        if skip_special_tokens and keep:
            skipped = self._skipped(keep)
            return self._backend.decode([i for i in ids if i not in skipped], skip_special_tokens=False)
        return self._backend.decode(ids, skip_special_tokens=skip_special_tokens)

    def _skipped(self, keep: tuple[str, ...]) -> frozenset[int]:
        """The special tokens' ids less those of `keep` (remembered: a stream decodes with them every token)."""
        if keep not in self._skipped_ids:
            kept = {self._backend.token_to_id(token) for token in keep}
            self._skipped_ids[keep] = frozenset(self.special_ids() - kept)
        return self._skipped_ids[keep]

    def save(self, folder) -> None:
        """Write tokenizer.json (+ a minimal tokenizer_config.json) that neolm and Hugging Face tools load."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self._backend.save(str(folder / "tokenizer.json"))
        eos = _EOS if self.eos_token_id is not None else None
        config = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": eos, "bos_token": eos, "unk_token": eos,
                  "model_max_length": 1_000_000, "add_prefix_space": False}  # fmt: skip
        (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes one token stands for: with a byte-level vocabulary, possibly part of a UTF-8 character.
        Special tokens come as spelled ("<|endoftext|>"); an id outside the vocabulary as b""."""
        token = self._backend.id_to_token(int(token_id))
        if token is None:
            return b""
        if isinstance(self._backend.decoder, decoders.ByteLevel) and all(c in _BYTE_OF for c in token):
            return bytes(_BYTE_OF[c] for c in token)
        return token.encode()

    def special_ids(self) -> set[int]:
        """Ids of the special tokens ("<|endoftext|>", ...), which stand for no text."""
        return {i for i, token in self._backend.get_added_tokens_decoder().items() if token.special}

    def token_to_id(self, token: str) -> int | None:
        """Id of a vocabulary entry (in its byte-level spelling, e.g. "Ġworld"), or None."""
        return self._backend.token_to_id(token)


@functools.lru_cache(maxsize=None)
def _load_builtin(name: str) -> Tokenizer:
    """Load a shipped tokenizer once; instances are read-only, so they are shared."""
    folder = _BUILTIN_DIR / name
    if (folder / "tokenizer.json").is_file():
        tokenizer = Tokenizer.from_file(folder / "tokenizer.json")
    else:
        tokenizer = Tokenizer.from_vocab_merges(folder / "vocab.json", folder / "merges.txt")
    tokenizer.name = f"{name} (built-in)"
    return tokenizer


def load_tokenizer(folder, default: str) -> Tokenizer:
    """The tokenizer for a checkpoint folder.

    The folder's own ``tokenizer.json`` wins, else its ``vocab.json`` + ``merges.txt``, else the built-in
    `default` (one of `BUILTIN`). `folder` may be None. Corrupt files, or only one of vocab.json and
    merges.txt, raise `NeolmError` naming the file.
    """
    if folder is not None:
        folder = Path(folder)
        if (folder / "tokenizer.json").is_file():
            return Tokenizer.from_file(folder / "tokenizer.json")
        vocab, merges = folder / "vocab.json", folder / "merges.txt"
        if vocab.is_file() and merges.is_file():
            return Tokenizer.from_vocab_merges(vocab, merges)
        if vocab.is_file() or merges.is_file():
            present, missing = (vocab, merges) if vocab.is_file() else (merges, vocab)
            raise NeolmError(f"{present} needs {missing.name} beside it (or a tokenizer.json)")
    logger.debug("no tokenizer files in %s, using built-in %s", folder, default)
    return Tokenizer.builtin(default)


class StreamDecoder:
    """Incremental detokenizer for streaming generation.

    ``push(token_id)`` returns the newly completed text (possibly "") and ``flush()`` what is still held
    back at the end; joined, they equal ``tokenizer.decode(all_ids)``. Byte-level BPE can split one
    character over several tokens, so text whose decoding ends in U+FFFD (an unfinished UTF-8 sequence) is
    held back until a later token completes it.

    This is the prefix/read-offset technique of Hugging Face's TextStreamer and vLLM: only a small window
    is decoded per token -- the tokens emitted last time (as context, for decoders whose output depends on
    neighbours) plus the ones held back. A window that keeps ending in U+FFFD for more than `max_held`
    tokens can only be a run of invalid bytes (garbage from an untrained model); it is then released as
    decoded, which keeps each push cheap, and only in that case may the U+FFFDs differ from a one-shot decode.
    """

    max_held = 32

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True, keep: Iterable[str] = ()):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.keep = tuple(keep)  # special tokens kept in the text (Tokenizer.decode's keep)
        self._ids: list[int] = []  # _ids[:_read] were emitted last time (context), _ids[_read:] are held
        self._read = 0

    def _decode(self, ids: list[int]) -> str:
        if self.keep:
            return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens, keep=self.keep)
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def push(self, token_id: int) -> str:
        """Add one generated id; return the text it completes (possibly "")."""
        self._ids.append(int(token_id))
        text = self._decode(self._ids)
        if text.endswith("\ufffd") and len(self._ids) - self._read <= self.max_held:
            return ""
        piece = text[len(self._decode(self._ids[: self._read])) :]
        self._ids = self._ids[self._read :]
        self._read = len(self._ids)
        return piece

    def flush(self) -> str:
        """Return whatever is still held back and start over."""
        piece = ""
        if len(self._ids) > self._read:
            piece = self._decode(self._ids)[len(self._decode(self._ids[: self._read])) :]
        self._ids, self._read = [], 0
        return piece
