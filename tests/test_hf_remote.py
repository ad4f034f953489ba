"""The Hugging Face remote-code export (mixturelm.hf.remote) against mixturelm itself.

Each tiny model, with random weights perturbed so that a wrong mapping shows (norm weights, biases, the
sigmoid_bias router's bias, query-norm statistics, calibrated MoD thresholds), is written by save_remote,
loaded by transformers with trust_remote_code=True, and must give mixturelm's causal-routing logits and,
under transformers' greedy generate (which recomputes the sequence: no cache), the tokens of mixturelm's
own cached greedy decoding. Nothing is written outside tmp_path and nothing is downloaded.
"""

from __future__ import annotations

import json
import sys

import pytest
import torch
from safetensors.torch import load_file

from mixturelm import MixtureLM, ModelConfig, UsageError
from mixturelm.generate import generate
from mixturelm.hf.remote import save_remote
from mixturelm.layers.mod import MoD, MoDAux
from mixturelm.layers.routing import SigmoidBias

transformers = pytest.importorskip("transformers")

BASE = {"vocab_size": 61, "d_model": 32, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "d_ffn": 48, "max_seq_len": 64}
BATCH, SEQ, PROMPT, NEW = 3, 24, 6, 8


def moe(**kw) -> dict:
    return {"ffn": "moe", "moe": {"n_experts": 4, "top_k": 2, "d_expert": 24} | kw}


def mod(block: dict | None = None, **kw) -> dict:
    return (block or {}) | {"wrapper": "mod", "mod": {"capacity": 0.5} | kw}


def peer(**kw) -> dict:
    return {"n_experts": 64, "n_heads": 2, "top_k": 4, "d_key": 16} | kw


LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 32}
CASES = {  # ModelConfig fields over BASE
    "dense": {"tie_embeddings": False},
    "moe-softmax": {"blocks": [moe(), moe(top_k=3)]},
    "moe-softmax-no-renormalize": {"blocks": [moe(renormalize=False), {}]},
    "moe-noisy": {"blocks": [moe(router="noisy"), moe(router="noisy", top_k=1)]},
    "moe-switch": {"blocks": [moe(router="switch", top_k=1), {}]},
    "moe-sigmoid-bias": {"blocks": [moe(router="sigmoid_bias", route_scale=2.5), moe(router="sigmoid_bias")]},
    "moe-shared": {"blocks": [moe(n_shared=1), moe(n_shared=2, d_shared=40, shared_gate=True)]},
    "mode-integrated": {"blocks": [moe(n_noop=4), moe(n_noop=2, top_k=3, renormalize=False)]},
    "mod-aux-loss": {"blocks": [{}, mod(calibrate=False)]},
    "mod-aux-loss-calibrated": {"blocks": [mod(capacity=0.25), {}, mod()], "n_layers": 3},
    "mod-predictor": {"blocks": [mod(causal="predictor", calibrate=False),
                                 mod(causal="predictor", gate="sigmoid", predictor_hidden=8)]},
    "mod-predictor-calibrated": {"blocks": [{}, mod(causal="predictor", capacity=0.25, gate="sigmoid")]},
    "mode-staged": {"blocks": [moe(), mod(moe(router="sigmoid_bias", n_shared=1))]},
    "peer-in-place": {"blocks": [{}, {"ffn": "peer", "peer": peer()}]},
    "peer-beside": {"blocks": [
        {"ffn": "dense", "beside": ["peer"], "peer": peer(query_norm="whiten", glu=True, per_head_keys=True)},
        {"ffn": "moe", "beside": ["peer"], "moe": moe()["moe"],
         "peer": peer(query_norm="layer", activation="silu", n_heads=3)}]},
    "peer-no-norm-in-mod": {"blocks": [mod({"ffn": "peer", "peer": peer(query_norm="none", activation="relu")}), {}]},
    "attention-head-norm": {"d_head": 12, "qk_norm": "head", "qkv_bias": True, "rope_scaling": LLAMA3},
    "attention-full-norm": {"n_kv_heads": 1, "qk_norm": "full", "rope_scaling": {"rope_type": "linear", "factor": 4.0},
                            "blocks": [mod(calibrate=False), {}]},
}


@pytest.fixture
def hf_env(tmp_path, monkeypatch):
    """Offline, with transformers' remote-code module cache (and any hub cache) under tmp_path."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.setenv("HF_MODULES_CACHE", str(tmp_path / "hf_modules"))
    import transformers.dynamic_module_utils as dynamic

    # read once when transformers is imported: the module's own constant is what it writes under
    monkeypatch.setattr(dynamic, "HF_MODULES_CACHE", str(tmp_path / "hf_modules"))
    monkeypatch.setattr(sys, "path", list(sys.path))  # it appends its cache folder to sys.path
    return tmp_path


def build(case: str, seed: int = 0) -> MixtureLM:
    """A tiny MixtureLM with perturbed weights and state, MoD thresholds calibrated (where asked) on a
    training forward, in eval mode."""
    torch.manual_seed(seed)
    model = MixtureLM(ModelConfig(**(BASE | CASES[case])))
    g = torch.Generator().manual_seed(seed + 1)

    def randn(t: torch.Tensor, std: float) -> torch.Tensor:
        return torch.randn(t.shape, generator=g) * std

    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1 and name.endswith("weight"):  # every norm's scale: a wrong norm shows
                p.copy_(1 + randn(p, 0.3))
            elif p.dim() == 1:  # biases
                p.copy_(randn(p, 0.2))
            else:
                p.copy_(randn(p, 0.15))
        for module in model.modules():
            if isinstance(module, SigmoidBias):
                module.bias_E.copy_(randn(module.bias_E, 0.3))
            if hasattr(module, "running_var"):  # PEER's batch norm
                module.running_mean.copy_(randn(module.running_mean, 0.2))
                module.running_var.copy_(0.5 + torch.rand(module.running_var.shape, generator=g))
            if hasattr(module, "running_cov"):  # PEER's query whitening
                a = randn(module.running_cov, 0.5)
                module.running_mean.copy_(randn(module.running_mean, 0.2))
                module.running_cov.copy_(a @ a.transpose(1, 2) / a.shape[-1] + 0.05 * torch.eye(a.shape[-1]))
    mods = [m for m in model.modules() if isinstance(m, MoD)]
    with torch.no_grad():  # the predictor's last bias at 0: its logits straddle the uncalibrated threshold 0
        for m in mods:
            if m.predictor is not None:
                m.predictor[2].bias.zero_()
    if any(m.calibrate for m in mods):  # what training does: a forward, then the optimizer step's hook
        model.train()
        model(torch.randint(0, BASE["vocab_size"], (4, SEQ), generator=g))
        for m in mods:
            m.after_optimizer_step()
        assert all(m.threshold != 0 for m in mods if m.calibrate)
    return model.eval()


def export_and_load(model: MixtureLM, folder):
    save_remote(model, folder)
    hf, info = transformers.AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True,
                                                                 output_loading_info=True)
    assert not any(info.values()), info  # every tensor in the file, and nothing else
    assert not hf.training and hf.dtype == torch.float32
    return hf


@pytest.mark.parametrize("case", list(CASES))
def test_remote_model_matches_mixturelm(case, hf_env):
    model = build(case)
    hf = export_and_load(model, hf_env / "export")
    ids = torch.randint(0, BASE["vocab_size"], (BATCH, SEQ), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        want = model(ids, causal_routing=True)
        got = hf(ids)
    torch.testing.assert_close(got.logits, want.logits, rtol=0, atol=1e-5)
    for a in (a for _, a in want.aux if isinstance(a, MoDAux)):  # MoD lets some tokens in and skips others
        assert 0 < a.causal_fraction < 1
    prompt = ids[:2, :PROMPT]
    ours = generate(model, prompt, NEW, temperature=0)
    theirs = hf.generate(prompt, max_new_tokens=NEW, do_sample=False)
    assert torch.equal(theirs, ours), (theirs, ours)


def test_padding_and_loss(hf_env):
    """A left-padded row computes what it computes alone; labels give the shifted next-token loss."""
    model = build("mode-staged")
    hf = export_and_load(model, hf_env / "export")
    ids = torch.randint(0, BASE["vocab_size"], (2, SEQ), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[1, :5] = 0
    with torch.no_grad():
        padded = hf(ids, attention_mask=mask).logits
        alone = model(ids[1:, 5:], causal_routing=True).logits
        torch.testing.assert_close(padded[1, 5:], alone[0], rtol=0, atol=1e-5)
        out = hf(ids, labels=ids)
        logits = model(ids, causal_routing=True).logits
    want = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
    torch.testing.assert_close(out.loss, want, rtol=0, atol=1e-5)


def test_folder_holds_the_state_dict_and_config(hf_env):
    model = build("mode-staged")
    out = hf_env / "export"
    save_remote(model, out, eos_token_id=3, bos_token_id=2)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "generation_config.json", "model.safetensors",
                                                      "modeling_mixturelm.py"]  # no tokenizer: the caller's
    tensors = load_file(out / "model.safetensors")
    state = model.state_dict()
    assert set(tensors) == {f"model.{k}" for k in state}  # tied: no lm_head, the embedding once
    for k, v in state.items():
        assert torch.equal(tensors[f"model.{k}"], v), k
    assert any(k.endswith("router.bias_E") for k in tensors) and any(k.endswith(".threshold") for k in tensors)
    config = json.loads((out / "config.json").read_text())
    assert config["mixturelm"] == json.loads(json.dumps(model.config.to_dict()))
    assert config["auto_map"] == {"AutoConfig": "modeling_mixturelm.MixtureLMConfig",
                                  "AutoModelForCausalLM": "modeling_mixturelm.MixtureLMForCausalLM"}
    assert config["architectures"] == ["MixtureLMForCausalLM"] and config["model_type"] == "mixturelm"
    assert (config["eos_token_id"], config["bos_token_id"], config["tie_word_embeddings"]) == (3, 2, True)
    assert config["use_cache"] is False
    generation = json.loads((out / "generation_config.json").read_text())
    assert generation["use_cache"] is False and generation["eos_token_id"] == 3
    source = (out / "modeling_mixturelm.py").read_text()
    assert "mixturelm." not in "".join(line for line in source.splitlines() if line.startswith(("import", "from")))


@pytest.mark.parametrize("moe_options, message", [
    ({"router": "expert_choice"}, "not causal"),
    ({"capacity_factor": 1.5}, "capacity_factor"),
])
def test_non_causal_moe_is_refused(moe_options, message, hf_env):
    """At export, and at load (a config.json edited by hand)."""
    model = MixtureLM(ModelConfig(**BASE, blocks=[moe(**moe_options), {}]))
    with pytest.raises(UsageError, match=message):
        save_remote(model, hf_env / "refused")
    assert not (hf_env / "refused").exists()
    out = hf_env / "edited"
    save_remote(MixtureLM(ModelConfig(**BASE, blocks=[moe(), {}])), out)
    config = json.loads((out / "config.json").read_text())
    config["mixturelm"]["blocks"][0]["moe"] |= moe_options
    (out / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=message):
        transformers.AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)


def test_unknown_option_is_refused_at_load(hf_env):
    """An option the modeling file does not implement is refused, never ignored."""
    out = hf_env / "edited"
    save_remote(build("moe-softmax"), out)
    config = json.loads((out / "config.json").read_text())
    config["mixturelm"]["blocks"][1]["moe"]["router_jitter"] = 0.1
    (out / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="router_jitter"):
        transformers.AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)
