"""Checkpoints: safetensors weights, the resolved JSON config, the tokenizer, and the resumable
training state (optimizer, scheduler, RNG, step), written atomically and verified when read.

Layout of a run directory:
    DIR/config.json                    resolved model + training config of the run
    DIR/checkpoints/step_0000100/      model.safetensors, config.json, train_state.pt, [tokenizer.json], meta.json
    DIR/checkpoints/latest             name of the newest complete checkpoint

A checkpoint is written into a temporary folder, its meta.json (sizes and SHA-256 of every file)
last, then renamed into place; only then does `latest` move (write a temporary file, then rename).
A run killed at any instant leaves either the old or the new checkpoint, never half of one.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .config import ModelConfig
from .data.tokenizer import load_from_dir
from .errors import UsageError
from .files import write_json_atomic, write_text_atomic

MODEL_FILE, STATE_FILE, CONFIG_FILE, META_FILE = "model.safetensors", "train_state.pt", "config.json", "meta.json"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def save(run_dir: Path, step: int, model: torch.nn.Module, run_config: dict, tokenizer,
         train_state: dict | None, keep: int = 2) -> Path:
    ckpts = Path(run_dir) / "checkpoints"
    ckpts.mkdir(parents=True, exist_ok=True)
    name = f"step_{step:07d}"
    tmp = ckpts / f".tmp-{name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_file({k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}, tmp / MODEL_FILE)
    if train_state is not None:
        torch.save(train_state, tmp / STATE_FILE)
    (tmp / CONFIG_FILE).write_text(json.dumps(run_config, indent=1))
    tokenizer.save(tmp)
    for f in tmp.iterdir():  # on disk before the renames make them visible
        with open(f, "rb+") as fh:
            os.fsync(fh.fileno())
    files = {f.name: {"bytes": f.stat().st_size, "sha256": _sha256(f)} for f in sorted(tmp.iterdir())}
    write_json_atomic(tmp / META_FILE, {"step": step, "files": files})
    final = ckpts / name
    if final.exists():  # the same step again after a resume: replace the old copy
        old = ckpts / f".old-{name}-{os.getpid()}"
        os.rename(final, old)
        os.rename(tmp, final)
        shutil.rmtree(old)
    else:
        os.rename(tmp, final)
    latest = ckpts / "latest"
    write_text_atomic(latest, name)
    _prune(ckpts, keep, name)
    return final


def _prune(ckpts: Path, keep: int, newest: str) -> None:
    done = sorted(p for p in ckpts.glob("step_*") if p.is_dir())
    for p in done[:-keep]:
        if p.name != newest:
            shutil.rmtree(p, ignore_errors=True)


def latest(run_dir: Path) -> Path | None:
    """The newest complete checkpoint of a run directory, or None if it has none yet."""
    pointer = Path(run_dir) / "checkpoints" / "latest"
    if not pointer.is_file():
        return None
    path = pointer.parent / pointer.read_text().strip()
    if not path.is_dir():
        raise UsageError(f"{pointer} names {path.name}, which is missing; the run directory is damaged")
    return path


def resolve(path: str | Path) -> Path:
    """A checkpoint folder, given either it or a run directory (whose latest checkpoint is taken)."""
    path = Path(path)
    if (path / META_FILE).is_file():
        return path
    if not path.exists():
        raise UsageError(f"`ckpt` {path}: no such file or folder")
    found = latest(path)
    if found is None:
        raise UsageError(f"`ckpt` {path}: no checkpoint there; give a run directory of `mixturelm train` "
                         "or one of its checkpoints/step_* folders")
    return found


def verify(ckpt: Path) -> dict:
    """Check every file against meta.json; a truncated or altered checkpoint is refused, not loaded."""
    try:
        meta = json.loads((ckpt / META_FILE).read_text())
        files = meta["files"]
    except (OSError, ValueError, KeyError):
        raise UsageError(f"checkpoint {ckpt} has no readable {META_FILE}; it is incomplete, "
                         "delete it and use an earlier one") from None
    if not {MODEL_FILE, CONFIG_FILE} <= set(files):
        raise UsageError(f"checkpoint {ckpt} lists no {MODEL_FILE} or {CONFIG_FILE}; it is incomplete, "
                         "delete it and use an earlier one")
    for name, info in files.items():
        f = ckpt / name
        if not f.is_file() or f.stat().st_size != info["bytes"] or _sha256(f) != info["sha256"]:
            raise UsageError(f"checkpoint {ckpt} is corrupt ({name} is missing, truncated or altered); "
                             "delete it and resume from an earlier checkpoint")
    return meta


def load_config(ckpt: Path) -> dict:
    try:
        return json.loads((ckpt / CONFIG_FILE).read_text())
    except (OSError, ValueError):
        raise UsageError(f"checkpoint {ckpt} has no readable {CONFIG_FILE}; it is incomplete or corrupt") from None


# state-dict names of mixturelm before 2026-12: a block's FFN with a layer beside it was one module
LEGACY_NAMES = ((".ffn.main.", ".ffn."), (".ffn.extra.", ".beside.0."))


def load_weights(model: torch.nn.Module, ckpt: Path) -> None:
    state = load_file(ckpt / MODEL_FILE)
    for old, new in LEGACY_NAMES:
        state = {k.replace(old, new): v for k, v in state.items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise UsageError(f"checkpoint {ckpt} does not fit its config (missing {missing[:3]}, unexpected "
                         f"{unexpected[:3]}); it was written by another version of mixturelm")


def load_model(path: str | Path, device: str | torch.device = "cpu"):
    """(model in eval mode, run config dict, tokenizer, checkpoint folder) from a run or checkpoint path."""
    from .model import MixtureLM

    ckpt = resolve(path)
    verify(ckpt)
    run_config = load_config(ckpt)
    model = MixtureLM(ModelConfig.from_dict(run_config["model"]))
    load_weights(model, ckpt)
    tokenizer = load_from_dir(ckpt, run_config["train"]["tokenizer"])
    return model.to(device).eval(), run_config, tokenizer, ckpt


def load_train_state(ckpt: Path) -> dict:
    if not (ckpt / STATE_FILE).is_file():
        raise UsageError(f"checkpoint {ckpt} has no training state; it cannot be resumed")
    return torch.load(ckpt / STATE_FILE, map_location="cpu", weights_only=False)
