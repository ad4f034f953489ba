"""Checkpoints of a sharded run (`train --fsdp`) with torch.distributed.checkpoint (DCP), and moving the
optimizer's state between the formats.

A sharded run saves, every process its own shards (nothing gathered): `model.<name>` for each weight (FSDP's
DTensors, the expert slices as DTensors on the (replica, ep) mesh) and `optim.<name>.<moment>` for each
parameter's optimizer state, `<name>` the unwrapped model's parameter name; train_state.pt keeps the
optimizer's groups and the parameter names in the optimizer's order, to map the moments back. DCP records
every tensor's global shape and each shard's offsets, so a run of any size, sharded or not, reads it:

- a sharded run loads straight into its own DTensors (DCP reads each process's piece, resharding);
- a run that is not sharded (one process, DDP, expert parallelism alone) reads the tensors whole
  (checkpoint.read_sharded) and goes on as from a single-device checkpoint;
- a sharded run resumed from a single-device checkpoint cuts the full moments to its pieces.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

from .. import checkpoint
from ..errors import UsageError
from ..parallel.fsdp import shard_like

MODEL, OPTIM = "model.", "optim."


def optimizer_params(opt: torch.optim.Optimizer) -> list[nn.Parameter]:
    """The parameters in the optimizer's order: the indices of its state dict."""
    return [p for g in opt.param_groups for p in g["params"]]


def param_names(model: nn.Module, opt: torch.optim.Optimizer, canonical) -> list[str]:
    """The unwrapped model's name of each parameter, in the optimizer's order."""
    name_of = {id(p): canonical(n) for n, p in model.named_parameters()}
    return [name_of[id(p)] for p in optimizer_params(opt)]


def save_shards(model: nn.Module, opt: torch.optim.Optimizer, canonical, folder: Path) -> dict:
    """Every process writes its shards of the weights and moments into `folder` (a collective). Returns
    what train_state.pt must hold besides to read them back."""
    state = {MODEL + canonical(k): v for k, v in get_model_state_dict(model).items()}
    names = param_names(model, opt, canonical)
    for name, p in zip(names, optimizer_params(opt)):
        for k, v in opt.state.get(p, {}).items():
            if torch.is_tensor(v):
                state[f"{OPTIM}{name}.{k}"] = v
    dcp.save(state, checkpoint_id=str(folder))
    return {"param_groups": opt.state_dict()["param_groups"], "param_names": names}


def load_shards(model: nn.Module, opt: torch.optim.Optimizer, canonical, ckpt: Path, saved: dict) -> dict:
    """A sharded checkpoint into a sharded run (a collective): the weights into the model, in place; returns
    the optimizer's state dict (this process's pieces) for Optimizers.load_state_dict."""
    metadata = checkpoint.sharded_metadata(ckpt)
    model_state = get_model_state_dict(model)
    targets = {MODEL + canonical(k): v for k, v in model_state.items()}
    names = _same_names(model, opt, canonical, saved, ckpt)
    params = optimizer_params(opt)
    moment_keys = _moment_keys(metadata.state_dict_metadata, names)
    moments = {i: {k: _moment_target(metadata.state_dict_metadata[key], params[i]) for k, key in keys.items()}
               for i, keys in moment_keys.items()}
    targets |= {key: moments[i][k] for i, keys in moment_keys.items() for k, key in keys.items()}
    missing = [k for k in targets if k not in metadata.state_dict_metadata]
    if missing:
        raise UsageError(f"checkpoint {ckpt} does not fit its config (missing {missing[:3]}); it was written by "
                         "another version of mixturelm")
    checkpoint.load_dcp(targets, ckpt, "resume from an earlier checkpoint")
    set_model_state_dict(model, model_state)
    return {"state": moments, "param_groups": saved["param_groups"]}


def full_optimizer_state(model: nn.Module, opt: torch.optim.Optimizer, canonical, ckpt: Path, saved: dict) -> dict:
    """A sharded checkpoint's optimizer state, whole, as a single-device checkpoint holds it (for a run that
    is not sharded; expert parallelism then cuts its slices as from any single-device checkpoint)."""
    names = _same_names(model, opt, canonical, saved, ckpt)
    tensors = checkpoint.read_sharded(ckpt, OPTIM)
    moments = {i: {k: tensors[key] for k, key in keys.items()} for i, keys in _moment_keys(tensors, names).items()}
    return {"state": moments, "param_groups": saved["param_groups"]}


def _moment_keys(keys, names: list[str]) -> dict[int, dict[str, str]]:
    """The keys `optim.<name>.<moment>` among `keys`, by the index of <name> in `names` (ascending), then by
    moment, in one pass. Names hold dots: a key's parameter is its first prefix up to a dot that is a name (the
    only one: a module's attribute is a parameter or a module, never both, so no name extends another)."""
    index = {name: i for i, name in enumerate(names)}
    found: dict[int, dict[str, str]] = {}
    for key in keys:
        if not key.startswith(OPTIM):
            continue
        rest = key[len(OPTIM):]
        dot = rest.find(".")
        while dot != -1 and rest[:dot] not in index:
            dot = rest.find(".", dot + 1)
        if dot != -1:
            found.setdefault(index[rest[:dot]], {})[rest[dot + 1:]] = key
    return {i: found[i] for i in sorted(found)}


def _moment_target(meta, p: nn.Parameter) -> torch.Tensor:
    """Where DCP reads a saved moment into: shaped as its parameter (a DTensor: this process's piece), or a
    whole tensor of the saved size (a scalar such as Adam's step)."""
    return (torch.zeros_like(p) if tuple(meta.size) == tuple(p.shape)
            else torch.empty(meta.size, dtype=meta.properties.dtype))


def shard_optimizer_state(opt: torch.optim.Optimizer, state: dict) -> dict:
    """A single-device checkpoint's optimizer state (full moments) cut to this process's pieces of a sharded
    run's parameters (FSDP shards and expert slices alike); no communication."""
    # not ExpertSharding.shard_optimizer_state: under FSDP every parameter is a DTensor, its moments placed alike
    params = optimizer_params(opt)
    new = {}
    for i, s in state["state"].items():
        p = params[int(i)]
        new[i] = {k: shard_like(v, p) if torch.is_tensor(v) and tuple(v.shape) == tuple(p.shape) and v.dim() else v
                  for k, v in s.items()}
    return state | {"state": new}


def _same_names(model, opt, canonical, saved: dict, ckpt: Path) -> list[str]:
    names = param_names(model, opt, canonical)
    if saved.get("param_names") != names:
        raise UsageError(f"checkpoint {ckpt}: its optimizer's parameters differ from this model's; it was written "
                         "by another version of mixturelm or another config")
    return names
