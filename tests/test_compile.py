"""torch.compile: the custom ops checked by torch.library.opcheck; a compiled training step against the eager
one (losses and gradients within float32 tolerance); each mechanism's debug preset trained compiled and
eagerly; a compiled run resumed eagerly; `mixturelm train --compile` end to end; no graph break left in the
dense, MoE and MoD presets.

Compiling on CPU takes tens of seconds per model: the per-preset runs are marked slow."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mixturelm import MixtureLM, ModelConfig, UsageError
from mixturelm.config import TrainConfig
from mixturelm.layers import kernels
from mixturelm.layers.dispatch import loop_grouped_mm
from mixturelm.training import Trainer, new_run_config, resumed_run_config
from mixturelm.training import compiling
from conftest import run_cli

needs_kernel = pytest.mark.skipif(kernels.library() is None, reason="no C compiler: the PEER kernel is not built here")


def losses(run_dir: Path) -> dict[int, float]:
    recs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in recs if r["kind"] == "train"}


# ----------------------------------------------------------------------------------------------
# Custom ops

def test_opcheck_loop_grouped_mm():
    torch.manual_seed(0)
    x = torch.randn(7, 5, requires_grad=True)
    w = torch.randn(3, 5, 4, requires_grad=True)
    counts = torch.tensor([3, 0, 4])  # an expert without tokens
    torch.library.opcheck(loop_grouped_mm, (x, w, counts))
    d_out = torch.randn(7, 4)
    torch.library.opcheck(torch.ops.mixturelm.loop_grouped_mm_backward.default,
                          (d_out, x.detach(), w.detach(), counts))


def test_loop_grouped_mm_against_a_loop_over_experts():
    torch.manual_seed(0)
    x = torch.randn(9, 5, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, 5, 3, dtype=torch.float64, requires_grad=True)
    counts = torch.tensor([2, 0, 5, 2])
    ends = counts.cumsum(0).tolist()
    want = torch.cat([x[e - n:e] @ w[i] for i, (n, e) in enumerate(zip(counts.tolist(), ends))])
    got = loop_grouped_mm(x, w, counts)
    torch.testing.assert_close(got, want)
    g = torch.randn_like(got)
    torch.testing.assert_close(torch.autograd.grad(got, (x, w), g), torch.autograd.grad(want, (x, w), g))


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_opcheck_peer_kernels(dtype):
    torch.manual_seed(0)
    T, J, D, N = 6, 4, 8, 10
    table, x = torch.randn(N, D, dtype=dtype), torch.randn(T, D, dtype=dtype)
    ids = torch.randint(0, N, (T, J))
    torch.library.opcheck(torch.ops.mixturelm.peer_gather_dot.default, (table, ids, x))
    torch.library.opcheck(torch.ops.mixturelm.peer_product_key_topk.default, (torch.randn(2, 3, T, 9, dtype=dtype), 4))
    token, order, rows, offsets = kernels.group_rows(ids, N)
    torch.library.opcheck(torch.ops.mixturelm.peer_group_rows.default, (ids, N))  # a data-dependent size
    w = torch.randn(T, J, dtype=dtype)
    torch.library.opcheck(torch.ops.mixturelm.peer_row_grad.default, (x, w, order, token, offsets))


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_opcheck_ragged_decode_step(dtype):
    """Mixture-of-Depths' decoding step writes the cache and its lengths: the op declares those mutations."""
    torch.manual_seed(0)
    B, L, H, G, K = 4, 64, 4, 2, 8  # room for every call opcheck makes: each appends one token per row
    k, v = torch.randn(B, L, G, K, dtype=dtype), torch.randn(B, L, G, K, dtype=dtype)
    length, rows = torch.tensor([3, 0, 5, 1]), torch.tensor([2, 0])
    q, k_new, v_new = torch.randn(2, H, K, dtype=dtype), torch.randn(2, G, K, dtype=dtype), torch.randn(2, G, K, dtype=dtype)
    torch.library.opcheck(torch.ops.mixturelm.ragged_decode_step.default, (q, k_new, v_new, k, v, length, rows))


# ----------------------------------------------------------------------------------------------
# A compiled training step against the eager one

def _one_block_model() -> MixtureLM:
    """The smallest model that passes through attention (rope), a MoE (the custom op) and a MoD wrapper."""
    torch.manual_seed(0)
    moe = {"n_experts": 4, "top_k": 2, "d_expert": 16}
    cfg = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=2, d_ffn=64, max_seq_len=32,
                      blocks=[{"ffn": "moe", "moe": moe}, {"wrapper": "mod", "mod": {"capacity": 0.5}}])
    return MixtureLM(cfg).train()


def _losses_and_grads(model: MixtureLM, forward, batches) -> tuple[list[float], list[torch.Tensor]]:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    out_losses = []
    for batch in batches:
        out = forward(batch[:, :-1], batch[:, 1:])
        (out.loss + out.aux_loss).backward()
        grads = [p.grad.clone() for p in model.parameters()]
        opt.step()
        opt.zero_grad()
        out_losses.append(out.loss.item())
    return out_losses, grads


def test_compiled_step_equals_eager():
    """Three AdamW steps of a MoE + MoD model, compiled and eager: the same losses and last gradients.
    Dynamo and AOTAutograd trace and differentiate it as in training, but the graph runs eagerly
    (aot_eager): inductor's C++ build would take a minute here; the slow tests below use it."""
    gen = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, 64, (2, 17), generator=gen) for _ in range(3)]
    eager_model, compiled_model = _one_block_model(), _one_block_model()
    want, want_grads = _losses_and_grads(eager_model, eager_model, batches)
    got, got_grads = _losses_and_grads(compiled_model, compiling.compiled(compiled_model, "aot_eager"), batches)
    assert got == pytest.approx(want, rel=1e-4)
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)


def test_no_graph_breaks_in_dense_moe_mod():
    """The breaks removed stay removed (docs/training.md lists those that remain: PEER's expert tables)."""
    for preset in ("dense-debug", "moe-debug", "mod-debug"):
        found = compiling.graph_breaks(preset)
        assert found["breaks"] == [] and found["graphs"] == 1, (preset, found)


@needs_kernel
def test_peer_breaks_only_at_its_expert_tables():
    found = compiling.graph_breaks("peer-debug")
    assert found["breaks"] and all("disable" in reason and "peer.py" in where for reason, where in found["breaks"])


# ----------------------------------------------------------------------------------------------
# The trainer

def test_compile_setting_is_checked():
    with pytest.raises(UsageError, match="TrainConfig.compile"):
        TrainConfig(compile="yes")


def test_compile_without_a_cpp_compiler_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(compiling.shutil, "which", lambda name: None)
    cfg = new_run_config("dense-debug", {"max_steps": 1, "compile": True})
    with pytest.raises(UsageError, match="TrainConfig.compile needs a C\\+\\+ compiler"):
        Trainer(cfg, tmp_path / "run", progress=False, log=lambda m: None)
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["dense-debug", "moe-debug", "mod-debug", "peer-debug"])
def test_compiled_training_repeats_eager_losses(preset, corpus_dir, tmp_path):
    runs = {}
    for compile_ in (False, True):
        cfg = new_run_config(preset, {"data": str(corpus_dir), "max_steps": 4, "eval_every": 4, "compile": compile_})
        Trainer(cfg, tmp_path / str(compile_), progress=False, log=lambda m: None).run()
        runs[compile_] = losses(tmp_path / str(compile_))
    assert list(runs[True]) == [1, 2, 3, 4]
    for step, want in runs[False].items():
        assert runs[True][step] == pytest.approx(want, rel=1e-4), f"step {step}"


class Stop(Exception):
    pass


@pytest.mark.slow
def test_compiled_run_resumes_eagerly(corpus_dir, tmp_path):
    """A run compiled for its first steps and resumed without compile trains as an eager run does; the
    change is written into its config."""
    common = {"data": str(corpus_dir), "max_steps": 4, "ckpt_every": 2, "eval_every": 4}
    Trainer(new_run_config("dense-debug", common), tmp_path / "eager", progress=False, log=lambda m: None).run()

    def stop_after_two(done: int) -> None:
        if done == 2:
            raise Stop

    out = tmp_path / "switched"
    with pytest.raises(Stop):
        Trainer(new_run_config("dense-debug", common | {"compile": True}), out, progress=False, log=lambda m: None,
                on_step=stop_after_two).run()
    logged = []
    cfg = resumed_run_config(out, None, {"compile": False})
    Trainer(cfg, out, resume=True, progress=False, log=logged.append).run()
    assert any("TrainConfig.compile True -> False" in m for m in logged), logged
    assert json.loads((out / "config.json").read_text())["train"]["compile"] is False
    want, got = losses(tmp_path / "eager"), losses(out)
    assert list(got) == [1, 2, 3, 4]
    for step in want:
        assert got[step] == pytest.approx(want[step], rel=1e-4), f"step {step}"


@pytest.mark.slow
def test_train_compile_cli(corpus_dir, tmp_path):
    out = tmp_path / "run"
    run_cli("train", "--preset", "moe-debug", "--data", str(corpus_dir), "--max-steps", "2", "--out", str(out),
            "--compile", "--no-progress", check=True)
    assert json.loads((out / "config.json").read_text())["train"]["compile"] is True
    assert list(losses(out)) == [1, 2]
