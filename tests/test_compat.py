"""What older versions of mixturelm wrote still reads: run configs (flat mechanism options, `<kind>_beside`,
absent configs as null), checkpoints of a block with PEER beside its FFN, the sparse optimizer's state; and
mechanisms mixed in one block are each measured."""

from __future__ import annotations

import copy
import json

from dataclasses import replace

import pytest
import torch
from safetensors.torch import save_file

from mixturelm import MixtureLM, ModelConfig
from mixturelm.checkpoint import MODEL_FILE, load_weights
from mixturelm.compare import same_run
from mixturelm.data.tokens import prepare
from mixturelm.training import RunConfig, evaluate, new_run_config

PEER = {"n_experts": 64, "n_heads": 2, "top_k": 3, "d_key": 8}
# a run config as mixturelm wrote it before each mechanism had one home
OLD_BLOCK = {"ffn": "dense", "ffn_hidden": None, "moe": None, "peer": PEER | {"activation": "gelu", "glu": False,
             "per_head_keys": False, "query_norm": "batch", "sparse_grad": True}, "peer_beside": True,
             "wrapper": "none", "mod": None}
OLD_TRAIN = {"max_steps": 3, "peer_lr": 0.01, "peer_key_lr": None, "peer_bn_calibration": 4}


def test_an_older_run_config_reads_as_the_same_run():
    old = {"preset": "x", "model": {"vocab_size": 257, "d_model": 16, "n_layers": 1, "n_heads": 2, "d_ffn": 32,
                                    "blocks": [OLD_BLOCK]}, "train": OLD_TRAIN}
    cfg = RunConfig.from_dict(json.loads(json.dumps(old)))
    block = cfg.model.blocks[0]
    assert block.kinds() == ["dense", "peer"] and block.peer.sparse_grad
    assert cfg.train.mechanisms["peer"].lr == 0.01
    assert same_run(old, cfg.to_dict())
    # a dense run of then held PEER's options at their defaults: they mean nothing and read as none
    dense = new_run_config("dense-debug", {"max_steps": 3})
    then = dense.to_dict()
    then["train"] = {k: v for k, v in then["train"].items() if k != "mechanisms"} | {
        "peer_lr": None, "peer_key_lr": None, "peer_bn_calibration": 4}
    assert same_run(then, dense.to_dict())


def test_an_older_checkpoint_with_peer_beside_loads(tmp_path):
    torch.manual_seed(0)
    model = MixtureLM(ModelConfig(d_model=16, n_layers=1, n_heads=2, d_ffn=32, blocks=[OLD_BLOCK]))
    state = {k.replace(".ffn.", ".ffn.main.").replace(".beside.0.", ".ffn.extra."): v
             for k, v in model.state_dict().items()}
    assert any(".ffn.extra." in k for k in state)  # the names of then
    save_file({k: v.contiguous() for k, v in state.items()}, tmp_path / MODEL_FILE)
    again = MixtureLM(model.config)
    load_weights(again, tmp_path)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))


def test_every_mechanism_of_a_mixed_block_is_measured(corpus_dir):
    """PEER inside a MoD-wrapped block, and PEER with a MoE beside it: each PEER's usage is reported."""
    moe = {"n_experts": 4, "top_k": 2, "d_expert": 8}
    cfg = ModelConfig(d_model=16, n_layers=2, n_heads=2, d_ffn=32, max_seq_len=32, blocks=[
        {"ffn": "peer", "peer": PEER, "wrapper": "mod", "mod": {"capacity": 0.5}},
        {"ffn": "peer", "peer": PEER, "beside": ["moe"], "moe": moe}])
    torch.manual_seed(0)
    model = MixtureLM(cfg)
    data = prepare(str(corpus_dir), "bytes", 0.1, "text", None, log=lambda m: None)
    res = evaluate(model, data, 32, 512, 4, "cpu")
    assert 0 < res["layer0.peer_usage"] <= 1 and 0 < res["layer1.peer_usage"] <= 1
    out = model(torch.randint(0, 257, (2, 16)), torch.randint(0, 257, (2, 16)))
    assert {"layer0.experts_used_fraction", "layer0.mod_causal_fraction", "layer1.experts_used_fraction",
            "layer1.load_max_over_mean"} <= set(out.stats())


@pytest.mark.parametrize("name", ["sparse_optimizer", "peer_optimizer"])
def test_an_older_training_state_of_the_sparse_optimizer_loads(name):
    """Checkpoints before 2026-12 hold AdamW and SparseAdam states apart (named after PEER before that): loaded
    into today's one optimizer, the next step moves every parameter as the two old optimizers would."""
    from mixturelm.optim import mechanism_needs, param_groups
    from mixturelm.presets import get_preset
    from mixturelm.training.optim import Optimizers

    cfg = new_run_config("peer-debug", {"max_steps": 3})
    torch.manual_seed(0)
    model = MixtureLM(ModelConfig(**get_preset("peer-debug").model))
    x = torch.randint(0, 257, (2, 17))

    def backward():
        model.zero_grad(set_to_none=True)
        model(x[:, :-1], x[:, 1:]).loss.backward()

    t, needs = cfg.train, mechanism_needs(model, cfg.train.mechanisms)
    dense = [g for g in param_groups(model, t.weight_decay, needs) if not g.get("row_sparse")]
    old_adamw = torch.optim.AdamW(dense, lr=t.lr, betas=(t.beta1, t.beta2))
    old_sparse = torch.optim.SparseAdam(needs.sparse, lr=needs.sparse_lr or t.lr, betas=(t.beta1, t.beta2))
    for _ in range(2):
        backward()
        old_adamw.step()
        old_sparse.step()
    old_state = copy.deepcopy({"optimizer": old_adamw.state_dict(), name: old_sparse.state_dict(),  # (live tensors)
                               "scheduler": torch.optim.lr_scheduler.LambdaLR(old_adamw, lambda s: 1.0).state_dict()})
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    backward()
    old_adamw.step()
    old_sparse.step()
    want = {k: v.clone() for k, v in model.state_dict().items()}

    model.load_state_dict(saved)
    optim = Optimizers(model, replace(t, grad_clip=0.0, warmup_steps=0), 3)
    optim.load_state_dict(old_state)
    optim.sched.lr_lambdas = [lambda s: 1.0] * len(optim.sched.lr_lambdas)
    for g in optim.opt.param_groups:
        g["lr"] = g["initial_lr"]
    backward()
    optim.opt.step()
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, want[k], rtol=1e-5, atol=1e-7, msg=lambda m: f"{k}: {m}")
    assert any(g["row_sparse"] for g in optim.opt.param_groups)
