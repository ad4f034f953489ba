"""The CUDA paths: each mechanism's layer and a whole model on the GPU against the same weights on the CPU,
the row-wise optimizer's torch-ops path, training and generation on the device. Skipped without a GPU;
MIXTURELM_TEST_DEVICE=cpu runs them on the CPU (the comparisons then check the CPU against itself, which
still exercises the device handling). benchmarks/gpu/run.sh runs this file first."""

from __future__ import annotations

import copy
import os

import pytest
import torch

from mixturelm import MixtureLM, ModelConfig
from mixturelm.layers import MoE
from mixturelm.layers.peer import PEER
from mixturelm.optim import AdamRows
from mixturelm.presets import get_preset

DEVICE = os.environ.get("MIXTURELM_TEST_DEVICE", "cuda")
pytestmark = pytest.mark.skipif(DEVICE == "cuda" and not torch.cuda.is_available(), reason="no CUDA device")
TOL = dict(rtol=1e-4, atol=1e-5)  # TF32 is off by default in matmuls; float32 reductions differ in order


def on_both(module: torch.nn.Module) -> tuple[torch.nn.Module, torch.nn.Module]:
    return module, copy.deepcopy(module).to(DEVICE)


@pytest.mark.parametrize("impl", ["auto", "loop", "grouped"])
def test_moe_layer_on_the_device_equals_the_cpu(impl):
    if impl == "grouped" and DEVICE == "cuda" and torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("torch._grouped_mm needs sm90+")
    torch.manual_seed(0)
    cpu, dev = on_both(MoE(64, n_experts=8, top_k=2, d_expert=96, impl=impl))
    x = torch.randn(2, 32, 64, requires_grad=True)
    xd = x.detach().to(DEVICE).requires_grad_()
    y, _ = cpu(x)
    yd, _ = dev(xd)
    torch.testing.assert_close(yd.cpu(), y, **TOL)
    g = torch.randn_like(y)
    y.backward(g)
    yd.backward(g.to(DEVICE))
    torch.testing.assert_close(xd.grad.cpu(), x.grad, **TOL)
    for (name, p), pd in zip(cpu.named_parameters(), dev.parameters()):
        torch.testing.assert_close(pd.grad.cpu(), p.grad, **TOL, msg=lambda m: f"{name}: {m}")


def test_peer_layer_and_row_adam_on_the_device_equal_the_cpu():
    torch.manual_seed(0)
    cpu, dev = on_both(PEER(32, n_experts=32 * 32, n_heads=2, top_k=4, d_key=16, sparse_grad=True))
    x = torch.randn(2, 16, 32)
    opts = [AdamRows([{"params": list(m.expert_tables()), "row_sparse": True}], lr=1e-2) for m in (cpu, dev)]
    for m, opt, inp in ((cpu, opts[0], x), (dev, opts[1], x.to(DEVICE))):
        for _ in range(2):
            m(inp)[0].square().mean().backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    for p, pd in zip(cpu.expert_tables(), dev.expert_tables()):
        torch.testing.assert_close(pd.detach().cpu(), p.detach(), **TOL)


@pytest.mark.parametrize("preset", ["dense-debug", "moe-debug", "mod-debug", "peer-debug"])
def test_model_on_the_device_equals_the_cpu_and_generates(preset):
    torch.manual_seed(0)
    cpu, dev = on_both(MixtureLM(ModelConfig(**get_preset(preset).model)).eval())
    tokens = torch.randint(0, 257, (2, 48))
    with torch.no_grad():
        want = cpu(tokens).logits
        got = dev(tokens.to(DEVICE)).logits
    torch.testing.assert_close(got.cpu(), want, **TOL)
    from mixturelm.generate import generate

    out = generate(dev, tokens[:1, :8].to(DEVICE), max_new_tokens=8, temperature=0.0)
    assert out.shape[-1] >= 8 and out.device.type == torch.device(DEVICE).type


def test_training_on_the_device(corpus_dir, tmp_path):
    from mixturelm.training import Trainer, new_run_config

    cfg = new_run_config("moe-debug", {"data": str(corpus_dir), "max_steps": 4, "eval_every": 4})
    result = Trainer(cfg, tmp_path / "run", device=DEVICE, progress=False, log=lambda m: None).run()
    assert result["steps"] == 4 and result["val_loss"] < 6
