"""The training loop: a budget in steps, tokens or FLOPs; AdamW with parameter groups; warm-up and
cosine; clipping; accumulation; bf16 autocast; evaluation; metrics; checkpoints; exact resume; DDP.

Everything that could reject the run (config, data, budget, output folder) is checked before the
output folder is touched, so a bad command never damages an existing run.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import shutil
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from . import checkpoint
from .config import OPTION_FIELDS, ModelConfig, TrainConfig, get_preset
from .data.tokenizer import load_from_dir
from .data.tokens import TokenData, check_length, prepare, train_rows, val_windows
from .errors import UsageError
from .flops import forward_flops_per_token, measure_matmul_flops, train_flops_per_token
from .model import MixtureLM
from .layers.mod import MoD
from .runtime import steady_allocator

DEFAULT_PRESET = "dense-tiny"
DEFAULT_MAX_STEPS = 200


@dataclass
class RunConfig:
    preset: str
    model: ModelConfig
    train: TrainConfig

    def to_dict(self) -> dict:
        return {"preset": self.preset, "model": self.model.to_dict(), "train": self.train.to_dict()}

    @classmethod
    def from_dict(cls, d: dict) -> RunConfig:
        return cls(d["preset"], ModelConfig.from_dict(d["model"]), TrainConfig.from_dict(d["train"]))


# ----------------------------------------------------------------------------------------------
# Resolving the configuration of a new or resumed run

# the presets that have blocks of each kind, for the error of an option that finds none
BLOCK_KIND_PRESETS = {"moe": ("MoE", "moe-* or mode-*"), "mod": ("MoD", "mod-* or mode-staged-*"),
                      "peer": ("PEER", "peer-*")}


def new_run_config(preset: str | None, train_overrides: dict, model_overrides: dict | None = None,
                   moe_overrides: dict | None = None, mod_overrides: dict | None = None,
                   peer_overrides: dict | None = None) -> RunConfig:
    """The preset's config with the given options on top. moe_overrides apply to every MoE block,
    mod_overrides (MoDConfig fields) to every Mixture-of-Depths block, peer_overrides (PEERConfig
    fields) to every PEER layer."""
    p = get_preset(preset or DEFAULT_PRESET)
    model_fields = p.model | (model_overrides or {})
    for kind, overrides in (("moe", moe_overrides), ("mod", mod_overrides), ("peer", peer_overrides)):
        model_fields = _override_blocks(model_fields, kind, overrides, p.name)
    model = ModelConfig(**model_fields)
    train = TrainConfig(**(p.train | train_overrides))
    if train.max_steps is None and train.max_tokens is None and train.max_flops is None:
        train = replace(train, max_steps=DEFAULT_MAX_STEPS)
    if train.seq_len > model.max_seq_len:
        model = replace(model, max_seq_len=train.seq_len)
    return RunConfig(p.name, model, train)


def _option_name(kind: str, field: str) -> str:
    """The command-line option that sets a config field (block fields may be named differently)."""
    field = next((cli for cli, f in OPTION_FIELDS.get(kind, {}).items() if f == field), field)
    return field.replace("_", "-")


def _override_blocks(model_fields: dict, kind: str, overrides: dict | None, preset: str) -> dict:
    """The blocks' `kind` configs (moe, mod or peer) with overrides on top; an error if the preset has none."""
    if not overrides:
        return model_fields
    if not any(b.get(kind) for b in model_fields.get("blocks", [])):
        option = _option_name(kind, next(iter(overrides)))
        name, presets = BLOCK_KIND_PRESETS[kind]
        raise UsageError(f"--{option} applies to {name} blocks, and preset {preset} has none; "
                         f"choose a {presets} preset")
    blocks = [b | {kind: b[kind] | overrides} if b.get(kind) else b for b in model_fields["blocks"]]
    return model_fields | {"blocks": blocks}


def resumed_run_config(out_dir: Path, preset: str | None, train_overrides: dict,
                       model_overrides: dict | None = None, moe_overrides: dict | None = None,
                       mod_overrides: dict | None = None, peer_overrides: dict | None = None) -> RunConfig:
    """The saved config of the run in out_dir; any option given again must agree with it."""
    path = out_dir / checkpoint.CONFIG_FILE
    if not path.is_file():
        raise UsageError(f"--resume: {out_dir} holds no run to resume (no {checkpoint.CONFIG_FILE}); "
                         "drop --resume to start a new run")
    try:
        saved = RunConfig.from_dict(json.loads(path.read_text()))
    except (ValueError, KeyError, TypeError):
        raise UsageError(f"--resume: {path} is unreadable or not a mixturelm config; the run directory is "
                         "damaged, start a new run with another --out") from None
    if preset is not None and preset != saved.preset:
        raise UsageError(f"--preset {preset} differs from the run's preset {saved.preset}; "
                         "drop --preset or start a new run with another --out")
    given = [("", saved.train, k, v) for k, v in train_overrides.items()]
    given += [("", saved.model, k, v) for k, v in (model_overrides or {}).items()]
    for kind, overrides in (("moe", moe_overrides), ("mod", mod_overrides), ("peer", peer_overrides)):
        if overrides:  # the same error as a new run when the run has no such blocks
            _override_blocks(saved.model.to_dict(), kind, overrides, saved.preset)
            block = next(getattr(b, kind) for b in saved.model.blocks if getattr(b, kind) is not None)
            given += [(kind, block, k, v) for k, v in overrides.items()]
    for kind, saved_cfg, key, value in given:
        if getattr(saved_cfg, key) != value:
            raise UsageError(f"--{_option_name(kind, key)} {value} differs from the run's {getattr(saved_cfg, key)}; "
                             "drop the option to resume, or start a new run with another --out")
    return saved


def steps_in_budget(cfg: RunConfig) -> int:
    t = cfg.train
    tokens_per_step = t.batch_size * t.seq_len
    if t.max_steps is not None:
        return t.max_steps
    if t.max_tokens is not None:
        steps = t.max_tokens // tokens_per_step
        unit, per_step = "--max-tokens", f"{tokens_per_step:,} tokens"
    else:
        flops_per_step = train_flops_per_token(cfg.model, t.seq_len) * tokens_per_step
        steps = int(t.max_flops // flops_per_step)
        unit, per_step = "--max-flops", f"{flops_per_step:.3g} FLOPs"
    if steps < 1:
        raise UsageError(f"{unit} is smaller than one step ({per_step} per step); raise the budget "
                         "or lower --batch-size / --seq-len")
    return steps


def prepare_out_dir(out_dir: Path, resume: bool, overwrite: bool) -> None:
    """Refuse to write into a non-empty folder unless told to resume or overwrite (and then only a run)."""
    if out_dir.exists() and not out_dir.is_dir():
        raise UsageError(f"--out {out_dir} is a file, not a folder; choose another --out")
    if resume or not out_dir.exists() or not any(out_dir.iterdir()):
        return
    if not overwrite:
        raise UsageError(f"--out {out_dir} is not empty; add --resume to continue the run there, "
                         "--overwrite to replace it, or choose another --out")
    if not (out_dir / checkpoint.CONFIG_FILE).is_file():
        raise UsageError(f"--overwrite: {out_dir} is not a mixturelm run directory (no config.json); "
                         "refusing to delete it, choose another --out")


def clear_out_dir(out_dir: Path) -> None:
    for p in out_dir.iterdir():
        shutil.rmtree(p) if p.is_dir() else p.unlink()


# ----------------------------------------------------------------------------------------------
# Optimizer and schedule

def side_network_parameters(model: torch.nn.Module) -> list:
    """Parameters of networks trained on their own loss from stop-gradient inputs (MoD's causal
    predictor). They are clipped apart: in one global norm their gradient would shrink the model's
    update (mod-tiny with the predictor, step 20: by 14 %; benchmarks/mod/predictor_clip_share.py)
    without the model gaining anything."""
    from .layers.mod import MoD

    return [p for m in model.modules() if isinstance(m, MoD) and m.predictor is not None
            for p in m.predictor.parameters()]


def peer_parameters(model: torch.nn.Module) -> tuple[list, list, list]:
    """PEER's parameters that train apart: expert tables with sparse gradients (SparseAdam), expert
    tables with dense gradients, and product keys (both AdamW, without weight decay)."""
    from .layers.peer import PEER

    sparse, dense, keys = [], [], []
    for m in model.modules():
        if isinstance(m, PEER):
            (sparse if m.sparse_grad else dense).extend(m.expert_tables())
            keys.append(m.sub_keys)
    return sparse, dense, keys


def param_groups(model: torch.nn.Module, weight_decay: float, peer_lr: float | None = None,
                 peer_key_lr: float | None = None) -> list[dict]:
    """Decay matrices; never norms, biases or embeddings (nor a head tied to the embedding). PEER's
    dense-gradient expert tables (at peer_lr) and its product keys (at peer_key_lr) form groups of
    their own, without decay; its sparse-gradient tables are left to a SparseAdam (peer_parameters)."""
    sparse, tables, keys = peer_parameters(model)
    memory = {id(p) for p in sparse + tables + keys}
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in memory:
            continue
        (decay if p.dim() >= 2 and "embed" not in name else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    for params, lr in ((tables, peer_lr), (keys, peer_key_lr)):
        if params:
            groups.append({"params": params, "weight_decay": 0.0, "fixed_lr": lr is not None}
                          | ({"lr": lr} if lr is not None else {}))
    return groups


def mark_coalesced(params) -> None:
    """Autograd drops the coalesced flag of a sparse gradient when it stores it; PEER's row gradients are
    coalesced (distinct, sorted rows), so check that cheaply and set it again, sparing SparseAdam a sort."""
    for p in params:
        g = p.grad
        if g is None or not g.is_sparse or g.is_coalesced():
            continue
        idx = g._indices()[0]
        if idx.numel() < 2 or bool((idx[1:] > idx[:-1]).all()):
            p.grad = torch.sparse_coo_tensor(g._indices(), g._values(), g.shape, is_coalesced=True,
                                             check_invariants=False)
        else:
            p.grad = g.coalesce()


@torch.no_grad()
def clip_grad_norm(params, max_norm: float) -> torch.Tensor:
    """torch.nn.utils.clip_grad_norm_, for dense and (coalesced) sparse gradients alike."""
    grads = [p.grad for p in params if p.grad is not None]
    dense = [g for g in grads if not g.is_sparse]
    sparse = [g._values() for g in grads if g.is_sparse]
    norms = [torch.linalg.vector_norm(g) for g in dense + sparse]
    total = torch.linalg.vector_norm(torch.stack(norms)) if norms else torch.zeros(())
    coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
    if max_norm != float("inf"):
        for g in dense + sparse:
            g.mul_(coef.to(g.device))
    return total


def lr_factor(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Linear warm-up over `warmup` steps, then cosine from 1 to min_ratio at `total`."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


# ----------------------------------------------------------------------------------------------
# Distributed set-up (torchrun sets WORLD_SIZE, RANK, LOCAL_RANK)

@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def mean(self, t: torch.Tensor) -> torch.Tensor:
        if self.world > 1:
            t = t.clone()
            dist.all_reduce(t)
            t /= self.world
        return t


def init_distributed(device: str) -> Dist:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Dist()
    if not dist.is_initialized():
        # gloo for CPU tensors (losses, counters), nccl for CUDA ones
        dist.init_process_group("cpu:gloo,cuda:nccl" if device.startswith("cuda") else "gloo")
    return Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def finish_distributed() -> bool:
    """After a finished run: wait for every process and say whether there was a process group. Not
    destroyed: gloo's teardown (destroy_process_group or interpreter exit) aborted about one finished
    torchrun run in ten here ("terminate called without an active exception", in C++, no Python frame)."""
    if not (dist.is_available() and dist.is_initialized()):
        return False
    dist.barrier()
    return True


def resolve_device(device: str) -> str:
    """'auto', 'cpu', 'cuda' or 'cuda:N', checked against what this machine has."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        kind = torch.device(device).type
    except (RuntimeError, ValueError):
        raise UsageError(f"--device {device!r} is not a device; use auto, cpu or cuda") from None
    if kind not in ("cpu", "cuda"):
        raise UsageError(f"--device {device!r} is not supported; use auto, cpu or cuda")
    if kind == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {device}: no CUDA device is available here; use --device cpu")
    return device


def pick_device(device: str, d: Dist) -> str:
    device = resolve_device(device)
    if device == "cuda" and d.world > 1:
        device = f"cuda:{d.local_rank}"
        torch.cuda.set_device(device)
    return device


# ----------------------------------------------------------------------------------------------
# Metrics

def _step_of(line: str) -> int | None:
    """The step of a metrics record, or None for a line a killed run left half-written."""
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return None


class Metrics:
    """metrics.jsonl (one JSON record per line) and TensorBoard, written by the main process only."""

    def __init__(self, out_dir: Path, start_step: int, enabled: bool) -> None:
        self.enabled = enabled
        self.path = out_dir / "metrics.jsonl"
        self.tb = None
        if not enabled:
            return
        self._truncate_after(start_step)
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(out_dir / "tb"), purge_step=start_step + 1 if start_step else None)
        except ImportError:
            self.tb = None

    def _truncate_after(self, step: int) -> None:
        """On resume, drop the records of steps the run is about to redo."""
        if not self.path.is_file():
            return
        kept = [line for line in self.path.read_text().splitlines() if _step_of(line) is not None
                and _step_of(line) <= step]
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        os.replace(tmp, self.path)

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as fh:
            fh.write(json.dumps(record) + "\n")
        if self.tb is not None:
            for k, v in record.items():
                if k not in ("step", "kind") and isinstance(v, (int, float)):
                    self.tb.add_scalar(f"{record['kind']}/{k}", v, record["step"])

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


@torch.no_grad()
def calibrate_query_norms(model: torch.nn.Module, batches, autocast=contextlib.nullcontext, d: Dist = Dist()) -> int:
    """Precise BN for PEER's query norms that keep running statistics (BatchNorm; `QueryWhitening`, a
    mean and a covariance per head): reset them and re-estimate them as the plain average over `batches`
    (token windows, (B, T + 1)) at the current weights, the rest of the model in eval mode. The
    momentum-0.1 running averages of training trail the query network, which moves fast early in
    training; evaluation with them retrieves from stale, off-centre queries (few experts, high loss).
    Training itself is unchanged (it normalises with batch statistics). Returns the number of norms set."""
    from .layers.peer import PEER

    norms = [m.query_norm for m in model.modules()
             if isinstance(m, PEER) and getattr(m.query_norm, "track_running_stats", False)]
    if not norms:
        return 0
    was_training = model.training
    model.eval()
    saved = [(bn.momentum, bn.num_batches_tracked.clone()) for bn in norms]
    for bn in norms:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative average over the calibration batches
        bn.train()
    try:
        for w in batches:
            with autocast():
                model(w[:, :-1], return_aux=False)
    finally:
        for bn, (momentum, tracked) in zip(norms, saved):
            bn.momentum = momentum
            bn.num_batches_tracked.copy_(tracked)
        model.train(was_training)
    if d.world > 1:
        for bn in norms:
            for name, buf in bn.named_buffers():
                if name.startswith("running_"):  # mean and var (BatchNorm) or cov (whitening)
                    dist.all_reduce(buf)
                    buf /= d.world
    return len(norms)


# ----------------------------------------------------------------------------------------------
# Evaluation

def loss_metrics(loss: float, bytes_per_token: float) -> dict:
    """A mean next-token loss in nats with its perplexity and bits per byte of text."""
    return {"val_loss": loss, "val_ppl": math.exp(min(loss, 50.0)), "val_bpb": loss / math.log(2) / bytes_per_token}


@torch.no_grad()
def evaluate(model: torch.nn.Module, data: TokenData, seq_len: int, max_tokens: int, batch: int,
             device: str, d: Dist = Dist(), autocast=contextlib.nullcontext) -> dict:
    """Mean next-token loss over the fixed validation windows, with perplexity and bits per byte.

    Models with Mixture-of-Depths blocks are also evaluated with causal routing (val_loss_causal): the
    token-by-token decisions of sampling, where the training-time top-k looks at future tokens. For PEER
    layers, expert usage over the same tokens ("layer{i}.peer_usage", "layer{i}.peer_kl")."""
    from .layers.peer import PEER, usage_from_scores

    was_training = model.training
    model.eval()
    has_peer = any(isinstance(m, PEER) for m in model.modules())
    windows = val_windows(data.val, seq_len, max_tokens)[d.rank::d.world]
    routings = [False, True] if any(isinstance(m, MoD) for m in model.modules()) else [False]
    total = torch.zeros(len(routings), 2, dtype=torch.float64)
    scores: dict[str, torch.Tensor] = {}  # router scores accumulated per expert, per PEER layer
    for i in range(0, len(windows), batch):
        w = windows[i:i + batch].to(device)
        for j, causal in enumerate(routings):
            with autocast():
                out = model(w[:, :-1], w[:, 1:], return_aux=has_peer and j == 0, causal_routing=causal)
            for name, v in out.stats.items():
                if name.endswith("expert_scores"):
                    scores[name] = scores[name] + v.double() if name in scores else v.double()
            total[j] += torch.tensor([out.loss.item() * w[:, 1:].numel(), w[:, 1:].numel()], dtype=torch.float64)
    if d.world > 1:
        dist.all_reduce(total)
        for v in scores.values():
            dist.all_reduce(v)
    model.train(was_training)
    loss = (total[0, 0] / total[0, 1]).item()
    res = loss_metrics(loss, data.val.bytes_per_token) | {"val_tokens": int(total[0, 1])}
    if len(routings) > 1:
        res["val_loss_causal"] = (total[1, 0] / total[1, 1]).item()
    for name, v in sorted(scores.items()):
        u = usage_from_scores(v.cpu())
        layer = name.removesuffix("expert_scores").rstrip("._")
        res[f"{layer}.peer_usage"], res[f"{layer}.peer_kl"] = u["usage"], u["kl_uniform"]
    return res


# ----------------------------------------------------------------------------------------------
# The run

def _rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class Trainer:
    def __init__(self, cfg: RunConfig, out_dir: str | Path, *, resume: bool = False, overwrite: bool = False,
                 device: str = "auto", progress: bool = True, log=None, on_step=None, bar_position: int = 0) -> None:
        """on_step(done): called after every optimizer step (an outer progress bar);
        bar_position: the line of this run's progress bar (1 below an outer bar, which it then leaves alone)."""
        self.out_dir = Path(out_dir)
        self.on_step, self.bar_position = on_step, bar_position
        self.dist = init_distributed(resolve_device(device))
        self.device = pick_device(device, self.dist)
        self.progress = progress and self.dist.main
        self.log = log or (lambda msg: print(msg, file=sys.stderr) if self.dist.main else None)
        self.resume, self.overwrite = resume, overwrite
        self.cfg = cfg
        t = cfg.train
        if t.batch_size % (self.dist.world * t.grad_accum):
            raise UsageError(f"--batch-size {t.batch_size} is not divisible by processes x --grad-accum "
                             f"({self.dist.world} x {t.grad_accum}); the global batch is split evenly")
        prepare_out_dir(self.out_dir, resume, overwrite)
        steps_in_budget(self.cfg)  # fail fast, before reading data; counted again once the vocabulary is known
        self.data = self._prepare_data()
        check_length(self.data.train, t.seq_len, "training")
        check_length(self.data.val, t.seq_len, "validation")
        self.total_steps = steps_in_budget(self.cfg)

    def _prepare_data(self) -> TokenData:
        t = self.cfg.train
        tokenizer = load_from_dir(self.out_dir, t.tokenizer) if self.resume else None
        data = None
        if self.dist.main:  # the main process fills the cache; the others then read it
            data = prepare(t.data, t.tokenizer, t.val_fraction, t.text_field, tokenizer, log=self.log)
        self.dist.barrier()
        if data is None:
            data = prepare(t.data, t.tokenizer, t.val_fraction, t.text_field, tokenizer, log=lambda m: None)
        if data.tokenizer.vocab_size != self.cfg.model.vocab_size:
            if self.resume:
                raise UsageError(f"the run's tokenizer has {data.tokenizer.vocab_size} tokens but its model "
                                 f"{self.cfg.model.vocab_size}; the run directory is damaged")
            self.cfg.model = replace(self.cfg.model, vocab_size=data.tokenizer.vocab_size)
        return data

    # -- set-up of model, optimizer and state ------------------------------------------------
    def _build(self) -> int:
        t = self.cfg.train
        torch.manual_seed(t.seed)
        self.model = MixtureLM(self.cfg.model).to(self.device)
        groups = param_groups(self.model, t.weight_decay, t.peer_lr, t.peer_key_lr)
        self.opt = torch.optim.AdamW(groups, lr=t.lr, betas=(t.beta1, t.beta2),
                                     fused=True)  # one kernel per step, on CPU as on CUDA
        warmup = min(t.warmup_steps, self.total_steps)

        def schedule(s: int) -> float:
            return lr_factor(s, warmup, self.total_steps, t.min_lr_ratio)

        def constant(s: int) -> float:
            return 1.0

        self.sched = torch.optim.lr_scheduler.LambdaLR(  # a given peer_lr / peer_key_lr is held fixed
            self.opt, [constant if g.get("fixed_lr") else schedule for g in groups])
        # PEER's sparse-gradient expert tables: lazy Adam on the touched rows only (no N x d work per step)
        self.sparse_params = peer_parameters(self.model)[0]
        # gradient clipping: the model under one norm, side networks (MoD's predictor) apart
        self.side_params = side_network_parameters(self.model)
        side = {id(p) for p in self.side_params}
        self.clipped_params = [p for p in self.model.parameters() if id(p) not in side]
        self.sparse_opt = self.sparse_sched = None
        if self.sparse_params:
            self.sparse_opt = torch.optim.SparseAdam(self.sparse_params, lr=t.peer_lr or t.lr, betas=(t.beta1, t.beta2))
            self.sparse_sched = torch.optim.lr_scheduler.LambdaLR(
                self.sparse_opt, schedule if t.peer_lr is None else constant)
        self.tokens_seen, self.elapsed = 0, 0.0
        start = 0
        ckpt = checkpoint.latest(self.out_dir) if self.resume else None
        if ckpt is not None:
            checkpoint.verify(ckpt)
            checkpoint.load_weights(self.model, ckpt)
            state = checkpoint.load_train_state(ckpt)
            self.opt.load_state_dict(state["optimizer"])
            self.sched.load_state_dict(state["scheduler"])
            if self.sparse_opt is not None:
                self.sparse_opt.load_state_dict(state["peer_optimizer"])
                self.sparse_sched.load_state_dict(state["peer_scheduler"])
            _set_rng_state(state["rng"])
            start, self.tokens_seen, self.elapsed = state["step"], state["tokens_seen"], state["elapsed"]
            self.log(f"resuming from {ckpt} at step {start}")
        self.ddp_model = self.model
        if self.dist.world > 1:
            self.ddp_model = torch.nn.parallel.DistributedDataParallel(
                self.model, device_ids=[self.dist.local_rank] if self.device.startswith("cuda") else None)
        return start

    def _write_run_files(self) -> None:
        if not self.dist.main:
            return
        if self.overwrite and not self.resume and self.out_dir.exists():
            clear_out_dir(self.out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        data_file = self.out_dir / "data.json"
        if not self.resume:
            checkpoint.write_json_atomic(self.out_dir / checkpoint.CONFIG_FILE, self.cfg.to_dict())
            checkpoint.write_json_atomic(data_file, self.data.stats)
            self.data.tokenizer.save(self.out_dir)
        elif data_file.is_file() and json.loads(data_file.read_text()).get("cache_key") != self.data.stats["cache_key"]:
            self.log(f"warning: the data of {self.out_dir} changed since the run started (files added, removed "
                     "or modified); the resumed run will not repeat the original exactly")

    def _autocast(self):
        if self.cfg.train.dtype == "bf16":
            return torch.autocast(device_type=self.device.split(":")[0], dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _save(self, step: int) -> None:
        if not self.dist.main:
            return
        state = {"step": step, "optimizer": self.opt.state_dict(), "scheduler": self.sched.state_dict(),
                 "rng": _rng_state(), "tokens_seen": self.tokens_seen, "elapsed": self.elapsed}
        if self.sparse_opt is not None:
            state["peer_optimizer"] = self.sparse_opt.state_dict()
            state["peer_scheduler"] = self.sparse_sched.state_dict()
        checkpoint.save(self.out_dir, step, self.model, self.cfg.to_dict(), self.data.tokenizer, state,
                        keep=self.cfg.train.keep_ckpts)

    # -- one optimizer step ----------------------------------------------------------------------
    def _train_step(self, step: int) -> dict:
        t, d = self.cfg.train, self.dist
        rows = train_rows(self.data.train, step, t.seed, t.batch_size, t.seq_len)
        micro = t.batch_size // (d.world * t.grad_accum)
        lm_loss = torch.zeros((), dtype=torch.float64)
        aux_sums: dict[str, float] = {}
        stat_sums: dict[str, float] = {}
        for m in range(t.grad_accum):
            first = (m * d.world + d.rank) * micro
            chunk = rows[first:first + micro].to(self.device)
            sync = m == t.grad_accum - 1 or d.world == 1
            with (contextlib.nullcontext() if sync else self.ddp_model.no_sync()), self._autocast():
                out = self.ddp_model(chunk[:, :-1], chunk[:, 1:])
                loss = out.loss if out.aux_loss is None else out.loss + out.aux_loss
            (loss / t.grad_accum).backward()
            lm_loss += out.loss.detach().double().cpu() / t.grad_accum
            for k, v in out.aux_losses.items():
                aux_sums[k] = aux_sums.get(k, 0.0) + v.item() / t.grad_accum
            for k, v in out.stats.items():
                if v.numel() == 1:
                    stat_sums[k] = stat_sums.get(k, 0.0) + v.item() / t.grad_accum
        clip = t.grad_clip if t.grad_clip > 0 else float("inf")
        if self.sparse_opt is None:
            grad_norm = torch.nn.utils.clip_grad_norm_(self.clipped_params, clip)
        else:  # one norm over dense and sparse gradients alike
            mark_coalesced(self.sparse_params)
            grad_norm = clip_grad_norm(self.clipped_params, clip)
        if self.side_params:  # clipped apart (side_network_parameters)
            clip_grad_norm(self.side_params, clip)
        lr = self.opt.param_groups[0]["lr"]
        self.opt.step()
        self.sched.step()
        self.opt.zero_grad(set_to_none=True)
        if self.sparse_opt is not None:
            self.sparse_opt.step()
            self.sparse_sched.step()
            self.sparse_opt.zero_grad(set_to_none=True)
        self._after_optimizer_step()
        record = {"loss": d.mean(lm_loss).item(), "lr": lr, "grad_norm": grad_norm.item()}
        names = [f"aux/{k}" for k in aux_sums] + [f"stat/{k}" for k in stat_sums]
        if names:  # the same names on every process: average them over processes
            values = d.mean(torch.tensor(list(aux_sums.values()) + list(stat_sums.values()), dtype=torch.float64))
            record.update(zip(names, values.tolist()))
        return record

    def _after_optimizer_step(self) -> None:
        """Online state of routed layers (the balancing bias) moves here, from loads summed over processes."""
        def total(t: torch.Tensor) -> torch.Tensor:
            if self.dist.world > 1:
                t = t.clone()
                dist.all_reduce(t)
            return t

        for module in self.model.modules():
            if hasattr(module, "after_optimizer_step"):
                module.after_optimizer_step(total)

    # -- the loop ------------------------------------------------------------------------------
    def run(self) -> dict:
        t = self.cfg.train
        if self.device == "cpu":
            steady_allocator()  # no page-fault storm every step
        self._write_run_files()
        self.dist.barrier()
        start = self._build()
        metrics = Metrics(self.out_dir, start, self.dist.main)
        tokens_per_step = t.batch_size * t.seq_len
        flops_per_step = train_flops_per_token(self.cfg.model, t.seq_len) * tokens_per_step
        peak = self._peak_flops()
        bar = self._progress_bar(start)
        self.model.train()
        record: dict = {}
        for step in range(start, self.total_steps):
            t0 = time.perf_counter()
            record = self._train_step(step)
            dt = time.perf_counter() - t0
            self.elapsed += dt
            self.tokens_seen += tokens_per_step
            done = step + 1
            record.update(kind="train", step=done, tokens=self.tokens_seen, flops=done * flops_per_step,
                          tok_per_s=tokens_per_step / dt, mfu=flops_per_step / dt / (peak * self.dist.world),
                          elapsed_s=self.elapsed)
            if done % t.log_every == 0 or done == self.total_steps:
                metrics.write(record)
            if t.peer_bn_calibration and (done % t.eval_every == 0 or done % t.ckpt_every == 0
                                          or done == self.total_steps):
                self._calibrate(done)
            if done % t.eval_every == 0 or done == self.total_steps:
                ev = evaluate(self.model, self.data, t.seq_len, t.eval_tokens, t.batch_size // self.dist.world,
                              self.device, self.dist, self._autocast)
                metrics.write({"kind": "eval", "step": done, "tokens": self.tokens_seen, **ev})
                record.update(ev)
                self._say(bar, f"step {done}/{self.total_steps}: train loss {record['loss']:.4f}, val loss "
                               f"{ev['val_loss']:.4f}, {ev['val_bpb']:.4f} bits/byte")
            if done % t.ckpt_every == 0 or done == self.total_steps:
                self._save(done)
            if self.on_step is not None:
                self.on_step(done)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{record['loss']:.3f}", tok_s=f"{record['tok_per_s']:,.0f}",
                                mfu=f"{record['mfu']:.0%}")
        if bar is not None:
            bar.close()
        metrics.close()
        return self._finish(record, start)

    def _calibrate(self, done: int) -> None:
        """Re-estimate PEER's query BatchNorm statistics on this process's share of the last
        peer_bn_calibration training batches (already trained on: no new data is drawn)."""
        t, d = self.cfg.train, self.dist
        micro = t.batch_size // d.world
        batches = (train_rows(self.data.train, s, t.seed, t.batch_size, t.seq_len)[d.rank * micro:(d.rank + 1) * micro]
                   .to(self.device) for s in range(max(0, done - t.peer_bn_calibration), done))
        calibrate_query_norms(self.model, batches, self._autocast, d)

    def _say(self, bar, msg: str) -> None:
        if bar is not None:
            bar.write(msg, file=sys.stderr)
        else:
            self.log(msg)

    def _peak_flops(self) -> float:
        peak = torch.tensor(measure_matmul_flops(self.device, seconds=0.3) if self.dist.main else 0.0)
        if self.dist.world > 1:  # everyone uses the main process's measurement
            dist.broadcast(peak, 0)
        return float(peak)

    def _progress_bar(self, start: int):
        if not self.progress:
            return None
        from tqdm.auto import tqdm

        return tqdm(total=self.total_steps, initial=start, desc=f"train {self.cfg.preset}", unit="step",
                    dynamic_ncols=True, mininterval=0.5, position=self.bar_position, leave=self.bar_position == 0,
                    disable=None)  # None: no bar when stderr is not a terminal (logs get the eval lines)

    def _last_train_record(self) -> dict:
        """The last training step's metrics (routing statistics among them), {} if none were written."""
        path = self.out_dir / "metrics.jsonl"
        lines = path.read_text().splitlines() if path.is_file() else []
        return next((r for r in map(json.loads, reversed(lines)) if r.get("kind") == "train"), {})

    def _finish(self, record: dict, start: int) -> dict:
        if start >= self.total_steps:  # resumed a finished run: evaluate what is there, beside its last step's record
            record = self._last_train_record() | evaluate(
                self.model, self.data, self.cfg.train.seq_len, self.cfg.train.eval_tokens,
                self.cfg.train.batch_size // self.dist.world, self.device, self.dist, self._autocast)
        summary = {
            "preset": self.cfg.preset, "steps": self.total_steps, "tokens": self.tokens_seen,
            "params": self.model.num_params(),
            "forward_flops_per_token": forward_flops_per_token(self.cfg.model, self.cfg.train.seq_len),
            "train_flops": self.total_steps * self.cfg.train.batch_size * self.cfg.train.seq_len
            * train_flops_per_token(self.cfg.model, self.cfg.train.seq_len),
            "wall_s": self.elapsed, "corpus": self.data.stats,
            **{k: record.get(k) for k in ("loss", "val_loss", "val_ppl", "val_bpb")},
        }
        if "val_loss_causal" in record:
            summary["val_loss_causal"] = record["val_loss_causal"]
        causal = {k.removeprefix("stat/"): v for k, v in record.items()
                  if k.endswith(("mod_causal_accuracy", "mod_causal_fraction"))}
        if causal:
            summary["mod_causal"] = causal
            layers = sorted({k.split(".")[0] for k in causal}, key=lambda name: int(name.removeprefix("layer")))
            self.log("MoD causal routing (last step), accuracy against top-k / fraction routed in: "
                     + ", ".join(f"{n} {causal[n + '.mod_causal_accuracy']:.3f}/{causal[n + '.mod_causal_fraction']:.3f}"
                                 for n in layers)
                     + (f"; val loss top-k {record['val_loss']:.4f}, causal {record['val_loss_causal']:.4f}"
                        if "val_loss_causal" in record else ""))
        usage = {k.split(".")[0]: {"usage": v, "kl_uniform": record[k.replace("peer_usage", "peer_kl")]}
                 for k, v in record.items() if k.endswith("peer_usage")}
        if usage:
            summary["peer_usage"] = usage
            self.log("PEER expert usage over the last evaluation (the paper's Table 2): " + ", ".join(
                f"{k} {u['usage']:.1%} of experts, KL(usage || uniform) {u['kl_uniform']:.3f}" for k, u in usage.items()))
        loads = {k.removeprefix("stat/"): v for k, v in record.items() if k.endswith("load_max_over_mean")}
        if loads:
            summary["load_max_over_mean"] = loads
            self.log("max/mean expert load per layer (last step): "
                     + ", ".join(f"{k.split('.')[0]} {v:.2f}" for k, v in loads.items()))
        if self.dist.main:
            checkpoint.write_json_atomic(self.out_dir / "results.json", summary)
        return summary
