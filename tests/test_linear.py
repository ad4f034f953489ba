"""Decoding's few-row weight products: kernels.few_row_linear against a float64 sum written out here, and when
layers.Linear takes it."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mixturelm.layers import kernels
from mixturelm.layers.linear import Linear, few_rows, linear

needs_kernel = pytest.mark.skipif(kernels.library() is None, reason="no C compiler: the CPU kernels are not built")
# the layer's own choice: with vectors of 4 floats the kernel was no faster than torch, and the layer leaves it
layer_uses_kernel = pytest.mark.skipif(not few_rows(), reason="the layer does not use the kernel on this processor")


def reference(x, w, b=None):
    """y[m, n] = sum_k x[m, k] w[n, k] + b[n] in float64, every product formed on its own, and the sum of
    |x[m, k] w[n, k]| that bounds the rounding of any float32 order of summation."""
    terms = x.double()[:, None, :] * w.double()[None, :, :]
    y = terms.sum(-1) + (0 if b is None else b.double())
    return y, terms.abs().sum(-1) + (0 if b is None else b.double().abs())


def assert_float32_close(y, x, w, b=None):
    want, scale = reference(x, w, b)
    assert y.dtype == torch.float32 and y.shape == want.shape
    # float32 rounding of a K-term sum stays under K * 2^-24 of the summed magnitudes; a mixed-up row, lane or
    # tail would be off by the size of a whole term
    err = (y.double() - want).abs()
    assert bool((err <= (x.shape[1] + 2) * 2.0 ** -24 * scale + 1e-30).all()), float((err / scale).max())


@needs_kernel
@pytest.mark.parametrize("M", [1, 2, 3, 4, 5, 8, 9, 32])  # whole tiles of four rows of x, and every remainder
@pytest.mark.parametrize("N", [4, 7, 149])  # whole blocks of four weight rows, a tail of three, many blocks
@pytest.mark.parametrize("K", [16, 19, 69])  # whole vectors (4, 8 or 16 lanes), and tails of scalars
def test_few_row_kernel_equals_the_written_out_sum(M, N, K):
    g = torch.Generator().manual_seed(M * 1000 + N * 10 + K)
    x, w, b = (torch.randn(s, generator=g) for s in ((M, K), (N, K), (N,)))
    assert_float32_close(kernels.few_row_linear(x, w), x, w)
    assert_float32_close(kernels.few_row_linear(x, w, b), x, w, b)


@needs_kernel
def test_few_row_kernel_at_a_block_shape_and_threads():
    """A dense-medium block's gate-and-up weight, split between threads as torch's setting says."""
    g = torch.Generator().manual_seed(1)
    x, w = torch.randn(8, 512, generator=g), torch.randn(2816, 512, generator=g)
    threads = torch.get_num_threads()
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            assert_float32_close(kernels.few_row_linear(x, w), x, w)
    finally:
        torch.set_num_threads(threads)


def test_linear_keeps_nn_linear_parameters_and_training():
    torch.manual_seed(0)
    ours, theirs = Linear(24, 12, bias=True), nn.Linear(24, 12, bias=True)
    assert isinstance(ours, nn.Linear) and ours.state_dict().keys() == theirs.state_dict().keys()
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(5, 24, requires_grad=True)
    ours(x).sum().backward()  # training: F.linear, gradients as nn.Linear's
    assert ours.weight.grad is not None and x.grad is not None


@pytest.fixture
def kernel_calls(monkeypatch):
    """How many products went through the kernel."""
    calls = []
    real = kernels.few_row_linear
    monkeypatch.setattr(kernels, "few_row_linear", lambda *a: calls.append(a[0].shape) or real(*a))
    return calls


@layer_uses_kernel
def test_linear_takes_the_kernel_at_few_rows_without_autograd(kernel_calls):
    layer = Linear(24, 12, bias=True)
    rows = [few_rows()[0] - 1, few_rows()[0], few_rows()[-1], few_rows()[-1] + 1]
    with torch.no_grad():
        for n in rows:
            x = torch.randn(1, n, 24)
            y = layer(x)
            assert y.shape == (1, n, 12)
            assert_float32_close(y.view(n, 12), x.view(n, 24), layer.weight, layer.bias)
    assert kernel_calls == [(few_rows()[0], 24), (few_rows()[-1], 24)]


@layer_uses_kernel
def test_linear_leaves_to_torch_what_the_kernel_does_not_do(kernel_calls):
    from torch.utils.flop_counter import FlopCounterMode

    layer, x = Linear(24, 12), torch.randn(4, 24)
    y = layer(x)  # the weight needs a gradient
    assert y.grad_fn is not None
    with torch.no_grad():
        layer.double()(x.double())  # float64: torch
        layer.float()
        torch.testing.assert_close(layer(x.bfloat16().float()), F.linear(x.bfloat16().float(), layer.weight, layer.bias))
        strided = torch.randn(24, 12).t()  # a transposed weight would be copied whole at every call
        linear(x, strided)
        with FlopCounterMode(display=False) as counter:  # the FLOP counter must see the product
            linear(x, layer.weight)
        assert counter.get_total_flops() == 2 * 4 * 24 * 12
    assert kernel_calls == [(4, 24)]  # only the bfloat16-valued float32 call


@needs_kernel
def test_linear_refuses_and_broadcasts_as_f_linear_does(kernel_calls):
    """Shapes F.linear refuses raise as F.linear raises; a bias it broadcasts is broadcast; nothing is read out of
    bounds by the kernel."""
    w = torch.randn(6, 8)
    with torch.no_grad():
        for x, weight, bias in [(torch.randn(4, 5), w, None), (torch.randn(4, 8), w, torch.randn(3)),
                                (torch.randn(4, 9), w, None)]:
            with pytest.raises(RuntimeError):
                F.linear(x, weight, bias)
            with pytest.raises(RuntimeError):
                linear(x, weight, bias)
        x = torch.randn(4, 8)
        for bias in (torch.tensor(0.5), torch.tensor([0.5])):
            torch.testing.assert_close(linear(x, w, bias), F.linear(x, w, bias))
        vector = torch.randn(8)  # a 1-d weight: F.linear gives one number per row
        torch.testing.assert_close(linear(x, vector), F.linear(x, vector))
        assert linear(x, vector).shape == (4,)
    assert kernel_calls == []


@needs_kernel
@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning", "ignore::DeprecationWarning")  # torch.jit inside torch
def test_linear_leaves_transforms_and_autocast_to_torch(kernel_calls):
    """Under autocast F.linear computes in bfloat16, under forward-mode AD it carries tangents, under vmap and
    jit.trace its tensors have no storage or must be recorded: the kernel must not run there."""
    import torch.autograd.forward_ad as fwAD

    w, x = torch.randn(6, 8), torch.randn(4, 8)
    with torch.no_grad():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert linear(x, w).dtype == F.linear(x, w).dtype == torch.bfloat16
        with fwAD.dual_level():
            tangent = fwAD.unpack_dual(linear(fwAD.make_dual(x, torch.ones_like(x)), w)).tangent
        torch.testing.assert_close(tangent, F.linear(torch.ones_like(x), w))
        batched = torch.func.vmap(lambda xs: linear(xs, w))(torch.randn(3, 4, 8))
        assert batched.shape == (3, 4, 6)
        traced = torch.jit.trace(lambda xs: linear(xs, w), (x,), check_trace=False)  # its check reruns untraced
        other = torch.randn(4, 8)
        torch.testing.assert_close(traced(other), F.linear(other, w))
    assert kernel_calls == []


def test_linear_without_kernels_is_f_linear(monkeypatch, kernel_calls):
    monkeypatch.setattr(kernels, "library", lambda: None)
    layer, x = Linear(24, 12), torch.randn(4, 24)
    with torch.no_grad():
        assert torch.equal(layer(x), F.linear(x, layer.weight, layer.bias))
    assert kernel_calls == []


def test_linear_compiles_to_torch_ops():
    layer, x = Linear(24, 12), torch.randn(4, 24)
    with torch.no_grad():
        compiled = torch.compile(layer, backend="eager", fullgraph=True)
        torch.testing.assert_close(compiled(x), F.linear(x, layer.weight, layer.bias))


@layer_uses_kernel
@pytest.mark.parametrize("tie", [True, False])
def test_float32_decoding_through_the_kernel_equals_recompute(tie, kernel_calls):
    """A float32 model decodes 3 rows at a time through the kernel (attention, FFN and head: tied or not) and
    gives the logits of recomputing the whole sequence, to float32 rounding."""
    from mixturelm import MixtureLM, ModelConfig

    torch.manual_seed(0)
    model = MixtureLM(ModelConfig(vocab_size=61, d_model=32, n_layers=2, n_heads=4, d_ffn=48, max_seq_len=32,
                                  tie_embeddings=tie)).eval()
    idx = torch.randint(0, 61, (3, 20))
    with torch.no_grad():
        want = model(idx).logits
        kernel_calls.clear()
        cache = model.new_cache(3, 20)
        got = [model(idx[:, :12], cache=cache).logits]
        got += [model(idx[:, t:t + 1], cache=cache).logits for t in range(12, 20)]
    torch.testing.assert_close(torch.cat(got, 1), want, rtol=1e-5, atol=1e-5)
    assert len(kernel_calls) == 8 * (2 * 4 + 1)  # per step: 4 products in each of 2 blocks, and the head


@pytest.mark.parametrize("extra", ["-mno-avx512f", "-mno-avx512f -mno-avx"], ids=["avx2", "sse"])
def test_few_row_kernel_narrower_vector_builds(extra, tmp_path, monkeypatch):
    """The library built with $MIXTURELM_KERNEL_CFLAGS for 8-lane (AVX/AVX2) and 4-lane (SSE) vectors, as on
    processors without AVX-512, against the written-out sum: the lane-sum tree has one level fewer each time."""
    import platform

    if kernels.library() is None or platform.machine() not in ("x86_64", "AMD64"):
        pytest.skip("needs a C compiler for x86-64")
    monkeypatch.setenv("MIXTURELM_CACHE", str(tmp_path))
    monkeypatch.setenv("MIXTURELM_KERNEL_CFLAGS", extra)
    narrow = kernels._build()
    assert narrow is not None and list(tmp_path.glob("kernels/*.so"))  # built here, not the default library
    monkeypatch.setattr(kernels, "_lib", narrow)
    g = torch.Generator().manual_seed(7)
    for M, N, K in [(1, 4, 16), (3, 7, 19), (5, 9, 8), (8, 149, 69), (33, 13, 3)]:
        x, w, b = (torch.randn(s, generator=g) for s in ((M, K), (N, K), (N,)))
        assert_float32_close(kernels.few_row_linear(x, w, b), x, w, b)
