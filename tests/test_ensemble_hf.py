"""`mixturelm ensemble lm` with Hugging Face experts: tiny random causal LMs of transformers sharing one
tokenizer, mixed with each other and with a mixturelm checkpoint; their per-token losses against the models'
own forward, and the one-line errors for folders that are no model or whose weights are damaged."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import make_text, tree_digest
from mixturelm import UsageError, checkpoint, cli
from mixturelm.data.tokenizer import ByteTokenizer, HFTokenizer
from mixturelm.ensemble import experts as ex
from mixturelm.ensemble import lm_stream

EOS = "<|endoftext|>"
SEGMENT_LEN, SEGMENTS, VAL_FRACTION = 40, 4, 0.5


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


def _code(i: int) -> str:
    return "".join(f"def f{i}_{j}(x):\n    return x * {j} + {i}\n\n" for j in range(40))


def _tokenizer(texts: list[str]):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=300, special_tokens=[EOS], show_progress=False,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return tok


def _save(model, tok, folder) -> str:
    model.save_pretrained(folder)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast",
                                                               "eos_token": EOS}))
    return str(folder)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Two sources, three HF causal LMs of one tokenizer (Llama with a padded embedding and a 16-token context,
    GPT-2 with 24 positions, Mistral with a context longer than a segment), a mixturelm checkpoint of the same
    tokenizer and one of bytes."""
    from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig, MistralConfig

    from mixturelm.model import MixtureLM
    from mixturelm.training import new_run_config

    root = tmp_path_factory.mktemp("hf")
    prose, code = root / "prose", root / "code"
    prose.mkdir(), code.mkdir()
    for i in range(12):
        (prose / f"p{i:02d}.txt").write_text(make_text(300, 100 + i))
        (code / f"c{i:02d}.py").write_text(_code(i))
    tok = _tokenizer([p.read_text() for d in (prose, code) for p in sorted(d.iterdir())])
    V, eos = tok.get_vocab_size(), tok.token_to_id(EOS)
    small = {"vocab_size": V, "bos_token_id": eos, "eos_token_id": eos}
    configs = {
        "llama": LlamaConfig(**small | {"vocab_size": 64 * math.ceil((V + 1) / 64)}, hidden_size=32,
                             intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                             max_position_embeddings=16, initializer_range=0.3),
        "gpt2": GPT2Config(**small, n_embd=32, n_layer=2, n_head=4, n_positions=24, initializer_range=0.3),
        "mistral": MistralConfig(**small, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                 num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=4096,
                                 sliding_window=None, initializer_range=0.3),
    }
    hf = {}
    for name, config in configs.items():
        torch.manual_seed(len(hf))
        hf[name] = _save(AutoModelForCausalLM.from_config(config), tok, root / name)
    runs = {}
    for name, tokenizer in (("run-hf", HFTokenizer.from_dir(root / "llama")), ("run-bytes", ByteTokenizer())):
        cfg = new_run_config("dense-debug", {"data": str(prose), "tokenizer": tokenizer.name, "seq_len": 32,
                                             "val_fraction": VAL_FRACTION},
                             {"vocab_size": tokenizer.vocab_size, "max_seq_len": 32})
        torch.manual_seed(7)
        checkpoint.save(root / name, 1, MixtureLM(cfg.model), cfg.to_dict(), tokenizer, None)
        runs[name] = str(root / name)
    return {"root": root, "data": f"{prose},{code}", "hf": hf, "runs": runs, "vocab": V}


def _reference_losses(folder: str, tokens: np.ndarray, window: int) -> np.ndarray:
    """The stream's rule written out token by token: input j (predicting tokens[j + 1]) is scored by the first
    window that holds it: [0, W), then windows of W each starting W/2 before the end of the one before, so
    token j's context starts at k h, h = W - W/2, k = max(0, (j - W/2) // h). Its loss is the cross-entropy
    of the model's own forward on that context, over all the model's logits (padding included)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True).float().eval()
    h = window - window // 2
    x = torch.as_tensor(tokens)
    out = []
    with torch.no_grad():
        for j in range(len(tokens) - 1):
            start = max(0, (j - window // 2) // h) * h
            assert j - start < window and (j < window or j - start >= window // 2)
            logits = model(input_ids=x[None, start:j + 1]).logits[0, -1]
            out.append(F.cross_entropy(logits[None], x[j + 1:j + 2]).item())
    return np.array(out)


def test_hf_expert_losses_are_the_models_own(world):
    experts, names = lm_stream.load_experts(list(world["hf"].values()), "cpu")
    assert names == list(world["hf"])
    assert [e.window(SEGMENT_LEN) for e in experts] == [16, 24, SEGMENT_LEN]
    assert experts[0].width > world["vocab"] == experts[0].tokenizer.vocab_size  # the padded Llama
    assert all(e.kind == ex.HF and not e.model.training and e.model.dtype == torch.float32 for e in experts)
    tok = experts[0].tokenizer
    segs = lm_stream.build_stream(world["data"].split(","), tok, tok.name, VAL_FRACTION, "text", SEGMENT_LEN,
                                  SEGMENTS, log=lambda m: None)
    for seg in segs:
        losses_LN, a_LNN, v_LNN = lm_stream.segment_losses(experts, seg, "cpu")
        for i, (name, folder) in enumerate(world["hf"].items()):
            ref = _reference_losses(folder, seg.tokens, experts[i].window(SEGMENT_LEN))
            np.testing.assert_allclose(losses_LN[:, i], ref, rtol=1e-5, atol=1e-5, err_msg=name)
        # the signal's diagonal is each expert's own entropy over the tokenizer's ids
        assert np.all(np.diagonal(a_LNN, axis1=1, axis2=2) > 0) and np.all(v_LNN >= 0)


def test_mix_hf_experts_and_a_mixturelm_checkpoint(world, tmp_path):
    out = tmp_path / "mix"
    res = lm_stream.run_lm(list(world["hf"].values()), world["data"], out, SEGMENT_LEN, SEGMENTS, VAL_FRACTION,
                           "text", "cpu", resamples=20, log=lambda m: None)
    saved = json.loads((out / "results.json").read_text())
    assert saved["tokens"] == SEGMENT_LEN * SEGMENTS
    assert (out / "report.md").is_file() and (out / "weights.png").stat().st_size > 10_000
    rows = {r["name"]: r for r in saved["rows"]}
    assert [rows[n]["format"] for n in world["hf"]] == [ex.HF] * 3
    assert [rows[n]["context"] for n in world["hf"]] == [16, 24, SEGMENT_LEN]
    experts = [rows[n]["bits_per_byte"]["value"] for n in world["hf"]]
    hedge = rows["hedge (Bayes mixture)"]["bits_per_byte"]["value"]
    assert hedge <= max(experts) and hedge * saved["bytes"] <= min(experts) * saved["bytes"] + math.log2(3) + 1e-6
    assert res["rows"] == saved["rows"]

    # a Hugging Face model and a mixturelm checkpoint of its tokenizer: the run's val_fraction is the default
    out2 = tmp_path / "mixed"
    assert cli.main(["ensemble", "lm", "--experts", world["hf"]["gpt2"], world["runs"]["run-hf"], "--data",
                     world["data"], "--segments", "2", "--segment-len", "30", "--resamples", "20",
                     "--device", "cpu", "--out", str(out2)]) == 0
    mixed = json.loads((out2 / "results.json").read_text())
    assert mixed["val_fraction"] == VAL_FRACTION
    assert [(r["name"], r["format"], r["context"]) for r in mixed["rows"] if r["kind"] == "expert"] == [
        ("gpt2", ex.HF, 24), ("run-hf", ex.MIXTURELM, 30)]


def _refused(argv: list[str], out, capsys) -> str:
    capsys.readouterr()
    assert cli.main(["ensemble", "lm", *argv, "--segments", "2", "--segment-len", "30", "--device", "cpu",
                     "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    return err


def test_tokenizers_must_match_before_any_hf_weights_load(world, tmp_path, capsys, monkeypatch):
    def never(*a, **k):
        raise AssertionError("weights loaded before the tokenizers were compared")

    monkeypatch.setattr(ex, "load_hf_model", never)
    out = tmp_path / "out"
    err = _refused(["--experts", world["hf"]["llama"], world["runs"]["run-bytes"], "--data", world["data"]], out,
                   capsys)
    assert "do not share a tokenizer (llama: hf:" in err and "run-bytes: bytes)" in err, err
    assert not out.exists()
    # two Hugging Face tokenizers of one size are told apart by their fingerprints
    other = tmp_path / "other"
    shutil.copytree(world["hf"]["gpt2"], other)
    spec = json.loads((other / "tokenizer.json").read_text())
    (other / "tokenizer.json").write_text(json.dumps(spec | {"normalizer": {"type": "Lowercase"}}))
    with pytest.raises(UsageError, match=r"do not share a tokenizer \(gpt2: hf:\d+ \(bpe-"):
        lm_stream.load_experts([world["hf"]["gpt2"], str(other)], "cpu")


def _not_a_model(root):
    root.mkdir()
    (root / "notes.txt").write_text("hello")
    (root / "config.json").write_text('{"hidden_size": 4}')


def _truncated(root, world):
    shutil.copytree(world["hf"]["llama"], root)
    weights = root / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])


def _no_weights(root, world):
    shutil.copytree(world["hf"]["gpt2"], root)
    (root / "model.safetensors").unlink()


def _no_tokenizer(root, world):
    shutil.copytree(world["hf"]["gpt2"], root)
    (root / "tokenizer.json").unlink()


def _incomplete(root, world):
    from safetensors.torch import load_file, save_file

    shutil.copytree(world["hf"]["llama"], root)
    state = load_file(root / "model.safetensors")
    save_file({k: v for k, v in state.items() if "layers.1." not in k}, root / "model.safetensors",
              metadata={"format": "pt"})


@pytest.mark.parametrize("make,message", [
    (lambda root, world: _not_a_model(root), "neither a mixturelm run nor a Hugging Face model folder"),
    (lambda root, world: root.write_text("x"), "neither a mixturelm run nor a Hugging Face model folder"),
    (_truncated, "safetensors weights cannot be read"),
    (_no_weights, "has no safetensors weights"),
    (_no_tokenizer, "has no tokenizer.json"),
    (_incomplete, "its weights lack 9 tensors"),
], ids=["not-a-model", "a-file", "truncated", "no-weights", "no-tokenizer", "incomplete"])
def test_bad_hf_folders_are_refused_in_one_line(world, tmp_path, capsys, make, message):
    bad = tmp_path / "bad"
    make(bad, world)
    out = tmp_path / "out"
    err = _refused(["--experts", world["hf"]["gpt2"], str(bad), "--data", world["data"], "--val-fraction", "0.5"],
                   out, capsys)
    assert message in err and str(bad) in err and "--experts" in err, err
    assert not out.exists()
    # an earlier report in --out, to be replaced, is left as it was
    out.mkdir()
    (out / "results.json").write_text('{"benchmark": "lm-stream", "rows": []}')
    (out / "report.md").write_text("# an earlier report\n")
    before = tree_digest(out)
    _refused(["--experts", str(bad), world["hf"]["gpt2"], "--data", world["data"], "--val-fraction", "0.5",
              "--overwrite"], out, capsys)
    assert tree_digest(out) == before


def test_hf_experts_alone_need_a_val_fraction(world, tmp_path, capsys):
    out = tmp_path / "out"
    err = _refused(["--experts", world["hf"]["gpt2"], world["hf"]["llama"], "--data", world["data"]], out, capsys)
    assert "--val-fraction is needed" in err, err
    assert not out.exists()
