"""Packed token files: `neolm prepare-data` writes them, training samples windows from them.

A prepared folder holds train.bin and val.bin (flat token ids, uint16 when the vocabulary has fewer than
65,536 ids, else uint32, memory-mapped at training time) with the end-of-text token after every document,
and meta.json (tokenizer, dtype, counts, and which documents went to validation). The validation split is
chosen by whole documents: by file-name pattern (e.g. two held-out plays) or a seeded random fraction.
"""

from __future__ import annotations

import fnmatch
import json
import logging
import os
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from neolm.errors import NeolmError
from neolm.tokenizer import Tokenizer

log = logging.getLogger(__name__)

TEXT_SUFFIXES = (".txt", ".md", ".text")
JSONL_SUFFIXES = (".jsonl", ".json")


@dataclass
class Document:
    name: str  # file name, or file:line for JSONL records
    text: str


def iter_documents(inputs: list[str | Path], text_field: str = "text") -> Iterator[Document]:
    """Every document in text files, folders of them (recursively, sorted) and JSONL files."""
    for item in inputs:
        path = Path(item)
        if not path.exists():
            raise NeolmError(f"no such file or folder: {path}")
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        files = [p for p in files if p.suffix.lower() in TEXT_SUFFIXES + JSONL_SUFFIXES] if path.is_dir() else files
        for file in files:
            if file.suffix.lower() in JSONL_SUFFIXES:
                yield from _jsonl_documents(file, text_field)
            else:
                try:
                    yield Document(file.name, file.read_text(encoding="utf-8"))
                except UnicodeDecodeError as e:
                    raise NeolmError(f"{file} is not UTF-8 text (byte {e.start})") from None


def _jsonl_documents(file: Path, text_field: str) -> Iterator[Document]:
    with open(file, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                text = record[text_field]
            except json.JSONDecodeError:
                raise NeolmError(f"{file}:{n} is not valid JSON") from None
            except (KeyError, TypeError):
                raise NeolmError(f"{file}:{n} has no {text_field!r} field (choose one with --text-field)") from None
            if not isinstance(text, str):
                raise NeolmError(f"{file}:{n}: field {text_field!r} is not a string")
            yield Document(f"{file.name}:{n}", text)


def token_dtype(vocab_size: int):
    return np.uint16 if vocab_size < 2**16 else np.uint32


def prepare(
    inputs: list[str | Path],
    out: str | Path,
    tokenizer: Tokenizer,
    tokenizer_name: str,
    val_files: list[str] | None = None,
    val_fraction: float = 0.0,
    text_field: str = "text",
    seed: int = 0,
    batch_docs: int = 256,
    progress: bool = True,
) -> dict:
    """Tokenize `inputs` into out/train.bin, out/val.bin and out/meta.json; returns the metadata."""
    from tqdm.auto import tqdm

    out = Path(out)
    docs = list(iter_documents(inputs, text_field))
    docs = [d for d in docs if d.text.strip()]
    if not docs:
        raise NeolmError("no text found in the inputs (empty files, or no .txt/.jsonl files in the folders)")
    if val_files:
        is_val = [any(fnmatch.fnmatch(d.name, pattern) for pattern in val_files) for d in docs]
        unmatched = [p for p in val_files if not any(fnmatch.fnmatch(d.name, p) for d in docs)]
        if unmatched:
            raise NeolmError(f"--val-files pattern(s) matched no document: {', '.join(unmatched)}")
    else:
        rng = random.Random(seed)
        is_val = [rng.random() < val_fraction for _ in docs]
    if all(is_val):
        raise NeolmError("every document went to validation; nothing is left to train on")
    eos = tokenizer.eos_token_id
    if eos is None:
        raise NeolmError(f"tokenizer {tokenizer.name} has no end-of-text token to separate documents")
    dtype = token_dtype(tokenizer.vocab_size)
    out.mkdir(parents=True, exist_ok=True)
    counts = {"train": 0, "val": 0}
    start = time.perf_counter()
    tmp = {split: out / f"{split}.bin.tmp" for split in counts}
    files = {split: open(path, "wb") for split, path in tmp.items()}
    try:
        bar = tqdm(total=sum(len(d.text) for d in docs), unit="char", unit_scale=True, disable=not progress,
                   desc="tokenizing")  # fmt: skip
        for i in range(0, len(docs), batch_docs):
            chunk = docs[i : i + batch_docs]
            for doc, ids, val in zip(chunk, tokenizer.encode_batch([d.text for d in chunk]), is_val[i : i + batch_docs]):
                split = "val" if val else "train"
                np.asarray(ids + [eos], dtype=dtype).tofile(files[split])
                counts[split] += len(ids) + 1
            bar.update(sum(len(d.text) for d in chunk))
        bar.close()
    finally:
        for f in files.values():
            f.close()
    for split, path in tmp.items():
        os.replace(path, out / f"{split}.bin")
    seconds = time.perf_counter() - start
    meta = {
        "tokenizer": tokenizer_name,
        "vocab_size": tokenizer.vocab_size,
        "eos_token_id": eos,
        "dtype": np.dtype(dtype).name,
        "train_tokens": counts["train"],
        "val_tokens": counts["val"],
        "documents": len(docs),
        "val_documents": sorted(d.name for d, v in zip(docs, is_val) if v),
        "tokens_per_second": round(sum(counts.values()) / max(seconds, 1e-9)),
    }
    (out / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    log.info("%d documents -> %d train + %d val tokens in %.1fs", len(docs), counts["train"], counts["val"], seconds)
    return meta


class TokenData:
    """A prepared folder, memory-mapped. Windows are a pure function of (seed, step): resumable exactly."""

    def __init__(self, folder: str | Path):
        folder = Path(folder)
        meta_path = folder / "meta.json"
        if not meta_path.exists():
            raise NeolmError(f"{folder} is not a prepared data folder (no meta.json); run `neolm prepare-data` first")
        self.meta = json.loads(meta_path.read_text())
        self.splits = {}
        for split in ("train", "val"):
            path = folder / f"{split}.bin"
            if not path.exists():
                raise NeolmError(f"missing data file {path}")
            size = path.stat().st_size
            self.splits[split] = np.memmap(path, dtype=self.meta["dtype"], mode="r") if size else np.zeros(0, np.uint16)
        if len(self.splits["train"]) == 0:
            raise NeolmError(f"{folder}/train.bin is empty")

    def check(self, seq_len: int, vocab_size: int) -> None:
        if len(self.splits["train"]) < seq_len + 1:
            raise NeolmError(f"train.bin has {len(self.splits['train'])} tokens, fewer than one window of {seq_len + 1}")
        if self.meta["vocab_size"] > vocab_size:
            raise NeolmError(
                f"the data was tokenized with {self.meta['tokenizer']} ({self.meta['vocab_size']} ids), "
                f"more than the model's vocabulary of {vocab_size}"
            )

    def train_batch(self, seed: int, step: int, count: int, seq_len: int) -> torch.Tensor:
        """`count` random windows of seq_len + 1 tokens for global step `step`: (count, seq_len + 1) int64."""
        tokens = self.splits["train"]
        rng = np.random.default_rng([seed, step])
        starts = rng.integers(0, len(tokens) - seq_len, size=count)
        return torch.from_numpy(np.stack([tokens[s : s + seq_len + 1].astype(np.int64) for s in starts]))

    def val_windows(self, seq_len: int, limit: int) -> torch.Tensor:
        """Up to `limit` disjoint windows covering the validation tokens from the start: (n, seq_len + 1)."""
        tokens = self.splits["val"]
        n = min(limit, (len(tokens) - 1) // seq_len)
        return torch.from_numpy(
            np.stack([tokens[i * seq_len : i * seq_len + seq_len + 1].astype(np.int64) for i in range(n)])
            if n > 0
            else np.zeros((0, seq_len + 1), np.int64)
        )
