"""Tokenizers: raw bytes (the default; lossless, any input), and byte-level BPE trained locally with
Hugging Face `tokenizers` and saved beside each checkpoint as tokenizer.json.

Each tokenizer appends an end-of-document token between documents in the token stream.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..errors import UsageError

EOS = "<|endoftext|>"


class ByteTokenizer:
    name = "bytes"
    vocab_size = 257
    eos_id = 256

    def encode(self, data: bytes) -> np.ndarray:
        return np.frombuffer(data, dtype=np.uint8).astype(np.int64)

    def decode(self, ids) -> str:
        return bytes(int(i) for i in ids if int(i) < 256).decode("utf-8", "replace")

    def save(self, directory: Path) -> None:
        pass  # nothing to save: the name "bytes" in the config is the whole tokenizer

    def fingerprint(self) -> str:
        return self.name


class BPETokenizer:
    """Byte-level BPE: every byte sequence is representable, so nothing is ever out of vocabulary."""

    def __init__(self, tok) -> None:
        self.tok = tok
        self.vocab_size = tok.get_vocab_size()
        self.eos_id = tok.token_to_id(EOS)
        self.name = f"bpe:{self.vocab_size}"

    @classmethod
    def train(cls, texts, vocab_size: int) -> BPETokenizer:
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS], show_progress=False,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        tok.train_from_iterator(texts, trainer=trainer)
        return cls(tok)

    @classmethod
    def load(cls, path: Path) -> BPETokenizer:
        from tokenizers import Tokenizer

        try:
            return cls(Tokenizer.from_file(str(path)))
        except Exception as e:
            raise UsageError(f"{path} is not a valid tokenizer file ({e}); retrain or restore it") from None

    def encode(self, data: bytes) -> np.ndarray:
        # Invalid UTF-8 becomes U+FFFD here; corpus statistics count those bytes.
        return np.asarray(self.tok.encode(data.decode("utf-8", "replace")).ids, dtype=np.int64)

    def encode_batch(self, datas: list[bytes]) -> list[np.ndarray]:
        encs = self.tok.encode_batch([d.decode("utf-8", "replace") for d in datas])
        return [np.asarray(e.ids, dtype=np.int64) for e in encs]

    def decode(self, ids) -> str:
        return self.tok.decode([int(i) for i in ids if int(i) != self.eos_id])

    def save(self, directory: Path) -> None:
        self.tok.save(str(Path(directory) / "tokenizer.json"))

    def fingerprint(self) -> str:
        import hashlib

        return "bpe-" + hashlib.sha256(self.tok.to_str().encode()).hexdigest()[:16]


def parse_spec(spec: str) -> tuple[str, int | None]:
    """'bytes' or 'bpe:VOCAB' -> (kind, vocab size)."""
    if spec == "bytes":
        return "bytes", None
    if spec.startswith("bpe:"):
        try:
            vocab = int(spec[4:])
        except ValueError:
            vocab = 0
        if vocab < 300:
            raise UsageError(f"`tokenizer` {spec!r}: write bpe:VOCAB with VOCAB >= 300 (e.g. bpe:8192)")
        return "bpe", vocab
    raise UsageError(f"`tokenizer` {spec!r} is unknown; use bytes or bpe:VOCAB (e.g. bpe:8192)")


def load_from_dir(directory: Path, spec: str):
    """The tokenizer a run or checkpoint saved: bytes by name, BPE from its tokenizer.json."""
    kind, _ = parse_spec(spec)
    if kind == "bytes":
        return ByteTokenizer()
    path = Path(directory) / "tokenizer.json"
    if not path.is_file():
        raise UsageError(f"{directory} uses {spec} but has no tokenizer.json; the checkpoint is incomplete")
    return BPETokenizer.load(path)


def describe(tok) -> str:
    return json.dumps({"name": tok.name, "vocab_size": tok.vocab_size, "eos_id": tok.eos_id})
