"""Writing results safely, in one place: atomic writes, output-folder checks, the machine description.

A file is written to a temporary name in its folder and renamed over the old one, so a reader (or a run
killed mid-write) sees the old content or the new, never half of it.
"""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path

from .errors import UsageError


def write_bytes_atomic(path: Path, data: bytes, *, sync: bool = False) -> None:
    """data to path by a temporary file and a rename; sync: on disk before the rename (checkpoints)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            if sync:
                fh.flush()
                os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:  # a full disk, say: no half-written temporary file left behind (a kill leaves one,
        tmp.unlink(missing_ok=True)  # which the next run of a training run clears)
        raise


def write_text_atomic(path: Path, text: str, *, sync: bool = False) -> None:
    write_bytes_atomic(path, text.encode("utf-8"), sync=sync)


def write_json_atomic(path: Path, obj, *, sync: bool = True) -> None:
    write_text_atomic(path, json.dumps(obj, indent=1), sync=sync)


def output_folder(path: str | Path, option: str = "`out`") -> Path:
    """A folder to write into: it may not exist yet, but it may not be a file. Checked before any work."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UsageError(f"{option} {path} is a file, not a folder; choose another {option}")
    return path


def machine() -> dict:
    """What a measurement ran on: processor, cores, threads, versions, GPU."""
    import torch

    cpu = platform.processor() or platform.machine()
    try:  # the model name says more than the architecture
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version(), "platform": platform.platform(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


# ----------------------------------------------------------------------------------------------
# Output folders: whose they are, and one writer at a time

MARKER = ".mixturelm-output"  # JSON {"kind": ...}: written by the command that owns the folder
LOCK = ".mixturelm-lock"  # held (flock) by the one process writing the folder; holds its pid


def _own(entry: Path) -> bool:
    return entry.name in (MARKER, LOCK)


def has_content(path: Path) -> bool:
    """The folder exists and holds something besides our lock and marker."""
    return path.is_dir() and any(not _own(p) for p in path.iterdir())


def marked_kind(path: Path) -> str | None:
    """The kind of output the folder's marker names, None when it has none (or an unreadable one)."""
    try:
        kind = json.loads((path / MARKER).read_text()).get("kind")
    except (OSError, ValueError, AttributeError):
        return None
    return kind if isinstance(kind, str) else None


def _writable(path: Path) -> bool:
    """Whether path (or, when it does not exist yet, its nearest existing folder) can be written."""
    while not path.exists():
        if path.parent == path:
            return False
        path = path.parent
    return os.access(path, os.W_OK | os.X_OK)


class OutputFolder:
    """The folder a command writes into, checked before any work and held while it is written.

    `kind` names the output ("training run", "compare", ...). check() writes nothing and refuses a file, a
    folder that cannot be written, a folder holding anything but this kind of output (recognised by the
    marker the command wrote, or by `legacy(path)` for folders written before markers existed), and this
    kind of output itself unless resuming, overwriting, or `restartable(path)` (it holds nothing worth
    keeping: a run that stopped before its first checkpoint). claim(), called once every value has been
    checked, creates the folder, takes its lock (a second process on the folder is refused), checks again,
    empties it when replacing, and writes the marker.
    """

    def __init__(self, path: str | Path, kind: str, *, option: str = "`out`", resume: bool = False,
                 overwrite: bool = False, legacy=None, restartable=None, exists_hint: str = "") -> None:
        self.path, self.kind, self.option = Path(path), kind, option
        self.resume, self.overwrite = resume, overwrite
        self.legacy, self.restartable = legacy, restartable
        self.exists_hint = exists_hint or f"add `overwrite=True` to replace it, or choose another {option}"
        self.replace = False  # set by check(): the folder's old content goes when claimed
        self._lock = None
        self._created = self._made_lock = self._claimed = False

    def __truediv__(self, name: str) -> Path:  # paths inside it, as with a Path
        return self.path / name

    def __fspath__(self) -> str:
        return str(self.path)

    def __str__(self) -> str:
        return str(self.path)

    def is_own_kind(self) -> bool:
        kind = marked_kind(self.path)
        if kind is not None:
            return kind == self.kind
        return bool(self.legacy and self.legacy(self.path))

    def check(self) -> OutputFolder:
        p, option = self.path, self.option
        if p.exists() and not p.is_dir():
            raise UsageError(f"{option} {p} is a file, not a folder; choose another {option}")
        if not _writable(p):
            raise UsageError(f"{option} {p} cannot be written (a read-only file system or no permission); "
                             f"choose another {option}")
        self.replace = False
        if not has_content(p):
            if self.resume:
                raise UsageError(f"{option} {p} holds no {self.kind} to resume; start a new one there")
            return self
        if not self.is_own_kind():
            found = marked_kind(p)
            what = _a(found) if found else f"files that are not {_a(self.kind)} of mixturelm"
            raise UsageError(f"{option} {p} holds {what}; it is left alone, choose another {option}")
        if self.resume:
            return self
        if self.overwrite or (self.restartable is not None and self.restartable(p)):
            self.replace = True
            return self
        raise UsageError(f"{option} {p} holds {_a(self.kind)} already; {self.exists_hint}")

    def lock(self) -> OutputFolder:
        """Create the folder if need be and take its lock (a second process is refused), then check again:
        another process may have written meanwhile. Nothing is changed yet. Idempotent."""
        if self._lock is not None:
            return self
        import fcntl

        self._created = not self.path.exists()
        self.path.mkdir(parents=True, exist_ok=True)
        self._made_lock = not (self.path / LOCK).exists()
        fh = open(self.path / LOCK, "a+")
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            holder = fh.read().strip() or "another"
            fh.close()
            raise UsageError(f"{self.option} {self.path} is being written by another mixturelm process (pid "
                             f"{holder}); wait for it to finish, or choose another {self.option}") from None
        self._lock = fh
        _LOCKED.append(self)
        try:
            self.check()
        except UsageError:
            self.abandon()
            raise
        fh.seek(0)
        fh.truncate()
        fh.write(str(os.getpid()))
        fh.flush()
        return self

    def claim(self) -> OutputFolder:
        """Locked (see lock), emptied when replacing (once every value has been checked: call it only then),
        and marked. Idempotent."""
        self.lock()
        self._claimed = True
        if self.replace:
            clear_folder(self.path)
            self.replace = False
        if marked_kind(self.path) != self.kind:
            write_json_atomic(self.path / MARKER, {"kind": self.kind}, sync=False)
        return self

    def abandon(self) -> None:
        """After a failure before anything was written: leave the folder as it was found (remove it if this
        command created it and it holds nothing; remove the lock file if this command made it)."""
        if self._lock is None:
            return
        if self._made_lock:
            (self.path / LOCK).unlink(missing_ok=True)
        self.release()
        if self._created and not has_content(self.path):
            (self.path / MARKER).unlink(missing_ok=True)
            try:
                self.path.rmdir()
            except OSError:
                pass

    def release(self) -> None:
        if self._lock is not None:
            self._lock.close()  # closing the file drops the lock (as a process's exit does)
            self._lock = None
        if self in _LOCKED:
            _LOCKED.remove(self)


# Folders this process locked: a command that fails before writing leaves each as it was found
_LOCKED: list[OutputFolder] = []


def abandon_unclaimed() -> None:
    """After a failure: every folder locked but not yet written (claimed) is left as it was found."""
    while _LOCKED:
        folder = _LOCKED.pop()
        if not folder._claimed:
            folder.abandon()
        folder.release()


def _a(noun: str) -> str:
    return f"{'an' if noun[0] in 'aeiou' else 'a'} {noun}"


def clear_folder(path: Path) -> None:
    """Empty a folder we own, without following links, keeping our lock."""
    import shutil

    for p in path.iterdir():
        if p.name == LOCK:
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink()


def results_only(*keys: str):
    """A legacy test for outputs written before markers: a folder holding nothing but a results.json with
    these keys, a report.md and PNG figures (so a compare or a run, which hold more, never passes)."""
    def test(path: Path) -> bool:
        if {p.name for p in path.iterdir() if not _own(p)} - {"results.json", "report.md"} - {
                p.name for p in path.glob("*.png")}:
            return False
        try:
            results = json.loads((path / "results.json").read_text())
        except (OSError, ValueError):
            return False
        return isinstance(results, dict) and all(k in results for k in keys)
    return test


def claim(out: OutputFolder | Path | None) -> Path | None:
    """The folder to write into now: an OutputFolder claimed (locked, emptied when replacing, marked), a
    plain path created."""
    if out is None:
        return None
    if isinstance(out, OutputFolder):
        return out.claim().path
    Path(out).mkdir(parents=True, exist_ok=True)
    return Path(out)
