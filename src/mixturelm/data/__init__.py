"""Corpora, tokenizers and token streams."""

from .corpus import Document, read_documents, resolve, split
from .tokenizer import BPETokenizer, ByteTokenizer
from .tokens import TokenData, TokenSplit, prepare, train_rows, val_windows

__all__ = ["BPETokenizer", "ByteTokenizer", "Document", "TokenData", "TokenSplit", "prepare", "read_documents",
           "resolve", "split", "train_rows", "val_windows"]
