"""The `mixturelm` command: thin commands that parse flags, call the library, and turn its errors into one
line on stderr with exit status 2.

The library speaks Python (its errors name config fields: `TrainConfig.lr`, `MoEConfig.top_k`); the command
line speaks flags, and `to_flags` rewrites the field names of an error into the flags that set them.
"""

from __future__ import annotations

import argparse
import dataclasses
import errno
import json
import math
import os
import re
import shlex
import sys
from pathlib import Path

from .errors import TrainingDiverged, UsageError
from .files import abandon_unclaimed
from .mechanisms import registry

# Options of `train` that set TrainConfig fields (flag name -> type, help); given ones override the preset.
TRAIN_OPTIONS: dict[str, tuple[type, str]] = {
    "data": (str, "text: files, folders, globs, .jsonl, hf:NAME[:CONFIG], comma-separated (default: the "
                  "Python standard library source)"),
    "tokenizer": (str, "bytes (default) or bpe:VOCAB, a BPE trained on the training split (e.g. bpe:8192)"),
    "text_field": (str, "field of .jsonl records and Hugging Face datasets that holds the text (default text)"),
    "max_steps": (int, "budget: optimizer steps (default 200 when no budget is given)"),
    "max_tokens": (int, "budget: training tokens"),
    "max_flops": (float, "budget: training FLOPs, as counted by `mixturelm flops`"),
    "batch_size": (int, "sequences per optimizer step, over all processes and accumulation steps"),
    "seq_len": (int, "tokens per training sequence"),
    "grad_accum": (int, "gradient accumulation steps per optimizer step"),
    "lr": (float, "peak learning rate"),
    "min_lr_ratio": (float, "final learning rate as a fraction of the peak"),
    "warmup_steps": (int, "linear warm-up steps"),
    "schedule": (str, "learning-rate schedule: cosine (default) or wsd (warm-up, stable, linear decay; a run "
                      "extended with --resume and a larger budget continues as if trained to it)"),
    "decay_fraction": (float, "wsd: share of the steps spent decaying (default 0.2)"),
    "weight_decay": (float, "AdamW weight decay (matrices only; not norms, biases, embeddings)"),
    "beta1": (float, "AdamW beta1"),
    "beta2": (float, "AdamW beta2"),
    "grad_clip": (float, "clip the gradient norm to this (0: no clipping)"),
    "eval_every": (int, "steps between validation evaluations"),
    "eval_tokens": (int, "validation tokens per evaluation"),
    "log_every": (int, "steps between metric records"),
    "ckpt_every": (int, "steps between checkpoints"),
    "keep_ckpts": (int, "checkpoints kept on disk"),
    "seed": (int, "random seed (weights and data order)"),
    "dtype": (str, "fp32 or bf16 (autocast)"),
    "val_fraction": (float, "fraction of documents held out for validation"),
}

# Options of `train` that switch a TrainConfig field on or off (--name, --no-name; not given: the preset's or
# the resumed run's setting).
TRAIN_SWITCHES: dict[str, str] = {
    "compile": "run the training step through torch.compile (evaluation stays eager); --no-compile: eagerly. "
               "A resumed run may change it",
}

# Options of `train` that change the preset's model shape (ModelConfig fields).
MODEL_OPTIONS: dict[str, tuple[type, str]] = {
    "d_model": (int, "model width (overrides the preset)"),
    "n_layers": (int, "number of blocks (overrides the preset)"),
    "n_heads": (int, "attention heads (overrides the preset)"),
    "n_kv_heads": (int, "key/value heads for grouped-query attention (default: n_heads)"),
    "d_ffn": (int, "FFN hidden size (overrides the preset)"),
}

# Fields of other library objects, as the flags that set them (for to_flags)
OTHER_FLAGS = {"ModelConfig.vocab_size": "--vocab-size", "CompareConfig.budgets": "--flops", "CompareConfig.archs": "--archs", "CompareConfig.text": "--text",
               "CompareConfig.sizes": "--size"}


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def field_flags() -> dict[str, str]:
    """Every config field the command line sets, by its name in library errors, and its flag."""
    flags = {f"TrainConfig.{k}": _flag(k) for k in TRAIN_OPTIONS | TRAIN_SWITCHES}
    flags |= {f"ModelConfig.{k}": _flag(k) for k in MODEL_OPTIONS}
    for m in registry.all_mechanisms():
        for flag, option in m.block_options.items():
            flags[f"BlockSpec.{m.kind}.{option.field}"] = _flag(flag)
            flags[f"{m.config_class.__name__}.{option.field}"] = _flag(flag)
        for flag, option in m.train_flags.items():
            flags[f"{m.train_options_class.__name__}.{option.field}"] = _flag(flag)
    from .compare import CompareConfig

    from .bench import BENCHMARKS

    from .hf.upcycle import UpcycleOptions

    flags |= {f"CompareConfig.{f.name}": _flag(f.name) for f in dataclasses.fields(CompareConfig)}
    flags |= {f"UpcycleOptions.{f.name}": _flag(f.name) for f in dataclasses.fields(UpcycleOptions)}
    for cls, _ in BENCHMARKS.values():
        flags |= {f"{cls.__name__}.{f.name}": _flag(f.name) for f in dataclasses.fields(cls)}
    return flags | OTHER_FLAGS


# parameters of library functions whose flag has another name
PARAMETER_FLAGS = {"out_dir": "out"}


def to_flags(message: str, dests: set[str] = frozenset()) -> str:
    """A library error in the words of the command line: config fields (`TrainConfig.lr`) and parameters
    (`out`, `overwrite=True`, of the command's own options `dests`) become the flags that set them."""
    flags = field_flags()
    names = "|".join(re.escape(k) for k in sorted(flags, key=len, reverse=True))
    pattern = re.compile(rf"(?<![\w./-])(?:{names})(?![\w./])")  # whole names, not inside a path
    message = pattern.sub(lambda m: flags[m.group(0)], message)

    def parameter(m: re.Match) -> str:
        name = PARAMETER_FLAGS.get(m.group(1), m.group(1))
        return _flag(name) if name in dests else m.group(0)

    return re.sub(r"`(\w+)(?:=True)?`", parameter, message)


# errors of the system, not of mixturelm, that the user fixes: one line each, with what to do
SYSTEM_ERRORS = {errno.ENOSPC: "free some space (earlier checkpoints and results are intact)",
                 errno.EDQUOT: "free some space (earlier checkpoints and results are intact)",
                 errno.EROFS: "the file system is read-only; write to another folder",
                 errno.EACCES: "no permission for it; fix its permissions or choose another path",
                 errno.EPERM: "no permission for it; fix its permissions or choose another path"}


class Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2 (argparse would print the usage block too)
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


# ----------------------------------------------------------------------------------------------
# train

def _block_options() -> dict[str, tuple[registry.Mechanism, registry.Option]]:
    return {flag: (m, o) for m in registry.all_mechanisms() for flag, o in m.block_options.items()}


def _train_flags() -> dict[str, tuple[type, str]]:
    """Each mechanism's training options, as train flags (e.g. --peer-lr)."""
    return {flag: (o.type, o.help) for m in registry.all_mechanisms() for flag, o in m.train_flags.items()}


def _add_train(sub) -> None:
    p = sub.add_parser("train", help="train a model on text",
                       description="Train a model of a preset (with options on top) on text, within a budget of "
                                   "steps, tokens or FLOPs; metrics, TensorBoard and checkpoints go to --out.")
    p.add_argument("--preset", help="model preset, e.g. dense-tiny (see --list-presets)")
    p.add_argument("--list-presets", action="store_true", help="print the presets and exit")
    p.add_argument("--out", help="run directory (metrics, TensorBoard, checkpoints)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its latest checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace the run in --out")
    p.add_argument("--device", default="auto", help="cpu, cuda or auto (default)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--expert-parallel", type=int, default=1, metavar="E",
                   help="under torchrun: shard every MoE layer's experts (and every PEER layer's table columns) "
                        "over groups of E consecutive processes (E divides the processes, n_experts and a PEER "
                        "layer's d_model; default 1: DDP replicas)")
    p.add_argument("--fsdp", action="store_true",
                   help="under torchrun: shard the parameters (all but expert slices), their gradients and "
                        "optimizer state over every process with FSDP2; checkpoints are written by every process "
                        "(torch.distributed.checkpoint) and read by any number of processes (not PEER presets)")
    options = TRAIN_OPTIONS | _train_flags() | MODEL_OPTIONS
    options |= {flag: (o.type, o.help) for flag, (m, o) in _block_options().items()}
    for name, (typ, helptext) in options.items():
        p.add_argument(_flag(name), dest=name, type=typ, default=None, help=helptext)
    for name, helptext in TRAIN_SWITCHES.items():
        p.add_argument(_flag(name), dest=name, action=argparse.BooleanOptionalAction, default=None, help=helptext)


def cmd_train(args) -> None:
    from .training import Trainer, finish_distributed, new_run_config, resumed_run_config

    if args.list_presets:
        from .presets import catalogue

        rows = catalogue()
        w = max(len(r["name"]) for r in rows) + 2
        print(f"{'preset':<{w}}{'params':>14}{'fwd FLOPs/token':>18}  description")
        for r in rows:
            print(f"{r['name']:<{w}}{r['params']:>14,}{r['forward_flops_per_token']:>18.3g}  {r['description']}")
        return
    if not args.out:
        raise UsageError("--out DIR is required: the run directory for metrics and checkpoints")
    if args.resume and args.overwrite:
        raise UsageError("--resume and --overwrite contradict each other; choose one")
    given = {k: v for k, v in vars(args).items() if v is not None}
    train = {k: given[k] for k in TRAIN_OPTIONS | TRAIN_SWITCHES | _train_flags() if k in given}
    model = {k: given[k] for k in MODEL_OPTIONS if k in given}
    blocks: dict[str, dict] = {}
    for flag, (m, o) in _block_options().items():
        if flag in given:
            blocks.setdefault(m.kind, {})[o.field] = given[flag]
    out = Path(args.out)
    if args.resume:
        cfg = resumed_run_config(out, args.preset, train, model, blocks)
    else:
        cfg = new_run_config(args.preset, train, model, blocks)
    trainer = Trainer(cfg, out, resume=args.resume, overwrite=args.overwrite, device=args.device,
                      progress=not args.no_progress, expert_parallel=args.expert_parallel,
                      fsdp=args.fsdp)
    summary = trainer.run()
    distributed = finish_distributed()
    if trainer.dist.main:
        print(f"{'already ' if trainer.was_finished else ''}trained {summary['preset']} for {summary['steps']} steps ({summary['tokens']:,} tokens, "
              f"{summary['train_flops']:.3g} FLOPs) in {summary['wall_s']:.0f}s: val loss {summary['val_loss']:.4f}, "
              f"ppl {summary['val_ppl']:.3f}, {summary['val_bpb']:.4f} bits/byte; checkpoint in {out}/checkpoints")
    if distributed:
        # every process is past the barrier, the work is done and written: leave without the C++
        # teardown of the process group, which now and then aborts (training.distributed.finish_distributed)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


# ----------------------------------------------------------------------------------------------
# eval, generate, flops

def _add_eval(sub) -> None:
    p = sub.add_parser("eval", help="validation loss, perplexity, bits per byte of a checkpoint",
                       description="Evaluate a checkpoint on its run's held-out split (or on other text): loss in "
                                   "nats per token, perplexity, bits per byte, and what its routed layers measure.")
    p.add_argument("--ckpt", required=True, help="run directory or checkpoint folder")
    p.add_argument("--data", help="text to evaluate on (default: the checkpoint's training data)")
    p.add_argument("--split", choices=("val", "all"), default="val",
                   help="val: the held-out split (default); all: every document of --data")
    p.add_argument("--max-tokens", type=int, default=None, help="tokens to evaluate (default: the run's eval_tokens)")
    p.add_argument("--batch-size", type=int, default=None, help="windows per forward pass (default: the run's)")
    p.add_argument("--device", default="auto", help="cpu, cuda or auto (default)")
    p.add_argument("--out", help="also write results.json into this folder")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier evaluation in --out")


def cmd_eval(args) -> None:
    from .files import OutputFolder, claim, results_only, write_json_atomic
    from .training import resolve_device
    from .training.evaluation import describe_evaluation, evaluate_checkpoint

    out = OutputFolder(args.out, "evaluation", overwrite=args.overwrite, legacy=results_only("checkpoint", "val_loss"),
                       exists_hint="add `overwrite=True` to replace it, or choose another `out`").check().lock() if args.out else None
    res = evaluate_checkpoint(args.ckpt, args.data, args.split, args.max_tokens, args.batch_size,
                              resolve_device(args.device), log=lambda m: print(m, file=sys.stderr))
    print("\n".join(describe_evaluation(res)))
    if out is not None:
        write_json_atomic(claim(out) / "results.json", res)


def _add_generate(sub) -> None:
    p = sub.add_parser("generate", help="sample text from a checkpoint with a KV cache",
                       description="Continue a prompt with text sampled from a checkpoint, one token at a time with "
                                   "a KV cache (temperature 0: greedy).")
    p.add_argument("--ckpt", required=True, help="run directory or checkpoint folder")
    p.add_argument("--prompt", default="\n", help="text the samples continue (default: a newline)")
    p.add_argument("--max-new-tokens", type=int, default=200, help="tokens to sample (default %(default)s)")
    p.add_argument("--temperature", type=float, default=0.8, help="0 for greedy decoding (default %(default)s)")
    p.add_argument("--top-k", type=int, default=None, help="sample among the k most likely tokens (default: all)")
    p.add_argument("--top-p", type=float, default=None,
                   help="nucleus sampling: the smallest set of tokens with this probability (default: all)")
    p.add_argument("--num-samples", type=int, default=1, help="samples of the same prompt (default %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default %(default)s)")
    p.add_argument("--device", default="auto", help="cpu, cuda or auto (default)")


def cmd_generate(args) -> None:
    import torch

    from . import checkpoint
    from .generate import check_cache_fits, check_sampling, generate
    from .training import resolve_device

    check_sampling(args.temperature, args.top_k, args.top_p, args.max_new_tokens)
    if args.num_samples < 1:
        raise UsageError(f"--num-samples must be >= 1, got {args.num_samples}")
    device = resolve_device(args.device)
    model, _, tokenizer, _ = checkpoint.load_model(args.ckpt, device)
    warnings = {w for m in model.modules() if (mech := registry.of_module(m)) and (w := mech.sampling_warning(m))}
    for warning in sorted(warnings):
        print(f"mixturelm generate: warning: {warning}", file=sys.stderr)
    # the prompt's own bytes, also those that are not UTF-8 (the shell hands them over as surrogates)
    encode = getattr(tokenizer, "encode_prompt", tokenizer.encode)  # an imported model's tokenizer adds its BOS
    ids = torch.as_tensor(encode(args.prompt.encode("utf-8", "surrogateescape")), dtype=torch.long, device=device)
    check_cache_fits(model, args.num_samples, len(ids), args.max_new_tokens, device)
    prompt = ids[None].repeat(args.num_samples, 1)
    gen = torch.Generator(device=device).manual_seed(args.seed)
    routing: dict = {}
    out = generate(model, prompt, args.max_new_tokens, args.temperature, args.top_k, args.top_p, gen, routing)
    for i, row in enumerate(out.tolist()):
        if args.num_samples > 1:
            print(f"--- sample {i + 1}")
        print(tokenizer.decode(row))
    if routing:
        print("fraction of tokens that entered each routed (wrapped) block: "
              + ", ".join(f"{k} {v:.3f}" for k, v in routing.items()), file=sys.stderr)


def _add_flops(sub) -> None:
    p = sub.add_parser("flops", help="FLOPs per token by component, for a preset or a checkpoint",
                       description="Forward and training FLOPs per token of a model, by component, as training "
                                   "budgets and compare count them.")
    p.add_argument("--preset", help="model preset (default dense-tiny)")
    p.add_argument("--ckpt", help="or a run directory / checkpoint folder")
    p.add_argument("--seq-len", type=int, default=None, help="sequence length (default: the preset's)")
    p.add_argument("--vocab-size", type=int, default=None, help="vocabulary (default 257, the byte tokenizer)")
    p.add_argument("--json", action="store_true", help="print JSON")


def cmd_flops(args) -> None:
    from . import checkpoint
    from .config import ModelConfig
    from .flops import describe_flops, flops_report
    from .presets import get_preset

    if args.ckpt:
        ckpt = checkpoint.resolve(args.ckpt)
        checkpoint.verify(ckpt)
        run_cfg = checkpoint.load_config(ckpt)
        cfg, seq_len, name = checkpoint.model_config(run_cfg, ckpt), run_cfg["train"]["seq_len"], str(ckpt)
    else:
        p = get_preset(args.preset or "dense-tiny")
        vocab = {"vocab_size": args.vocab_size} if args.vocab_size is not None else {}
        cfg, seq_len, name = ModelConfig(**(p.model | vocab)), p.train["seq_len"], p.name
    report = flops_report(cfg, args.seq_len if args.seq_len is not None else seq_len)
    if args.json:
        print(json.dumps({"model": name, **report}, indent=1))
    else:
        print("\n".join(describe_flops(name, report)))


# ----------------------------------------------------------------------------------------------
# bench, ensemble, compare, inspect

def _add_bench(sub) -> None:
    p = sub.add_parser("bench", help="side-by-side benchmarks against peers")
    from .bench import BENCHMARKS

    p.add_argument("what", choices=tuple(BENCHMARKS),
                   help="train: our dense model against transformers' Llama; moe: one MoE layer against "
                        "transformers' Mixtral block and the dense floor; mod: Mixture-of-Depths against the "
                        "dense model of the same shape (FLOPs, prefill, training step, decoding); peer: one "
                        "PEER layer against PEER-pytorch and a large copy; compile: the training step of "
                        "presets eager against torch.compile'd, with their graph breaks; parallel: expert parallelism "
                        "over 1, 2, 4 processes (tokens/s, all-to-all time and bytes, peak memory per process)")
    p.add_argument("--steps", type=int, default=5, help="timed steps per contender per round")
    p.add_argument("--rounds", type=int, default=3, help="rounds, alternating the models")
    p.add_argument("--batch-size", type=int, default=None, help="train: 16, mod: 2 (training step), compile: 8")
    p.add_argument("--seq-len", type=int, default=None, help="train: 256, mod: 1024, compile: 128")
    p.add_argument("--presets", default=None, help="compile: comma-separated presets "
                                                     "(default dense-tiny,moe-tiny,mod-tiny,peer-debug)")
    p.add_argument("--capacity", type=float, default=0.125, help="mod: fraction of tokens entering a routed block")
    p.add_argument("--decode-tokens", type=int, default=32, help="mod: tokens decoded after each prompt")
    p.add_argument("--decode-batches", default="1,4,16,64",
                   help="mod: batch sizes to decode at, comma-separated (default 1,4,16,64)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads (default: all cores; parallel: per process, the cores / processes)")
    p.add_argument("--tokens", type=int, default=None,
                   help="moe, peer: tokens per call (default 4096, 2048); parallel: tokens per process (2048)")
    p.add_argument("--no-memory", action="store_true", help="moe, peer: skip the peak-memory measurement")
    p.add_argument("--n-experts", type=int, default=None,
                   help="peer: experts N, a perfect square (default 1048576); parallel: experts per layer (8)")
    p.add_argument("--d-model", type=int, default=None, help="peer, parallel: model width (default 256)")
    p.add_argument("--heads", type=int, default=8, help="peer: retrieval heads")
    p.add_argument("--top-k", type=int, default=None, help="peer: experts per head (default 16); parallel: "
                                                            "experts per token (2)")
    p.add_argument("--d-key", type=int, default=128, help="peer: query / key size")
    p.add_argument("--no-peer", action="store_true", help="peer: time ours alone (no PEER-pytorch)")
    p.add_argument("--procs", default=None, help="parallel: process counts, comma-separated, each also the "
                                                 "expert-parallel size (default 1,2,4)")
    p.add_argument("--device", default=None,
                   help="parallel: cpu with gloo (default) or cuda with nccl, one GPU per process")
    p.add_argument("--d-expert", type=int, default=None, help="parallel: hidden size of each expert (default 512)")
    p.add_argument("--layers", type=int, default=None, help="parallel: MoE layers in the stack (default 2)")
    p.add_argument("--compile", action="store_true",
                   help="train, moe, peer: also time a torch.compile'd copy of ours (compile time not counted); "
                        "mod: the training step of both models compiled")
    p.add_argument("--out", help="also write results.json into this folder")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier benchmark's results in --out")


def cmd_bench(args) -> None:
    from .bench import BENCHMARKS

    config_class, run = BENCHMARKS[args.what]
    names = {f.name for f in dataclasses.fields(config_class)}
    given = {k: v for k, v in vars(args).items() if k in names and v is not None}
    run(config_class(**given), command="mixturelm " + shlex.join(args.argv))


def _add_ensemble(sub) -> None:
    p = sub.add_parser("ensemble", help="mix whole models online: MoE-F and standard aggregators",
                       description="Online aggregation of N experts whose forecasts arrive step by step: MoE-F "
                                   "(stochastic filtering) against uniform, follow-the-leader, Hedge, Fixed-Share, "
                                   "window soft-min and realised-history baselines.")
    what = p.add_subparsers(dest="what", required=True, parser_class=Parser)
    n = what.add_parser("nifty", help="the MoE-F paper's LLM experts on NIFTY ($SPY daily movement)",
                        description="Every aggregator, expert and the paper's MoE-F output on the NIFTY test days, "
                                    "with weighted/macro F1, accuracy and MCC and bootstrap 95 percent intervals.")
    n.add_argument("--out", required=True, help="folder for results.json, report.md and weight heatmaps")
    n.add_argument("--overwrite", action="store_true", help="replace an earlier ensemble report in --out")
    n.add_argument("--data", help="the nifty-moe-f folder (default: the copy inside the package)")
    n.add_argument("--seeds", default="0,13,42", help="comma-separated seeds (default 0,13,42)")
    n.add_argument("--pools", default="all,llama2-7b,llama3-8b",
                   help="comma-separated pools: all (every LLM), llama2-7b and llama3-8b (each with its 4 adapters)")
    n.add_argument("--resamples", type=int, default=1000, help="bootstrap resamples of the days (default 1000)")
    n.add_argument("--no-history", action="store_true",
                   help="leave out the pools that add the realised-history forecasters to the experts")
    n.add_argument("--audit", default="headline", choices=("headline", "every", "none"),
                   help="audit the paper's released MoE-F output against causal and look-ahead (not causal) "
                        "aggregators and a permutation test: headline (default; the all-experts pool of seed 42, "
                        "~15 s), every (each pool with a released output) or none")
    n.add_argument("--permutations", type=int, default=2000,
                   help="permutations of the audit's conditional permutation test (default 2000)")
    m = what.add_parser("lm", help="mix language-model checkpoints on a stream of alternating sources",
                        description="Per-token log loss of each expert, mixed online; bits per byte of each expert, "
                                    "each aggregator and the per-segment oracle; a plot of weights against the source.")
    m.add_argument("--experts", nargs="+", required=True,
                   help="run directories or checkpoints, or Hugging Face folders of causal LMs (config.json, "
                        "safetensors, tokenizer.json); all with the same tokenizer")
    m.add_argument("--data", required=True, help="sources, comma-separated (file, folder or glob each); segments "
                                                 "are drawn from them in turn, from their held-out documents")
    m.add_argument("--out", required=True, help="folder for results.json, report.md and weights.png")
    _stream_options(m)
    m.add_argument("--text-field", default="text", help="field of .jsonl records that holds the text")
    m.add_argument("--resamples", type=int, default=1000, help="bootstrap resamples of segments (default 1000)")
    m.add_argument("--device", default="auto", help="cpu, cuda or auto (default)")
    _add_ensemble_tune(what)


def _floats(text: str, what: str, low: float, high: float, high_included: bool = False) -> tuple[float, ...]:
    """A comma-separated grid of numbers in (low, high) (or (low, high]), or one line naming the bad value."""
    try:
        vals = tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise UsageError(f"{what} {text!r}: give numbers separated by commas") from None
    bad = [v for v in vals if not (low < v < high or (high_included and v == high))]
    if not vals or bad:
        interval = f"({low:g}, {high:g}{']' if high_included else ')'}"
        raise UsageError(f"{what} {text!r}: every value must be in {interval}"
                         + (f", got {bad[0]:g}" if bad else ", and at least one given"))
    return vals


def _add_ensemble_tune(what) -> None:
    from .ensemble import tune

    g = lambda vals: ",".join(f"{v:g}" for v in vals)  # noqa: E731
    t = what.add_parser("tune", help="choose aggregators on development streams, report them on test streams",
                        description="Each aggregator variant's hyper-parameters are chosen on development streams "
                                    "(the dev half of each source's held-out documents), then every variant is "
                                    "reported on test streams (the test half; other source pairs too) against "
                                    "Fixed-Share and the best expert, with 95 percent intervals over segments.")
    t.add_argument("--experts", nargs="+", required=True, help="run directories, checkpoints or Hugging Face folders "
                                                               "of causal LMs, all with the same tokenizer")
    t.add_argument("--dev-data", required=True, help="development streams: sources separated by ',', streams by ';'")
    t.add_argument("--test-data", required=True, help="test streams, written like --dev-data, e.g. 'A,B;A,C'")
    t.add_argument("--out", required=True, help="folder for results.json and report.md")
    _stream_options(t)
    t.add_argument("--switch-rates", default=g(tune.SWITCH_RATES),
                   help=f"grid of switching rates per token, fixed-share and moe-f (default {g(tune.SWITCH_RATES)})")
    t.add_argument("--noises", default=g(tune.NOISES), help=f"grid of moe-f's noise (default {g(tune.NOISES)})")
    t.add_argument("--discounts", default=g(tune.DISCOUNTS),
                   help=f"grid of the Gibbs scores' discount, in (0, 1] (default {g(tune.DISCOUNTS)})")
    t.add_argument("--windows", default=g(tune.WINDOWS), help=f"grid of window-softmin's window (default "
                                                               f"{g(tune.WINDOWS)})")
    t.add_argument("--text-field", default="text", help="field of .jsonl records that holds the text")
    t.add_argument("--resamples", type=int, default=1000, help="bootstrap resamples of segments (default 1000)")
    t.add_argument("--device", default="auto", help="cpu, cuda or auto (default)")


def _stream_options(p) -> None:
    """The options that `ensemble lm` and `ensemble tune` share: how their streams of segments are drawn."""
    p.add_argument("--overwrite", action="store_true", help="replace an earlier ensemble report in --out")
    p.add_argument("--segment-len", type=int, default=512, help="scored tokens per segment (default 512)")
    p.add_argument("--segments", type=int, default=12, help="segments per stream (default 12)")
    p.add_argument("--val-fraction", type=float, default=None,
                   help="held-out fraction defining each source's unseen documents (default: the smallest of the "
                        "mixturelm experts; required when every expert is a Hugging Face model)")


def cmd_ensemble(args) -> None:
    from .ensemble.report import check_out

    out = check_out(args.out, args.overwrite)
    if args.resamples < 10:
        raise UsageError(f"--resamples must be >= 10, got {args.resamples}")
    log = lambda msg: print(msg, file=sys.stderr)  # noqa: E731
    if args.what == "nifty":
        from .ensemble import nifty

        try:
            seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
        except ValueError:
            raise UsageError(f"--seeds {args.seeds!r}: give integers separated by commas, e.g. 0,13,42") from None
        pools = [p.strip() for p in args.pools.split(",") if p.strip()]
        if not seeds or not pools:
            raise UsageError("--seeds and --pools must each name at least one")
        root = Path(args.data) if args.data else nifty.data_root()
        if not root.is_dir():
            raise UsageError(f"--data {root}: no such folder; give the nifty-moe-f folder")
        if args.permutations < 100:
            raise UsageError(f"--permutations must be >= 100, got {args.permutations}")
        nifty.run_benchmark(root, seeds, pools, args.resamples, not args.no_history, out, log=log, audit=args.audit,
                            permutations=args.permutations)
    elif args.what == "tune":
        from .ensemble import tune
        from .training import resolve_device

        windows = _floats(args.windows, "--windows", 0, math.inf)
        if any(w != int(w) for w in windows):
            raise UsageError(f"--windows {args.windows!r}: windows are whole numbers of tokens")
        grids = {"switch_rates": _floats(args.switch_rates, "--switch-rates", 0, 1),
                 "noises": _floats(args.noises, "--noises", 0, math.inf),
                 "discounts": _floats(args.discounts, "--discounts", 0, 1, high_included=True),
                 "windows": tuple(int(w) for w in windows)}
        tune.run_tune(args.experts, args.dev_data, args.test_data, out, args.segment_len, args.segments,
                      args.val_fraction, args.text_field, resolve_device(args.device), args.resamples, grids, log=log)
    else:
        from .ensemble import lm_stream
        from .training import resolve_device

        lm_stream.run_lm(args.experts, args.data, out, args.segment_len, args.segments, args.val_fraction,
                         args.text_field, resolve_device(args.device), args.resamples, log=log)


def _add_compare(sub) -> None:
    from .compare import SWEEP_SIZES, CompareConfig

    d = CompareConfig()  # the defaults live there, for Python callers and the command alike
    p = sub.add_parser("compare", help="isoFLOP comparison of architectures on one corpus, with report",
                       description="Train each architecture under the same training-FLOP budget on the same data, "
                                   "evaluate all on the same held-out tokens, and write results.json, plots and a "
                                   "self-contained report.html with the routing views. Run again with the same "
                                   "--out to resume.")
    p.add_argument("--archs", default=",".join(d.archs),
                   help="comma-separated architectures, preset prefixes (default %(default)s; also moe-fg, mode-staged)")
    p.add_argument("--size", default=d.sizes[0], help="backbone size of every architecture (default %(default)s)")
    p.add_argument("--sweep", nargs="?", const=",".join(SWEEP_SIZES), default=None, metavar="SIZES",
                   help=f"isoFLOP sweep: train every architecture at each size (default {','.join(SWEEP_SIZES)}) and "
                        "mark each one's isoFLOP-optimal size")
    p.add_argument("--flops", default=",".join(f"{b:g}" for b in d.budgets),
                   help="training-FLOP budget of every run; comma-separated for several budgets (default %(default)s, "
                        "9 to 14 minutes for the five architectures on 2 CPU cores)")
    p.add_argument("--data", help="text to train and evaluate on (default: the Python standard library source)")
    p.add_argument("--tokenizer", default=d.tokenizer, help="bytes (default) or bpe:VOCAB")
    p.add_argument("--text-field", default=d.text_field, help="field of .jsonl records that holds the text")
    p.add_argument("--seed", type=int, default=None,
                   help=f"seed of weights and data order, the same for every run (default {d.seed})")
    p.add_argument("--seeds", metavar="S1,S2,...",
                   help="train every run at each of these seeds (weights and data order; the held-out tokens stay "
                        "the same) and report means with 95%% intervals and differences to dense paired by seed; "
                        "instead of --seed")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="sequences per step (default %(default)s)")
    p.add_argument("--seq-len", type=int, default=d.seq_len, help="tokens per sequence (default %(default)s)")
    p.add_argument("--eval-tokens", type=int, default=d.eval_tokens,
                   help="validation tokens, the same for every run (default %(default)s)")
    p.add_argument("--evals", type=int, default=d.evals,
                   help="evaluations per run: the points of the loss curves (default %(default)s)")
    text = p.add_mutually_exclusive_group()
    text.add_argument("--text", help="text for the routing views (default: the start of the held-out split)")
    text.add_argument("--text-file", help="or a UTF-8 file of it")
    p.add_argument("--view-tokens", type=int, default=d.view_tokens,
                   help="tokens the routing views show (default %(default)s)")
    p.add_argument("--out", required=True, help="folder of the comparison (runs, results.json, report.html)")
    p.add_argument("--overwrite", action="store_true", help="replace the comparison in --out")
    p.add_argument("--device", default="auto", help="cpu, cuda or auto (default)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def _comma_list(value: str, option: str) -> tuple[str, ...]:
    items = tuple(v.strip() for v in value.split(",") if v.strip())
    if not items:
        raise UsageError(f"{option} is empty; give a comma-separated list")
    if len(set(items)) < len(items):
        raise UsageError(f"{option} {value} names something twice; give each once")
    return items


def compare_config(args):
    """The CompareConfig of a `mixturelm compare` command line (it checks its own values)."""
    from .compare import CompareConfig

    items = _comma_list(args.flops, "--flops")
    try:
        budgets = tuple(float(v) for v in items)
    except ValueError:
        raise UsageError(f"--flops {args.flops} is not a number (or comma-separated numbers), e.g. 4e12") from None
    if args.sweep is not None and not args.sweep.strip(", "):
        raise UsageError("--sweep is empty; give sizes (e.g. --sweep debug,tiny,small) or --sweep alone for those")
    text = args.text if args.text_file is None else _read_text_file(args.text_file)
    if args.seed is not None and args.seeds is not None:
        raise UsageError("--seed and --seeds both given; give the seeds with --seeds alone (e.g. --seeds 0,1,2)")
    seeds = ()
    if args.seeds is not None:
        items = _comma_list(args.seeds, "--seeds")
        try:
            seeds = tuple(int(v) for v in items)
        except ValueError:
            raise UsageError(f"--seeds {args.seeds} is not a list of integers; give e.g. --seeds 0,1,2") from None
    return CompareConfig(archs=_comma_list(args.archs, "--archs"),
                         sizes=_comma_list(args.sweep, "--sweep") if args.sweep else (args.size,),
                         budgets=budgets, sweep=args.sweep is not None, data=args.data, tokenizer=args.tokenizer,
                         text_field=args.text_field, seed=CompareConfig.seed if args.seed is None else args.seed,
                         seeds=seeds, batch_size=args.batch_size, seq_len=args.seq_len,
                         eval_tokens=args.eval_tokens, evals=args.evals, view_tokens=args.view_tokens, text=text)


def cmd_compare(args) -> None:
    from .compare import run_compare

    run_compare(compare_config(args), Path(args.out), overwrite=args.overwrite, device=args.device,
                progress=not args.no_progress, command="mixturelm " + shlex.join(args.argv))


def _read_text_file(path: str) -> str:
    p = Path(path)
    if not p.is_file():
        raise UsageError(f"--text-file {path} does not exist or is not a file; give a UTF-8 text file")
    try:
        return p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise UsageError(f"--text-file {path} is not UTF-8 text (byte {e.start}); convert it to UTF-8") from None


# ----------------------------------------------------------------------------------------------

def _add_inspect(sub) -> None:
    p = sub.add_parser("inspect", help="routing views of a checkpoint on a text (HTML, PNG, JSON)",
                       description="What the routers decide on a text: the tokens each Mixture-of-Depths block "
                                   "processed (top-k and causal routing), each token's MoE expert and the load per "
                                   "expert, PEER's expert usage and KL to uniform. Writes inspect.html (self-"
                                   "contained), inspect.json and the PNGs into --out.")
    p.add_argument("--ckpt", required=True, help="run directory or checkpoint folder")
    text = p.add_mutually_exclusive_group(required=True)
    text.add_argument("--text", help="the text to route")
    text.add_argument("--text-file", help="a UTF-8 text file to route")
    p.add_argument("--out", required=True, help="folder for inspect.html, inspect.json and the PNGs")
    p.add_argument("--max-tokens", type=int, default=1024, help="route the first N tokens of the text (default 1024)")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier inspect output in --out")
    p.add_argument("--device", default="auto", help="cpu, cuda or auto (default)")


def cmd_inspect(args) -> None:
    from .training import resolve_device
    from .views.command import check_out, run_inspect
    from .views.routing import describe

    if args.max_tokens < 1:
        raise UsageError(f"--max-tokens must be >= 1, got {args.max_tokens}")
    text = args.text if args.text_file is None else _read_text_file(args.text_file)
    if not text:
        raise UsageError("the text is empty; give some text with --text or --text-file")
    out = check_out(args.out, args.overwrite)  # before loading anything
    views = run_inspect(args.ckpt, text, out, args.max_tokens, overwrite=args.overwrite,
                        device=resolve_device(args.device))
    s = views.summary
    more = f" (the first {s['n_tokens']:,} of {s['text_tokens']:,}; see --max-tokens)" if s["truncated"] else ""
    print(f"routed {s['n_tokens']:,} tokens{more} through {s['checkpoint']}")
    for line in describe(s):
        print(f"  {line}")
    print(f"views in {out.path / 'inspect.html'} (summary: inspect.json, {len(views.figures)} PNG)")


# ----------------------------------------------------------------------------------------------
# Hugging Face: import-hf, export-hf, upcycle

def _add_hf(sub) -> None:
    p = sub.add_parser("import-hf", help="a Hugging Face model folder as a mixturelm run directory",
                       description="Turn a Hugging Face folder (config.json, safetensors in one file or shards, "
                                   "tokenizer.json) of Llama, Mixtral, Qwen3-MoE, OLMoE or Qwen2-MoE into a run "
                                   "directory that eval, generate, inspect, ensemble lm and train --resume take.")
    p.add_argument("hf_dir", help="the Hugging Face model folder")
    p.add_argument("--out", required=True, help="the run directory to write")
    p.add_argument("--overwrite", action="store_true", help="replace a run already in --out")
    p = sub.add_parser("export-hf", help="a run as a Hugging Face folder transformers loads",
                       description="Write a run's model and tokenizer as a Hugging Face folder: dense as Llama, MoE "
                                   "as the transformers architecture that computes exactly the same function "
                                   "(Mixtral, Qwen3-MoE, OLMoE, Qwen2-MoE); MoD, MoDE and PEER with mixturelm's own "
                                   "modeling file (load with trust_remote_code=True).")
    p.add_argument("ckpt", help="run directory or checkpoint folder")
    p.add_argument("--out", required=True, help="the folder to write")
    p.add_argument("--remote-code", action="store_true",
                   help="for a MoE no transformers architecture computes exactly: export with mixturelm's own "
                        "modeling file instead")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier export in --out")
    p = sub.add_parser("upcycle", help="a dense run made into a MoE, PEER or MoD run to train on",
                       description="Upcycle a dense run: MoE experts copied from each FFN (the dense function at step "
                                   "0), PEER beside the FFN (zero output at step 0), or MoD routers. Then: mixturelm "
                                   "train --resume --out OUT.")
    p.add_argument("ckpt", help="the dense run directory or checkpoint")
    p.add_argument("--to", required=True, help="moe, peer, mod, or a preset whose mechanism settings to take "
                                               "(e.g. moe-tiny, peer-debug, mod-tiny); dense: the same model with a "
                                               "new schedule, the control for upcycling")
    p.add_argument("--out", required=True, help="the new run directory")
    p.add_argument("--n-experts", type=int, default=None, help="MoE or PEER experts (default: the preset's)")
    p.add_argument("--top-k", type=int, default=None, help="experts per token (default: the preset's)")
    p.add_argument("--router", default=None, help="MoE router (default: the preset's, softmax)")
    p.add_argument("--granularity", type=int, default=1,
                   help="cut each FFN copy into this many fine-grained experts (not function-preserving)")
    p.add_argument("--noise", type=float, default=0.0,
                   help="perturb each expert copy by this fraction of the weights' std (not function-preserving)")
    p.add_argument("--reinit-share", type=float, default=0.0,
                   help="re-draw this share of each expert's hidden units (Drop-Upcycling; not function-preserving)")
    p.add_argument("--capacity", type=float, default=None, help="MoD capacity (default: the preset's, 0.125)")
    p.add_argument("--layers", default=None, help="comma-separated blocks to change (default: every block for MoE, "
                                                  "every other for MoD, the middle one for PEER)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the new routers and noise, also added to the continued run's data seed (default 0)")
    p.add_argument("--max-steps", type=int, default=None, help="budget of the continued run (default: the source's)")
    p.add_argument("--max-tokens", type=int, default=None, help="budget of the continued run in tokens")
    p.add_argument("--max-flops", type=float, default=None, help="budget of the continued run in training FLOPs")
    p.add_argument("--lr", type=float, default=None, help="peak learning rate of the continued run (default: the source's)")
    p.add_argument("--warmup-steps", type=int, default=None, help="warm-up of the continued run (default: the source's)")
    p.add_argument("--overwrite", action="store_true", help="replace a run already in --out")


def cmd_import_hf(args) -> None:
    from .hf import import_hf

    import_hf(args.hf_dir, args.out, overwrite=args.overwrite)


def cmd_export_hf(args) -> None:
    from .hf import export_hf

    export_hf(args.ckpt, args.out, overwrite=args.overwrite, remote_code=args.remote_code)


def cmd_upcycle(args) -> None:
    from .hf.upcycle import UpcycleOptions, upcycle

    layers = None
    if args.layers is not None:
        try:
            layers = [int(x) for x in args.layers.split(",") if x.strip()]
        except ValueError:
            raise UsageError(f"--layers {args.layers!r} is not a comma-separated list of block numbers, e.g. 1,3") from None
    options = UpcycleOptions(to=args.to, n_experts=args.n_experts, top_k=args.top_k, router=args.router,
                             granularity=args.granularity, noise=args.noise, reinit_share=args.reinit_share,
                             capacity=args.capacity, layers=layers, seed=args.seed)
    train = {k: getattr(args, k) for k in ("max_steps", "max_tokens", "max_flops", "lr", "warmup_steps")
             if getattr(args, k) is not None}
    upcycle(args.ckpt, args.out, options, train, overwrite=args.overwrite)


def build_parser() -> Parser:
    parser = Parser(prog="mixturelm", description="Conditional-computation language models: train, measure, "
                                                  "inspect and mix them.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    for add in (_add_train, _add_eval, _add_generate, _add_flops, _add_bench, _add_ensemble, _add_compare,
                _add_inspect, _add_hf):
        add(sub)
    return parser


COMMANDS = {"train": cmd_train, "eval": cmd_eval, "generate": cmd_generate, "flops": cmd_flops, "bench": cmd_bench,
            "ensemble": cmd_ensemble, "compare": cmd_compare, "inspect": cmd_inspect, "import-hf": cmd_import_hf,
            "export-hf": cmd_export_hf, "upcycle": cmd_upcycle}


def _dests(parser: argparse.ArgumentParser, args) -> set[str]:
    """The option names of the command that ran (and of its sub-command, for ensemble)."""
    def of(p):
        return {a.dest for a in p._actions}

    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[args.command]
    dests = of(sub)
    for action in sub._actions:
        if isinstance(action, argparse._SubParsersAction) and getattr(args, action.dest, None) in action.choices:
            dests |= of(action.choices[getattr(args, action.dest)])
    return dests


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = argv  # the exact command, for reports
    try:
        try:
            COMMANDS[args.command](args)
        except BaseException:
            abandon_unclaimed()  # an --out locked but not yet written is left as it was found
            raise
    except UsageError as e:
        print(f"mixturelm {args.command}: error: {to_flags(str(e), _dests(parser, args))}", file=sys.stderr)
        return 3 if isinstance(e, TrainingDiverged) else 2
    except OSError as e:
        if e.errno not in SYSTEM_ERRORS:
            raise
        where = f" ({e.filename})" if e.filename else ""
        print(f"mixturelm {args.command}: error: {e.strerror or e}{where}; {SYSTEM_ERRORS[e.errno]}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"mixturelm {args.command}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
