"""Where text comes from: files, folders, globs, .jsonl records, Hugging Face datasets, and the
default corpus (the running interpreter's standard library source, real text on every machine).

A corpus is a list of named documents (raw bytes) in a deterministic order, split into training
and validation by a hash of each document's name, so the split does not depend on file order.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import sysconfig
from dataclasses import dataclass
from pathlib import Path

from ..errors import UsageError

DEFAULT_CORPUS = "stdlib"
# Bump when how documents are read, named or split changes in a way the source hash below cannot see
# (a dependency's behaviour, say). reader_fingerprint() also hashes the rules' own source.
READER_VERSION = 2
# Suffixes read as text inside folders; anything else in a folder is skipped (binaries, images).
TEXT_SUFFIXES = {".txt", ".md", ".rst", ".py", ".jsonl", ".json", ".c", ".h", ".html", ".tex", ".csv", ".toml",
                 ".yaml", ".yml", ".js", ".ts", ".rs", ".go", ".java", ".cpp", ".sh", ".ini", ".cfg"}


@dataclass
class Document:
    name: str
    data: bytes


@dataclass
class Source:
    """One entry of --data, resolved to the files (or dataset) it stands for, before reading them."""

    spec: str
    files: list[Path]
    hf: tuple[str, str | None] | None = None
    root: Path | None = None  # the folder given (or a glob's fixed prefix): names are relative to it

    def name_of(self, f: Path) -> str:
        """A document's name relative to the folder the user named, so the split depends neither on where
        the corpus lies nor on files added elsewhere."""
        return str(f.relative_to(self.root)) if self.root is not None else f.name

    def fingerprint(self) -> str:
        """Changes when any file is added, removed, resized or touched: the token cache key."""
        h = hashlib.sha256(self.spec.encode())
        for f in self.files:
            st = f.stat()
            h.update(f"{f}|{st.st_size}|{st.st_mtime_ns}".encode())
        return h.hexdigest()


def stdlib_files() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"site-packages", "dist-packages", "__pycache__"}
    return sorted(p for p in root.rglob("*.py") if not skip & set(p.relative_to(root).parts))


def resolve(data: str | None) -> list[Source]:
    """Turn the --data string (comma-separated entries) into sources, with clear errors."""
    if data is None or data == DEFAULT_CORPUS:
        return [Source(DEFAULT_CORPUS, stdlib_files(), root=Path(sysconfig.get_paths()["stdlib"]))]
    sources = []
    for spec in (s.strip() for s in data.split(",")):
        if not spec:
            continue
        if spec == DEFAULT_CORPUS:  # the standard library's code beside other sources: "stdlib,notes/"
            sources.append(Source(DEFAULT_CORPUS, stdlib_files(), root=Path(sysconfig.get_paths()["stdlib"])))
        elif spec.startswith("hf:"):
            parts = spec[3:].split(":")
            if not parts[0] or len(parts) > 2:
                raise UsageError(f"`data` {spec!r}: write hf:NAME or hf:NAME:CONFIG")
            sources.append(Source(spec, [], hf=(parts[0], parts[1] if len(parts) == 2 else None)))
        else:
            files, root = _files_of(spec)
            sources.append(Source(spec, files, root=root))
    if not sources:
        raise UsageError("`data` is empty; give a file, folder, glob, .jsonl or hf:NAME")
    return sources


def _files_of(spec: str) -> tuple[list[Path], Path | None]:
    """The files of one --data entry, and the folder their names are taken relative to (None: the file name)."""
    path = Path(spec).expanduser()
    if any(ch in spec for ch in "*?["):
        files = sorted(Path(p) for p in glob.glob(os.path.expanduser(spec), recursive=True) if Path(p).is_file())
        if not files:
            raise UsageError(f"`data` {spec!r}: the pattern matches no file; check the glob")
        fixed = [part for part in Path(os.path.expanduser(spec)).parts]
        prefix = Path(*fixed[:next(i for i, p in enumerate(fixed) if any(c in p for c in "*?["))] or ["."])
        return files, prefix
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES)
        if not files:
            raise UsageError(f"`data` {spec!r}: the folder holds no text file ({', '.join(sorted(TEXT_SUFFIXES))})")
        return files, path
    if path.is_file():
        return [path], None
    raise UsageError(f"`data` {spec!r}: no such file or folder; check the path")


def read_documents(sources: list[Source], text_field: str = "text") -> list[Document]:
    docs: list[Document] = []
    for src in sources:
        if src.hf is not None:
            docs.extend(_hf_documents(src, text_field))
            continue
        for f in src.files:
            if f.suffix.lower() == ".jsonl":
                docs.extend(_jsonl_documents(f, src.name_of(f), text_field))
            else:
                docs.append(Document(src.name_of(f), f.read_bytes()))
    docs = [d for d in docs if d.data]
    if not docs:
        raise UsageError(f"`data` {','.join(s.spec for s in sources)}: no text found (all files are empty)")
    return docs


def _jsonl_documents(path: Path, name: str, text_field: str) -> list[Document]:
    docs = []
    with open(path, "rb") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise UsageError(f"{path}:{lineno} is not valid JSON ({e.msg}); fix the line or remove it") from None
            if not isinstance(record, dict) or not isinstance(record.get(text_field), str):
                raise UsageError(f"{path}:{lineno} has no string field {text_field!r}; "
                                 "name the field with `text_field`")
            docs.append(Document(f"{name}:{lineno}", record[text_field].encode("utf-8", "surrogatepass")))
    return docs


def _hf_documents(src: Source, text_field: str) -> list[Document]:
    name, config = src.hf
    try:
        import datasets

        ds = datasets.load_dataset(name, config, split="train")
    except Exception as e:  # no network, unknown name, missing config: all end here
        first_line = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise UsageError(f"could not load Hugging Face dataset {src.spec!r} ({first_line}); "
                         "check the name and the network, or give local files as `data`") from None
    if text_field not in ds.column_names:
        raise UsageError(f"{src.spec} has no column {text_field!r} (columns: {', '.join(ds.column_names)}); "
                         "name it with `text_field`")
    return [Document(f"{src.spec}#{i}", t.encode("utf-8")) for i, t in enumerate(ds[text_field]) if t]


def is_validation(name: str, val_fraction: float) -> bool:
    """Deterministic split by document name: stable when files are added or reordered."""
    h = int.from_bytes(hashlib.sha256(name.encode("utf-8", "surrogatepass")).digest()[:8], "big")
    return h / 2**64 < val_fraction


def split(docs: list[Document], val_fraction: float) -> tuple[list[Document], list[Document], str]:
    """Training and validation documents, and how the split was made.

    By document when both sides get at least one; otherwise (a single file, say) the last
    val_fraction of each document's bytes goes to validation.
    """
    train = [d for d in docs if not is_validation(d.name, val_fraction)]
    val = [d for d in docs if is_validation(d.name, val_fraction)]
    if train and val:
        return train, val, "by document"
    train, val = [], []
    for d in docs:
        cut = int(len(d.data) * (1 - val_fraction))
        train.append(Document(d.name, d.data[:cut]))
        val.append(Document(d.name, d.data[cut:]))
    return train, val, "by position (too few documents to split by document)"


def reader_fingerprint() -> str:
    """What decides the documents and the split besides the files: this reader's version and the source of
    its naming, reading and split rules. Part of every token cache key, so a cache written under other
    rules is never read as current."""
    import inspect

    rules = [Source.name_of, stdlib_files, resolve, _files_of, read_documents, _jsonl_documents, _hf_documents,
             is_validation, split]
    h = hashlib.sha256(str(READER_VERSION).encode())
    for rule in rules:
        try:
            h.update(inspect.getsource(rule).encode())
        except (OSError, TypeError):  # installed without sources: the package's version stands for them
            from importlib.metadata import PackageNotFoundError, version

            try:
                h.update(version("mixturelm").encode())
            except PackageNotFoundError:
                pass
            break
    return h.hexdigest()[:12]


def content_fingerprint(train: list[Document], val: list[Document]) -> str:
    """A hash of the split itself (every document's name and bytes, on each side): equal on two machines
    exactly when they train and evaluate on the same text, wherever the files lie."""
    h = hashlib.sha256()
    for side, docs in (("train", train), ("val", val)):
        h.update(f"{side}|{len(docs)}".encode())
        for d in docs:
            h.update(f"|{d.name}|{len(d.data)}|".encode("utf-8", "surrogatepass"))
            h.update(hashlib.sha256(d.data).digest())
    return h.hexdigest()[:20]


def count_non_utf8(data: bytes) -> int:
    """Bytes that are not part of valid UTF-8 (they are kept as bytes, or replaced for BPE, and counted)."""
    try:
        data.decode("utf-8")
        return 0
    except UnicodeDecodeError:
        return len(data) - len(data.decode("utf-8", "ignore").encode("utf-8"))
