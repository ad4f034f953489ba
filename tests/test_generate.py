"""Sampling filters against brute-force references, and decoding with the cache."""

from __future__ import annotations

import pytest
import torch

from mixturelm import MixtureLM, ModelConfig, UsageError
from mixturelm.generate import filter_logits, generate


def test_top_k_keeps_exactly_the_k_largest():
    logits = torch.tensor([[1.0, 5.0, 3.0, 4.0, 2.0]])
    kept = filter_logits(logits, top_k=2).isfinite()
    assert kept.tolist() == [[False, True, False, True, False]]


def test_top_p_keeps_the_smallest_nucleus():
    torch.manual_seed(0)
    logits = torch.randn(50, 30)
    for p in (0.1, 0.5, 0.9, 0.999):
        kept = filter_logits(logits, top_p=p).isfinite()
        probs = logits.softmax(-1)
        for row in range(50):  # reference: add tokens by decreasing probability until the mass reaches p
            order = probs[row].argsort(descending=True)
            mass, want = 0.0, set()
            for i in order.tolist():
                want.add(i)
                mass += probs[row, i].item()
                if mass >= p:
                    break
            assert set(kept[row].nonzero().flatten().tolist()) == want


def test_greedy_generation_equals_argmax_of_full_recompute():
    torch.manual_seed(0)
    model = MixtureLM(ModelConfig(vocab_size=50, d_model=32, n_layers=2, n_heads=4, d_ffn=64, max_seq_len=64))
    prompt = torch.randint(0, 50, (2, 5))
    out = generate(model, prompt, 12, temperature=0)
    seq = prompt
    for _ in range(12):
        nxt = model(seq).logits[:, -1].argmax(-1, keepdim=True)
        seq = torch.cat([seq, nxt], dim=1)
    assert torch.equal(out, seq)


def test_sampling_is_reproducible_with_a_seed():
    torch.manual_seed(0)
    model = MixtureLM(ModelConfig(vocab_size=50, d_model=32, n_layers=1, n_heads=4, d_ffn=64))
    prompt = torch.randint(0, 50, (3, 4))
    a = generate(model, prompt, 10, 1.0, 10, 0.9, torch.Generator().manual_seed(1))
    b = generate(model, prompt, 10, 1.0, 10, 0.9, torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and a.shape == (3, 14)


@pytest.mark.parametrize("kw", [{"temperature": -1}, {"top_k": 0}, {"top_p": 0.0}, {"top_p": 1.5}])
def test_bad_sampling_options(kw):
    model = MixtureLM(ModelConfig(vocab_size=50, d_model=32, n_layers=1, n_heads=4, d_ffn=64))
    with pytest.raises(UsageError):
        generate(model, torch.zeros(1, 2, dtype=torch.long), 3, **kw)
