"""Hugging Face in and out: import, export, round trip, upcycling, and the model options they need.

transformers itself is the reference: tiny random models built from its config classes (no download),
compared with mixturelm's on the same tokens, batch > 1, with and without a KV cache, and by greedy
generation."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from mixturelm import MixtureLM, ModelConfig, UsageError, checkpoint  # noqa: E402
from mixturelm.cli import main  # noqa: E402
from mixturelm.generate import generate  # noqa: E402
from mixturelm.hf import export_hf, import_hf  # noqa: E402
from mixturelm.hf.convert import byte_tokenizer_json  # noqa: E402
from mixturelm.hf.upcycle import UpcycleOptions, _experts, upcycled_model  # noqa: E402

VOCAB = 257
COMMON = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=24, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64, eos_token_id=256, bos_token_id=None,
              pad_token_id=None, rms_norm_eps=1e-6)
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 16, "rope_theta": 10000.0}
ARCHS = {  # each architecture with the options that make it differ from the others
    "llama": ("LlamaConfig", dict(rope_parameters=LLAMA3_ROPE, tie_word_embeddings=True)),
    "mixtral": ("MixtralConfig", dict(num_local_experts=4, rope_parameters={"rope_type": "linear", "factor": 2.0,
                                                                           "rope_theta": 5000.0})),
    "qwen3_moe": ("Qwen3MoeConfig", dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16, head_dim=16,
                                         mlp_only_layers=[0], norm_topk_prob=False)),
    "olmoe": ("OlmoeConfig", dict(num_experts=4, num_experts_per_tok=2, norm_topk_prob=True)),
    "qwen2_moe": ("Qwen2MoeConfig", dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
                                         shared_expert_intermediate_size=20)),
}


@pytest.fixture(autouse=True)
def offline(monkeypatch, tmp_path):
    """No network, and transformers' caches (remote-code modules too) under tmp_path, not the user's home."""
    import sys

    import transformers.dynamic_module_utils as dynamic

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.setattr(dynamic, "HF_MODULES_CACHE", str(tmp_path / "hf-modules"))  # read once, at import
    monkeypatch.setattr(sys, "path", list(sys.path))  # transformers appends its module cache to it


def save_tokenizer(folder: Path) -> None:
    byte_tokenizer_json().save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|endoftext|>",
                                                              "tokenizer_class": "PreTrainedTokenizerFast"}))


def hf_model(arch: str, seed: int = 0):
    """A tiny random transformers model of `arch`."""
    config_class, extra = ARCHS[arch]
    cfg = getattr(transformers, config_class)(**COMMON, **extra)
    torch.manual_seed(seed)
    return perturbed(transformers.AutoModelForCausalLM.from_config(cfg).eval())


@torch.no_grad()
def perturbed(model):
    """Weights drawn at a scale that keeps logits moderate; norms and biases moved off their defaults, so that
    a wrong mapping of them shows."""
    for name, p in model.named_parameters():
        if "norm" in name or "bias" in name:
            p.add_(0.3 * torch.randn_like(p))
        else:
            p.normal_(0.0, 0.1)
    return model


def save_hf(model, folder: Path, shards: bool = False) -> Path:
    model.save_pretrained(folder, max_shard_size="20KB" if shards else "5GB")
    save_tokenizer(folder)
    return folder


def ours_logits_cached(model: MixtureLM, ids: torch.Tensor, prefix: int) -> torch.Tensor:
    """Logits of the tokens after `prefix`, fed one at a time through mixturelm's KV cache."""
    cache = model.new_cache(ids.shape[0], ids.shape[1])
    model(ids[:, :prefix], cache=cache)
    return torch.cat([model(ids[:, t:t + 1], cache=cache).logits for t in range(prefix, ids.shape[1])], 1)


def hf_logits_cached(model, ids: torch.Tensor, prefix: int) -> torch.Tensor:
    out = model(ids[:, :prefix], use_cache=True)
    past, logits = out.past_key_values, []
    for t in range(prefix, ids.shape[1]):
        out = model(ids[:, t:t + 1], cache=past, use_cache=True)
        past = out.past_key_values
        logits.append(out.logits)
    return torch.cat(logits, 1)


def assert_same_model(hf, ours: MixtureLM) -> None:
    """Logits within 1e-5 (batch 3, whole sequences and token by token with caches) and greedy tokens equal."""
    ids = torch.randint(0, VOCAB - 1, (3, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a, b = hf(ids).logits, ours(ids).logits
        assert (a - b).abs().max() < 1e-5
        assert (hf_logits_cached(hf, ids, 16) - ours_logits_cached(ours, ids, 16)).abs().max() < 1e-5
        theirs = hf.generate(ids[:, :8], max_new_tokens=10, do_sample=False, min_new_tokens=10)
    mine = generate(ours, ids[:, :8], 10, temperature=0)
    assert torch.equal(theirs, mine)


@pytest.mark.parametrize("arch", list(ARCHS))
def test_import_computes_what_transformers_computes(arch, tmp_path):
    hf = hf_model(arch)
    ckpt = import_hf(save_hf(hf, tmp_path / "hf", shards=arch == "mixtral"), tmp_path / "run", log=lambda m: None)
    ours, run_config, tokenizer, _ = checkpoint.load_model(ckpt)
    assert run_config["preset"] == f"hf:{arch}" and tokenizer.name == f"hf:{VOCAB}"
    assert_same_model(hf, ours)


def our_model(arch: str, seed: int = 0) -> MixtureLM:
    """A mixturelm model of the shape each native architecture computes, weights random."""
    moe = dict(n_experts=4, top_k=2, d_expert=16)
    shapes = {
        "llama": dict(rope_scaling={k: v for k, v in LLAMA3_ROPE.items() if k != "rope_theta"}),
        "mixtral": dict(blocks=[{"ffn": "moe", "moe": moe}] * 2, tie_embeddings=False),
        "qwen3_moe": dict(qk_norm="head", d_head=16, blocks=[{"ffn": "dense"}, {"ffn": "moe", "moe": moe | {
            "renormalize": False}}]),
        "olmoe": dict(qk_norm="full", blocks=[{"ffn": "moe", "moe": moe}] * 2),
        "qwen2_moe": dict(qkv_bias=True, blocks=[{"ffn": "moe", "moe": moe | {"n_shared": 1, "d_shared": 20,
                                                                              "shared_gate": True}}] * 2),
    }
    cfg = ModelConfig(vocab_size=VOCAB, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ffn=24, max_seq_len=64,
                      **shapes[arch])
    torch.manual_seed(seed)
    return perturbed(MixtureLM(cfg).eval())


def save_run(model: MixtureLM, folder: Path) -> Path:
    from mixturelm.config import TrainConfig
    from mixturelm.data.tokenizer import ByteTokenizer
    from mixturelm.training.run import RunConfig

    run = RunConfig("test", model.config, TrainConfig(max_steps=1, seq_len=32))
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(run.to_dict()))
    return checkpoint.save(folder, 1, model, run.to_dict(), ByteTokenizer(), None)


@pytest.mark.parametrize("arch", list(ARCHS))
def test_export_loads_in_transformers_and_computes_the_same(arch, tmp_path):
    ours = our_model(arch)
    save_run(ours, tmp_path / "run")
    export_hf(tmp_path / "run", tmp_path / "hf", log=lambda m: None)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert type(hf).__name__ == {"llama": "LlamaForCausalLM", "mixtral": "MixtralForCausalLM",
                                 "qwen3_moe": "Qwen3MoeForCausalLM", "olmoe": "OlmoeForCausalLM",
                                 "qwen2_moe": "Qwen2MoeForCausalLM"}[arch]
    assert_same_model(hf, ours)
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    text = "def f(x):\n    return x  # é"
    assert tok(text, add_special_tokens=False)["input_ids"] == list(text.encode("utf-8"))
    assert tok.eos_token_id == 256


@pytest.mark.parametrize("arch", list(ARCHS))
def test_round_trip_is_bit_exact(arch, tmp_path):
    ours = our_model(arch)
    save_run(ours, tmp_path / "run")
    export_hf(tmp_path / "run", tmp_path / "hf", log=lambda m: None)
    ckpt = import_hf(tmp_path / "hf", tmp_path / "back", log=lambda m: None)
    back, _, _, _ = checkpoint.load_model(ckpt)
    ignored = {"aux_loss_weights": {}}  # training weights: transformers' MoEs have no z-loss
    if all(ours.config.block_spec(i).ffn == "moe" for i in range(ours.config.n_layers)):
        ignored["d_ffn"] = 0  # no dense FFN uses it: transformers' config has one intermediate_size for the experts
    assert back.config.to_dict() | ignored == ours.config.to_dict() | ignored
    a, b = ours.state_dict(), back.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_fused_experts_are_read_too(tmp_path):
    """transformers 5 holds experts fused in memory; a folder with that layout is read like the Hub's."""
    from safetensors.torch import save_file

    hf = hf_model("olmoe")
    folder = save_hf(hf, tmp_path / "hf")
    save_file({k: v.contiguous() for k, v in hf.state_dict().items()}, folder / "model.safetensors")
    ckpt = import_hf(folder, tmp_path / "run", log=lambda m: None)
    ids = torch.randint(0, VOCAB, (2, 12))
    with torch.no_grad():
        assert (hf(ids).logits - checkpoint.load_model(ckpt)[0](ids).logits).abs().max() < 1e-5


def test_rope_scaling_matches_transformers():
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from mixturelm.layers.attention import rope_angles

    cfg = transformers.LlamaConfig(**COMMON, rope_parameters=LLAMA3_ROPE)
    inv_freq, _ = ROPE_INIT_FUNCTIONS["llama3"](cfg, "cpu")
    cos, _ = rope_angles(torch.tensor([1.0]), 8, 10000.0, {k: v for k, v in LLAMA3_ROPE.items() if k != "rope_theta"})
    assert torch.allclose(cos[0], inv_freq.cos(), atol=1e-7)
    cos, _ = rope_angles(torch.tensor([1.0]), 8, 10000.0, {"rope_type": "linear", "factor": 4.0})
    plain, _ = rope_angles(torch.tensor([0.25]), 8, 10000.0)
    assert torch.allclose(cos, plain)


@pytest.mark.parametrize("bad", [{"qk_norm": "rms"}, {"rope_scaling": {"rope_type": "yarn"}},
                                 {"rope_scaling": {"rope_type": "linear", "factor": 0}}, {"d_head": 0},
                                 {"qkv_bias": "yes"}])
def test_new_model_options_are_checked(bad):
    with pytest.raises(UsageError, match=next(iter(bad))):
        ModelConfig(**bad)


def test_shared_expert_options_are_checked():
    from mixturelm.layers.moe import MoEConfig

    with pytest.raises(UsageError, match="d_shared"):
        MoEConfig(d_shared=8)
    with pytest.raises(UsageError, match="shared_gate"):
        MoEConfig(shared_gate=True)
    assert MoEConfig(n_shared=2, d_expert=8).shared_hidden == 16


def test_models_with_no_native_architecture(tmp_path):
    """MoE routers transformers lacks are refused (exit 2, nothing written) unless exported as remote code."""
    cfg = ModelConfig(vocab_size=VOCAB, d_model=32, n_layers=1, n_heads=4, d_ffn=24,
                      blocks=[{"ffn": "moe", "moe": {"n_experts": 4, "top_k": 2, "d_expert": 8, "router": "noisy"}}])
    save_run(MixtureLM(cfg), tmp_path / "run")
    assert main(["export-hf", str(tmp_path / "run"), "--out", str(tmp_path / "hf")]) == 2
    assert not (tmp_path / "hf").exists()


# ----------------------------------------------------------------------------------------------
# bad input: one line, exit 2, nothing written

def _one_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


def test_import_refuses_what_is_not_a_model(tmp_path, capsys):
    out = tmp_path / "out"
    (tmp_path / "empty").mkdir()
    assert main(["import-hf", str(tmp_path / "empty"), "--out", str(out)]) == 2
    assert "no config.json" in _one_line(capsys)
    gpt2 = tmp_path / "gpt2"
    transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50)).save_pretrained(gpt2)
    capsys.readouterr()  # the progress bar of save_pretrained
    assert main(["import-hf", str(gpt2), "--out", str(out)]) == 2
    err = _one_line(capsys)
    assert "'gpt2' is not supported" in err and "llama, mixtral, qwen3_moe, olmoe, qwen2_moe" in err
    assert not out.exists()


def test_import_refuses_damaged_folders(tmp_path, capsys):
    good = save_hf(hf_model("mixtral"), tmp_path / "good", shards=True)
    capsys.readouterr()
    out = tmp_path / "out"
    shards = sorted(good.glob("model-*.safetensors"))
    assert len(shards) > 1
    cases = {}
    for name, damage in {
        "missing shard": lambda f: sorted(f.glob("model-*.safetensors"))[1].unlink(),
        "truncated shard": lambda f: (lambda p: p.write_bytes(p.read_bytes()[:len(p.read_bytes()) // 2]))(
            sorted(f.glob("model-*.safetensors"))[0]),
        "no tokenizer": lambda f: (f / "tokenizer.json").unlink(),
        "shapes": lambda f: (f / "config.json").write_text(
            (f / "config.json").read_text().replace('"intermediate_size": 24', '"intermediate_size": 20')),
        "option ours lacks": lambda f: (f / "config.json").write_text(
            (f / "config.json").read_text().replace('"sliding_window": null', '"sliding_window": 8')),
    }.items():
        folder = tmp_path / name.replace(" ", "-")
        shutil.copytree(good, folder)
        damage(folder)
        assert main(["import-hf", str(folder), "--out", str(out)]) == 2, name
        cases[name] = _one_line(capsys)
        assert not out.exists(), name
    assert "is missing" in cases["missing shard"]
    assert "truncated or damaged" in cases["truncated shard"]
    assert "tokenizer.json" in cases["no tokenizer"]
    assert "do not fit config.json" in cases["shapes"]
    assert "sliding-window" in cases["option ours lacks"]


def test_out_holding_something_else_is_left_alone(tmp_path, capsys):
    folder = save_hf(hf_model("llama"), tmp_path / "hf")
    capsys.readouterr()
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert main(["import-hf", str(folder), "--out", str(out)]) == 2
    assert "left alone" in _one_line(capsys)
    assert [p.name for p in out.iterdir()] == ["notes.txt"]
    assert main(["export-hf", str(folder), "--out", str(tmp_path / "x")]) == 2  # a HF folder is not a run
    _one_line(capsys)


# ----------------------------------------------------------------------------------------------
# imported runs are ordinary runs

def test_imported_moe_runs_through_eval_inspect_and_training(tmp_path, corpus_dir, capsys):
    folder = save_hf(hf_model("qwen3_moe"), tmp_path / "hf")
    run = tmp_path / "run"
    assert main(["import-hf", str(folder), "--out", str(run)]) == 0
    assert main(["eval", "--ckpt", str(run), "--data", str(corpus_dir), "--max-tokens", "256"]) == 0
    assert "perplexity" in capsys.readouterr().out
    assert main(["inspect", "--ckpt", str(run), "--text", "def f(x): return x", "--out", str(tmp_path / "views")]) == 0
    summary = json.loads((tmp_path / "views" / "inspect.json").read_text())
    assert "layer1" in json.dumps(summary) and "layer0.load" not in json.dumps(summary)  # layer 0 is dense
    run_config = json.loads((run / "config.json").read_text())
    run_config["train"] |= {"data": str(corpus_dir), "max_steps": 2, "batch_size": 2, "seq_len": 16, "eval_tokens": 64}
    (run / "config.json").write_text(json.dumps(run_config))
    assert main(["train", "--resume", "--out", str(run)]) == 0
    said = capsys.readouterr()
    assert "starting from the weights" in said.err + said.out
    assert json.loads((run / "results.json").read_text())["steps"] == 2


# ----------------------------------------------------------------------------------------------
# upcycling

def dense_model(dtype=torch.float64) -> MixtureLM:
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=VOCAB, d_model=32, n_layers=4, n_heads=4, d_ffn=24, max_seq_len=64)
    return MixtureLM(cfg).to(dtype).eval()


@pytest.mark.parametrize("router", ["softmax", "noisy", "sigmoid_bias"])
def test_upcycled_moe_computes_the_dense_function(router):
    from mixturelm.hf.upcycle import target_config

    dense = dense_model()
    options = UpcycleOptions(to="moe", n_experts=4, top_k=2, router=router)
    cfg, _ = target_config(dense.config, "dense-debug", options)
    up = upcycled_model(dense.float(), cfg, options).double().eval()
    dense = dense.double()
    ids = torch.randint(0, VOCAB, (2, 20))
    with torch.no_grad():
        assert (dense(ids).logits - up(ids).logits).abs().max() < 1e-12
    w = up.blocks[0].ffn.w_gate_up
    assert torch.equal(w[0], w[3]) and not torch.equal(up.blocks[0].ffn.router.gate.weight[0],
                                                       up.blocks[0].ffn.router.gate.weight[1])


def test_upcycled_peer_beside_is_exact_and_mod_is_not():
    from mixturelm.hf.upcycle import probe_difference, target_config

    dense = dense_model(torch.float32)
    for to, exact in (("peer-debug", True), ("mod", False)):
        options = UpcycleOptions(to=to)
        cfg, _ = target_config(dense.config, "dense-debug", options)
        up = upcycled_model(dense, cfg, options)
        diff = probe_difference(dense, up, VOCAB, 32)
        assert (diff == 0.0) if exact else diff > 1e-3, (to, diff)


def test_fine_grained_slices_add_up_to_the_ffn_and_drop_upcycling_redraws_its_share():
    from mixturelm.layers.ffn import SwiGLU, swiglu_activation

    torch.manual_seed(0)
    ffn = SwiGLU(16, 24).double()
    x = torch.randn(5, 16, dtype=torch.float64)
    w_in, w_out = _experts(ffn.gate_up.weight.detach(), ffn.down.weight.detach(), 6, UpcycleOptions(to="moe", granularity=3))
    assert w_in.shape == (6, 16, 16) and w_out.shape == (6, 8, 16)
    parts = sum(swiglu_activation(x @ w_in[j]) @ w_out[j] for j in range(3))  # one copy's three slices
    assert torch.allclose(parts, ffn(x)[0], atol=1e-12)
    assert torch.equal(w_in[0], w_in[3])
    w_in, w_out = _experts(ffn.gate_up.weight.detach(), ffn.down.weight.detach(), 4,
                           UpcycleOptions(to="moe", reinit_share=0.5))
    original = ffn.gate_up.weight.detach().t()
    changed = (w_in != original).any(0)  # (2F,) columns re-drawn in any expert; per expert: half the units
    for e in range(4):
        units = (w_in[e] != original).any(0)[:24]
        assert units.sum() == 12 and torch.equal(units, (w_in[e] != original).any(0)[24:])
    assert changed.any()


def test_upcycle_command_and_training_from_it(tmp_path, corpus_dir, capsys):
    dense = tmp_path / "dense"
    assert main(["train", "--preset", "dense-debug", "--data", str(corpus_dir), "--max-steps", "2",
                 "--out", str(dense)]) == 0
    up = tmp_path / "up"
    assert main(["upcycle", str(dense), "--to", "moe-debug", "--n-experts", "4", "--max-steps", "3", "--out", str(up)]) == 0
    note = json.loads((up / "upcycled.json").read_text())
    assert note["preserves_function"] and note["probe_max_abs_logit_difference"] < 1e-5
    assert main(["train", "--resume", "--out", str(up)]) == 0
    results = json.loads((up / "results.json").read_text())
    assert results["steps"] == 3 and results["preset"] == "upcycled:moe-debug"
    capsys.readouterr()
    assert main(["upcycle", str(up), "--to", "moe", "--out", str(tmp_path / "again")]) == 2
    assert "not dense" in _one_line(capsys)
    assert main(["upcycle", str(dense), "--to", "moe", "--granularity", "5", "--out", str(tmp_path / "g")]) == 2
    assert "granularity" in _one_line(capsys)
    assert not (tmp_path / "again").exists() and not (tmp_path / "g").exists()
    for flag, value in (("--n-experts", "0"), ("--top-k", "-1"), ("--reinit-share", "2"), ("--noise", "nan")):
        assert main(["upcycle", str(dense), "--to", "moe", flag, value, "--out", str(tmp_path / "bad")]) == 2
        assert flag in _one_line(capsys), flag
        assert not (tmp_path / "bad").exists()
    assert math.isfinite(results["val_loss"])


def test_export_of_a_trained_mod_run_generates_the_same_tokens(tmp_path, corpus_dir, capsys):
    """MoD has no transformers architecture: export-hf writes mixturelm's own modeling file, loaded with
    trust_remote_code=True, which generates the tokens mixturelm generates (causal routing, token by token)."""
    run = tmp_path / "mod"
    assert main(["train", "--preset", "mod-debug", "--data", str(corpus_dir), "--max-steps", "3", "--out", str(run)]) == 0
    assert main(["export-hf", str(run), "--out", str(tmp_path / "hf")]) == 0
    assert "trust_remote_code" in capsys.readouterr().out
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", trust_remote_code=True).eval()
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    ours, _, _, _ = checkpoint.load_model(run)
    ids = torch.tensor([tok("def main(x):\n", add_special_tokens=False)["input_ids"]] * 2)
    theirs = hf.generate(ids, max_new_tokens=12, do_sample=False, min_new_tokens=12)
    assert torch.equal(theirs, generate(ours, ids, 12, temperature=0))
    # a MoE router transformers lacks: refused natively (see above), exported as remote code on request
    moe = tmp_path / "noisy"
    assert main(["train", "--preset", "moe-debug", "--router", "noisy", "--data", str(corpus_dir), "--max-steps", "2",
                 "--out", str(moe)]) == 0
    assert main(["export-hf", str(moe), "--out", str(tmp_path / "hf2"), "--remote-code"]) == 0
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf2", trust_remote_code=True).eval()
    ours, _, _, _ = checkpoint.load_model(moe)
    with torch.no_grad():
        assert (hf(ids).logits - ours(ids).logits).abs().max() < 1e-5


def test_export_edge_cases_compute_the_same_or_are_refused(tmp_path, capsys):
    """Top-1 gates (kept as the probability on both sides), one dense size other than d_ffn, and what no
    native architecture computes: refused before anything is written, also as remote code."""
    cases = {
        "qwen3-top1": dict(qk_norm="head", blocks=[{"ffn": "moe", "moe": {"n_experts": 4, "top_k": 1, "d_expert": 16}}] * 2),
        "olmoe-top1": dict(qk_norm="full", blocks=[{"ffn": "moe", "moe": {"n_experts": 4, "top_k": 1, "d_expert": 16}}] * 2),
        "llama-ffn": dict(blocks=[{"ffn": "dense", "ffn_hidden": 40}] * 2),
    }
    for name, shape in cases.items():
        torch.manual_seed(0)
        ours = MixtureLM(ModelConfig(vocab_size=VOCAB, d_model=32, n_layers=2, n_heads=4, d_ffn=24, **shape)).eval()
        save_run(ours, tmp_path / name)
        assert main(["export-hf", str(tmp_path / name), "--out", str(tmp_path / f"{name}-hf")]) == 0, name
        hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / f"{name}-hf").eval()
        ids = torch.randint(0, VOCAB, (2, 12))
        with torch.no_grad():
            assert (hf(ids).logits - ours(ids).logits).abs().max() < 1e-5, name
    refused = {
        "olmoe-dhead": (dict(qk_norm="full", d_head=16, blocks=[{"ffn": "moe", "moe": {"n_experts": 4, "top_k": 2,
                                                                                       "d_expert": 16}}] * 2), [], "OLMoE"),
        "capacity": (dict(blocks=[{"ffn": "moe", "moe": {"n_experts": 4, "top_k": 2, "d_expert": 16,
                                                         "capacity_factor": 1.0}}] * 2), ["--remote-code"], "capacity"),
    }
    capsys.readouterr()
    for name, (shape, flags, why) in refused.items():
        save_run(MixtureLM(ModelConfig(vocab_size=VOCAB, d_model=32, n_layers=2, n_heads=4, d_ffn=24, **shape)),
                 tmp_path / name)
        assert main(["export-hf", str(tmp_path / name), "--out", str(tmp_path / f"{name}-hf"), *flags]) == 2, name
        assert why in _one_line(capsys), name
        assert not (tmp_path / f"{name}-hf").exists(), name


def test_import_refuses_quantized_and_foreign_tensors(tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    good = save_hf(hf_model("llama"), tmp_path / "good")
    capsys.readouterr()
    out = tmp_path / "out"
    for name, damage, why in (
        ("quantized", lambda f: (f / "config.json").write_text(json.dumps(
            json.loads((f / "config.json").read_text()) | {"quantization_config": {"quant_method": "fp8"}})), "quantized"),
        ("int8", lambda f: save_file({k: (v.to(torch.int8) if k.endswith("q_proj.weight") else v)
                                      for k, v in load_file(f / "model.safetensors").items()},
                                     f / "model.safetensors"), "int8"),
        ("extra", lambda f: save_file(load_file(f / "model.safetensors") | {"model.layers.0.mlp.extra.weight":
                                                                            torch.zeros(2)}, f / "model.safetensors"),
         "fit no part"),
    ):
        folder = tmp_path / name
        shutil.copytree(good, folder)
        damage(folder)
        assert main(["import-hf", str(folder), "--out", str(out)]) == 2, name
        assert why in _one_line(capsys), name
        assert not out.exists()


def test_upcycle_never_writes_over_its_source(tmp_path, corpus_dir, capsys):
    dense = tmp_path / "dense"
    assert main(["train", "--preset", "dense-debug", "--data", str(corpus_dir), "--max-steps", "1", "--out", str(dense)]) == 0
    before = sorted(p.name for p in (dense / "checkpoints").iterdir())
    capsys.readouterr()
    ckpt = dense / "checkpoints" / "step_0000001"
    assert main(["upcycle", str(ckpt), "--to", "moe", "--out", str(dense), "--overwrite"]) == 2
    assert "holds the run being upcycled" in _one_line(capsys)
    assert sorted(p.name for p in (dense / "checkpoints").iterdir()) == before
    assert main(["upcycle", str(ckpt), "--to", "moe", "--out", str(tmp_path / "up")]) == 0
    assert (tmp_path / "up" / "data.json").read_text() == (dense / "data.json").read_text()


def test_llama_upcycled_is_a_mixtral_computing_the_llama_function(tmp_path):
    """The researcher's path end to end: a Hugging Face Llama in, upcycled to 4 experts top-2, out as a
    Mixtral that transformers runs, computing the Llama's function (the experts are copies)."""
    from mixturelm.hf import upcycle

    llama = hf_model("llama")
    import_hf(save_hf(llama, tmp_path / "llama"), tmp_path / "run", log=lambda m: None)
    upcycle(tmp_path / "run", tmp_path / "up", UpcycleOptions(to="moe", n_experts=4, top_k=2), log=lambda m: None)
    export_hf(tmp_path / "up", tmp_path / "mixtral", log=lambda m: None)
    mixtral = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "mixtral").eval()
    assert type(mixtral).__name__ == "MixtralForCausalLM" and mixtral.config.num_local_experts == 4
    ids = torch.randint(0, VOCAB - 1, (2, 20))
    with torch.no_grad():
        assert (mixtral(ids).logits - llama(ids).logits).abs().max() < 1e-5
