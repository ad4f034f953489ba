"""Sampling with a KV cache: one prefill of the prompt, then one token at a time.

Temperature 0 is greedy decoding; top-k keeps the k most likely tokens; top-p (nucleus) keeps the
smallest set whose probability reaches p. Filters apply in that order, then sampling.
"""

from __future__ import annotations

import math

import torch

from .errors import UsageError


def filter_logits(logits_BV: torch.Tensor, top_k: int | None = None, top_p: float | None = None) -> torch.Tensor:
    """Logits with the tokens outside top-k and outside the top-p nucleus set to -inf."""
    logits_BV = logits_BV.clone()
    if top_k is not None and top_k < logits_BV.shape[-1]:
        kth = logits_BV.topk(top_k, dim=-1).values[:, -1:]
        logits_BV[logits_BV < kth] = float("-inf")
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits_BV.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # drop a token when the tokens before it already reach top_p (the most likely one always stays)
        drop_sorted = probs.cumsum(-1) - probs >= top_p
        logits_BV[drop_sorted.scatter(-1, order, drop_sorted)] = float("-inf")
    return logits_BV


def check_sampling(temperature: float, top_k: int | None, top_p: float | None, max_new_tokens: int) -> None:
    if not 0 <= temperature < math.inf:  # also refuses NaN
        raise UsageError(f"`temperature` must be a finite number >= 0 (0 is greedy), got {temperature}")
    if top_k is not None and top_k < 1:
        raise UsageError(f"`top_k` must be >= 1, got {top_k}")
    if top_p is not None and not 0 < top_p <= 1:  # also refuses NaN
        raise UsageError(f"`top_p` must be in (0, 1], got {top_p}")
    if max_new_tokens < 0:
        raise UsageError(f"`max_new_tokens` must be >= 0, got {max_new_tokens}")


def check_cache_fits(model, batch: int, prompt_len: int, new_tokens: int, device) -> None:
    """What sampling allocates must fit in memory: the KV cache of every position (4-byte keys and values
    per layer), a bound of the prompt pass's activations (8 residual-stream copies; it keeps the logits of
    the last position only) and the logits of each step."""
    from .runtime import check_fits

    c = model.config
    cache = float(batch) * (prompt_len + new_tokens) * c.n_layers * 2 * (c.n_kv_heads or c.n_heads) * c.head_dim * 4
    logits = float(batch) * (prompt_len * c.d_model * 8 + c.vocab_size) * 4
    check_fits(cache + logits, f"sampling {batch:,} x {prompt_len + new_tokens:,} tokens (prompt and new tokens)",
               "sample fewer or shorter sequences (`num_samples`, `max_new_tokens`)", str(device))


@torch.no_grad()
def generate(model, prompt_BT: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
             top_k: int | None = None, top_p: float | None = None,
             generator: torch.Generator | None = None, routing: dict | None = None) -> torch.Tensor:
    """The prompt followed by max_new_tokens sampled tokens, (B, T + max_new_tokens).

    routing: if a dict is given, it receives for each Mixture-of-Depths layer the fraction of tokens
    (prompt and generated) that entered it under causal routing, to compare with its capacity."""
    check_sampling(temperature, top_k, top_p, max_new_tokens)
    if prompt_BT.shape[1] == 0:
        raise UsageError("the prompt is empty; give at least one token (one byte) of `prompt`")
    check_cache_fits(model, prompt_BT.shape[0], prompt_BT.shape[1], max_new_tokens, prompt_BT.device)
    model.eval()
    cache = model.new_cache(prompt_BT.shape[0], prompt_BT.shape[1] + max_new_tokens)
    out = [prompt_BT]
    logits = model(prompt_BT, cache=cache, last_only=True).logits[:, -1].float()
    for i in range(max_new_tokens):
        if temperature == 0:
            nxt = logits.argmax(-1, keepdim=True)
        else:
            probs = filter_logits(logits / temperature, top_k, top_p).softmax(-1)
            nxt = torch.multinomial(probs, 1, generator=generator)
        out.append(nxt)
        if i + 1 < max_new_tokens:
            logits = model(nxt, cache=cache).logits[:, -1].float()
    if routing is not None:
        for i, layer in enumerate(cache.layers):
            if hasattr(layer, "length_B") and cache.length:  # a ragged (MoD) cache: what entered
                routing[f"layer{i}"] = layer.length_B.sum().item() / (cache.length * prompt_BT.shape[0])
    return torch.cat(out, dim=1)
