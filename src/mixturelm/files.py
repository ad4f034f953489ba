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
    with open(tmp, "wb") as fh:
        fh.write(data)
        if sync:
            fh.flush()
            os.fsync(fh.fileno())
    os.replace(tmp, path)


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


def has_content(path: Path) -> bool:
    """The folder exists and holds something (a result that must not be written over unasked)."""
    return path.is_dir() and any(path.iterdir())


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
