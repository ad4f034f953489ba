"""bench train: our dense model against transformers' LlamaForCausalLM of the same shape, training
tokens/s and MFU, alternating the two over several rounds."""

from __future__ import annotations

import statistics
from dataclasses import dataclass

import torch

from ..config import ModelConfig
from ..errors import UsageError
from ..files import machine
from ..flops import measure_matmul_flops, train_flops_per_token
from ..model import MixtureLM
from ..runtime import steady_allocator
from ..training.compiling import compiled
from .timing import check_config, machine_line, prepare, save_results, time_alternating, train_step_fn

DEFAULT_SEQ_LEN, DEFAULT_BATCH_SIZE = 256, 16


@dataclass(kw_only=True)
class TrainBenchConfig:
    steps: int = 5  # timed steps per contender per round
    rounds: int = 3  # rounds, alternating the models
    batch_size: int | None = None  # None: 16
    seq_len: int | None = None  # None: 256
    threads: int | None = None  # torch threads; None: all cores
    compile: bool = False  # also time a torch.compile'd copy of ours
    out: str | None = None  # also write results.json there
    overwrite: bool = False  # replace an earlier benchmark's results in out

    def __post_init__(self) -> None:
        check_config(self, optional_positive=("batch_size", "seq_len", "threads"))


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


def bench_train(cfg: TrainBenchConfig, command: str = "") -> dict:
    """Our dense model against transformers' LlamaForCausalLM of the same shape: training tokens/s and MFU."""
    out = prepare(cfg)
    steady_allocator()
    seq_len, batch_size = cfg.seq_len or DEFAULT_SEQ_LEN, cfg.batch_size or DEFAULT_BATCH_SIZE
    model_cfg = ModelConfig(vocab_size=257, d_model=512, n_layers=8, n_heads=8, d_ffn=1408, max_seq_len=seq_len,
                            tie_embeddings=False)
    torch.manual_seed(0)
    ours = MixtureLM(model_cfg)
    peer = _llama_peer(model_cfg)
    n_ours, n_peer = ours.num_params(), sum(p.numel() for p in peer.parameters())
    batch = torch.randint(0, model_cfg.vocab_size, (batch_size, seq_len + 1))
    tokens = batch_size * seq_len
    contenders = {
        "mixturelm": train_step_fn(ours, lambda x: ours(x).logits, batch),
        "transformers Llama": train_step_fn(peer, lambda x: peer(input_ids=x).logits, batch),
    }
    if cfg.compile:  # a copy with the same weights; its compilation happens in the untimed warm-up
        torch.manual_seed(0)
        copy = MixtureLM(model_cfg)
        fast = compiled(copy)
        contenders["mixturelm (compiled)"] = train_step_fn(copy, lambda x: fast(x).logits, batch)
    peak = measure_matmul_flops(seconds=1.0)
    times = time_alternating(contenders, cfg.steps, cfg.rounds)
    flops_per_step = train_flops_per_token(model_cfg, seq_len) * tokens
    result = {"machine": machine(), "command": command,
              "shape": {"d_model": 512, "n_layers": 8, "n_heads": 8, "d_ffn": 1408, "seq_len": seq_len,
                        "batch_size": batch_size, "vocab": model_cfg.vocab_size, "dtype": "fp32"},
              "params": {"mixturelm": n_ours, "transformers Llama": n_peer},
              "matmul_peak_flops": peak, "contenders": {}}
    for name, ts in times.items():
        sec = statistics.median(ts)
        result["contenders"][name] = {"step_s": sec, "tok_per_s": tokens / sec, "mfu": flops_per_step / sec / peak,
                                      "step_s_all_rounds": ts}
    ratio = result["contenders"]["mixturelm"]["tok_per_s"] / result["contenders"]["transformers Llama"]["tok_per_s"]
    result["ratio_tok_per_s_ours_over_peer"] = ratio
    if cfg.compile:
        result["ratio_tok_per_s_compiled_over_eager"] = (result["contenders"]["mixturelm (compiled)"]["tok_per_s"]
                                                        / result["contenders"]["mixturelm"]["tok_per_s"])
    print_train(result)
    save_results(out, result)
    return result


def print_train(r: dict) -> None:
    m = r["machine"]
    print(machine_line(m))
    print(f"shape: {r['shape']}; params ours {r['params']['mixturelm']:,}, "
          f"peer {r['params']['transformers Llama']:,}")
    print(f"large-matmul peak: {r['matmul_peak_flops'] / 1e9:.1f} GFLOP/s")
    print(f"{'model':<22}{'step s':>9}{'tokens/s':>11}{'MFU':>7}")
    for name, c in r["contenders"].items():
        print(f"{name:<22}{c['step_s']:>9.3f}{c['tok_per_s']:>11,.0f}{c['mfu']:>7.1%}")
    print(f"ours / Llama tokens/s: {r['ratio_tok_per_s_ours_over_peer']:.3f}x")
    if "ratio_tok_per_s_compiled_over_eager" in r:
        print(f"ours compiled (torch.compile, compile time not counted) / eager tokens/s: "
              f"{r['ratio_tok_per_s_compiled_over_eager']:.3f}x")
