"""Routing views (`mixturelm inspect`): every view against a computation written here from the layers'
weights and inputs (captured by the test's own hooks): the MoD top-C and threshold by hand, the MoE
router's softmax top-k, PEER's brute-force top-k over all N product keys and its usage from a direct
forward; the HTML fragment is self-contained and escapes the text; the command writes its files and
refuses bad input with one line, exit 2, touching nothing."""

from __future__ import annotations

import json
import math
import re
import shutil
from collections import Counter
from html.parser import HTMLParser

import pytest
import torch

from mixturelm import MixtureLM, ModelConfig
from mixturelm.cli import main
from mixturelm.presets import get_preset
from mixturelm.data.tokenizer import BPETokenizer, ByteTokenizer
from mixturelm.views.html import token_pieces
from mixturelm.views.routing import routing_views
from mixturelm.layers.mod import MoD, capacity_tokens
from mixturelm.layers.moe import MoE
from mixturelm.layers.peer import PEER, usage_from_scores

from conftest import make_text, run_cli, tree_digest

TOK = ByteTokenizer()
TEXT = make_text(30, 3)  # ~170 bytes: three windows of the debug presets' 64 tokens


def model_of(preset: str, seed: int = 0) -> MixtureLM:
    torch.manual_seed(seed)
    return MixtureLM(ModelConfig(**get_preset(preset).model))


def ids_of(text: str) -> torch.Tensor:
    return torch.as_tensor(TOK.encode(text.encode("utf-8")))


def capture_inputs(module: torch.nn.Module, calls: list):
    """The test's own hook: each call's input and whether it routed causally (MoD's 4th argument)."""
    return module.register_forward_pre_hook(
        lambda m, args: calls.append((args[0].detach().clone(), bool(args[3]) if len(args) > 3 else False)))


def tooltips(html: str, section: str, nth_text: int = 0) -> dict[int, tuple[str, str]]:
    """Token position -> (class, tooltip) of the nth text view after the heading that contains `section`."""
    part = html[html.index(section):]
    div = part.split('<div class="mlmi-text">')[nth_text + 1].split("</div>")[0]
    found = re.findall(r'<span class="mlmi-t ?([^"]*)"(?: style="[^"]*")? title="#(\d+) ([^"]*)"', div)
    return {int(i): (cls, tip) for cls, i, tip in found}


# ----------------------------------------------------------------------------------------------
# MoD

def test_mod_processed_tokens_are_the_top_c_and_the_causal_choice():
    model = model_of("mod-debug")
    mod = model.blocks[1]
    assert isinstance(mod, MoD)
    ids = ids_of(TEXT)
    with torch.no_grad():
        logits = model(ids[None, :64]).logits
    model.train()
    calls: list = []
    h = capture_inputs(mod, calls)
    views = routing_views(model, TOK, ids, "t")
    h.remove()
    assert model.training, "the model's mode is restored"
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(ids[None, :64]).logits, logits), "no hook is left behind"

    w = mod.router.weight.detach().double()[0]
    topk, causal, w0 = set(), set(), 0
    for x, is_causal in calls:
        r = x[0].double() @ w  # Eq. 1 by hand
        T = r.numel()
        if is_causal:
            causal |= {w0 + t for t in range(T) if r[t] > mod.threshold.item()}
            w0 += T
        else:
            order = sorted(range(T), key=lambda t: -r[t].item())
            topk |= {w0 + t for t in order[:capacity_tokens(mod.capacity, T)]}
    assert w0 == ids.numel() and len(calls) == 2 * math.ceil(ids.numel() / 64)
    s = views.summary["layers"]["layer1.mod"]
    assert set(s["topk_processed"]) == topk and set(s["causal_processed"]) == causal
    assert s["topk_fraction"] == pytest.approx(len(topk) / ids.numel())
    assert s["causal_fraction"] == pytest.approx(len(causal) / ids.numel())
    # the most processed tokens, counted here from the hand-made top-k set
    for key, chosen in (("topk_favourites", topk), ("causal_favourites", causal)):
        processed = Counter(ids[i].item() for i in chosen)
        seen = Counter(ids.tolist())
        expected_fav = sorted(processed, key=lambda t: (-processed[t], t))[:8]
        assert [[p, n, m] for p, n, m in s[key]] == [[TOK.decode([t]), processed[t], seen[t]] for t in expected_fav]
    # the text views highlight exactly those tokens, every token shown once, each with its score
    for nth, expected in ((0, topk), (1, causal)):
        spans = tooltips(views.html, "Mixture-of-Depths block", nth)
        assert sorted(spans) == list(range(ids.numel()))
        assert {i for i, (cls, _) in spans.items() if "mlmi-on" in cls} == expected
        assert all(re.search(r"(r|score) = -?\d", tip) for _, tip in spans.values())
    assert views.figures == {} and json.dumps(views.summary)


# ----------------------------------------------------------------------------------------------
# MoE

def _hand_topk(moe: MoE, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax over the router's logits, top k, renormalised (SoftmaxTopK), from its weights."""
    p = torch.softmax(x.reshape(-1, x.shape[-1]).double() @ moe.router.gate.weight.detach().double().t(), -1)
    w, e = p.topk(moe.top_k, -1)
    return e, w / w.sum(-1, keepdim=True)


@pytest.mark.parametrize("preset", ["moe-debug", "mode-debug"])
def test_moe_experts_per_token_and_load_match_the_router(preset):
    model = model_of(preset, seed=1)
    ids = ids_of(TEXT)
    moes = [b.ffn for b in model.blocks]
    calls = {i: [] for i in range(len(moes))}
    hooks = [capture_inputs(m, calls[i]) for i, m in enumerate(moes)]
    views = routing_views(model, TOK, ids)
    for h in hooks:
        h.remove()
    for i, moe in enumerate(moes):
        s = views.summary["layers"][f"layer{i}.moe"]
        E = moe.n_experts + moe.n_noop
        experts, weights = map(torch.cat, zip(*(_hand_topk(moe, x) for x, _ in calls[i])))
        assert experts.shape == (ids.numel(), moe.top_k)
        assert s["top1"] == experts[:, 0].tolist()
        load = torch.bincount(experts.reshape(-1), minlength=E).double() / experts.numel()
        assert s["load"] == pytest.approx(load.tolist())
        if moe.n_noop:
            assert s["noop_share"] == pytest.approx(load[moe.n_experts:].sum().item())
        spans = tooltips(views.html, f"layer {i}: Mixture-of-Experts")
        for t, (cls, tip) in spans.items():
            shown = re.findall(r"(expert|no-op) (\d+) \((\d\.\d+)\)", tip)
            ids_shown = [int(n) + (moe.n_experts if kind == "no-op" else 0) for kind, n, _ in shown]
            assert ids_shown == experts[t].tolist()
            assert [float(g) for *_, g in shown] == pytest.approx(weights[t].tolist(), abs=1e-3)
            assert ("mlmi-noop" in cls) == (experts[t, 0].item() >= moe.n_experts)
        assert f"layer{i}_moe_load.png" in views.figures
    assert all(png.startswith(b"\x89PNG") for png in views.figures.values())


def test_moe_inside_a_mod_block_maps_back_to_text_positions():
    model = model_of("mode-staged-debug", seed=2)
    mod = model.blocks[1]
    moe = mod.block.ffn
    ids = ids_of(TEXT)
    events: list = []  # in call order: the block's (input, causal?) then its MoE's input
    hooks = [capture_inputs(mod, events), capture_inputs(moe, events)]
    views = routing_views(model, TOK, ids)
    for h in hooks:
        h.remove()
    layers = views.summary["layers"]
    entered = layers["layer1.mod"]["topk_processed"]
    # the MoE's inputs under top-k routing: the tokens that entered, in order
    topk_calls = [events[i + 1][0] for i in range(0, len(events), 2) if not events[i][1]]
    assert len(topk_calls) == math.ceil(ids.numel() / 64)
    top1 = torch.cat([_hand_topk(moe, x)[0][:, 0] for x in topk_calls]).tolist()
    expected = [None] * ids.numel()
    for pos, e in zip(entered, top1):
        expected[pos] = e
    assert layers["layer1.moe"]["top1"] == expected
    assert layers["layer1.moe"]["n_tokens"] == len(entered) and layers["layer0.moe"]["n_tokens"] == ids.numel()


# ----------------------------------------------------------------------------------------------
# PEER

def test_peer_usage_and_retrievals_match_a_direct_forward_and_brute_force():
    model = model_of("peer-debug", seed=3)
    peer = model.blocks[0].ffn
    assert isinstance(peer, PEER)
    ids = ids_of(TEXT)
    calls: list = []
    h = capture_inputs(peer, calls)
    views = routing_views(model, TOK, ids)
    h.remove()
    s = views.summary["layers"]["layer0.peer"]
    model.eval()  # as routing_views ran it: the query BatchNorm on its running statistics
    with torch.no_grad():
        scores = sum(peer(x)[1].expert_scores.double() for x, _ in calls)
    u = usage_from_scores(scores)
    assert s["usage"] == pytest.approx(u["usage"]) and s["kl_uniform"] == pytest.approx(u["kl_uniform"])
    # brute force: the score of every one of the N = S*S product keys, top k per head
    S, P = peer.n_sub_keys, peer.d_key // 2
    with torch.no_grad():
        q = torch.cat([peer.queries(x.reshape(-1, x.shape[-1])) for x, _ in calls]).double()  # (N_tok, H, Q)
        c1, c2 = peer.sub_keys[0, 0].double(), peer.sub_keys[1, 0].double()  # (S, P) each
        full = (q[..., :P] @ c1.t())[..., :, None] + (q[..., P:] @ c2.t())[..., None, :]  # (N_tok, H, S, S)
        ids_top = full.reshape(*q.shape[:2], S * S).topk(peer.top_k, -1).indices
    counts = torch.bincount(ids_top.reshape(-1), minlength=peer.n_experts)
    assert s["retrievals"] == ids.numel() * peer.n_heads * peer.top_k == int(counts.sum())
    assert s["experts_retrieved"] == int((counts > 0).sum()) and s["max_retrievals"] == int(counts.max())
    assert s["usage"] == pytest.approx((counts > 0).double().mean().item())
    assert views.figures["layer0_peer_usage.png"].startswith(b"\x89PNG")
    assert f"Usage {s['usage']:.2%}" in views.html


# ----------------------------------------------------------------------------------------------
# The HTML fragment

class _Checker(HTMLParser):
    VOID = {"img", "br", "meta", "link"}

    def __init__(self) -> None:
        super().__init__()
        self.stack, self.tags, self.classes, self.srcs = [], set(), set(), []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.tags.add(tag)
        self.classes |= set((a.get("class") or "").split())
        assert "id" not in a and not any(k.startswith("on") for k in a), (tag, attrs)
        if "src" in a:
            self.srcs.append(a["src"])
        if tag not in self.VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag):
        assert self.stack and self.stack.pop() == tag, f"unbalanced </{tag}>"


@pytest.mark.parametrize("preset", ["mode-staged-debug", "peer-debug", "dense-debug"])
def test_fragment_is_self_contained_and_escapes_the_text(preset):
    text = 'a <script>alert("x")</script> & <b>bold</b> \x00 é\n' * 2
    views = routing_views(model_of(preset), TOK, ids_of(text), title="<i>title</i>")
    html = views.html
    assert "<script" not in html.lower() and "<b>" not in html and "<i>" not in html
    assert "&lt;i&gt;title&lt;/i&gt;" in html and "\x00" not in html
    if preset == "mode-staged-debug":  # the text views: every character shown, escaped
        assert "&lt;" in html and "&amp;" in html and "&quot;" in html and "\u2400" in html
    c = _Checker()
    c.feed(html)
    c.close()
    assert c.stack == [], "every tag is closed"
    assert not c.tags & {"html", "head", "body", "script", "link", "iframe", "object"}
    assert all(cls.startswith("mlmi") for cls in c.classes)
    assert all(src.startswith("data:image/png;base64,") for src in c.srcs)
    assert len(c.srcs) == len(views.figures)
    style = html.split("<style>")[1].split("</style>")[0]
    selectors = [sel.strip() for block in re.findall(r"([^{}]+)\{", style) for sel in block.split(",")]
    assert selectors and all(sel.startswith(".mlmi") for sel in selectors)
    assert "http" not in html and "url(" not in html
    if preset == "dense-debug":
        assert "no routed layers" in html and views.summary["layers"] == {}


def test_token_pieces_rebuild_the_text():
    text = "plain, é, ✓ and 😀\ttab\n"
    pieces = token_pieces(TOK, TOK.encode(text.encode()).tolist())
    assert "".join(pieces) == text and pieces[:2] == ["p", "l"] and "" in pieces
    assert token_pieces(TOK, [0xFF, 0x41, 256]) == ["\ufffd", "A", "\u27e8eos\u27e9"]
    bpe = BPETokenizer.train([make_text(400, s) + " é ✓ ü" for s in range(3)], 300)
    ids = bpe.encode(text.encode()).tolist()
    assert "".join(token_pieces(bpe, ids)) == text


# ----------------------------------------------------------------------------------------------
# The command

@pytest.fixture(scope="module")
def run_dir(corpus_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("inspect") / "run"
    run_cli("train", "--preset", "mode-staged-debug", "--data", str(corpus_dir), "--max-steps", "2",
            "--eval-tokens", "512", "--out", str(out), "--no-progress", check=True)
    return out


def test_cli_writes_html_json_and_pngs(run_dir, tmp_path):
    text_file = tmp_path / "t.txt"
    text_file.write_text("def f(x):\n    return x < 1  # <script>\n" * 5)
    out = tmp_path / "views"
    proc = run_cli("inspect", "--ckpt", str(run_dir), "--text-file", str(text_file), "--out", str(out),
                   "--max-tokens", "150", check=True)
    assert "layer1.mod" in proc.stdout and "inspect.html" in proc.stdout
    summary = json.loads((out / "inspect.json").read_text())
    assert set(summary["layers"]) == {"layer0.moe", "layer1.mod", "layer1.moe"}
    assert summary["n_tokens"] == 150 and summary["truncated"] and summary["n_windows"] == 3
    assert summary["files"] == ["layer0_moe_load.png", "layer1_moe_load.png"]
    for name in summary["files"]:
        assert (out / name).read_bytes().startswith(b"\x89PNG")
    page = (out / "inspect.html").read_text()
    assert page.startswith("<!DOCTYPE html>") and page.count('<div class="mlmi">') == 1
    assert "<script" not in page.lower()
    # again with --overwrite: replaced in place
    proc = run_cli("inspect", "--ckpt", str(run_dir), "--text", "short", "--out", str(out), "--overwrite", check=True)
    assert json.loads((out / "inspect.json").read_text())["n_tokens"] == 5


def _main(capsys, *args) -> tuple[int, str]:
    rc = main(["inspect", *args])
    return rc, capsys.readouterr().err


def test_cli_bad_inputs_exit_2_with_one_line_and_touch_nothing(run_dir, tmp_path, capsys):
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "notes.txt").write_text("mine")
    before = tree_digest(existing)
    bad_utf8 = tmp_path / "latin1.txt"
    bad_utf8.write_bytes("café".encode("latin-1"))
    corrupt = tmp_path / "corrupt"
    shutil.copytree(run_dir, corrupt)
    model_file = next(corrupt.glob("checkpoints/step_*/model.safetensors"))
    model_file.write_bytes(model_file.read_bytes()[:100])
    ok = ["--ckpt", str(run_dir), "--text", "hello"]
    cases = [
        (["--ckpt", str(tmp_path / "nope"), "--text", "x", "--out", str(tmp_path / "o")], "no such file or folder"),
        (["--ckpt", str(corrupt), "--text", "x", "--out", str(tmp_path / "o")], "is corrupt"),
        (["--ckpt", str(run_dir), "--text-file", str(tmp_path / "missing.txt"), "--out", str(tmp_path / "o")],
         "does not exist"),
        (["--ckpt", str(run_dir), "--text-file", str(bad_utf8), "--out", str(tmp_path / "o")], "is not UTF-8"),
        (["--ckpt", str(run_dir), "--text", "", "--out", str(tmp_path / "o")], "the text is empty"),
        ([*ok, "--out", str(tmp_path / "o"), "--max-tokens", "0"], "--max-tokens must be >= 1"),
        ([*ok, "--out", str(existing)], "holds files that are not an inspect output of mixturelm"),
        ([*ok, "--out", str(existing), "--overwrite"], "it is left alone"),
        ([*ok, "--out", str(existing / "notes.txt")], "is a file, not a folder"),
    ]
    for args, needle in cases:
        rc, err = _main(capsys, *args)
        lines = err.strip().splitlines()
        assert rc == 2 and len(lines) == 1 and needle in lines[0], (args, err)
        assert lines[0].startswith("mixturelm inspect: error:")
    assert tree_digest(existing) == before
    assert not (tmp_path / "o").exists(), "a refused command creates nothing"
