"""Token streams: a corpus tokenised once and cached on disk, and the batches drawn from it.

The cache lives in $MIXTURELM_CACHE (default ~/.cache/mixturelm), keyed by everything that decides the
tokens: the files (names, sizes, modification times), the validation fraction and text field, the reader
(its version and the source of its naming and split rules: corpus.reader_fingerprint) and the tokenizer.
Each cache also records a hash of the split's content, which results carry so that two runs can be told
apart when they saw different text. Training batches are random
windows chosen by a generator seeded with (seed, step): the data position of a run is its step,
so resuming and data parallelism see exactly the batches an uninterrupted single process sees.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import UsageError
from ..files import write_text_atomic
from . import corpus
from .tokenizer import BPETokenizer, ByteTokenizer, parse_spec


@dataclass
class TokenSplit:
    tokens: np.ndarray  # 1-D, documents joined by the tokenizer's end-of-document token
    n_bytes: int  # bytes of text these tokens encode (for bits per byte)
    n_docs: int

    @property
    def bytes_per_token(self) -> float:
        return self.n_bytes / max(1, len(self.tokens))


@dataclass
class TokenData:
    train: TokenSplit
    val: TokenSplit
    tokenizer: object
    stats: dict


def cache_root() -> Path:
    return Path(os.environ.get("MIXTURELM_CACHE", Path.home() / ".cache" / "mixturelm"))


def prepare(data: str | None, tokenizer_spec: str, val_fraction: float, text_field: str = "text",
            tokenizer=None, log=print) -> TokenData:
    """Resolve, read, split and tokenise a corpus, or load it from the cache.

    `tokenizer` is given when it is already fixed (resuming, evaluating a checkpoint); otherwise it is
    made from `tokenizer_spec`, BPE being trained on the training split and cached too.
    """
    sources = corpus.resolve(data)
    files_key = hashlib.sha256("|".join([s.fingerprint() for s in sources] + [str(val_fraction), text_field]).encode())
    corpus_key = f"{files_key.hexdigest()[:20]}-r{corpus.reader_fingerprint()}"
    docs = None

    def documents():
        nonlocal docs
        if docs is None:
            log(f"reading corpus {data or corpus.DEFAULT_CORPUS} ...")
            docs = corpus.split(corpus.read_documents(sources, text_field), val_fraction)
        return docs

    if tokenizer is None:
        tokenizer = _tokenizer(tokenizer_spec, corpus_key, documents, log)
    token_dir = cache_root() / f"tokens-{corpus_key}-{tokenizer.fingerprint()}"
    if not (token_dir / "meta.json").is_file():
        _say_if_other_reader(files_key.hexdigest()[:20], tokenizer.fingerprint(), log)
        train_docs, val_docs, how = documents()
        log(f"tokenising {len(train_docs)} + {len(val_docs)} documents with {tokenizer.name} ...")
        _write_cache(token_dir, tokenizer, train_docs, val_docs, how)
    return _load_cache(token_dir, tokenizer)


def _say_if_other_reader(files_key: str, tokenizer_fp: str, log) -> None:
    """A cache of the same files and tokenizer written under other reading or split rules (another version
    of mixturelm) is left alone, and said so: its split is not this version's."""
    others = sorted(cache_root().glob(f"tokens-{files_key}-*{tokenizer_fp}"))
    if others:
        log(f"the token cache {others[-1].name} was written by another version of mixturelm's corpus reader "
            "(other naming or split rules): not used; tokenising again")


def _tokenizer(spec: str, corpus_key: str, documents, log):
    kind, vocab = parse_spec(spec)
    if kind == "bytes":
        return ByteTokenizer()
    if kind == "hf":
        raise UsageError(f"tokenizer {spec} is a Hugging Face model's own: it comes with the run made by "
                         "`mixturelm import-hf`; train from that run, or choose bytes or bpe:VOCAB")
    path = cache_root() / f"bpe-{corpus_key}-{vocab}.json"  # trained on the split: keyed like it
    if path.is_file():
        return BPETokenizer.load(path)
    train_docs = documents()[0]
    log(f"training a {vocab}-token BPE on {sum(len(d.data) for d in train_docs):,} bytes ...")
    tok = BPETokenizer.train((d.data.decode("utf-8", "replace") for d in train_docs), vocab)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, tok.tok.to_str(pretty=True))
    return tok


def _encode(tokenizer, docs: list[corpus.Document]) -> np.ndarray:
    if isinstance(tokenizer, BPETokenizer):
        pieces = []
        for i in range(0, len(docs), 256):
            pieces.extend(tokenizer.encode_batch([d.data for d in docs[i:i + 256]]))
    else:
        pieces = [tokenizer.encode(d.data) for d in docs]
    eos = np.array([tokenizer.eos_id], dtype=np.int64)
    return np.concatenate([x for p in pieces for x in (p, eos)])


def _write_cache(token_dir: Path, tokenizer, train_docs, val_docs, how: str) -> None:
    token_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=token_dir.parent, prefix=".tmp-tokens-"))
    dtype = np.uint16 if tokenizer.vocab_size <= 65536 else np.uint32
    meta = {"tokenizer": tokenizer.name, "dtype": np.dtype(dtype).name, "split": how,
            "reader": corpus.reader_fingerprint(), "fingerprint": corpus.content_fingerprint(train_docs, val_docs)}
    for name, docs in (("train", train_docs), ("val", val_docs)):
        tokens = _encode(tokenizer, docs).astype(dtype)
        tokens.tofile(tmp / f"{name}.bin")
        meta[name] = {"tokens": int(len(tokens)), "bytes": sum(len(d.data) for d in docs), "docs": len(docs),
                      "non_utf8_bytes": sum(corpus.count_non_utf8(d.data) for d in docs)}
    (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
    try:
        os.rename(tmp, token_dir)  # atomic: another process may have written the same cache meanwhile
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)


def _load_cache(token_dir: Path, tokenizer) -> TokenData:
    meta = json.loads((token_dir / "meta.json").read_text())
    splits = {}
    for name in ("train", "val"):
        tokens = np.memmap(token_dir / f"{name}.bin", dtype=meta["dtype"], mode="r")
        splits[name] = TokenSplit(tokens, meta[name]["bytes"], meta[name]["docs"])
    stats = {k: meta[k] for k in ("train", "val", "split", "fingerprint")} | {"cache_key": token_dir.name}
    return TokenData(splits["train"], splits["val"], tokenizer, stats)


def same_split(recorded: dict, stats: dict) -> bool:
    """Whether a run's recorded corpus (its data.json, results.json's `corpus`) is the text of `stats`: the
    content fingerprint where both have one; for records written before it existed, the tokens, bytes and
    documents of each side (a split made by other rules differs in them)."""
    if recorded.get("fingerprint") and stats.get("fingerprint"):
        return recorded["fingerprint"] == stats["fingerprint"]
    return all(recorded.get(side) == stats.get(side) for side in ("train", "val"))


def check_length(split: TokenSplit, seq_len: int, what: str) -> None:
    if len(split.tokens) < seq_len + 1:
        raise UsageError(f"the {what} split has {len(split.tokens)} tokens, fewer than one sequence of "
                         f"{seq_len + 1}; give more data or a shorter `seq_len`")


def train_rows(split: TokenSplit, step: int, seed: int, rows: int, seq_len: int) -> torch.Tensor:
    """The global batch of optimizer step `step`: (rows, seq_len + 1) token windows."""
    rng = np.random.default_rng([seed, step])
    starts = rng.integers(0, len(split.tokens) - seq_len, size=rows)
    idx = starts[:, None] + np.arange(seq_len + 1)
    return torch.from_numpy(split.tokens[idx].astype(np.int64))


def val_windows(split: TokenSplit, seq_len: int, max_tokens: int) -> torch.Tensor:
    """Non-overlapping windows from the start of the validation split: the same tokens for every run."""
    n = max(1, min(max_tokens // seq_len, (len(split.tokens) - 1) // seq_len))
    idx = np.arange(n)[:, None] * seq_len + np.arange(seq_len + 1)
    return torch.from_numpy(split.tokens[idx].astype(np.int64))
