"""The training loop: one optimizer step after another within the budget, with evaluations, metrics,
checkpoints, exact resume and data parallelism (torchrun).

Everything that could reject the run (config, data, budget, output folder) is checked before the output
folder is touched, so a bad command never damages an existing run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import random
import shutil
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from torch.distributed.checkpoint.api import CheckpointException  # a BaseException, not an Exception

from .. import checkpoint
from ..config import TrainConfig
from ..data.tokenizer import load_from_dir
from ..data.tokens import TokenData, check_length, prepare, same_split, train_rows
from ..errors import TrainingDiverged, UsageError
from ..files import write_json_atomic, write_text_atomic
from ..flops import measure_matmul_flops
from ..model import MixtureLM
from ..parallel.expert_training import ExpertSharding, check_expert_parallel
from ..parallel.fsdp import FullyShardedModel, check_fsdp
from ..runtime import steady_allocator
from . import sharded_checkpoint
from .compiling import check_compiler, compiled
from .distributed import init_distributed, pick_device, resolve_device
from .evaluation import calibrate, evaluate
from .metrics import METRICS_FILE, Metrics, last_record, records_after, truncate_records
from .optim import Optimizers, Schedule
from .run import RESUME_CHANGES, RunConfig, check_memory, run_folder, steps_in_budget, train_flops_per_step
from .summary import describe_summary, run_summary


class Trainer:
    def __init__(self, cfg: RunConfig, out_dir: str | Path, *, resume: bool = False, overwrite: bool = False,
                 device: str = "auto", progress: bool = True, log=None, on_step=None, bar_position: int = 0,
                 expert_parallel: int = 1, fsdp: bool = False) -> None:
        """on_step(done): called after every optimizer step (an outer progress bar);
        bar_position: the line of this run's progress bar (1 below an outer bar, which it then leaves alone);
        expert_parallel: E > 1 shards every MoE layer's experts over groups of E consecutive processes
        (mixturelm.parallel.expert_training) instead of replicating the model with DDP;
        fsdp: shard the other parameters, their gradients and optimizer state over every process with FSDP2
        (mixturelm.parallel.fsdp), checkpoints written by every process (training/sharded_checkpoint.py)."""
        self.out_dir = Path(out_dir)
        self.on_step, self.bar_position = on_step, bar_position
        self.dist = init_distributed(resolve_device(device))
        self.device = pick_device(device, self.dist)
        self.progress = progress and self.dist.main
        self.log = log or (lambda msg: print(msg, file=sys.stderr) if self.dist.main else None)
        self.resume = resume  # (overwrite is the run folder's: run_folder below)
        self.was_finished = False  # set by run(): resumed a run that had nothing left to train
        self.cfg = cfg
        self.expert_parallel = expert_parallel
        self.sharding: ExpertSharding | None = None  # set by _build
        self.fsdp, self.fsdp_model = fsdp, None  # FullyShardedModel, set by _build
        t = cfg.train
        if fsdp or expert_parallel != 1:
            with torch.device("meta"):  # the model's layers to check, without allocating its weights
                layout = MixtureLM(cfg.model)
        if fsdp:
            check_fsdp(layout, self.dist.world)
        if expert_parallel != 1:
            check_expert_parallel(layout, expert_parallel, self.dist.world,
                                  cuda=torch.device(self.device).type == "cuda")
            if t.compile:
                raise UsageError("TrainConfig.compile is not supported with --expert-parallel yet; leave one out")
        if t.batch_size % (self.dist.world * t.grad_accum):
            raise UsageError(f"TrainConfig.batch_size={t.batch_size} is not divisible by processes x grad_accum "
                             f"({self.dist.world} x {t.grad_accum}); the global batch is split evenly")
        self.folder = run_folder(self.out_dir, resume, overwrite)
        if t.compile:
            check_compiler(self.device)
        steps_in_budget(self.cfg)  # fail fast, before reading data; counted again once the vocabulary is known
        check_memory(self.cfg, self.dist.world, self.device)
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
            if self.resume and data.tokenizer.vocab_size < self.cfg.model.vocab_size:
                return data  # an embedding padded beyond the tokenizer (imported models): ids never reach it
            if self.resume:
                raise UsageError(f"the run's tokenizer has {data.tokenizer.vocab_size} tokens but its model "
                                 f"{self.cfg.model.vocab_size}; the run directory is damaged")
            self.cfg.model = replace(self.cfg.model, vocab_size=data.tokenizer.vocab_size)
        return data

    # -- set-up of model, optimizer and state ------------------------------------------------
    def _build(self, ckpt: Path | None = None) -> int:
        """Model and optimizer, from the checkpoint `ckpt` (already verified) when resuming."""
        t = self.cfg.train
        torch.manual_seed(t.seed)
        self.model = MixtureLM(self.cfg.model).to(self.device)
        self.n_params = self.model.num_params()  # the whole model's: sharding below keeps a share per process
        sharded_ckpt = ckpt is not None and checkpoint.is_sharded(ckpt)
        if ckpt is not None and not (self.fsdp and sharded_ckpt):  # whole, before anything is sharded
            checkpoint.load_weights(self.model, ckpt)
        self.sharding, self.fsdp_model = None, None
        if self.expert_parallel > 1:
            self.sharding = ExpertSharding(self.model, self.expert_parallel, self.dist.rank, self.dist.world)
        if self.fsdp:
            self.fsdp_model = FullyShardedModel(self.model, self.dist.world, self.sharding)
        self.optim = Optimizers(self.model, t, self.total_steps)
        if self.fsdp_model is not None:
            self.optim.grad_norm_of = self.fsdp_model.grad_norm
        elif self.sharding is not None:
            self.optim.grad_norm_of = self.sharding.grad_norm
        self.tokens_seen, self.elapsed = 0, 0.0
        start = 0
        if ckpt is not None:
            if checkpoint.is_weights_only_start(ckpt):  # written by import-hf or upcycle: weights to start training from
                self.log(f"starting from the weights of {ckpt} at step 0, with a new optimizer")
                return self._wrap(0)
            state = checkpoint.load_train_state(ckpt)
            state = state | {"optimizer": self._optimizer_state(ckpt, state)}
            self.optim.load_state_dict(state)
            _set_rng_state(state["rng"])
            start, self.tokens_seen, self.elapsed = state["step"], state["tokens_seen"], state["elapsed"]
            self.log(f"resuming from {ckpt} at step {start}")
        return self._wrap(start)

    def _optimizer_state(self, ckpt: Path, state: dict) -> dict:
        """The checkpoint's optimizer state as this run holds it (loading a sharded run's weights meanwhile):
        either format into any layout."""
        opt, canonical = self.optim.opt, self._canonical
        if checkpoint.is_sharded(ckpt) and self.fsdp:
            return sharded_checkpoint.load_shards(self.model, opt, canonical, ckpt, state)
        full = (sharded_checkpoint.full_optimizer_state(self.model, opt, canonical, ckpt, state)
                if checkpoint.is_sharded(ckpt) else state["optimizer"])
        if self.fsdp:
            return sharded_checkpoint.shard_optimizer_state(opt, full)
        if self.sharding is not None:
            return self.sharding.shard_optimizer_state(opt, full)
        return full

    def _canonical(self, name: str) -> str:
        return self.sharding.canonical(name) if self.sharding is not None else name

    def _wrap(self, start: int) -> int:
        self.ddp_model = self.model
        if self.dist.world > 1 and self.sharding is None and not self.fsdp:
            self.ddp_model = torch.nn.parallel.DistributedDataParallel(
                self.model, device_ids=[self.dist.local_rank] if self.device.startswith("cuda") else None)
        # the training step's model: compiled when asked. Evaluation, calibration and checkpoints use the
        # eager self.model (the same parameters): they run now and then, in eval mode and without gradients,
        # where a compiled model would compile a second graph for little gain
        self.step_model = compiled(self.ddp_model) if self.cfg.train.compile else self.ddp_model
        return start

    def _on_main(self, write, what: str) -> None:
        """A write the main process does alone (take the folder, a checkpoint, results.json). Every process
        learns whether it failed, so that under torchrun none waits forever in the next collective."""
        error = None
        if self.dist.main:
            try:
                write()
            except Exception as e:  # noqa: BLE001 (re-raised below, on this process and as an error on the others)
                error = e
        failed = self.dist.total(torch.tensor(float(error is not None)))
        if error is not None:
            raise error
        if failed.item():
            raise UsageError(f"the main process failed to {what} in `out_dir`; see its message")

    def _write_run_files(self) -> None:
        if not self.dist.main:
            return
        left = checkpoint.clear_leftovers(self.out_dir)
        if left:
            self.log(f"removed what an interrupted checkpoint write left: {', '.join(left)}")
        data_file = self.out_dir / "data.json"
        if not self.resume:
            write_json_atomic(self.out_dir / checkpoint.CONFIG_FILE, self.cfg.to_dict())
            write_json_atomic(data_file, self.data.stats)
            self.data.tokenizer.save(self.out_dir)
        else:
            self._record_changes()
        if self.resume and data_file.is_file() and not same_split(json.loads(data_file.read_text()), self.data.stats):
            self.log(f"warning: the data of {self.out_dir} changed since the run started (files added, removed "
                     "or modified); the resumed run will not repeat the original exactly")

    def _record_changes(self) -> None:
        """A resumed run given another learning rate (say, after a divergence) or cadence: said, and written
        into its config so that the next resume agrees."""
        path = self.out_dir / checkpoint.CONFIG_FILE
        saved = json.loads(path.read_text())["train"]
        now = self.cfg.train.to_dict()
        default = {f.name: f.default for f in dataclasses.fields(TrainConfig)}  # a config saved before a field
        before = {k: saved.get(k, default[k]) for k in RESUME_CHANGES}
        changed = {k: (before[k], now[k]) for k in RESUME_CHANGES if before[k] != now[k]}
        if changed:
            self.log("the resumed run changes " + ", ".join(f"TrainConfig.{k} {a} -> {b}" for k, (a, b) in changed.items()))
            write_json_atomic(path, self.cfg.to_dict())

    def _diverged(self, step: int, record: dict) -> TrainingDiverged:
        """The error of a non-finite loss or gradient at `step`. The checkpoint of step - 1, if any, holds the
        weights that gave it (resuming there would repeat it whatever the settings): it leaves the series,
        and the message names the newest checkpoint before it."""
        if self.dist.main:
            checkpoint.drop_from(self.out_dir, step - 1)
        self.dist.barrier()
        ckpt = checkpoint.resumable(self.out_dir, lambda m: None)
        where = (f"the last good checkpoint is {ckpt}: resume from it with other settings, e.g. a lower "
                 "TrainConfig.lr (`resume=True`)" if ckpt is not None else
                 "no checkpoint from before it remains: start the run again with other settings, e.g. a lower "
                 "TrainConfig.lr")
        return TrainingDiverged(f"training diverged at step {step} (loss {record['loss']:.4g}, gradient norm "
                                f"{record['grad_norm']:.4g}); {where}", step)

    def _autocast(self):
        if self.cfg.train.dtype == "bf16":
            return torch.autocast(device_type=self.device.split(":")[0], dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _save(self, step: int) -> None:
        """A checkpoint in the single-device format, written by the main process; with expert parallelism
        every process first joins the gathering of the expert slices. Sharded (--fsdp): every process writes
        its shards, the main process the rest."""
        if self.fsdp:
            return self._save_sharded(step)
        weights, optim_state = self.model, self.optim.state_dict()
        if self.sharding is not None:
            weights = self.sharding.full_state_dict(self.model)
            optim_state["optimizer"] = self.sharding.full_optimizer_state(self.optim.opt, optim_state["optimizer"])

        def write() -> None:
            checkpoint.save(self.out_dir, step, weights, self.cfg.to_dict(), self.data.tokenizer,
                            self._train_state(step, optim_state), keep=self.cfg.train.keep_ckpts)

        self._on_main(write, "write a checkpoint")

    def _save_sharded(self, step: int) -> None:
        """Into a temporary folder named alike on every process (the main process's pid), renamed into place
        by the main process once every shard and the rest are on disk: a kill leaves the previous checkpoint."""
        token = [os.getpid()]
        torch.distributed.broadcast_object_list(token, src=0)
        tmp = checkpoint.sharded_tmp(self.out_dir, step, token[0])

        def fresh() -> None:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)

        self._on_main(fresh, "write a checkpoint")
        try:
            extra = sharded_checkpoint.save_shards(self.model, self.optim.opt, self._canonical,
                                                   tmp / checkpoint.DCP_DIR)
        except (Exception, CheckpointException) as e:  # on every process; the half-written folder would hold the space
            if self.dist.main:
                shutil.rmtree(tmp, ignore_errors=True)
            if checkpoint.nearly_full(tmp.parent):
                raise checkpoint.no_space(checkpoint.step_folder(self.out_dir, step).name, tmp.parent) from None
            raise checkpoint.write_failure(e) from None

        def write() -> None:
            optim_state = {"scheduler": self.optim.sched.state_dict(), **extra}
            checkpoint.save(self.out_dir, step, None, self.cfg.to_dict(), self.data.tokenizer,
                            self._train_state(step, optim_state), keep=self.cfg.train.keep_ckpts, tmp=tmp)

        self._on_main(write, "write a checkpoint")

    def _train_state(self, step: int, optim_state: dict) -> dict:
        """train_state.pt: the optimizer's and scheduler's state (`optim_state`, in either format) and what an
        exact resume needs besides, the RNG taken now (when the main process writes)."""
        return {"step": step, **optim_state, "rng": _rng_state(), "tokens_seen": self.tokens_seen,
                "elapsed": self.elapsed}

    # -- one optimizer step ----------------------------------------------------------------------
    def _train_step(self, step: int) -> dict:
        t, d = self.cfg.train, self.dist
        rows = train_rows(self.data.train, step, t.seed, t.batch_size, t.seq_len)
        micro = t.batch_size // (d.world * t.grad_accum)
        lm_loss = torch.zeros((), dtype=torch.float64)
        sums: dict[str, float] = {}  # "aux/layer{i}.{loss}" and "stat/layer{i}.{statistic}", averaged over micro-steps
        for m in range(t.grad_accum):
            first = (m * d.world + d.rank) * micro
            chunk = rows[first:first + micro].to(self.device)
            last = m == t.grad_accum - 1
            sync = last or d.world == 1 or self.sharding is not None or self.fsdp
            if self.fsdp_model is not None:
                self.fsdp_model.set_gradient_sync(last)
            with (contextlib.nullcontext() if sync else self.ddp_model.no_sync()), self._autocast():
                out = self.step_model(chunk[:, :-1], chunk[:, 1:])
                loss = out.loss if out.aux_loss is None else out.loss + out.aux_loss
            (loss / t.grad_accum).backward()
            lm_loss += out.loss.detach().double().cpu() / t.grad_accum
            for prefix, values in (("aux", out.aux_losses), ("stat", out.stats())):
                for k, v in values.items():
                    sums[f"{prefix}/{k}"] = sums.get(f"{prefix}/{k}", 0.0) + v.item() / t.grad_accum
        if self.sharding is not None:  # what DDP does, over the right processes for each parameter
            self.sharding.reduce_gradients(replicated=not self.fsdp)  # FSDP reduced the others
        lr, grad_norm = self.optim.step()
        inner = self.sharding.inner_layers() if self.sharding is not None else set()
        for module in self.model.modules():  # online state (the balancing bias), from loads summed over processes
            if hasattr(module, "after_optimizer_step") and id(module) not in inner:  # a wrapper calls its layer's
                module.after_optimizer_step(d.total)
        record = {"loss": d.mean(lm_loss).item(), "lr": lr, "grad_norm": grad_norm.item()}
        if sums:  # the same names on every process: average them over processes
            record.update(zip(sums, d.mean(torch.tensor(list(sums.values()), dtype=torch.float64)).tolist()))
        return record

    # -- the loop ------------------------------------------------------------------------------
    def finished_results(self, ckpt: Path | None) -> dict | None:
        """When the checkpoint to resume from (verified) is the run's last step and its results are written:
        those results (there is nothing to train)."""
        results = self.out_dir / "results.json"
        if ckpt is None or not results.is_file():
            return None
        step = json.loads((ckpt / checkpoint.META_FILE).read_text()).get("step", 0)
        return json.loads(results.read_text()) if step == self.total_steps else None

    def run(self) -> dict:
        """Train to the budget (or say the run is finished), holding the run directory's lock meanwhile."""
        try:
            return self._run()
        finally:
            self.folder.release()

    def _run(self) -> dict:
        t = self.cfg.train
        self._on_main(self.folder.claim, "take the run directory")  # every value checked: lock, replace, mark
        # the checkpoint to resume from, verified once (a damaged newest one is passed over with a warning)
        ckpt = checkpoint.resumable(self.out_dir, self.log) if self.resume else None
        finished = self.finished_results(ckpt)
        self.was_finished = finished is not None
        if finished is None and ckpt is not None:
            ckpt = self._extension_start(ckpt)
        if finished is not None:
            # a line half written by a kill
            self._on_main(lambda: truncate_records(self.out_dir / METRICS_FILE, self.total_steps), "repair metrics")
            self.log(f"the run in {self.out_dir} is finished ({self.total_steps} of {self.total_steps} steps): "
                     "nothing to train; its results are in results.json")
            return finished
        if self.device == "cpu":
            steady_allocator()  # no page-fault storm every step
        self._on_main(self._write_run_files, "write the run's files")
        start = self._build(ckpt)
        metrics = Metrics(self.out_dir, start, self.dist.main)
        tokens_per_step = t.batch_size * t.seq_len
        flops_per_step = train_flops_per_step(self.cfg)
        peak = self._peak_flops()
        bar = self._progress_bar(start)
        self.model.train()
        record: dict = {}
        for step in range(start, self.total_steps):
            t0 = time.perf_counter()
            record = self._train_step(step)
            if not (math.isfinite(record["loss"]) and math.isfinite(record["grad_norm"])):
                if bar is not None:
                    bar.close()
                metrics.close()
                raise self._diverged(step + 1, record)
            dt = time.perf_counter() - t0
            self.elapsed += dt
            self.tokens_seen += tokens_per_step
            done = step + 1
            record.update(kind="train", step=done, tokens=self.tokens_seen, flops=done * flops_per_step,
                          tok_per_s=tokens_per_step / dt, mfu=flops_per_step / dt / (peak * self.dist.world),
                          elapsed_s=self.elapsed)
            if done % t.log_every == 0 or done == self.total_steps:
                metrics.write(record)
            evaluating = done % t.eval_every == 0 or done == self.total_steps
            at_decay = done == self.stable_step
            if evaluating or done % t.ckpt_every == 0 or at_decay:
                self._calibrate(done)
            if evaluating:
                ev = self._evaluate()
                metrics.write({"kind": "eval", "step": done, "tokens": self.tokens_seen, **ev})
                record.update(ev)
                self._say(bar, f"step {done}/{self.total_steps}: train loss {record['loss']:.4f}, val loss "
                               f"{ev['val_loss']:.4f}, {ev['val_bpb']:.4f} bits/byte")
            if done % t.ckpt_every == 0 or done == self.total_steps or at_decay:
                self._save(done)
            if at_decay:  # wsd: the point a longer budget is extended from
                self._on_main(lambda: checkpoint.keep_stable(checkpoint.step_folder(self.out_dir, done)),
                              "keep the checkpoint of the decay's start")
            if self.on_step is not None:
                self.on_step(done)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{record['loss']:.3f}", tok_s=f"{record['tok_per_s']:,.0f}",
                                mfu=f"{record['mfu']:.0%}")
        if bar is not None:
            bar.close()
        metrics.close()
        if start >= self.total_steps:  # resumed a finished run: evaluate what is there, beside its last step's record
            record = last_record(self.out_dir) | self._evaluate()
        return self._finish(record)

    @property
    def stable_step(self) -> int | None:
        """wsd: the step its decay starts at, whose checkpoint is kept to extend the run from."""
        schedule = self.optim.schedule
        return schedule.decay_start if schedule.kind == "wsd" and 0 < schedule.decay_start < self.total_steps \
            else None

    def _extension_start(self, ckpt: Path) -> Path:
        """The checkpoint a run resumed with another budget goes on from. Where the old and the new schedule
        agree up to the checkpoint, it is the run trained to the new budget, exactly. A wsd run past the start
        of its decay goes on from its kept checkpoint there (its decayed model is set aside as final_<step>);
        otherwise (a cosine run) the rate changes at the checkpoint's step, which the log says."""
        if checkpoint.is_weights_only_start(ckpt):
            return ckpt
        saved = RunConfig.from_dict(checkpoint.load_config(ckpt))
        step = json.loads((ckpt / checkpoint.META_FILE).read_text()).get("step", 0)
        if step > self.total_steps:
            raise UsageError(f"the run has trained {step} steps, more than the budget's {self.total_steps}; give a "
                             f"budget of at least {step} steps, or start a new run")
        old, new = Schedule.of(saved.train, steps_in_budget(saved)), Schedule.of(self.cfg.train, self.total_steps)
        agree = old.agrees_until(new)
        if step <= agree:
            return ckpt
        branch = checkpoint.stable_before(self.out_dir, agree) if new.kind == "wsd" else None
        if branch is not None:
            return self._branch(branch, step, old)
        why = ("a cosine schedule's rates depend on its length; a wsd schedule extends without a change"
               if new.kind == "cosine" else "no checkpoint from before the old decay is left")
        self.log(f"the learning rate of step {step + 1} changes from {saved.train.lr * old.factor(step):.3g} to "
                 f"{self.cfg.train.lr * new.factor(step):.3g}: a {old.kind} schedule of {old.total} steps becomes "
                 f"one of {new.total} ({why})")
        return ckpt

    def _branch(self, branch: Path, step: int, old: Schedule) -> Path:
        """Go on from `branch` (before the old decay): the old decay's checkpoints leave the series, the
        finished shorter run's model kept as final_<step> with its metrics records and results."""
        start = json.loads((branch / checkpoint.META_FILE).read_text())["step"]
        self.dist.barrier()  # every process has verified its checkpoints before the main one moves them
        kept: list[Path | None] = [None]

        def set_aside() -> None:
            _, kept[0] = checkpoint.set_aside_after(self.out_dir, branch, old.total)
            results = self.out_dir / "results.json"
            if kept[0] is not None and results.is_file():
                os.replace(results, kept[0] / "results.json")
            if kept[0] is not None:
                write_text_atomic(kept[0] / METRICS_FILE, "".join(records_after(self.out_dir / METRICS_FILE, start)))

        self._on_main(set_aside, "set aside the decayed checkpoints")
        if kept[0] is not None:
            self.log(f"the model of the {old.total}-step budget (decayed from step {old.decay_start}) is kept as "
                     f"{kept[0]}, with its results and metrics")
        self.log(f"extending the wsd run: training again from its checkpoint of step {start}, before its decay"
                 + (f" (the checkpoint of step {step}, part of the way through that decay, is dropped)"
                    if step != old.total else ""))
        return checkpoint.step_folder(self.out_dir, start)

    def _evaluate(self) -> dict:
        t = self.cfg.train
        return evaluate(self.model, self.data, t.seq_len, t.eval_tokens, t.batch_size // self.dist.world,
                        self.device, self.dist, self._autocast, lockstep=self.sharding is not None or self.fsdp)

    def _calibrate(self, done: int) -> None:
        """What a mechanism must re-estimate before evaluation and checkpoints, on this process's share of
        the last training batches (already trained on: no new data is drawn)."""
        t, d = self.cfg.train, self.dist
        micro = t.batch_size // d.world

        def batches(n: int):
            return (train_rows(self.data.train, s, t.seed, t.batch_size, t.seq_len)[d.rank * micro:(d.rank + 1) * micro]
                    .to(self.device) for s in range(max(0, done - n), done))

        calibrate(self.model, batches, lambda mechanism: mechanism.train_options(t), self._autocast, d)

    def _finish(self, record: dict) -> dict:
        summary = run_summary(self.cfg, self.total_steps, self.tokens_seen, self.n_params, self.elapsed,
                              self.data.stats, record)
        for line in describe_summary(summary):
            self.log(line)
        if "val_loss_causal" in summary:
            self.log(f"val loss with training's routing {summary['val_loss']:.4f}, with causal (sampling) routing "
                     f"{summary['val_loss_causal']:.4f}")
        self._on_main(lambda: write_json_atomic(self.out_dir / "results.json", summary), "write results.json")
        return summary

    def _say(self, bar, msg: str) -> None:
        if bar is not None:
            bar.write(msg, file=sys.stderr)
        else:
            self.log(msg)

    def _peak_flops(self) -> float:
        peak = torch.tensor(measure_matmul_flops(self.device, seconds=0.3) if self.dist.main else 0.0)
        if self.dist.world > 1:  # everyone uses the main process's measurement
            torch.distributed.broadcast(peak, 0)
        return float(peak)

    def _progress_bar(self, start: int):
        if not self.progress:
            return None
        from tqdm.auto import tqdm

        return tqdm(total=self.total_steps, initial=start, desc=f"train {self.cfg.preset}", unit="step",
                    dynamic_ncols=True, mininterval=0.5, position=self.bar_position, leave=self.bar_position == 0,
                    disable=None)  # None: no bar when stderr is not a terminal (logs get the eval lines)


def _rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
