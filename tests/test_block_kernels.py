"""Inference kernels of a block's element-wise steps (RMSNorm, rotary embedding, SwiGLU activation) and of a
Mixture-of-Depths decoding step (router and rows; the weighted sum back into the batch): each against a float64
computation written out here, then when the layers take them and that the model computes the same either way."""

import math

import pytest
import torch
import torch.nn.functional as F

from mixturelm import MixtureLM, ModelConfig
from mixturelm.layers import kernels
from mixturelm.layers.attention import rope_angles, rotate_qkv
from mixturelm.layers.ffn import swiglu_activation
from mixturelm.layers.mod import MoD
from mixturelm.model import RMSNorm
from mixturelm.presets import PRESETS

needs_kernel = pytest.mark.skipif(kernels.library() is None, reason="no C compiler: the CPU kernels are not built")
ULP = 2.0 ** -23  # float32's relative spacing at 1


def close_to(got: torch.Tensor, want64: torch.Tensor, ulps: float,
             floor: float = torch.finfo(torch.float32).tiny) -> None:
    """got (float32) within `ulps` float32 steps of the float64 value, relative to each element's own size, or
    within `floor` (default the smallest normal float32, for results that underflow)."""
    assert got.dtype == torch.float32 and got.shape == want64.shape
    err = (got.double() - want64).abs()
    bound = ulps * ULP * want64.abs() + floor
    assert bool((err <= bound).all()), float((err / want64.abs().clamp_min(1e-30)).max() / ULP)


@needs_kernel
@pytest.mark.parametrize("M, D", [(1, 512), (3, 17), (64, 512), (300, 1000)])  # one row; tails; the threaded size
def test_rms_norm_kernel_equals_the_norm_written_out(M, D):
    torch.manual_seed(M)
    x, w = torch.randn(M, D) * 3, torch.randn(D)
    y = kernels.rms_norm(x, w, 1e-5)
    x64 = x.double()
    inv = 1 / torch.sqrt((x64 * x64).mean(-1, keepdim=True) + 1e-5)
    close_to(y, x64 * inv * w.double(), ulps=4)


@needs_kernel
@pytest.mark.parametrize("shared", [True, False])  # angles (T, K/2) for the batch, or (B, T, K/2) per row
@pytest.mark.parametrize("K", [8, 64, 6])
def test_rope_kernel_turns_the_first_heads_in_place(shared, K):
    torch.manual_seed(K)
    B, T, N, n_rot = 3, 5, 7, 5  # the last two heads (v) must stay as they are
    x = torch.randn(B, T, N, K)
    positions = torch.arange(T) if shared else torch.randint(0, 4000, (B, T))
    cos, sin = rope_angles(positions, K, 10000.0)
    before = x.clone()
    out = kernels.rope_rows_(x, cos, sin, n_rot)
    assert out is x and torch.equal(x[:, :, n_rot:], before[:, :, n_rot:])
    c = cos.double()[..., None, :] if not shared else cos.double()[None, :, None, :]
    s = sin.double()[..., None, :] if not shared else sin.double()[None, :, None, :]
    x1, x2 = before[:, :, :n_rot, :K // 2].double(), before[:, :, :n_rot, K // 2:].double()
    want = torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], -1)
    # each output is a sum of two rounded products: within a few steps of the larger term
    err = (x[:, :, :n_rot].double() - want).abs()
    assert bool((err <= 4 * ULP * (x1.abs() + x2.abs()).repeat(1, 1, 1, 2)).all())


@needs_kernel
def test_swiglu_kernel_equals_silu_times_up_over_the_float_range():
    gate = torch.cat([torch.linspace(-120, 120, 4801), torch.randn(997) * 4, torch.tensor([0.0, -0.0, 1e-30])])
    up = torch.randn_like(gate)
    for F_ in (gate.numel(), 7):  # every lane of the vectors, and a row narrower than one vector (the scalar tail)
        g, u = gate[:F_], up[:F_]
        out = kernels.swiglu(torch.cat([g, u]).view(1, -1))[0]
        want = g.double() * torch.sigmoid(g.double()) * u.double()
        # e^x to about 2 steps, then a product, a division and a product, each rounded; below g = -87.3 (silu
        # under 1e-35) it may give 0, as torch's own silu does below -88.7
        close_to(out, want, ulps=6, floor=1e-35)
    big = torch.randn(40, 2 * 1408)  # several rows, threaded
    close_to(kernels.swiglu(big), F.silu(big[:, :1408].double()) * big[:, 1408:].double(), ulps=6)
    assert kernels.swiglu(torch.tensor([[float("inf"), 1.0]]))[0, 0] == float("inf")
    assert bool(kernels.swiglu(torch.tensor([[float("nan"), 1.0]])).isnan().all())


@needs_kernel
def test_mod_route_and_add_rows_kernels_equal_the_rule_written_out():
    torch.manual_seed(0)
    B, D = 37, 100
    x, w = torch.randn(B, D), torch.randn(D)
    r, rows = kernels.mod_route(x, w, 0.3)
    r64 = x.double() @ w.double()
    assert bool(((r.double() - r64).abs() <= D * ULP * (x.double().abs() @ w.double().abs())).all())
    assert rows.tolist() == [b for b in range(B) if r[b] > 0.3] and 0 < rows.numel() < B
    f = torch.randn(rows.numel(), D)
    for sigmoid in (False, True):
        y = kernels.mod_add_rows(x, rows, r, f, sigmoid)
        g = torch.sigmoid(r[rows]) if sigmoid else r[rows]
        want = x.clone()
        want[rows] = x[rows] + g[:, None] * f  # float32: the product rounded, then the sum, as prefill rounds it
        if sigmoid:  # the kernel's sigmoid may differ from torch's in the last step
            torch.testing.assert_close(y, want, rtol=2 * ULP, atol=1e-6)
        else:
            assert torch.equal(y, want)
    _, none = kernels.mod_add_rows(x, rows[:0], r, f[:0], False), kernels.mod_route(x, w, math.inf)[1]
    assert torch.equal(_, x) and none.numel() == 0


def test_inference_ready_only_where_nothing_else_is_asked():
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.randn(2, 8)
    if kernels.library() is None:
        assert not kernels.inference_ready(x)
        return
    assert kernels.inference_ready(x)
    assert not kernels.inference_ready(x.double()) and not kernels.inference_ready(x.bfloat16())
    w = torch.randn(8, requires_grad=True)
    assert not kernels.inference_ready(x, w)  # a gradient to carry
    with torch.no_grad():
        assert kernels.inference_ready(x, w)
        with FlopCounterMode(display=False):  # the counter must see torch's ops
            assert not kernels.inference_ready(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert not kernels.inference_ready(x)


@pytest.fixture
def block_kernel_calls(monkeypatch):
    """Which of the element-wise and MoD kernels the layers called."""
    calls = []
    for name in ("rms_norm", "rope_rows_", "swiglu", "mod_route", "mod_add_rows", "ragged_attend_qkv"):
        real = getattr(kernels, name)
        monkeypatch.setattr(kernels, name, lambda *a, real=real, name=name: calls.append(name) or real(*a))
    return calls


@needs_kernel
def test_layers_take_the_kernels_in_inference_only(block_kernel_calls):
    norm = RMSNorm(16, 1e-5)
    x = torch.randn(3, 16)
    cos, sin = rope_angles(torch.arange(3), 4, 10000.0)
    qkv = torch.randn(1, 3, 4, 4)
    gu = torch.randn(3, 10)
    want = (F.rms_norm(x, (16,), norm.weight, 1e-5), swiglu_activation(gu.requires_grad_()))
    assert block_kernel_calls == []  # the norm's weight, and gu, need gradients
    with torch.no_grad():
        torch.testing.assert_close(norm(x), want[0])
        torch.testing.assert_close(swiglu_activation(gu), want[1])
        q, k, v = rotate_qkv(qkv.clone(), cos, sin, 2, 1)
        q2, k2, v2 = rotate_qkv(qkv.double(), cos.double(), sin.double(), 2, 1)  # float64: QKVRope
        for a, b in zip((q, k, v), (q2, k2, v2)):
            torch.testing.assert_close(a.double(), b, rtol=1e-6, atol=1e-6)
        assert swiglu_activation(gu, torch.ones(3)).shape == (3, 5)  # a per-row scale (MoE): torch's ops
    assert block_kernel_calls == ["rms_norm", "swiglu", "rope_rows_"]


def float32_mod_model(**mod_options) -> MixtureLM:
    fields = dict(PRESETS["mod-debug"].model)
    fields["blocks"] = [b | {"mod": b["mod"] | mod_options} if b.get("wrapper") == "mod" else b
                        for b in fields["blocks"]]
    torch.manual_seed(0)
    model = MixtureLM(ModelConfig(**fields)).eval()
    for m in model.modules():
        if isinstance(m, MoD):
            m.threshold.fill_(0.0)  # the router's own sign: about half the rows enter
    return model


@needs_kernel
@pytest.mark.parametrize("gate", ["linear", "sigmoid"])
@pytest.mark.parametrize("batch", [6, 1])  # one sequence: its prefill routes in the kernels too
def test_float32_decoding_in_kernels_equals_the_torch_path(gate, batch, block_kernel_calls, monkeypatch):
    """A float32 MoD model prefills and decodes the same with the kernels (element-wise steps, router and rows, the
    sum back, the fused ragged attention) as with every kernel off (the path CUDA takes), to float32 rounding, and
    its ragged caches grow alike; so does a forward with causal routing and no cache."""
    model = float32_mod_model(gate=gate, capacity=0.5)
    torch.manual_seed(1)
    idx = torch.randint(0, 257, (batch, 20))

    def decode():
        with torch.no_grad():
            cache = model.new_cache(batch, 20)
            out = [model(idx[:, :8], cache=cache).logits]
            out += [model(idx[:, t:t + 1], cache=cache).logits for t in range(8, 20)]
            causal = model(idx, causal_routing=True).logits
        return torch.cat(out, 1), causal, [layer.length_B for layer in cache.layers if hasattr(layer, "length_B")]

    got, got_causal, got_lengths = decode()
    assert {"rms_norm", "rope_rows_", "swiglu", "mod_route", "mod_add_rows"} <= set(block_kernel_calls)
    routed = sum(isinstance(m, MoD) for m in model.modules())
    # the routed blocks' attention, in the prefill (padded rows at batch 6) and every decoding step where rows entered
    assert block_kernel_calls.count("ragged_attend_qkv") >= routed
    # the router's kernel ran in every routed block's decoding steps, and in its prefill and forward of one sequence
    assert block_kernel_calls.count("mod_route") == routed * (12 + 2 * (batch == 1))
    monkeypatch.setattr(kernels, "library", lambda: None)
    want, want_causal, want_lengths = decode()
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got_causal, want_causal, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got, got_causal, rtol=1e-4, atol=1e-4)  # decoding computes what the forward does
    assert all(torch.equal(a, b) for a, b in zip(got_lengths, want_lengths))
    assert any(0 < int(n.min()) and int(n.max()) < 20 for n in got_lengths) or batch == 1  # rows entered and skipped
    assert all(0 < int(n.max()) < 20 for n in got_lengths)


@needs_kernel
def test_mod_decoding_kernels_when_nobody_or_everybody_enters(block_kernel_calls):
    model = float32_mod_model(capacity=0.5)
    routed = [m for m in model.modules() if isinstance(m, MoD)]
    x = torch.randn(4, 1, model.config.d_model)
    rope = rope_angles(torch.tensor([3]), model.config.d_model // model.config.n_heads, 10000.0)
    mod = routed[0]
    for threshold, entered in ((math.inf, 0), (-math.inf, 4)):
        mod.threshold.fill_(threshold)
        cache = mod.new_cache(4, 8, "cpu", torch.float32)
        with torch.no_grad():
            y, aux = mod(x, rope, cache)
        assert cache.length_B.tolist() == [1 if entered else 0] * 4
        assert aux[-1].causal_counts.tolist() == [entered, 4] and float(aux[-1].causal_fraction) == entered / 4
        if not entered:
            assert torch.equal(y, x)
        else:
            assert not torch.equal(y, x) and y.shape == x.shape
    assert block_kernel_calls.count("mod_route") == 2 and block_kernel_calls.count("mod_add_rows") == 1


@needs_kernel
@pytest.mark.parametrize("K", [8, 64, 20, 6])  # whole vectors of 4, 8 or 16 floats; tails of scalars; no vector
@pytest.mark.parametrize("shared", [True, False])  # one angle per token for every row, or one per row and token
@pytest.mark.parametrize("C", [1, 3])  # decoding, and a prefill whose rows bring 3, 1 and 2 tokens (then padding)
def test_ragged_attention_from_the_projection_equals_the_step_written_out(K, shared, C):
    """The fused step from the projection against float64 written out: each token's key turned by its angle and
    its value at its row's length + its index, the length grown by the row's real tokens, and each token's
    softmax(q k / sqrt(K)) v over its row's tokens up to its own, q turned the same way; rows in any order, an
    empty row, a row that fills the cache, two query heads per key/value head, more tokens than one block of
    sixteen scores. A row without room, or rows repeated or outside the batch: an error, and nothing written."""
    gen = torch.Generator().manual_seed(K + C)
    B, L, H, G = 6, 40, 4, 2
    k_BLGK, v_BLGK = (torch.randn(B, L, G, K, generator=gen) for _ in range(2))
    length_B = torch.tensor([3, 40 - C, 0, 25, 2, 1])
    rows = torch.tensor([4, 0, 2, 1])  # row 2 empty before; row 1 takes the last slots
    count = None if C == 1 else torch.tensor([3, 1, 2, 3])
    qkv = torch.randn(4, C, H + 2 * G, K, generator=gen) * 2  # a sharp softmax
    positions = torch.arange(7, 7 + C) if shared else torch.randint(0, 4000, (4, C))
    cos, sin = rope_angles(positions, K, 10000.0)  # (C, K/2) or (R, C, K/2)
    k_want, v_want, length_want = k_BLGK.double(), v_BLGK.double(), length_B.clone()

    def turn(x, r, c):  # (heads, K) by token (r, c)'s angle, in float64
        cs, sn = (cos[c], sin[c]) if shared else (cos[r, c], sin[r, c])
        x1, x2 = x[:, :K // 2], x[:, K // 2:]
        return torch.cat([x1 * cs.double() - x2 * sn.double(), x2 * cs.double() + x1 * sn.double()], -1)

    for r, b in enumerate(rows.tolist()):
        for c in range(C):  # padding too: written past the row's end
            k_want[b, length_B[b] + c] = turn(qkv[r, c, H:H + G].double(), r, c)
            v_want[b, length_B[b] + c] = qkv[r, c, H + G:].double()
        length_want[b] += C if count is None else count[r]
    got = kernels.ragged_attend_qkv(qkv, cos, sin, k_BLGK, v_BLGK, length_B, rows, count, H)
    assert got.shape == (4, C, H * K) and torch.equal(length_B, length_want)
    torch.testing.assert_close(k_BLGK.double(), k_want, rtol=1e-6, atol=1e-6)
    assert torch.equal(v_BLGK.double(), v_want)
    for r, b in enumerate(rows.tolist()):
        for c in range(C):
            n, q = int(length_want[b] - (C if count is None else count[r])) + c + 1, turn(qkv[r, c, :H].double(), r, c)
            for h in range(H):
                keys, values = k_want[b, :n, h // (H // G)], v_want[b, :n, h // (H // G)]
                weights = torch.softmax(keys @ q[h] / math.sqrt(K), dim=0)
                torch.testing.assert_close(got[r, c, h * K:(h + 1) * K].double(), weights @ values, rtol=2e-5,
                                           atol=2e-5)
    before = k_BLGK.clone(), v_BLGK.clone(), length_B.clone()
    with pytest.raises(RuntimeError, match="KV cache holds 40 tokens"):  # row 1 is full now
        kernels.ragged_attend_qkv(qkv, cos, sin, k_BLGK, v_BLGK, length_B, rows, count, H)
    for bad in ([0, 0, 2, 3], [0, 6, 2, 3], [0, -1, 2, 3]):  # a row twice, past the batch, negative
        with pytest.raises(ValueError, match="distinct batch rows"):
            kernels.ragged_attend_qkv(qkv, cos, sin, k_BLGK, v_BLGK, length_B, torch.tensor(bad), count, H)
    assert all(torch.equal(x, y) for x, y in zip((k_BLGK, v_BLGK, length_B), before))


@needs_kernel
def test_attention_takes_the_fused_ragged_step_only_where_it_fits(monkeypatch):
    from mixturelm.layers.attention import Attention, RaggedKVCache

    calls = []
    real = kernels.ragged_attend_qkv
    monkeypatch.setattr(kernels, "ragged_attend_qkv", lambda *a: calls.append(a[0].dtype) or real(*a))
    torch.manual_seed(0)
    x = torch.randn(3, 1, 32)
    rope = rope_angles(torch.tensor([4]), 8, 10000.0)
    past_k, past_v = torch.randn(5, 6, 2, 8), torch.randn(5, 6, 2, 8)
    for qk_norm in ("none", "head"):
        attn = Attention(32, 4, 2, qk_norm=qk_norm)
        outs = []
        for dtype in (torch.float32, torch.float64):  # float64: the unfused step, the reference here
            a = attn.to(dtype)
            cache = RaggedKVCache(5, 2, 8, 6, "cpu", dtype)
            cache.k_BLGK.copy_(past_k), cache.v_BLGK.copy_(past_v)
            cache.length_B.copy_(torch.tensor([2, 0, 5, 1, 3]))
            with torch.no_grad():
                outs.append(a(x.to(dtype), tuple(t.to(dtype) for t in rope), cache.rows(torch.tensor([4, 0, 3]), 1)))
        torch.testing.assert_close(outs[0].double(), outs[1], rtol=1e-5, atol=1e-5)
    assert calls == [torch.float32, torch.float32]
    cache = RaggedKVCache(5, 2, 8, 6, "cpu", torch.float32)
    attn = Attention(32, 4, 2)
    attn(x, rope, cache.rows(torch.tensor([4, 0, 3]), 1))  # the weights need gradients: the unfused step
    assert len(calls) == 2 and cache.length_B.tolist() == [1, 0, 0, 1, 1]
    from mixturelm.layers import attention

    monkeypatch.setattr(attention, "FUSED_ATTENTION_MOST_TOKENS", 0)  # more tokens than the kernel takes
    with torch.no_grad():
        attn(x, rope, cache.rows(torch.tensor([4, 0, 3]), 1))
    assert len(calls) == 2 and cache.length_B.tolist() == [2, 0, 0, 2, 2]
