"""The few-row decoding path of layers.Linear against a float64 sum written out here."""

import pytest
import torch
import torch.nn.functional as F

from mixturelm.layers import kernels
from mixturelm.layers.linear import SKINNY_ROWS, Linear, _use_skinny, linear

needs_kernel = pytest.mark.skipif(kernels.library() is None, reason="no C compiler")


def reference(x, w, b=None):
    """y[m, n] = sum_k x[m, k] w[n, k] + b[n], one term at a time in float64."""
    M, K = x.shape
    y = torch.zeros(M, w.shape[0], dtype=torch.float64)
    for m in range(M):
        for n in range(w.shape[0]):
            y[m, n] = sum(float(x[m, k]) * float(w[n, k]) for k in range(K)) + (0.0 if b is None else float(b[n]))
    return y


@needs_kernel
@pytest.mark.parametrize("M", [1, 2, 3, 5])
@pytest.mark.parametrize("N", [4, 7])  # a whole block of four weight rows; and one with a tail of three
@pytest.mark.parametrize("K", [16, 19])  # whole vectors; and a tail of scalars
def test_skinny_kernel_matches_the_written_out_sum(M, N, K):
    g = torch.Generator().manual_seed(M * 100 + N * 10 + K)
    x, w, b = (torch.randn(s, dtype=torch.float64, generator=g) for s in ((M, K), (N, K), (N,)))
    torch.testing.assert_close(kernels.skinny_linear(x, w), reference(x, w), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(kernels.skinny_linear(x, w, b), reference(x, w, b), rtol=1e-12, atol=1e-12)
    y32 = kernels.skinny_linear(x.float(), w.float(), b.float())
    torch.testing.assert_close(y32, F.linear(x.float(), w.float(), b.float()), rtol=1e-5, atol=1e-5)


@needs_kernel
def test_linear_takes_the_kernel_only_without_autograd_and_at_few_rows():
    layer = Linear(24, 12, bias=True).double()
    few, many = torch.randn(2, 3, 24, dtype=torch.float64), torch.randn(SKINNY_ROWS + 1, 24, dtype=torch.float64)
    with torch.no_grad():
        assert _use_skinny(few, layer.weight) and not _use_skinny(many, layer.weight)
        torch.testing.assert_close(layer(few), F.linear(few, layer.weight, layer.bias), rtol=1e-12, atol=1e-12)
        assert layer(few).shape == (2, 3, 12)
        assert not _use_skinny(few.float(), layer.weight)  # mixed dtypes: F.linear raises as it would
    assert not _use_skinny(few, layer.weight)  # the weight needs a gradient
    y = layer(few)
    y.sum().backward()
    assert layer.weight.grad is not None and y.grad_fn is not None


@needs_kernel
def test_flop_counter_sees_the_decoding_products():
    from torch.utils.flop_counter import FlopCounterMode
    w = torch.randn(12, 24)
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        linear(torch.randn(3, 24), w)
    assert fc.get_total_flops() == 2 * 3 * 24 * 12
