"""Checkpoints: safetensors weights, the resolved JSON config, the tokenizer, and the resumable
training state (optimizer, scheduler, RNG, step), written atomically and verified when read.

Layout of a run directory:
    DIR/config.json                    resolved model + training config of the run
    DIR/checkpoints/step_0000100/      model.safetensors, config.json, train_state.pt, [tokenizer.json], meta.json
    DIR/checkpoints/latest             name of the newest complete checkpoint

A checkpoint of a sharded run (`train --fsdp`) holds, instead of model.safetensors, a folder dcp/ written by
torch.distributed.checkpoint: every process writes its own shards (dcp/__<rank>_0.distcp) of the weights
and of the optimizer's moments, the main process the index (dcp/.metadata); the tensors are named
`model.<name>` and `optim.<name>.<moment>`, by the unwrapped model's parameter names. Its train_state.pt holds
the rest (step, scheduler, RNG, the optimizer's groups and parameter names). One process reads such a
checkpoint whole (`read_sharded`); a sharded run reads only its shards (training/sharded_checkpoint.py).

A checkpoint is written into a temporary folder, its meta.json (sizes and SHA-256 of every file)
last, then renamed into place; only then does `latest` move (write a temporary file, then rename).
A run killed at any instant leaves either the old or the new checkpoint, never half of one.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import warnings
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .config import ModelConfig
from .data.tokenizer import load_from_dir
from .errors import UsageError
from .files import write_json_atomic, write_text_atomic

MODEL_FILE, STATE_FILE, CONFIG_FILE, META_FILE = "model.safetensors", "train_state.pt", "config.json", "meta.json"
DCP_DIR = "dcp"  # a sharded checkpoint's weights and moments (torch.distributed.checkpoint)
DCP_METADATA = DCP_DIR + "/.metadata"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def step_folder(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"step_{step:07d}"


def save(run_dir: Path, step: int, model: torch.nn.Module | dict | None, run_config: dict, tokenizer,
         train_state: dict | None, keep: int = 2, tmp: Path | None = None) -> Path:
    """model: the module, or its state dict (one gathered from processes that each hold a part of it); None
    when every process has written its shards into `tmp`/dcp (`sharded_tmp`): the rest joins them there."""
    final = step_folder(run_dir, step)
    ckpts, name = final.parent, final.name
    sharded = tmp is not None
    tmp = tmp if sharded else ckpts / f".tmp-{name}-{os.getpid()}"
    try:
        ckpts.mkdir(parents=True, exist_ok=True)
        _write(tmp, step, model, run_config, tokenizer, train_state, fresh=not sharded)
    except (OSError, RuntimeError) as e:  # torch.save reports a failed write as a RuntimeError
        full = getattr(e, "errno", None) in (errno.ENOSPC, errno.EDQUOT) or nearly_full(ckpts)
        shutil.rmtree(tmp, ignore_errors=True)  # a half-written folder would hold the space a resume needs
        if full:
            raise no_space(name, ckpts) from None
        raise
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


def no_space(name: str, ckpts: Path) -> UsageError:
    return UsageError(f"no space left on the device while writing checkpoint {name} into {ckpts}; the earlier "
                      "checkpoints are intact: free some space, then resume the run (`resume=True`)")


def nearly_full(folder: Path) -> bool:
    """Whether a failed write met a full device (under 16 MiB left), whatever error type reported it."""
    try:
        return shutil.disk_usage(folder).free < 16 << 20
    except OSError:
        return False


def _write(tmp: Path, step: int, model: torch.nn.Module | dict | None, run_config: dict, tokenizer, train_state,
           fresh: bool = True) -> None:
    """Every file of a checkpoint into tmp, on disk, its manifest (meta.json) last. fresh=False: tmp already
    holds the shards the processes wrote (model None)."""
    if fresh:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    if model is not None:
        state = model if isinstance(model, dict) else model.state_dict()
        save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, tmp / MODEL_FILE)
    if train_state is not None:
        torch.save(train_state, tmp / STATE_FILE)
    (tmp / CONFIG_FILE).write_text(json.dumps(run_config, indent=1))
    tokenizer.save(tmp)
    written = sorted(f for f in tmp.rglob("*") if f.is_file())
    for f in written:  # on disk before the renames make them visible
        with open(f, "rb+") as fh:
            os.fsync(fh.fileno())
    files = {f.relative_to(tmp).as_posix(): {"bytes": f.stat().st_size, "sha256": _sha256(f)} for f in written}
    write_json_atomic(tmp / META_FILE, {"step": step, "files": files})


def sharded_tmp(run_dir: Path, step: int, token: int) -> Path:
    """The temporary folder the processes of a sharded run write a checkpoint into (`token`: the main
    process's pid, the same on every process); cleared with the other leftovers if a kill interrupts it."""
    final = step_folder(run_dir, step)
    return final.parent / f".tmp-{final.name}-{token}"


def _prune(ckpts: Path, keep: int, newest: str) -> None:
    """Remove all but the newest `keep` checkpoints. Each leaves the series by a rename before it is deleted,
    so a kill at any moment leaves only complete step_* folders (and a .old-* folder cleared next time)."""
    done = sorted(p for p in ckpts.glob("step_*") if p.is_dir())
    for p in done[:-keep]:
        if p.name != newest:
            trash = ckpts / f".old-{p.name}-{os.getpid()}"
            os.rename(p, trash)
            shutil.rmtree(trash, ignore_errors=True)


def drop_from(run_dir: Path, step: int) -> list[str]:
    """Take the checkpoints of `step` and later out of the series (each renamed, then deleted), and point
    `latest` at the newest one left (or remove it). Used when training diverged: a checkpoint written after
    the last step whose loss was finite holds the weights that diverged. Returns the names dropped."""
    ckpts = Path(run_dir) / "checkpoints"
    dropped = [p for p in sorted(ckpts.glob("step_*")) if p.is_dir() and _step_of(p) is not None and _step_of(p) >= step]
    for p in dropped:
        trash = ckpts / f".old-{p.name}-{os.getpid()}"
        os.rename(p, trash)
        shutil.rmtree(trash, ignore_errors=True)
    left = sorted(p for p in ckpts.glob("step_*") if p.is_dir())
    pointer = ckpts / "latest"
    if left:
        write_text_atomic(pointer, left[-1].name)
    else:
        pointer.unlink(missing_ok=True)
    return [p.name for p in dropped]


def keep_stable(ckpt: Path) -> Path:
    """A copy of a wsd run's checkpoint at the start of its decay, as checkpoints/stable_<step>: outside the
    series (never pruned, never resumed from by default), the point a longer budget is extended from. Hard
    links where the file system has them: checkpoint files are never written in place, so the copy stays."""
    copy = ckpt.parent / ckpt.name.replace("step_", "stable_")
    tmp = ckpt.parent / f".tmp-{copy.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(ckpt, tmp, copy_function=_link_or_copy)
    shutil.rmtree(copy, ignore_errors=True)
    os.rename(tmp, copy)
    for older in ckpt.parent.glob("stable_*"):  # a run extended again decays later: only its newest is of use
        if older != copy:
            shutil.rmtree(older, ignore_errors=True)
    return copy


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def stable_before(run_dir: Path, step: int) -> Path | None:
    """The newest checkpoint (of the series or a kept stable_*) at or before `step` that verifies."""
    ckpts = Path(run_dir) / "checkpoints"
    found = [(_step_of(p), p) for pattern in ("step_*", "stable_*") for p in ckpts.glob(pattern) if p.is_dir()]
    for s, p in sorted(((s, p) for s, p in found if s is not None and s <= step), reverse=True):
        try:
            verify(p)
            return p
        except UsageError:
            continue
    return None


def set_aside_after(run_dir: Path, branch: Path, finished_step: int) -> tuple[Path, Path | None]:
    """Before a run is trained again from `branch` (a wsd run extended from the start of its decay): the
    checkpoint of `finished_step` (the shorter budget's last) is kept as checkpoints/final_<step>, the others
    after the branch leave the series, and the branch point joins the series as step_<step> and becomes
    `latest`, so that a kill before the next checkpoint resumes there. Returns (the branch point in the
    series, the kept folder or None)."""
    ckpts = Path(run_dir) / "checkpoints"
    start = _step_of(branch)
    finished = step_folder(run_dir, finished_step)
    kept = None
    if finished_step > start and finished.is_dir():
        kept = ckpts / finished.name.replace("step_", "final_")
        shutil.rmtree(kept, ignore_errors=True)
        os.rename(finished, kept)
    drop_from(run_dir, start + 1)
    in_series = step_folder(run_dir, start)
    if not in_series.is_dir():
        tmp = ckpts / f".tmp-{in_series.name}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(branch, tmp, copy_function=_link_or_copy)
        os.rename(tmp, in_series)
    write_text_atomic(ckpts / "latest", in_series.name)
    return in_series, kept


def _step_of(ckpt: Path) -> int | None:
    try:
        return int(ckpt.name.split("_", 1)[1])
    except (ValueError, IndexError):
        return None


def clear_leftovers(run_dir: Path) -> list[str]:
    """Delete what a killed or failed write left (.tmp-* and .old-* folders of checkpoints, temporary files
    of atomic writes); called when a run starts or resumes, holding its folder's lock. A checkpoint renamed
    aside to be replaced by a copy that never arrived is put back first. Returns what was removed."""
    run_dir = Path(run_dir)
    ckpts = run_dir / "checkpoints"
    pointer = latest_pointer(run_dir)
    named = pointer.read_text().strip() if pointer is not None else None
    for old in sorted(ckpts.glob(".old-step_*")) if ckpts.is_dir() else []:
        name = old.name.removeprefix(".old-").rsplit("-", 1)[0]
        if name == named and not (ckpts / name).exists():  # `latest` names it: put it back
            try:
                verify(old)
                os.rename(old, ckpts / name)
            except UsageError:
                pass
    found = []
    if ckpts.is_dir():
        found += [p for pattern in (".tmp-*", ".old-*", ".*.tmp[0-9]*") for p in ckpts.glob(pattern)]
    found += list(run_dir.glob(".*.tmp[0-9]*"))
    for p in sorted(set(found)):
        shutil.rmtree(p, ignore_errors=True) if p.is_dir() and not p.is_symlink() else p.unlink(missing_ok=True)
    return sorted({p.name for p in found})


def resumable(run_dir: Path, warn) -> Path | None:
    """The checkpoint to resume from: the newest one that verifies. One that is damaged or half deleted is
    passed over with a warning (warn(message)); an error when there are checkpoints and none verifies."""
    ckpts = Path(run_dir) / "checkpoints"
    pointer = latest_pointer(run_dir)
    candidates = sorted((p for p in ckpts.glob("step_*") if p.is_dir()), reverse=True) if ckpts.is_dir() else []
    if pointer is not None:  # the folder `latest` names first (it is the newest unless a rename was cut short)
        named = ckpts / pointer.read_text().strip()
        candidates = [named] + [c for c in candidates if c != named]
    first_error = None
    for ckpt in candidates:
        try:
            verify(ckpt)
            return ckpt
        except UsageError as e:
            first_error = first_error or e
            warn(f"warning: {e}; passing over it")
    if first_error is not None:
        raise first_error
    return None


def latest_pointer(run_dir: Path) -> Path | None:
    """The checkpoints/latest file of a run directory, None when the run has written no checkpoint."""
    pointer = Path(run_dir) / "checkpoints" / "latest"
    return pointer if pointer.is_file() else None


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
    if not ckpt.is_dir():
        raise UsageError(f"checkpoint {ckpt} is missing; the run directory is damaged")
    try:
        meta = json.loads((ckpt / META_FILE).read_text())
        files = meta["files"]
    except (OSError, ValueError, KeyError):
        raise UsageError(f"checkpoint {ckpt} has no readable {META_FILE}; it is incomplete, "
                         "delete it and use an earlier one") from None
    if CONFIG_FILE not in files or not (MODEL_FILE in files or DCP_METADATA in files):
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


def model_config(run_config: dict, ckpt: Path) -> ModelConfig:
    """The ModelConfig of a checkpoint's config, its values checked as any config's are."""
    try:
        return ModelConfig.from_dict(run_config["model"])
    except (KeyError, TypeError, ValueError) as e:
        raise UsageError(f"checkpoint {ckpt}: its {CONFIG_FILE} is not a mixturelm model config ({e}); it is "
                         "damaged") from None


# state-dict names of mixturelm before 2026-12: a block's FFN with a layer beside it was one module
LEGACY_NAMES = ((".ffn.main.", ".ffn."), (".ffn.extra.", ".beside.0."))


def load_weights(model: torch.nn.Module, ckpt: Path) -> None:
    """The checkpoint's weights into `model` (unsharded), from either format."""
    if is_sharded(ckpt):
        state = {k[len("model."):]: v for k, v in read_sharded(ckpt, "model.").items()}
    else:
        try:
            state = load_file(ckpt / MODEL_FILE)
        except Exception as e:  # safetensors' own error type: a file whose manifest was rewritten to match
            raise UsageError(f"checkpoint {ckpt}: {MODEL_FILE} cannot be read ({str(e)[:120]}); it is damaged, "
                             "use an earlier checkpoint") from None
    for old, new in LEGACY_NAMES:
        state = {k.replace(old, new): v for k, v in state.items()}
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as e:  # shapes that differ from the config's
        first = next((line.strip() for line in str(e).splitlines() if "size mismatch" in line), str(e)[:160])
        raise UsageError(f"checkpoint {ckpt} does not fit its config ({first[:200]}); its config.json was changed "
                         "or it was written by another version of mixturelm") from None
    if missing or unexpected:
        raise UsageError(f"checkpoint {ckpt} does not fit its config (missing {missing[:3]}, unexpected "
                         f"{unexpected[:3]}); it was written by another version of mixturelm")


def load_model(path: str | Path, device: str | torch.device = "cpu"):
    """(model in eval mode, run config dict, tokenizer, checkpoint folder) from a run or checkpoint path."""
    from .model import MixtureLM

    ckpt = resolve(path)
    verify(ckpt)
    run_config = load_config(ckpt)
    model = MixtureLM(model_config(run_config, ckpt))
    load_weights(model, ckpt)
    tokenizer = load_from_dir(ckpt, run_config["train"]["tokenizer"])
    return model.to(device).eval(), run_config, tokenizer, ckpt


def is_weights_only_start(ckpt: Path) -> bool:
    """A checkpoint of step 0 written without training state (import-hf, upcycle): a run starts from its
    weights with a new optimizer. (A checkpoint whose manifest lists a state that is gone fails verify.)"""
    return _step_of(ckpt) == 0 and not (ckpt / STATE_FILE).is_file()


def load_train_state(ckpt: Path) -> dict:
    if not (ckpt / STATE_FILE).is_file():
        raise UsageError(f"checkpoint {ckpt} has no training state; it cannot be resumed")
    try:
        return torch.load(ckpt / STATE_FILE, map_location="cpu", weights_only=False)
    except Exception as e:  # pickle, zip or EOF errors of a file whose manifest was rewritten to match
        raise UsageError(f"checkpoint {ckpt}: {STATE_FILE} cannot be read ({type(e).__name__}); it is damaged, "
                         "resume from an earlier checkpoint") from None


def is_sharded(ckpt: Path) -> bool:
    """Whether the checkpoint was written by a sharded run (torch.distributed.checkpoint, dcp/)."""
    return (Path(ckpt) / DCP_DIR).is_dir()


def sharded_metadata(ckpt: Path):
    """The index of a sharded checkpoint, every shard file it names checked to be there."""
    from torch.distributed.checkpoint import FileSystemReader

    folder = Path(ckpt) / DCP_DIR
    try:
        metadata = FileSystemReader(str(folder)).read_metadata()
    except Exception as e:  # pickle or EOF errors of a truncated or altered index
        raise UsageError(f"checkpoint {ckpt}: {DCP_METADATA} cannot be read ({type(e).__name__}); it is damaged, "
                         "use an earlier checkpoint") from None
    files = sorted({info.relative_path for info in (metadata.storage_data or {}).values()})
    missing = next((f for f in files if not (folder / f).is_file()), None)
    if missing is not None:
        raise UsageError(f"checkpoint {ckpt}: the shard file {DCP_DIR}/{missing} is missing; copy it back from where "
                         "the run wrote it, or use an earlier checkpoint")
    return metadata


def read_sharded(ckpt: Path, prefix: str = "") -> dict[str, torch.Tensor]:
    """Every tensor of a sharded checkpoint whose name starts with `prefix`, whole, in this one process
    (no process group needed): what a reader of weights, or a run that is not sharded, takes."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    metadata = sharded_metadata(ckpt)
    state = {k: torch.empty(m.size, dtype=m.properties.dtype) for k, m in metadata.state_dict_metadata.items()
             if k.startswith(prefix) and isinstance(m, TensorStorageMetadata)}
    with warnings.catch_warnings():  # "torch.distributed is disabled ...": one process is meant
        warnings.simplefilter("ignore", UserWarning)
        load_dcp(state, ckpt, "use an earlier checkpoint", no_dist=True)
    return state


def load_dcp(state: dict, ckpt: Path, advice: str, no_dist: bool = False) -> None:
    """The tensors of `state` read in place from a sharded checkpoint's shards (a collective unless `no_dist`).
    A shard that cannot be read is a one-line UsageError ending in `advice` (what to do instead)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException  # a BaseException, not an Exception

    try:
        dcp.load(state, checkpoint_id=str(Path(ckpt) / DCP_DIR), no_dist=no_dist)
    except (Exception, CheckpointException) as e:  # a shard truncated or altered behind the manifest's back
        raise UsageError(f"checkpoint {ckpt}: its shards in {DCP_DIR}/ cannot be read ({error_line(e)}); it is "
                         f"damaged, {advice}") from None


def write_failure(e: BaseException) -> BaseException:
    """What a failed sharded write reports: the OSError inside DCP's CheckpointException (a BaseException
    the command line would print as a traceback), which the command line turns into one line, or the error
    itself when it holds none."""
    failures = getattr(e, "failures", None) or {}
    for failure in failures.values():
        cause = failure[0] if isinstance(failure, tuple) else getattr(failure, "exc", failure)  # (exception, trace)
        if isinstance(cause, OSError):
            return cause
    if isinstance(e, Exception) and not failures:
        return e
    return UsageError(f"writing a sharded checkpoint failed: {error_line(e)}; the earlier checkpoints are intact: "
                      "fix the cause, then resume the run")


def error_line(e: Exception) -> str:
    """The last non-empty line of an error's message (DCP wraps the cause in lines of context), or its type."""
    lines = [line for line in str(e).splitlines() if line.strip()]
    return (lines[-1] if lines else type(e).__name__)[:160]
