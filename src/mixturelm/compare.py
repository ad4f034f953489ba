"""`mixturelm compare`: at the same training compute, on one corpus, which architecture is best, what does
each cost per token, and what did its routers learn?

The fair-size rule (FAIR_RULE, printed in every report): all architectures of one size share the dense
backbone of that size (width, depth, heads, vocabulary, context) and change only what their mechanism
changes; the presets `<arch>-<size>` define them. Every run gets the same training-FLOP budget, counted by
mixturelm.flops for what the run actually computes, so an architecture cheaper per token trains on more
tokens: the isoFLOP protocol of the MoD and PEER papers. All runs see the same data order (seed), tokenizer,
held-out split, batch, sequence length and validation tokens; the learning rate is the size's preset one.
With several seeds (`seeds`) every run is trained at each seed, which sets its initialisation and its data
order (the same order for every architecture at one seed) and never the held-out split; each architecture
is reported by its mean over the seeds with a 95 % t interval, and by its difference to dense paired by seed
(mixturelm.stats).
Mixture-of-Depths models are scored with causal routing (the token-by-token decisions of sampling), since
the top-k routing of training looks at future tokens.

Layout of --out: compare.json (the settings every run shares), runs/<name>/ (ordinary run directories; with
several seeds runs/<name>/seed-<s>/, one per seed), views/<name>/ (routing views, of the first seed), results.json, loss_vs_flops.png, loss_vs_forward_flops.png, isoflop.png
(with --sweep) and report.html. Run again with the same --out, it skips finished runs and resumes the one in
progress (with several seeds, per run and seed).
"""

from __future__ import annotations

import json
import math
import os
import sys
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from . import checkpoint
from .data.tokens import same_split
from .errors import TrainingDiverged, UsageError
from .files import OutputFolder, has_content, machine, write_json_atomic
from .flops import TRAIN_FLOPS_MULTIPLIER, active_params, forward_flops_per_token, realized_flops_correction
from .mechanisms import registry
from .model import MixtureLM
from .presets import DEFAULT_ARCHS, PRESETS
from .stats import mean_interval, paired_difference
from .training import RunConfig, Trainer, loss_metrics, new_run_config, steps_in_budget
from .training.metrics import metric_records
from .training.run import train_flops_per_step

DEFAULT_SIZE = "tiny"
SWEEP_SIZES = ("debug", "tiny", "small")
# The default budget: 7 min 48 s (Intel Xeon) to 13 min 53 s (AMD EPYC) for the five default architectures on
# 2 quiet CPU cores (benchmarks/compare; peer-tiny's 1024^2 experts take the most time), dense-tiny's 222 steps
# of 16 x 256 tokens, where the curves have separated.
DEFAULT_FLOPS = 6e12

FAIR_RULE = (
    "Every architecture of a size shares that size's dense backbone (width, depth, heads, vocabulary, context) "
    "and changes only what its mechanism changes, as its preset <arch>-<size> says (each run's description). "
    "Every run gets the "
    "same training-FLOP budget, counted for what it computes, so a cheaper architecture trains on more tokens "
    "(the isoFLOP protocol of the MoD and PEER papers). Same data order (at each seed), tokenizer, held-out "
    "split, batch, "
    "sequence length and validation tokens; learning rate of the size's preset. MoD models are scored with "
    "causal routing (as they sample).")

# Settings every run of a compare shares; a compare resumed in the same --out must give the same ones.
SHARED_FIELDS = ("data", "tokenizer", "text_field", "val_fraction", "seed", "batch_size", "seq_len", "eval_tokens",
                 "evals", "budgets", "seeds")
REFERENCE_ARCH = "dense"  # the architecture every other one is compared with, paired by seed


@dataclass
class CompareConfig:
    archs: tuple[str, ...] = DEFAULT_ARCHS
    sizes: tuple[str, ...] = (DEFAULT_SIZE,)
    budgets: tuple[float, ...] = (DEFAULT_FLOPS,)
    sweep: bool = False
    data: str | None = None
    tokenizer: str = "bytes"
    text_field: str = "text"
    val_fraction: float = 0.02
    seed: int = 0
    # several seeds: every run trained at each (initialisation and data order, never the held-out split); empty: `seed`
    seeds: tuple[int, ...] = ()
    batch_size: int = 16
    seq_len: int = 256
    eval_tokens: int = 65536
    evals: int = 8  # evaluations per run, evenly spaced: the points of the loss-vs-FLOPs curves
    view_tokens: int = 512  # tokens of validation text the routing views are drawn on
    text: str | None = None  # or this text

    def __post_init__(self) -> None:
        for name in ("batch_size", "seq_len", "eval_tokens", "evals", "view_tokens"):
            if getattr(self, name) < 1:
                raise UsageError(f"CompareConfig.{name} must be at least 1, got {getattr(self, name)}")
        if self.eval_tokens < self.seq_len:  # evaluation reads whole windows of seq_len tokens
            raise UsageError(f"CompareConfig.eval_tokens={self.eval_tokens} is below one window of "
                             f"CompareConfig.seq_len={self.seq_len}; give at least {self.seq_len}")
        if not self.archs or not self.sizes or not self.budgets:
            raise UsageError("give at least one architecture (CompareConfig.archs), size and budget "
                             "(CompareConfig.budgets)")
        budgets = ",".join(f"{b:g}" for b in self.budgets)
        if not all(0 < b < math.inf for b in self.budgets):  # also refuses NaN
            raise UsageError(f"CompareConfig.budgets={budgets} must be positive and finite, e.g. 4e12")
        if len(set(self.budgets)) < len(self.budgets):
            raise UsageError(f"CompareConfig.budgets={budgets} names a budget twice; give each once")
        self._check_seeds()
        if self.text is not None and not self.text.strip():
            raise UsageError("CompareConfig.text is empty; give some text for the routing views or none")

    def _check_seeds(self) -> None:
        seeds = ",".join(str(s) for s in self.seeds)
        if not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in self.seeds):
            raise UsageError(f"CompareConfig.seeds={seeds} must be integers >= 0, e.g. 0,1,2")
        if len(set(self.seeds)) < len(self.seeds):
            raise UsageError(f"CompareConfig.seeds={seeds} names a seed twice; give each once")
        if self.seeds and self.seed != 0 and tuple(self.seeds) != (self.seed,):
            raise UsageError(f"CompareConfig.seed={self.seed} and CompareConfig.seeds={seeds} both given; give the "
                             "seeds with CompareConfig.seeds alone")
        if len(self.seeds) == 1:  # one seed is `seed`: the same compare, the same folders
            self.seed, self.seeds = self.seeds[0], ()
        self.seeds = tuple(self.seeds)

    @property
    def run_seeds(self) -> tuple[int, ...]:
        """The seeds every run is trained at."""
        return self.seeds or (self.seed,)

    def shared(self) -> dict:
        d = asdict(self) | {"seeds": list(self.run_seeds)}
        return {k: list(d[k]) if isinstance(d[k], tuple) else d[k] for k in SHARED_FIELDS}


@dataclass
class RunPlan:
    name: str  # the architecture at its size and budget, one row of the results whatever the seeds
    arch: str
    size: str
    budget: float
    config: RunConfig
    steps: int
    seed: int = 0
    folder: str = ""  # its run directory under runs/: the name, or name/seed-<s> with several seeds

    def __post_init__(self) -> None:
        self.folder = self.folder or self.name

    @property
    def label(self) -> str:
        return self.name if self.folder == self.name else f"{self.name} seed {self.seed}"


# ----------------------------------------------------------------------------------------------
# Planning: everything that could reject the compare is checked before --out is touched

def plan_runs(cc: CompareConfig, vocab_size: int) -> list[RunPlan]:
    """One run per seed, architecture, size and budget, with its steps in the budget: seed by seed, so that a
    compare stopped early has whole comparisons at its first seeds."""
    runs = []
    for seed in cc.run_seeds:
        runs += _plan_seed(cc, vocab_size, seed)
    return runs


def _plan_seed(cc: CompareConfig, vocab_size: int, seed: int) -> list[RunPlan]:
    runs = []
    for arch in cc.archs:
        for size in cc.sizes:
            preset = f"{arch}-{size}"
            if preset not in PRESETS:
                known = sorted({p.rsplit("-", 1)[0] for p in PRESETS if p.endswith(f"-{size}")})
                raise UsageError(f"no architecture {arch!r} at size {size} (no preset {preset}); choose "
                                 f"CompareConfig.archs from {', '.join(known)}")
            for budget in cc.budgets:
                cfg = new_run_config(preset, {
                    "max_flops": budget, "data": cc.data, "tokenizer": cc.tokenizer, "text_field": cc.text_field,
                    "val_fraction": cc.val_fraction, "seed": seed, "batch_size": cc.batch_size,
                    "seq_len": cc.seq_len, "eval_tokens": cc.eval_tokens, "keep_ckpts": 1, "log_every": 1})
                cfg.model = replace(cfg.model, vocab_size=vocab_size)
                per_step = train_flops_per_step(cfg)
                if budget < per_step:
                    raise UsageError(f"CompareConfig.budgets: {budget:g} is smaller than one step of {preset} "
                                     f"({per_step:.3g} FLOPs per step); raise it or lower CompareConfig.batch_size / "
                                     "seq_len")
                try:
                    steps = steps_in_budget(cfg)
                except UsageError as e:  # in compare's words: the budget is --flops here
                    raise UsageError(str(e).replace("TrainConfig.max_flops", f"CompareConfig.budgets {budget:g}")) from None
                every = max(1, math.ceil(steps / cc.evals))
                # four checkpoints a run: a resume loses at most a quarter of it (peer-tiny's are 3 GB each)
                cfg.train = replace(cfg.train, eval_every=every, ckpt_every=every * math.ceil(cc.evals / 4))
                name = preset if len(cc.budgets) == 1 else f"{preset}-{budget:.3g}"
                folder = name if len(cc.run_seeds) == 1 else f"{name}/seed-{seed}"
                runs.append(RunPlan(name, arch, size, budget, cfg, steps, seed, folder))
    return runs


COMPARE_KIND = "compare"


def check_out_dir(out: Path, cc: CompareConfig, overwrite: bool) -> tuple[OutputFolder, bool]:
    """--out checked, nothing written: the folder, and True when it holds this compare already (resume).
    Errors for anything we must not touch."""
    folder = OutputFolder(out, COMPARE_KIND, overwrite=overwrite, legacy=lambda p: (p / "compare.json").is_file(),
                          exists_hint="give the same settings to resume it, add `overwrite=True` to replace it, or "
                                      "choose another `out`")
    if overwrite or not has_content(out) or not folder.is_own_kind():
        return folder.check(), False
    marker = out / "compare.json"
    try:
        saved = json.loads(marker.read_text())["shared"]
    except (OSError, ValueError, KeyError, TypeError):
        raise UsageError(f"{marker} is unreadable; the compare is damaged, add `overwrite=True` to start it "
                         "again") from None
    saved = {"seeds": [saved.get("seed")]} | saved  # compares from before several seeds had one
    diff = [k for k in SHARED_FIELDS if k != "seed" and saved.get(k) != cc.shared()[k]]  # seeds holds seed
    if diff:
        k = diff[0]
        raise UsageError(f"`out` {out} holds a compare with {k} {saved.get(k)!r}, not {cc.shared()[k]!r}; give the "
                         "same settings to resume it, `overwrite=True` to replace it, or another `out`")
    folder.resume = True
    return folder.check(), True


def check_same_corpus(out: Path, stats: dict) -> None:
    """The runs already in --out were trained on this corpus: files added, removed or changed since (or a
    version of mixturelm that splits it otherwise) would give the architectures different data."""
    saved = json.loads((out / "compare.json").read_text())
    recorded = saved.get("corpus")
    if recorded is None:  # written before compare.json kept the corpus: the first run's record of it
        recorded = next((json.loads(f.read_text()) for f in sorted(out.glob("runs/*/data.json"))), None)
    if recorded is not None and not same_split(recorded, stats):
        raise UsageError(f"the corpus changed since the compare in `out` {out} started (files added, removed or "
                         "modified, or split by another version), so its runs would not see the same data; restore "
                         "it, or add `overwrite=True` to start the compare again, or use another `out`")


# ----------------------------------------------------------------------------------------------
# Running

def run_compare(cc: CompareConfig, out: Path, *, overwrite: bool = False, device: str = "auto",
                progress: bool = True, command: str = "", log=None) -> dict:
    from .data.tokens import check_length, prepare

    from .training import resolve_device

    log = log or (lambda msg: print(msg, file=sys.stderr))
    resolve_device(device)  # a bad --device is refused before --out is touched
    plan_runs(cc, vocab_size=1)  # unknown architectures and budgets too small even so, before reading the corpus
    folder, resume = check_out_dir(out, cc, overwrite)
    data = prepare(cc.data, cc.tokenizer, cc.val_fraction, cc.text_field, log=log)
    check_length(data.train, cc.seq_len, "training")
    check_length(data.val, cc.seq_len, "validation")
    if resume:
        check_same_corpus(out, data.stats)
    runs = plan_runs(cc, data.tokenizer.vocab_size)
    if resume:  # every run folder checked before any run trains
        for r in runs:
            finished_run(r, out / "runs" / r.folder)
    folder.claim()  # every value checked: lock, empty when replacing, mark
    if not resume:
        write_json_atomic(out / "compare.json", {"shared": cc.shared(), "command": command,
                                                 "corpus": data.stats})
    done_steps = {r.folder: _finished_steps(out / "runs" / r.folder) for r in runs}
    bar = _outer_bar(progress, sum(r.steps for r in runs), sum(min(done_steps[r.folder], r.steps) for r in runs))
    rows = []
    try:
        for i, r in enumerate(runs):
            run_dir = out / "runs" / r.folder
            _say(bar, log, f"[{i + 1}/{len(runs)}] {r.label}: {r.steps} steps in {r.budget:.3g} FLOPs")
            rows.append(_run_one(r, run_dir, device, progress, bar, log))
        if bar is not None:
            bar.close()
        results = collect(cc, out, runs, rows, data, command)
        write_json_atomic(out / "results.json", results)
        from .report import write_report

        write_report(out, results, runs, data, cc, log=log)
    finally:
        if bar is not None:
            bar.close()
        folder.release()
    return results


def _finished_steps(run_dir: Path) -> int:
    """Steps already trained in a run directory (its newest checkpoint), 0 if none."""
    pointer = checkpoint.latest_pointer(run_dir) if run_dir.is_dir() else None
    if pointer is None:
        return 0
    try:  # for the progress bar only: not verified here (the resume verifies it)
        return int(json.loads((pointer.parent / pointer.read_text().strip() / "meta.json").read_text())["step"])
    except (OSError, ValueError, KeyError):
        return 0


# How often a run saves does not change what it computes: a run saved more or less often is the same run.
NOT_RESULTS = ("ckpt_every", "keep_ckpts")


def same_run(saved: dict, planned: dict) -> bool:
    """Whether a saved run config is the planned one, whichever version of mixturelm wrote it (both are read
    back through RunConfig, which takes the older formats)."""
    def strip(cfg: dict) -> dict:
        try:
            cfg = RunConfig.from_dict(cfg).to_dict()
        except (UsageError, KeyError, TypeError):
            return {"unreadable": cfg}
        return cfg | {"train": {k: v for k, v in cfg.get("train", {}).items() if k not in NOT_RESULTS}}
    return strip(saved) == strip(planned)


def finished_run(r: RunPlan, run_dir: Path) -> dict | None:
    """The summary of a run already finished in run_dir, None if it is not; an error if run_dir cannot be
    this compare's run (checked for every run before any trains, so a bad --out costs nothing)."""
    results_file = run_dir / "results.json"
    config_file = run_dir / checkpoint.CONFIG_FILE
    if not config_file.is_file():
        if has_content(run_dir):  # its own lock and marker are not content
            raise UsageError(f"{run_dir} is damaged (files but no {checkpoint.CONFIG_FILE}); delete it to train that "
                             "run again, or add `overwrite=True` to start the compare again")
        return None
    if not same_run(_read_json(config_file), r.config.to_dict()):
        raise UsageError(f"{run_dir} was trained with other settings than this compare gives it (another "
                         "mixturelm version?); add `overwrite=True` to start the compare again, or use another `out`")
    finished = _read_json(results_file) if results_file.is_file() else None
    return finished if finished is not None and finished.get("steps") == r.steps else None


def _run_one(r: RunPlan, run_dir: Path, device: str, progress: bool, bar, log) -> dict:
    """Train (or resume, or skip) one run; its summary with the load average around it."""
    finished = finished_run(r, run_dir)
    if finished is not None:
        log(f"  {r.label}: finished earlier, skipped")
        return finished | {"skipped": True}
    started = (run_dir / checkpoint.CONFIG_FILE).is_file()
    resume = started and checkpoint.latest_pointer(run_dir) is not None
    load_before = os.getloadavg()[0]
    trainer = Trainer(replace(r.config), run_dir, resume=resume, overwrite=not resume and run_dir.exists(),
                      device=device, progress=progress, log=lambda m: _say(bar, log, "  " + m),
                      on_step=(lambda done: bar.update(1)) if bar is not None else None,
                      bar_position=1 if bar is not None else 0)
    try:
        summary = trainer.run() | {"load_before": load_before, "load_after": os.getloadavg()[0]}
    except TrainingDiverged as e:  # compare sets every run's settings: the fix is not a resume with other ones
        raise TrainingDiverged(f"{r.label} diverged at step {e.step} (its loss stopped being finite); a resumed "
                               "compare would repeat it: start the compare again with `overwrite=True` and another "
                               "`seed` or `batch_size`, or leave that architecture out of `archs`", e.step) from None
    if trainer.dist.main:  # kept with the run, so a resumed compare still reports it
        write_json_atomic(run_dir / "results.json", summary)
    return summary


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        raise UsageError(f"{path} is unreadable; delete its run folder to train that run again, or add "
                         "`overwrite=True` to start the compare again") from None


def _outer_bar(progress: bool, total: int, initial: int):
    if not progress:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc="compare", unit="step", position=0, dynamic_ncols=True,
                disable=None)  # no bar when stderr is not a terminal


def _say(bar, log, msg: str) -> None:
    if bar is not None and not bar.disable:
        bar.write(msg, file=sys.stderr)
    else:
        log(msg)


# ----------------------------------------------------------------------------------------------
# Results

def collect(cc: CompareConfig, out: Path, runs: list[RunPlan], summaries: list[dict], data, command: str) -> dict:
    """The results: one row per architecture, size and budget, over its seeds (see seed_row)."""
    by_name: dict[str, list[dict]] = {}
    for r, s in zip(runs, summaries):
        by_name.setdefault(r.name, []).append(_row(r, s, data, out / "runs" / r.folder) | {"seed": r.seed})
    rows = [seed_row(seed_rows, data.val.bytes_per_token) for seed_rows in by_name.values()]
    add_differences(rows)
    if cc.sweep:
        mark_isoflop_optimal(rows)
    return {"command": command, "machine": machine(), "rule": FAIR_RULE, "settings": json.loads(json.dumps(asdict(cc))),
            "corpus": data.stats, "runs": rows, "pairwise": pairwise_differences(rows)}


# What differs between the seeds of a run and is averaged in its row (the rest is the same at every seed, or is
# the routers' statistics, kept in per_seed).
MEAN_FIELDS = ("val_loss_topk", "train_flops_realized", "tokens_per_s", "wall_s")


def seed_row(seed_rows: list[dict], bytes_per_token: float) -> dict:
    """One run's row over its seeds. One seed: the run's own row. Several: val_loss (with val_ppl and val_bpb
    from it), the curve and MEAN_FIELDS are means over the seeds, and per_seed holds every seed's own row. Both
    have seeds, val_loss_per_seed and val_loss_interval (mixturelm.stats: none for one seed)."""
    losses = [r["val_loss"] for r in seed_rows]
    stats = {"seeds": [r["seed"] for r in seed_rows], "val_loss_per_seed": losses,
             "val_loss_interval": mean_interval(losses).to_dict()}
    if len(seed_rows) == 1:
        return seed_rows[0] | stats
    first = seed_rows[0]
    routers = {m.summary_key for m in registry.all_mechanisms()}  # their statistics stay with each seed
    row = {k: v for k, v in first.items() if k not in {"seed", "curve", "load_average", *MEAN_FIELDS, *routers}}
    row |= loss_metrics(stats["val_loss_interval"]["mean"], bytes_per_token)
    for k in MEAN_FIELDS:
        values = [r.get(k) for r in seed_rows]
        if all(v is not None for v in values):
            row[k] = sum(values) / len(values)
    return row | {"curve": mean_curve([r["curve"] for r in seed_rows])} | stats | {"per_seed": seed_rows}


def mean_curve(curves: list[list[list[float]]]) -> list[list[float]]:
    """The mean loss at each evaluation the seeds' curves share (all of them: the steps are the budget's)."""
    common = set.intersection(*({x for x, _ in c} for c in curves))
    points: dict[float, list[float]] = {}
    for c in curves:
        for x, y in c:
            if x in common:
                points.setdefault(x, []).append(y)
    return [[x, sum(ys) / len(ys)] for x, ys in sorted(points.items())]


def add_differences(rows: list[dict]) -> None:
    """Every row's difference to dense of its size and budget, paired by seed: vs_dense (none for dense itself,
    or where no dense was trained)."""
    reference = {(r["size"], r["budget_flops"]): r for r in rows if r["arch"] == REFERENCE_ARCH}
    for row in rows:
        ref = reference.get((row["size"], row["budget_flops"]))
        if ref is None or ref is row:
            continue
        paired = dict(zip(ref["seeds"], ref["val_loss_per_seed"]))
        mine = [loss for seed, loss in zip(row["seeds"], row["val_loss_per_seed"]) if seed in paired]
        theirs = [paired[seed] for seed in row["seeds"] if seed in paired]
        d = paired_difference(mine, theirs)
        row["vs_dense"] = ({"reference": ref["name"], "per_seed": [a - b for a, b in zip(mine, theirs)]}
                           | d.to_dict() | {"resolved": d.resolved})  # resolved: the interval excludes 0


def pairwise_differences(rows: list[dict]) -> list[dict]:
    """Every pair of runs of the same size and budget, paired by the seeds both have: better (lower mean loss)
    minus worse, with its interval, and whether it is resolved. Dense against the rest is in each row's
    vs_dense; this tells the others apart (is MoD ahead of PEER?)."""
    pairs = []
    for i, a in enumerate(rows):
        for b in rows[i + 1:]:
            if (a["size"], a["budget_flops"]) != (b["size"], b["budget_flops"]):
                continue
            better, worse = (a, b) if a["val_loss"] <= b["val_loss"] else (b, a)
            theirs = dict(zip(worse["seeds"], worse["val_loss_per_seed"]))
            seeds = [s for s in better["seeds"] if s in theirs]
            if not seeds:
                continue
            mine = dict(zip(better["seeds"], better["val_loss_per_seed"]))
            d = paired_difference([mine[s] for s in seeds], [theirs[s] for s in seeds])
            pairs.append({"better": better["name"], "worse": worse["name"], "seeds": seeds}
                         | d.to_dict() | {"resolved": d.resolved})
    return pairs


def _row(r: RunPlan, s: dict, data, run_dir: Path) -> dict:
    cfg, t = r.config, r.config.train
    with torch.device("meta"):  # shapes only
        model = MixtureLM(cfg.model)
    flops_per_step = train_flops_per_step(cfg)
    causal = s.get("val_loss_causal")
    loss = causal if causal is not None else s["val_loss"]
    row = {
        "name": r.name, "arch": r.arch, "size": r.size, "preset": cfg.preset,
        "description": PRESETS[cfg.preset].description, "budget_flops": r.budget,
        "total_params": model.num_params(), "active_params": active_params(model, cfg.model, t.seq_len),
        "forward_flops_per_token": forward_flops_per_token(cfg.model, t.seq_len),
        "train_flops": s["train_flops"], "steps": s["steps"], "tokens": s["tokens"],
        **loss_metrics(loss, data.val.bytes_per_token),
        "val_loss_scored_with": "causal routing" if causal is not None else "the model's forward",
        "tokens_per_s": s["tokens"] / s["wall_s"] if s.get("wall_s") else None, "wall_s": s.get("wall_s"),
        "load_average": [s.get("load_before"), s.get("load_after")],
        "curve": read_curve(run_dir, flops_per_step),
    }
    if causal is not None:
        row["val_loss_topk"] = s["val_loss"]
    realized = realized_train_flops(run_dir, cfg, flops_per_step)
    if realized is not None:  # the budget assumed what a router would choose (integrated MoDE's no-op share)
        row["train_flops_realized"] = realized
    for m in registry.all_mechanisms():  # each mechanism's summary of the run, as its results.json has it
        if m.summary_key in s:
            row[m.summary_key] = s[m.summary_key]
    return row


def realized_train_flops(run_dir: Path, cfg: RunConfig, flops_per_step: float) -> float | None:
    """Training FLOPs with every step's correction for what the routers really chose (flops.
    realized_flops_correction; None when no mechanism corrects anything): what the run really computed."""
    per_step = {}
    for rec in metric_records(run_dir):
        if rec.get("kind") != "train":
            continue
        correction = realized_flops_correction(cfg.model, cfg.train.seq_len, rec)
        if correction is not None:
            per_step[rec["step"]] = correction
    if not per_step:
        return None
    tokens = cfg.train.batch_size * cfg.train.seq_len
    # steps not logged (log_every > 1) count at the mean correction of the logged ones
    mean = sum(per_step.values()) / len(per_step)
    steps = max(per_step)
    return steps * flops_per_step + TRAIN_FLOPS_MULTIPLIER * tokens * (sum(per_step.values())
                                                                       + (steps - len(per_step)) * mean)


def read_curve(run_dir: Path, flops_per_step: float) -> list[list[float]]:
    """(training FLOPs, validation loss) at every evaluation of a run (causal routing for MoD)."""
    points: dict[int, float] = {}
    for rec in metric_records(run_dir):
        if rec.get("kind") == "eval":  # a resumed run may log a step twice: the last one counts
            points[rec["step"]] = rec.get("val_loss_causal", rec["val_loss"])
    return [[step * flops_per_step, loss] for step, loss in sorted(points.items())]


def mark_isoflop_optimal(rows: list[dict]) -> None:
    """Per architecture and budget, the size with the lowest validation loss is isoFLOP-optimal."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault((row["arch"], row["budget_flops"]), []).append(row)
    for group in groups.values():
        best = min(group, key=lambda row: row["val_loss"])
        for row in group:
            row["isoflop_optimal"] = row is best
