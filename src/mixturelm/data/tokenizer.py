"""Tokenizers: raw bytes (the default; lossless, any input), and byte-level BPE trained locally with
Hugging Face `tokenizers` and saved beside each checkpoint as tokenizer.json.

Each tokenizer appends an end-of-document token between documents in the token stream.
"""

from __future__ import annotations

import hashlib
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
        return "bpe-" + hashlib.sha256(self.tok.to_str().encode()).hexdigest()[:16]


class HFTokenizer(BPETokenizer):
    """The tokenizer of a Hugging Face model folder (tokenizer.json, and tokenizer_config.json for its
    special tokens), as imported models and Hugging Face experts use it. Documents are encoded without
    the special tokens a tokenizer's post-processor adds (a BOS per call): the stream puts its own
    end-of-document token between documents, as for every other tokenizer."""

    def __init__(self, tok, eos_token: str | None, bos_token: str | None = None) -> None:
        self.tok = tok
        self.vocab_size = tok.get_vocab_size(with_added_tokens=True)
        self.eos_token, self.bos_token = eos_token, bos_token
        self.eos_id = tok.token_to_id(eos_token) if eos_token else None
        self.bos_id = tok.token_to_id(bos_token) if bos_token else None
        if self.eos_id is None:  # a stream needs a separator: the tokenizer's own end token, or none at all
            raise UsageError(f"the tokenizer has no end-of-text token ({eos_token!r} is not in its vocabulary); "
                             "set eos_token in tokenizer_config.json")
        self.name = f"hf:{self.vocab_size}"

    @classmethod
    def from_dir(cls, directory: Path) -> HFTokenizer:
        """From a folder holding tokenizer.json (and tokenizer_config.json naming eos_token)."""
        from tokenizers import Tokenizer

        directory = Path(directory)
        path = directory / "tokenizer.json"
        if not path.is_file():
            raise UsageError(f"{directory} has no tokenizer.json; export the tokenizer in the fast format "
                             "(tokenizer.save_pretrained) beside the model")
        try:
            tok = Tokenizer.from_file(str(path))
        except Exception as e:
            raise UsageError(f"{path} is not a valid tokenizer file ({str(e)[:100]}); restore it") from None
        special = _special_tokens(directory)
        return cls(tok, special.get("eos_token"), special.get("bos_token"))

    def encode(self, data: bytes) -> np.ndarray:
        return np.asarray(self.tok.encode(data.decode("utf-8", "replace"), add_special_tokens=False).ids,
                          dtype=np.int64)

    def encode_prompt(self, data: bytes) -> np.ndarray:
        """A prompt as the model's own library encodes it: with the special tokens the tokenizer adds (the BOS
        that Llama-family models expect at the start of a text)."""
        return np.asarray(self.tok.encode(data.decode("utf-8", "replace")).ids, dtype=np.int64)

    def encode_batch(self, datas: list[bytes]) -> list[np.ndarray]:
        encs = self.tok.encode_batch([d.decode("utf-8", "replace") for d in datas], add_special_tokens=False)
        return [np.asarray(e.ids, dtype=np.int64) for e in encs]

    def fingerprint(self) -> str:
        """The tokenizer file and the end-of-text token it puts between documents (two models may share a
        tokenizer.json and differ in it). The same tokenizer.json trained here (bpe:VOCAB) gets the same
        fingerprint when its end token is mixturelm's own."""
        base = super().fingerprint()
        return base if self.eos_token == EOS else f"{base}-{hashlib.sha256(self.eos_token.encode()).hexdigest()[:8]}"

    def save(self, directory: Path) -> None:
        self.tok.save(str(Path(directory) / "tokenizer.json"))
        config = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": self.eos_token}
        if self.bos_token:
            config["bos_token"] = self.bos_token
        (Path(directory) / "tokenizer_config.json").write_text(json.dumps(config, indent=1))



def from_hf_folder(directory: Path):
    """The tokenizer of a Hugging Face folder: mixturelm's byte tokenizer when the folder says it is one
    (export-hf writes that mark), else the folder's tokenizer.json."""
    try:
        mark = json.loads((Path(directory) / "tokenizer_config.json").read_text()).get("mixturelm_tokenizer")
    except (OSError, ValueError, AttributeError):
        mark = None
    return ByteTokenizer() if mark == ByteTokenizer.name else HFTokenizer.from_dir(directory)


def _special_tokens(directory: Path) -> dict[str, str]:
    """eos_token and bos_token of a Hugging Face folder: tokenizer_config.json, else special_tokens_map.json,
    else the token named by config.json's eos_token_id in tokenizer.json."""
    found: dict[str, str] = {}
    for name in ("special_tokens_map.json", "tokenizer_config.json"):
        try:
            d = json.loads((directory / name).read_text())
        except (OSError, ValueError):
            continue
        if not isinstance(d, dict):
            raise UsageError(f"{directory / name} is not a JSON object; restore it")
        for key in ("eos_token", "bos_token"):
            v = d.get(key)
            v = v.get("content") if isinstance(v, dict) else v
            if isinstance(v, str):
                found[key] = v
    if "eos_token" not in found:
        try:
            eos_id = json.loads((directory / "config.json").read_text()).get("eos_token_id")
            added = json.loads((directory / "tokenizer.json").read_text()).get("added_tokens", [])
            eos_id = eos_id[0] if isinstance(eos_id, list) else eos_id
            found.update({"eos_token": t["content"] for t in added if t.get("id") == eos_id})
        except (OSError, ValueError, AttributeError):
            pass
    return found


def parse_spec(spec: str) -> tuple[str, int | None]:
    """'bytes', 'bpe:VOCAB' or 'hf:VOCAB' (a Hugging Face model's tokenizer, saved with the run) -> (kind, vocab size)."""
    if spec == "bytes":
        return "bytes", None
    if spec.startswith("hf:") and spec[3:].isdigit():
        return "hf", int(spec[3:])
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
    if kind == "hf":
        return HFTokenizer.from_dir(directory)
    path = Path(directory) / "tokenizer.json"
    if not path.is_file():
        raise UsageError(f"{directory} uses {spec} but has no tokenizer.json; the checkpoint is incomplete")
    return BPETokenizer.load(path)


def describe(tok) -> str:
    return json.dumps({"name": tok.name, "vocab_size": tok.vocab_size, "eos_id": tok.eos_id})
