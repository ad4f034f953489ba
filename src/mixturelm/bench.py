"""Side-by-side benchmarks: ours and a peer measured in the same run, alternating, with ratios.

Never a timed test: these machines are shared and noisy, so every benchmark alternates the
contenders over several rounds and reports medians, the machine and the command.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from .config import ModelConfig
from .errors import UsageError
from .flops import measure_matmul_flops, train_flops_per_token
from .model import MixtureLM
from .runtime import steady_allocator


def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "threads": torch.get_num_threads(), "torch": torch.__version__,
            "python": platform.python_version(), "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None}


def time_alternating(contenders: dict[str, Callable[[], None]], steps: int, rounds: int,
                     warmup: int = 2) -> dict[str, list[float]]:
    """Seconds per call of each contender: `rounds` rounds, each timing `steps` calls of every contender in turn."""
    for fn in contenders.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in contenders}
    for _ in range(rounds):
        for name, fn in contenders.items():
            t0 = time.perf_counter()
            for _ in range(steps):
                fn()
            times[name].append((time.perf_counter() - t0) / steps)
    return times


def _llama_peer(cfg: ModelConfig):
    try:
        from transformers import LlamaConfig, LlamaForCausalLM
    except ImportError:
        raise UsageError("bench train needs transformers for the Llama peer; pip install 'mixturelm[bench]'") from None
    hf_cfg = LlamaConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, intermediate_size=cfg.d_ffn,
                         num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads,
                         num_key_value_heads=cfg.kv_heads, max_position_embeddings=cfg.max_seq_len,
                         rms_norm_eps=cfg.norm_eps, rope_theta=cfg.rope_theta,
                         tie_word_embeddings=cfg.tie_embeddings, attention_bias=False, mlp_bias=False)
    hf_cfg._attn_implementation = "sdpa"
    return LlamaForCausalLM(hf_cfg)


def _train_step_fn(model, forward_logits, batch: torch.Tensor) -> Callable[[], None]:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)  # the same optimizer for both

    def step() -> None:
        logits = forward_logits(batch[:, :-1])
        loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def bench_train(args) -> dict:
    """Our dense model against transformers' LlamaForCausalLM of the same shape: training tokens/s and MFU."""
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.steps < 1 or args.rounds < 1:
        raise UsageError("--steps and --rounds must be >= 1")
    steady_allocator()
    args.seq_len, args.batch_size = args.seq_len or 256, args.batch_size or 16
    cfg = ModelConfig(vocab_size=257, d_model=512, n_layers=8, n_heads=8, d_ffn=1408, max_seq_len=args.seq_len,
                      tie_embeddings=False)
    torch.manual_seed(0)
    ours = MixtureLM(cfg)
    peer = _llama_peer(cfg)
    n_ours, n_peer = ours.num_params(), sum(p.numel() for p in peer.parameters())
    batch = torch.randint(0, cfg.vocab_size, (args.batch_size, args.seq_len + 1))
    tokens = args.batch_size * args.seq_len
    contenders = {
        "mixturelm": _train_step_fn(ours, lambda x: ours(x).logits, batch),
        "transformers Llama": _train_step_fn(peer, lambda x: peer(input_ids=x).logits, batch),
    }
    peak = measure_matmul_flops(seconds=1.0)
    times = time_alternating(contenders, args.steps, args.rounds)
    flops_per_step = train_flops_per_token(cfg, args.seq_len) * tokens
    result = {"machine": machine(), "command": "mixturelm " + " ".join(sys.argv[1:]),
              "shape": {"d_model": 512, "n_layers": 8, "n_heads": 8, "d_ffn": 1408, "seq_len": args.seq_len,
                        "batch_size": args.batch_size, "vocab": cfg.vocab_size, "dtype": "fp32"},
              "params": {"mixturelm": n_ours, "transformers Llama": n_peer},
              "matmul_peak_flops": peak, "contenders": {}}
    for name, ts in times.items():
        sec = statistics.median(ts)
        result["contenders"][name] = {"step_s": sec, "tok_per_s": tokens / sec, "mfu": flops_per_step / sec / peak,
                                      "step_s_all_rounds": ts}
    ratio = result["contenders"]["mixturelm"]["tok_per_s"] / result["contenders"]["transformers Llama"]["tok_per_s"]
    result["ratio_tok_per_s_ours_over_peer"] = ratio
    _print_train(result)
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "results.json").write_text(json.dumps(result, indent=1))
    return result


# ----------------------------------------------------------------------------------------------
# bench moe: one MoE layer, forward + backward, against transformers' Mixtral block and the dense floor

MOE_SHAPES = {"8x top-2": (8, 2, 1408), "64x top-8 (fine-grained)": (64, 8, 352)}  # experts, k, expert hidden


def _moe_contenders(n_experts: int, top_k: int, d_hidden: int, d_model: int) -> dict[str, Callable[[], torch.nn.Module]]:
    from .layers.ffn import SwiGLU
    from .layers.moe import MoE

    def mixtral(impl: str):
        def build():
            try:
                from transformers import MixtralConfig
                from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock
            except ImportError:
                raise UsageError("bench moe needs transformers for the Mixtral peer; pip install 'mixturelm[bench]'") from None
            cfg = MixtralConfig(hidden_size=d_model, intermediate_size=d_hidden, num_local_experts=n_experts,
                                num_experts_per_tok=top_k)
            cfg._experts_implementation = impl
            block = MixtralSparseMoeBlock(cfg)
            for p in block.parameters():
                torch.nn.init.normal_(p, 0.0, 0.02)
            return block
        return build

    return {
        "mixturelm MoE": lambda: MoE(d_model, d_hidden, n_experts, top_k, "softmax", impl="auto"),
        "mixturelm MoE, loop impl": lambda: MoE(d_model, d_hidden, n_experts, top_k, "softmax", impl="loop"),
        "Mixtral block (eager)": mixtral("eager"),
        "Mixtral block (grouped_mm)": mixtral("grouped_mm"),
        "dense floor": lambda: SwiGLU(d_model, top_k * d_hidden),
    }


def _fwd_bwd(module: torch.nn.Module, x: torch.Tensor, grad: torch.Tensor) -> Callable[[], None]:
    params = list(module.parameters())

    def step() -> None:
        for p in params:
            p.grad = None
        out = module(x)
        (out[0] if isinstance(out, tuple) else out).backward(grad)

    return step


def _rss_bytes() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise OSError("no VmHWM in /proc/self/status")


def _peak_memory_child(shape: str, name: str, tokens: int, d_model: int, queue) -> None:
    """In a fresh process: peak resident memory growth over one forward + backward (CPU has no allocator
    stats). Linux's high-water mark is reset first (clear_refs 5), then read after the step."""
    torch.manual_seed(0)
    steady_allocator()
    module = _moe_contenders(*MOE_SHAPES[shape], d_model)[name]()
    x = torch.randn(1, tokens, d_model, requires_grad=True)
    grad = torch.randn(1, tokens, d_model)
    before = _rss_bytes()
    Path("/proc/self/clear_refs").write_text("5")
    _fwd_bwd(module, x, grad)()
    queue.put(_peak_rss_bytes() - before)


def in_fresh_process(target, *args):
    """target(*args, queue) run in a spawned process (fresh memory, for peak-RSS measurements); its answer."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=target, args=(*args, queue))
    proc.start()
    value = queue.get(timeout=600)
    proc.join()
    return value


def peak_memory(shape: str, name: str, tokens: int, d_model: int) -> int:
    return in_fresh_process(_peak_memory_child, shape, name, tokens, d_model)


def bench_moe(args) -> dict:
    """One MoE layer, forward + backward: ours against Mixtral's block and the dense FFN of the same active size."""
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.steps < 1 or args.rounds < 1 or args.tokens < 1:
        raise UsageError("--steps, --rounds and --tokens must be >= 1")
    steady_allocator()
    tokens, d_model = args.tokens, 512
    result = {"machine": machine(), "command": "mixturelm " + " ".join(sys.argv[1:]), "tokens": tokens,
              "d_model": d_model, "dtype": "fp32", "shapes": {}}
    for shape, (n_experts, top_k, d_hidden) in MOE_SHAPES.items():
        torch.manual_seed(0)
        x = torch.randn(1, tokens, d_model, requires_grad=True)
        grad = torch.randn(1, tokens, d_model)
        builders = _moe_contenders(n_experts, top_k, d_hidden, d_model)
        steps = {name: _fwd_bwd(build(), x, grad) for name, build in builders.items()}
        times = time_alternating(steps, args.steps, args.rounds)
        rows = {name: {"fwd_bwd_s": statistics.median(ts), "all_rounds_s": ts} for name, ts in times.items()}
        if not args.no_memory:
            for name in rows:
                rows[name]["peak_mem_bytes"] = peak_memory(shape, name, tokens, d_model)
        floor, peer = rows["dense floor"]["fwd_bwd_s"], rows["Mixtral block (eager)"]["fwd_bwd_s"]
        for row in rows.values():
            row["x_dense_floor"] = row["fwd_bwd_s"] / floor
            row["x_mixtral_eager"] = row["fwd_bwd_s"] / peer
        decode = _decode_latency(builders, d_model, max(20, args.steps * 10), args.rounds)
        for name, sec in decode.items():
            rows[name]["decode_1_token_s"] = sec
        result["shapes"][shape] = {"n_experts": n_experts, "top_k": top_k, "d_expert": d_hidden, "contenders": rows}
    _print_moe(result)
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "results.json").write_text(json.dumps(result, indent=1))
    return result


@torch.no_grad()
def _decode_latency(builders: dict, d_model: int, steps: int, rounds: int) -> dict[str, float]:
    """Forward of one token (batch 1, inference): the decoding case where capacity-based layers break."""
    torch.manual_seed(0)
    x = torch.randn(1, 1, d_model)
    modules = {name: build().eval() for name, build in builders.items()}
    times = time_alternating({name: (lambda m=m: m(x)) for name, m in modules.items()}, steps, rounds)
    return {name: statistics.median(ts) for name, ts in times.items()}


def _print_moe(r: dict) -> None:
    m = r["machine"]
    print(f"machine: {m['cpu']}, {m['threads']} threads, torch {m['torch']}; {r['tokens']} tokens, d_model "
          f"{r['d_model']}, fp32, forward + backward")
    for shape, s in r["shapes"].items():
        print(f"\n{shape}: {s['n_experts']} experts, top-{s['top_k']}, expert hidden {s['d_expert']}")
        print(f"  {'':<28}{'fwd+bwd s':>10}{'x dense':>9}{'x Mixtral':>11}{'peak MB':>9}{'1-token fwd ms':>16}")
        for name, c in s["contenders"].items():
            mem = f"{c['peak_mem_bytes'] / 2**20:>9.0f}" if "peak_mem_bytes" in c else f"{'':>9}"
            print(f"  {name:<28}{c['fwd_bwd_s']:>10.3f}{c['x_dense_floor']:>9.2f}{c['x_mixtral_eager']:>11.2f}{mem}"
                  f"{c['decode_1_token_s'] * 1e3:>16.3f}")


def _print_train(r: dict) -> None:
    m = r["machine"]
    print(f"machine: {m['cpu']}, {m['threads']} threads, torch {m['torch']}")
    print(f"shape: {r['shape']}; params ours {r['params']['mixturelm']:,}, "
          f"peer {r['params']['transformers Llama']:,}")
    print(f"large-matmul peak: {r['matmul_peak_flops'] / 1e9:.1f} GFLOP/s")
    print(f"{'model':<22}{'step s':>9}{'tokens/s':>11}{'MFU':>7}")
    for name, c in r["contenders"].items():
        print(f"{name:<22}{c['step_s']:>9.3f}{c['tok_per_s']:>11,.0f}{c['mfu']:>7.1%}")
    print(f"ours / Llama tokens/s: {r['ratio_tok_per_s_ours_over_peer']:.3f}x")


# ----------------------------------------------------------------------------------------------
# bench mod: Mixture-of-Depths (12.5 %, every other block) against the dense model of the same shape

MOD_SHAPE = dict(vocab_size=257, d_model=512, n_layers=8, n_heads=8, d_ffn=1408)


def _mod_models(seq_len: int, capacity: float) -> dict[str, MixtureLM]:
    from .config import BlockSpec, MoDConfig

    dense_cfg = ModelConfig(**MOD_SHAPE, max_seq_len=seq_len)
    blocks = [BlockSpec(wrapper="mod", mod=MoDConfig(capacity=capacity)) if i % 2 else BlockSpec()
              for i in range(dense_cfg.n_layers)]
    models = {}
    for name, cfg in (("dense", dense_cfg), ("MoD", ModelConfig(**(dense_cfg.to_dict() | {"blocks": blocks})))):
        torch.manual_seed(0)
        models[name] = MixtureLM(cfg)
    _calibrate_mod(models["MoD"], seq_len)
    return models


@torch.no_grad()
def _calibrate_mod(model: MixtureLM, seq_len: int, steps: int = 8) -> None:
    """Set the sampling thresholds as training does (running quantile of the scores), so that the causal
    routing of prefill and decoding lets in the capacity's share of tokens, as in a trained model."""
    from .layers.mod import MoD

    model.train()
    for _ in range(steps):
        model(torch.randint(0, model.config.vocab_size, (2, seq_len)), return_aux=True)
        for m in model.modules():
            if isinstance(m, MoD):
                m.after_optimizer_step()
    model.eval()


def _mod_routed_caches(cache) -> list:
    return [layer for layer in cache.layers if hasattr(layer, "length_B")]


def _decode_contenders(models: dict, batch: int, prompt_len: int, new_tokens: int, record: dict):
    """Per model, a function that prefills a fresh cache (untimed) and returns the seconds of decoding
    new_tokens tokens one at a time; record gets the MoD blocks' realised fraction during decoding."""
    torch.manual_seed(1)
    prompt = torch.randint(0, 257, (batch, prompt_len))
    feed = torch.randint(0, 257, (batch, new_tokens))

    def run(name: str, model: MixtureLM) -> float:
        with torch.no_grad():
            cache = model.new_cache(batch, prompt_len + new_tokens)
            model(prompt, cache=cache, last_only=True)
            before = [c.length_B.clone() for c in _mod_routed_caches(cache)]
            t0 = time.perf_counter()
            for i in range(new_tokens):
                model(feed[:, i:i + 1], cache=cache)
            sec = time.perf_counter() - t0
            routed = _mod_routed_caches(cache)
            if routed:
                entered = sum(int((c.length_B - b).sum()) for c, b in zip(routed, before))
                record.setdefault(name, []).append(entered / (len(routed) * batch * new_tokens))
        return sec

    return run


def bench_mod(args) -> dict:
    """MoD against dense, same shape, one run: forward FLOPs, prefill time, training step, decode tokens/s."""
    from .flops import flop_counter, forward_flops_per_token

    if args.threads:
        torch.set_num_threads(args.threads)
    seq_len, batch = args.seq_len or 1024, args.batch_size or 2
    if min(args.steps, args.rounds, seq_len, batch, args.decode_tokens) < 1:
        raise UsageError("--steps, --rounds, --seq-len, --batch-size and --decode-tokens must be >= 1")
    steady_allocator()
    models = _mod_models(seq_len, args.capacity)
    cfgs = {name: m.config for name, m in models.items()}
    result = {"machine": machine(), "command": "mixturelm " + " ".join(sys.argv[1:]),
              "shape": MOD_SHAPE | {"seq_len": seq_len, "train_batch": batch, "dtype": "fp32",
                                    "mod": f"capacity {args.capacity}, every other block (4 of 8)"},
              "rows": {}}
    rows = result["rows"]
    # forward FLOPs per token: analytic, and counted by FlopCounterMode on one sequence (top-k routing)
    idx = torch.randint(0, 257, (1, seq_len))
    counted = {}
    for name, m in models.items():
        with torch.no_grad(), flop_counter() as fc:
            m(idx)
        counted[name] = fc.get_total_flops() / seq_len
    rows["forward FLOPs/token (analytic)"] = {n: forward_flops_per_token(c, seq_len) for n, c in cfgs.items()}
    rows["forward FLOPs/token (counted)"] = counted
    flop_ratio = rows["forward FLOPs/token (analytic)"]["MoD"] / rows["forward FLOPs/token (analytic)"]["dense"]
    result["flop_ratio"] = flop_ratio
    result["goal_speedup"] = 0.9 / flop_ratio

    def prefill(m: MixtureLM) -> Callable[[], None]:
        def fn() -> None:
            with torch.no_grad():
                m(idx, cache=m.new_cache(1, seq_len), last_only=True)
        return fn

    times = time_alternating({n: prefill(m) for n, m in models.items()}, args.steps, args.rounds, warmup=1)
    rows[f"prefill {seq_len} tokens, batch 1 (s)"] = {n: statistics.median(t) for n, t in times.items()}
    train_batch = torch.randint(0, 257, (batch, seq_len + 1))
    steps = {n: _train_step_fn(m.train(), lambda x, m=m: m(x).logits, train_batch) for n, m in models.items()}
    times = time_alternating(steps, args.steps, args.rounds, warmup=1)
    rows[f"training step, {batch} x {seq_len} tokens (s)"] = {n: statistics.median(t) for n, t in times.items()}
    for m in models.values():
        m.eval()
    fractions: dict[str, list[float]] = {}
    for b in (1, 8):
        run = _decode_contenders(models, b, seq_len // 2, args.decode_tokens, fractions)
        secs: dict[str, list[float]] = {n: [] for n in models}
        run("dense", models["dense"]), run("MoD", models["MoD"])  # warm-up
        fractions.clear()
        for _ in range(args.rounds):
            for n, m in models.items():
                secs[n].append(run(n, m))
        rows[f"decode, batch {b}, after {seq_len // 2} (tokens/s)"] = {
            n: b * args.decode_tokens / statistics.median(s) for n, s in secs.items()}
        result[f"decode_batch{b}_fraction_entered"] = statistics.mean(fractions["MoD"])
        fractions.clear()
    for name, row in rows.items():
        faster_is_higher = "tokens/s" in name
        row["speedup"] = (row["MoD"] / row["dense"]) if faster_is_higher else (row["dense"] / row["MoD"])
    _print_mod(result)
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "results.json").write_text(json.dumps(result, indent=1))
    return result


# ----------------------------------------------------------------------------------------------
# bench peer: one PEER layer, forward + backward, against PEER-pytorch, and against the memory floor

def _peer_contenders(shape: dict) -> dict[str, Callable[[], torch.nn.Module]]:
    from .layers.peer import PEER

    def lucidrains():
        try:
            from PEER_pytorch import PEER as LucidPEER
        except ImportError:
            raise UsageError("bench peer needs PEER-pytorch for the peer; pip install 'mixturelm[bench]' "
                             "(or --no-peer to time ours alone)") from None
        # the paper's setting: softmax over each head's top-k (non_competing_scores=False); its dim_key
        # is the size of one half of the query, ours the whole query
        return LucidPEER(shape["d_model"], heads=shape["heads"], num_experts=shape["n_experts"],
                         num_experts_per_head=shape["top_k"], dim_key=shape["d_key"] // 2,
                         non_competing_scores=False)

    return {
        "mixturelm PEER": lambda: PEER(shape["d_model"], shape["n_experts"], shape["heads"], shape["top_k"],
                                       shape["d_key"], sparse_grad=True),
        "PEER-pytorch": lucidrains,
    }


def _peer_memory_child(name: str, shape: dict, queue) -> None:
    """Peak resident memory of one forward + backward in a fresh process: total, and above the state
    at the start of the step (the parameters and the input)."""
    torch.manual_seed(0)
    steady_allocator()
    module = _peer_contenders(shape)[name]()
    x = torch.randn(1, shape["tokens"], shape["d_model"], requires_grad=True)
    grad = torch.randn(1, shape["tokens"], shape["d_model"])
    before = _rss_bytes()
    Path("/proc/self/clear_refs").write_text("5")
    _fwd_bwd(module, x, grad)()
    queue.put((_peak_rss_bytes(), _peak_rss_bytes() - before))


def copy_bandwidth(n_bytes: int = 1 << 29, seconds: float = 1.0) -> float:
    """Bytes per second moved by a large tensor copy (each byte read once and written once: 2x size)."""
    src = torch.ones(n_bytes // 4)
    dst = torch.empty_like(src)
    dst.copy_(src)
    best, deadline = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < deadline or best == 0.0:
        t0 = time.perf_counter()
        dst.copy_(src)
        best = max(best, 2 * n_bytes / (time.perf_counter() - t0))
    return best


def peer_expert_bytes(module, x: torch.Tensor) -> dict:
    """Bytes of expert rows one forward + backward must move: each of the T*h*k retrieved rows of u and v
    read in the forward and again in the backward (not kept: that would hold (T, h*k, d) twice), and the
    gradient rows of the distinct experts written once per table."""
    with torch.no_grad():
        ids, _ = module.retrieve(x.reshape(-1, x.shape[-1]))
    pairs, rows = ids.numel(), torch.unique(ids).numel()
    row_bytes = module.d_model * module.w_up.element_size()
    n_tables = len(module.expert_tables())
    return {"pairs": pairs, "distinct_experts": rows,
            "bytes": n_tables * (2 * pairs + rows) * row_bytes}


def bench_peer(args) -> dict:
    """One PEER layer at the paper's N, h, k: forward + backward time and peak memory, ours against
    PEER-pytorch (the paper's softmax setting), and the bytes of expert rows against a large copy."""
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.steps < 1 or args.rounds < 1 or args.tokens < 1:
        raise UsageError("--steps, --rounds and --tokens must be >= 1")
    from .config import PEERConfig

    PEERConfig(n_experts=args.n_experts, n_heads=args.heads, top_k=args.top_k, d_key=args.d_key)  # validates
    steady_allocator()
    shape = {"tokens": args.tokens, "d_model": args.d_model, "n_experts": args.n_experts, "heads": args.heads,
             "top_k": args.top_k, "d_key": args.d_key}
    builders = _peer_contenders(shape)
    if args.no_peer:
        builders.pop("PEER-pytorch")
    torch.manual_seed(0)
    x = torch.randn(1, args.tokens, args.d_model, requires_grad=True)
    grad = torch.randn(1, args.tokens, args.d_model)
    modules = {name: build() for name, build in builders.items()}
    params = {name: sum(p.numel() * p.element_size() for p in m.parameters()) for name, m in modules.items()}
    moved = peer_expert_bytes(modules["mixturelm PEER"], x)
    times = time_alternating({name: _fwd_bwd(m, x, grad) for name, m in modules.items()}, args.steps, args.rounds)
    del modules
    bandwidth = copy_bandwidth(min(1 << 29, max(1 << 24, moved["bytes"])))  # large, but no larger than needed
    result = {"machine": machine(), "command": "mixturelm " + " ".join(sys.argv[1:]), "shape": shape,
              "dtype": "fp32", "copy_bytes_per_s": bandwidth, "expert_rows": moved, "contenders": {}}
    for name, ts in times.items():
        row = {"fwd_bwd_s": statistics.median(ts), "all_rounds_s": ts, "param_bytes": params[name]}
        if not args.no_memory:
            row["peak_rss_bytes"], row["peak_above_start_bytes"] = in_fresh_process(_peer_memory_child, name, shape)
        result["contenders"][name] = row
    ours = result["contenders"]["mixturelm PEER"]
    ours["expert_bytes_per_s"] = moved["bytes"] / ours["fwd_bwd_s"]
    ours["x_copy_floor"] = ours["fwd_bwd_s"] / (moved["bytes"] / bandwidth)
    if "PEER-pytorch" in result["contenders"]:
        peer = result["contenders"]["PEER-pytorch"]
        result["speedup_over_peer"] = peer["fwd_bwd_s"] / ours["fwd_bwd_s"]
        if not args.no_memory:
            result["memory_above_start_ours_over_peer"] = ours["peak_above_start_bytes"] / peer["peak_above_start_bytes"]
    _print_peer(result)
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "results.json").write_text(json.dumps(result, indent=1))
    return result


def _print_mod(r: dict) -> None:
    m = r["machine"]
    print(f"machine: {m['cpu']}, {m['threads']} threads, torch {m['torch']}")
    print(f"shape: {r['shape']}")
    print(f"{'':<44}{'dense':>12}{'MoD':>12}{'MoD speed-up':>14}")
    for name, row in r["rows"].items():
        fmt = (lambda v: f"{v / 1e6:>11.1f}M") if "FLOPs" in name else (lambda v: f"{v:>12.3f}")
        label = "x fewer" if "FLOPs" in name else "x"
        print(f"{name:<44}{fmt(row['dense'])}{fmt(row['MoD'])}{row['speedup']:>12.2f}{label:>2}"[:120])
    print(f"FLOP ratio MoD/dense {r['flop_ratio']:.3f}: FLOP speed-up {1 / r['flop_ratio']:.2f}x, "
          f"goal (90 %) {r['goal_speedup']:.2f}x")
    print(f"MoD blocks' realised fraction while decoding: batch 1 {r['decode_batch1_fraction_entered']:.3f}, "
          f"batch 8 {r['decode_batch8_fraction_entered']:.3f}")


def _print_peer(r: dict) -> None:
    m, s, e = r["machine"], r["shape"], r["expert_rows"]
    print(f"machine: {m['cpu']}, {m['threads']} threads, torch {m['torch']}")
    print(f"PEER: N={s['n_experts']:,} experts, d_model {s['d_model']}, {s['heads']} heads x top-{s['top_k']}, "
          f"d_key {s['d_key']}, {s['tokens']} tokens, fp32, forward + backward")
    print(f"  {'':<18}{'fwd+bwd s':>10}{'params MB':>11}{'peak RSS MB':>13}{'peak above params MB':>22}")
    for name, c in r["contenders"].items():
        mem = (f"{c['peak_rss_bytes'] / 2**20:>13.0f}{c['peak_above_start_bytes'] / 2**20:>22.0f}"
               if "peak_rss_bytes" in c else "")
        print(f"  {name:<18}{c['fwd_bwd_s']:>10.3f}{c['param_bytes'] / 2**20:>11.0f}{mem}")
    if "speedup_over_peer" in r:
        print(f"ours is {r['speedup_over_peer']:.2f}x faster than PEER-pytorch"
              + (f"; peak memory above the parameters: ours / PEER-pytorch = "
                 f"{r['memory_above_start_ours_over_peer']:.3f}" if "memory_above_start_ours_over_peer" in r else ""))
    ours = r["contenders"]["mixturelm PEER"]
    print(f"expert rows moved per step: {e['bytes'] / 1e9:.3f} GB ({e['pairs']:,} retrievals, "
          f"{e['distinct_experts']:,} distinct experts); large copy {r['copy_bytes_per_s'] / 1e9:.1f} GB/s; "
          f"ours {ours['expert_bytes_per_s'] / 1e9:.2f} GB/s, {ours['x_copy_floor']:.1f}x the copy floor")
