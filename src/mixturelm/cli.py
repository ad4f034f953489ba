"""The `mixturelm` command: train, eval, generate, flops, bench, ensemble, compare, inspect.

Bad input ends with one line on stderr that names the problem and the fix, and exit status 2.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from pathlib import Path

from .config import MOD_OPTION_FIELDS, PEER_OPTION_FIELDS
from .errors import UsageError

# Options of `train` that set TrainConfig fields (flag name -> type); given ones override the preset.
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
    "min_lr_ratio": (float, "final learning rate as a fraction of the peak (cosine schedule)"),
    "warmup_steps": (int, "linear warm-up steps"),
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
    "peer_lr": (float, "PEER: fixed learning rate of the expert tables (default: the preset's; none given: "
                       "--lr and its schedule)"),
    "peer_key_lr": (float, "PEER: fixed learning rate of the product keys (default: the preset's, peer-tiny 1e-4; "
                           "none given: --lr and its schedule)"),
    "peer_bn_calibration": (int, "PEER: training batches that re-estimate the query norm's statistics (BatchNorm "
                                   "or whitening) before each evaluation and checkpoint (0: keep the running "
                                   "averages)"),
}


# Options of `train` that change the preset's model shape (flag name -> type, help).
MODEL_OPTIONS: dict[str, tuple[type, str]] = {
    "d_model": (int, "model width (overrides the preset)"),
    "n_layers": (int, "number of blocks (overrides the preset)"),
    "n_heads": (int, "attention heads (overrides the preset)"),
    "n_kv_heads": (int, "key/value heads for grouped-query attention (default: n_heads)"),
    "d_ffn": (int, "FFN hidden size (overrides the preset)"),
}


# Options of `train` that change every MoE block of a moe-* preset.
MOE_OPTIONS: dict[str, tuple[type, str]] = {
    "router": (str, "MoE router: softmax, noisy, switch, sigmoid_bias, expert_choice"),
    "n_experts": (int, "MoE experts per layer"),
    "top_k": (int, "MoE experts per token"),
    "d_expert": (int, "hidden size of each MoE expert"),
    "n_shared": (int, "always-on shared experts"),
    "capacity_factor": (float, "token dropping above this capacity (default: dropless)"),
}


# Options of `train` that change every Mixture-of-Depths block of a mod-* or mode-staged-* preset
# (their MoDConfig fields: config.MOD_OPTION_FIELDS).
MOD_OPTIONS: dict[str, tuple[type, str]] = {
    "capacity": (float, "MoD: fraction of each sequence's tokens that enter a routed block (default 0.125)"),
    "mod_causal": (str, "MoD: how sampling routes token by token: aux_loss (BCE on the router) or predictor"),
    "mod_gate": (str, "MoD: what multiplies the block's output: linear (r, the paper's Eq. 1) or sigmoid (sigmoid(r))"),
}


# Options of `train` that change every PEER layer of a peer-* preset (their PEERConfig fields:
# config.PEER_OPTION_FIELDS).
PEER_OPTIONS: dict[str, tuple[type, str]] = {
    "peer_experts": (int, "PEER: experts N, a perfect square (peer-tiny: 1024^2)"),
    "peer_heads": (int, "PEER: retrieval heads h"),
    "peer_top_k": (int, "PEER: experts per head k"),
    "peer_query_norm": (str, "PEER: query normalisation: batch (the paper's), layer, none, or whiten (decorrelates "
                             "each head's query: more experts used, some loss lost; README PEER training check)"),
}


class Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2 (argparse would print the usage block too)
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _add_train(sub) -> None:
    p = sub.add_parser("train", help="train a model on text", description="Train a model on text.")
    p.add_argument("--preset", help="model preset, e.g. dense-tiny (see --list-presets)")
    p.add_argument("--list-presets", action="store_true", help="print the presets and exit")
    p.add_argument("--out", help="run directory (metrics, TensorBoard, checkpoints)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its latest checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace the run in --out")
    p.add_argument("--device", default="auto", help="cpu, cuda or auto (default)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    for name, (typ, helptext) in (TRAIN_OPTIONS | MODEL_OPTIONS | MOE_OPTIONS | MOD_OPTIONS | PEER_OPTIONS).items():
        p.add_argument(f"--{name.replace('_', '-')}", dest=name, type=typ, default=None, help=helptext)


def _add_eval(sub) -> None:
    p = sub.add_parser("eval", help="validation loss, perplexity, bits per byte of a checkpoint")
    p.add_argument("--ckpt", required=True, help="run directory or checkpoint folder")
    p.add_argument("--data", help="text to evaluate on (default: the checkpoint's training data)")
    p.add_argument("--split", choices=("val", "all"), default="val",
                   help="val: the held-out split (default); all: every document of --data")
    p.add_argument("--max-tokens", type=int, default=None, help="tokens to evaluate (default: the run's eval_tokens)")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--device", default="auto")
    p.add_argument("--out", help="also write results.json there")


def _add_generate(sub) -> None:
    p = sub.add_parser("generate", help="sample text from a checkpoint with a KV cache")
    p.add_argument("--ckpt", required=True, help="run directory or checkpoint folder")
    p.add_argument("--prompt", default="\n", help="text the samples continue")
    p.add_argument("--max-new-tokens", type=int, default=200)
    p.add_argument("--temperature", type=float, default=0.8, help="0 for greedy decoding")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--num-samples", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")


def _add_flops(sub) -> None:
    p = sub.add_parser("flops", help="FLOPs per token by component, for a preset or a checkpoint")
    p.add_argument("--preset", help="model preset (default dense-tiny)")
    p.add_argument("--ckpt", help="or a run directory / checkpoint folder")
    p.add_argument("--seq-len", type=int, default=None, help="sequence length (default: the preset's)")
    p.add_argument("--vocab-size", type=int, default=None, help="vocabulary (default 257, the byte tokenizer)")
    p.add_argument("--json", action="store_true", help="print JSON")


def _add_bench(sub) -> None:
    p = sub.add_parser("bench", help="side-by-side benchmarks against peers")
    p.add_argument("what", choices=("train", "moe", "mod", "peer"),
                   help="train: our dense model against transformers' Llama; moe: one MoE layer against "
                        "transformers' Mixtral block and the dense floor; mod: Mixture-of-Depths against the "
                        "dense model of the same shape (FLOPs, prefill, training step, decoding); peer: one "
                        "PEER layer against PEER-pytorch and a large copy")
    p.add_argument("--steps", type=int, default=5, help="timed steps per contender per round")
    p.add_argument("--rounds", type=int, default=3, help="rounds, alternating the models")
    p.add_argument("--batch-size", type=int, default=None, help="train: 16, mod: 2 (training step)")
    p.add_argument("--seq-len", type=int, default=None, help="train: 256, mod: 1024")
    p.add_argument("--capacity", type=float, default=0.125, help="mod: fraction of tokens entering a routed block")
    p.add_argument("--decode-tokens", type=int, default=64, help="mod: tokens decoded per round, batch 1 and 8")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    p.add_argument("--tokens", type=int, default=None, help="moe, peer: tokens per call (default 4096, 2048)")
    p.add_argument("--no-memory", action="store_true", help="moe, peer: skip the peak-memory measurement")
    p.add_argument("--n-experts", type=int, default=1024 * 1024, help="peer: experts N, a perfect square")
    p.add_argument("--d-model", type=int, default=256, help="peer: model width")
    p.add_argument("--heads", type=int, default=8, help="peer: retrieval heads")
    p.add_argument("--top-k", type=int, default=16, help="peer: experts per head")
    p.add_argument("--d-key", type=int, default=128, help="peer: query / key size")
    p.add_argument("--no-peer", action="store_true", help="peer: time ours alone (no PEER-pytorch)")
    p.add_argument("--out", help="also write results.json there")


# ---- ensemble: MoE-F and online aggregation baselines (issue 7) ----

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
    n.add_argument("--data", help="the nifty-moe-f folder (default: the copy inside the package)")
    n.add_argument("--seeds", default="0,13,42", help="comma-separated seeds (default 0,13,42)")
    n.add_argument("--pools", default="all,llama2-7b,llama3-8b",
                   help="comma-separated pools: all (every LLM), llama2-7b and llama3-8b (each with its 4 adapters)")
    n.add_argument("--resamples", type=int, default=1000, help="bootstrap resamples of the days (default 1000)")
    n.add_argument("--no-history", action="store_true",
                   help="leave out the pools that add the realised-history forecasters to the experts")
    m = what.add_parser("lm", help="mix language-model checkpoints on a stream of alternating sources",
                        description="Per-token log loss of each expert, mixed online; bits per byte of each expert, "
                                    "each aggregator and the per-segment oracle; a plot of weights against the source.")
    m.add_argument("--experts", nargs="+", required=True, help="run directories or checkpoints (same tokenizer)")
    m.add_argument("--data", required=True, help="sources, comma-separated (file, folder or glob each); segments "
                                                 "are drawn from them in turn, from their held-out documents")
    m.add_argument("--out", required=True, help="folder for results.json, report.md and weights.png")
    m.add_argument("--segment-len", type=int, default=512, help="scored tokens per segment (default 512)")
    m.add_argument("--segments", type=int, default=12, help="segments in the stream (default 12)")
    m.add_argument("--val-fraction", type=float, default=None,
                   help="held-out fraction defining each source's unseen documents (default: the experts' smallest)")
    m.add_argument("--text-field", default="text", help="field of .jsonl records that holds the text")
    m.add_argument("--resamples", type=int, default=1000, help="bootstrap resamples of segments (default 1000)")
    m.add_argument("--device", default="auto", help="cpu, cuda or auto (default)")


def cmd_ensemble(args) -> None:
    from .ensemble.report import check_out

    out = check_out(args.out)
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
        nifty.run_benchmark(root, seeds, pools, args.resamples, not args.no_history, out, log=log)
    else:
        from .ensemble import lm_stream
        from .train import resolve_device

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
                        "about 8 minutes for the five architectures on 2 CPU cores)")
    p.add_argument("--data", help="text to train and evaluate on (default: the Python standard library source)")
    p.add_argument("--tokenizer", default=d.tokenizer, help="bytes (default) or bpe:VOCAB")
    p.add_argument("--text-field", default=d.text_field, help="field of .jsonl records that holds the text")
    p.add_argument("--seed", type=int, default=d.seed, help="seed of weights and data order, the same for every run")
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
    return CompareConfig(archs=_comma_list(args.archs, "--archs"),
                         sizes=_comma_list(args.sweep, "--sweep") if args.sweep else (args.size,),
                         budgets=budgets, sweep=args.sweep is not None, data=args.data, tokenizer=args.tokenizer,
                         text_field=args.text_field, seed=args.seed, batch_size=args.batch_size, seq_len=args.seq_len,
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


# ---- inspect: routing views (issue 6) ----

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
    from .inspect import check_out, describe, run_inspect
    from .train import resolve_device

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
    print(f"views in {out / 'inspect.html'} (summary: inspect.json, {len(views.figures)} PNG)")


def build_parser() -> Parser:
    parser = Parser(prog="mixturelm", description="Conditional-computation language models: train, measure, "
                                                  "inspect and mix them.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    for add in (_add_train, _add_eval, _add_generate, _add_flops, _add_bench, _add_ensemble, _add_compare,
                _add_inspect):
        add(sub)
    return parser


# ----------------------------------------------------------------------------------------------

def cmd_train(args) -> None:
    from .config import PRESETS
    from .train import Trainer, finish_distributed, new_run_config, resumed_run_config

    if args.list_presets:
        import torch

        from .config import ModelConfig
        from .flops import forward_flops_per_token
        from .model import MixtureLM

        print(f"{'preset':<16}{'params':>12}{'fwd FLOPs/token':>18}  description")
        for name, p in PRESETS.items():
            cfg = ModelConfig(**p.model)
            with torch.device("meta"):  # shapes only: peer-tiny's tables alone are 1 GiB
                n = MixtureLM(cfg).num_params()
            print(f"{name:<16}{n:>12,}{forward_flops_per_token(cfg, p.train['seq_len']):>18.3g}  {p.description}")
        return
    if not args.out:
        raise UsageError("--out DIR is required: the run directory for metrics and checkpoints")
    overrides = {k: getattr(args, k) for k in TRAIN_OPTIONS if getattr(args, k) is not None}
    model_overrides = {k: getattr(args, k) for k in MODEL_OPTIONS if getattr(args, k) is not None}
    moe_overrides = {k: getattr(args, k) for k in MOE_OPTIONS if getattr(args, k) is not None}
    mod_overrides = {MOD_OPTION_FIELDS[k]: getattr(args, k) for k in MOD_OPTIONS if getattr(args, k) is not None}
    peer_overrides = {PEER_OPTION_FIELDS[k]: getattr(args, k) for k in PEER_OPTIONS if getattr(args, k) is not None}
    if args.resume and args.overwrite:
        raise UsageError("--resume and --overwrite contradict each other; choose one")
    out = Path(args.out)
    if args.resume:
        cfg = resumed_run_config(out, args.preset, overrides, model_overrides, moe_overrides, mod_overrides,
                                 peer_overrides)
    else:
        cfg = new_run_config(args.preset, overrides, model_overrides, moe_overrides, mod_overrides, peer_overrides)
    trainer = Trainer(cfg, out, resume=args.resume, overwrite=args.overwrite, device=args.device,
                      progress=not args.no_progress)
    summary = trainer.run()
    distributed = finish_distributed()
    if trainer.dist.main:
        print(f"trained {summary['preset']} for {summary['steps']} steps ({summary['tokens']:,} tokens, "
              f"{summary['train_flops']:.3g} FLOPs) in {summary['wall_s']:.0f}s: val loss {summary['val_loss']:.4f}, "
              f"ppl {summary['val_ppl']:.3f}, {summary['val_bpb']:.4f} bits/byte; checkpoint in {out}/checkpoints")
    if distributed:
        # every process is past the barrier, the work is done and written: leave without the C++
        # teardown of the process group, which now and then aborts (train.finish_distributed)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


def cmd_eval(args) -> None:
    from . import checkpoint
    from .data.tokens import TokenSplit, check_length, prepare
    from .train import evaluate, resolve_device

    device = resolve_device(args.device)
    if args.out and Path(args.out).exists() and not Path(args.out).is_dir():
        raise UsageError(f"--out {args.out} is a file, not a folder; choose another --out")
    model, run_cfg, tokenizer, ckpt = checkpoint.load_model(args.ckpt, device)
    t = run_cfg["train"]
    data = prepare(args.data if args.data else t["data"], t["tokenizer"], t["val_fraction"], t["text_field"],
                   tokenizer, log=lambda m: print(m, file=sys.stderr))
    if args.split == "all":
        import numpy as np

        data.val = TokenSplit(np.concatenate([data.train.tokens, data.val.tokens]), data.train.n_bytes + data.val.n_bytes,
                              data.train.n_docs + data.val.n_docs)
    check_length(data.val, t["seq_len"], args.split)
    max_tokens = args.max_tokens or t["eval_tokens"]
    res = evaluate(model, data, t["seq_len"], max_tokens, args.batch_size or t["batch_size"], device)
    res.update(checkpoint=str(ckpt), data=args.data or t["data"] or "stdlib", split=args.split)
    print(f"loss {res['val_loss']:.4f}  perplexity {res['val_ppl']:.3f}  bits/byte {res['val_bpb']:.4f}  "
          f"({res['val_tokens']:,} tokens of {res['data']}, {args.split} split)")
    if "val_loss_causal" in res:
        print(f"with causal (sampling) routing of the MoD blocks: loss {res['val_loss_causal']:.4f}")
    for k in (k for k in res if k.endswith("peer_usage")):
        print(f"{k.split('.')[0]}: PEER expert usage {res[k]:.1%}, KL(usage || uniform) "
              f"{res[k.replace('peer_usage', 'peer_kl')]:.3f}")
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "results.json").write_text(json.dumps(res, indent=1))


def cmd_generate(args) -> None:
    import torch

    from . import checkpoint
    from .generate import check_sampling, generate
    from .train import resolve_device

    check_sampling(args.temperature, args.top_k, args.top_p, args.max_new_tokens)
    if args.num_samples < 1:
        raise UsageError(f"--num-samples must be >= 1, got {args.num_samples}")
    device = resolve_device(args.device)
    model, _, tokenizer, _ = checkpoint.load_model(args.ckpt, device)
    if any(getattr(m, "router_kind", None) == "expert_choice" for m in model.modules()):
        print("mixturelm generate: warning: expert-choice routing is not causal (an expert picks among all tokens "
              "of a call); one token at a time it routes differently from training", file=sys.stderr)
    ids = torch.as_tensor(tokenizer.encode(args.prompt.encode("utf-8")), dtype=torch.long, device=device)
    prompt = ids[None].repeat(args.num_samples, 1)
    gen = torch.Generator(device=device).manual_seed(args.seed)
    routing: dict = {}
    out = generate(model, prompt, args.max_new_tokens, args.temperature, args.top_k, args.top_p, gen, routing)
    for i, row in enumerate(out.tolist()):
        if args.num_samples > 1:
            print(f"--- sample {i + 1}")
        print(tokenizer.decode(row))
    if routing:
        print("Mixture-of-Depths, fraction of tokens that entered each routed block: "
              + ", ".join(f"{k} {v:.3f}" for k, v in routing.items()), file=sys.stderr)


def cmd_flops(args) -> None:
    from . import checkpoint
    from .config import ModelConfig, get_preset
    from .flops import FORWARD_ONLY_PARTS, forward_flops_breakdown, train_flops_per_token

    if args.ckpt:
        ckpt = checkpoint.resolve(args.ckpt)
        run_cfg = checkpoint.load_config(ckpt)
        cfg, seq_len, name = ModelConfig.from_dict(run_cfg["model"]), run_cfg["train"]["seq_len"], str(ckpt)
    else:
        p = get_preset(args.preset or "dense-tiny")
        cfg, seq_len, name = ModelConfig(**p.model), p.train["seq_len"], p.name
        if args.vocab_size is not None:
            cfg = ModelConfig(**(p.model | {"vocab_size": args.vocab_size}))
    seq_len = args.seq_len or seq_len
    if seq_len < 1:
        raise UsageError(f"--seq-len must be positive, got {seq_len}")
    parts = forward_flops_breakdown(cfg, seq_len)
    fwd = sum(parts.values())
    train = train_flops_per_token(cfg, seq_len)
    if args.json:
        print(json.dumps({"model": name, "seq_len": seq_len, "forward_per_token": parts, "forward_total": fwd,
                          "train_per_token": train}, indent=1))
        return
    print(f"{name}, sequence {seq_len}: FLOPs per token")
    w = max(14, max(len(k) for k in parts) + 2)
    for k, v in parts.items():
        print(f"  {k:<{w}}{v:>14,.0f}  {v / fwd:6.1%}")
    print(f"  {'forward':<{w}}{fwd:>14,.0f}")
    note = ("3 x forward" if not any(k in parts for k in FORWARD_ONLY_PARTS)
            else f"3 x forward, but 1 x {', '.join(k for k in FORWARD_ONLY_PARTS if k in parts)}")
    print(f"  {'training':<{w}}{train:>14,.0f}  (forward + backward = {note})")


def cmd_bench(args) -> None:
    from .bench import bench_mod, bench_moe, bench_peer, bench_train

    if args.tokens is None:
        args.tokens = 2048 if args.what == "peer" else 4096
    {"moe": bench_moe, "mod": bench_mod, "peer": bench_peer, "train": bench_train}[args.what](args)


COMMANDS = {"train": cmd_train, "eval": cmd_eval, "generate": cmd_generate, "flops": cmd_flops, "bench": cmd_bench,
            "ensemble": cmd_ensemble, "compare": cmd_compare, "inspect": cmd_inspect}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    args.argv = argv  # the exact command, for reports
    try:
        COMMANDS[args.command](args)
    except UsageError as e:
        print(f"mixturelm {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"mixturelm {args.command}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
