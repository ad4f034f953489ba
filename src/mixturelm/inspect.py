"""Routing views: what the routers of a model decided on a given text (`mixturelm inspect`, and the
views `mixturelm compare` embeds in its report).

- Mixture-of-Depths: per routed block, the text with the tokens the block processed highlighted, under
  training-time top-k routing and under causal routing (what sampling does); the router score in a tooltip.
- Mixture-of-Experts: per layer, the text coloured by each token's top-1 expert (every chosen expert and
  its gate in the tooltip), and a load histogram; integrated MoDE's no-op experts shown apart.
- PEER: a histogram of how often each expert was retrieved, and the usage and KL(usage || uniform) of
  the paper's Table 2 (layers.peer.usage_from_scores, as train.evaluate reports them).

Nothing here routes: the decisions come from the layers themselves, read by hooks while the model runs
its ordinary forward pass (numerics untouched): the MoE router's `Routing`, the MoE and PEER layers' own
statistics, MoD's `topk_indices` / `causal_enter` (the methods its forward uses) on the block's input,
and PEER's `retrieve` on the layer's input.

Dimension letters: T tokens of a window, N tokens of the text, E experts (no-op ones included).
"""

from __future__ import annotations

import base64
import codecs
import colorsys
import html
import io
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .errors import UsageError
from .layers.mod import MoD
from .layers.moe import MoE
from .layers.peer import PEER, usage_from_scores

CSS_PREFIX = "mlmi"  # every class of the HTML fragment starts with this
FORMAT = "mixturelm-inspect/1"  # marks inspect.json, so --overwrite only ever replaces an inspect output
DEFAULT_MAX_TOKENS = 1024


@dataclass
class RoutingViews:
    """summary: {"format", "title", "n_tokens", "window", "n_windows", "layers": {"layer{i}.{mod|moe|peer}": {...}}}
    (run_inspect adds "checkpoint", "text_tokens", "truncated", "files"). Per layer, with "kind" and "layer":
    mod: capacity, causal, threshold, n_tokens, topk_fraction / causal_fraction (share processed),
      topk_processed / causal_processed (token positions), topk_favourites / causal_favourites ([token,
      times processed, times in the text] of the most processed tokens), agreement;
    moe: router, n_experts, n_noop, top_k, in_mod_block, n_tokens (that reached it), assignments, load (share
      of assignments per expert, no-op ones last), load_max_over_mean (real experts), dropped_fraction,
      top1 (per token position: first expert, -1 none, null for a token its MoD block skipped), [noop_share];
    peer: n_experts, heads, top_k, n_tokens, retrievals, usage, kl_uniform, experts_retrieved, max_retrievals."""

    summary: dict  # JSON-able: per routed layer, what was measured
    figures: dict[str, bytes] = field(default_factory=dict)  # file name -> PNG bytes
    html: str = ""  # a self-contained HTML fragment (no <html>/<head>, no JavaScript, no external resource)


# ----------------------------------------------------------------------------------------------
# Tokens as text

_CONTROL = {c: chr(0x2400 + c) for c in range(32) if chr(c) not in "\n\t"} | {0x7F: "\u2421"}


def _byte_level_table() -> dict[str, int]:
    """Byte-level BPE's printable stand-ins for the 256 bytes (GPT-2's bytes_to_unicode), reversed."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    chars, n = list(keep), 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            chars.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(keep, chars)}


def _token_bytes(tokenizer, token_id: int) -> bytes | None:
    """The bytes a token stands for; None for a special token (end of document)."""
    if token_id == getattr(tokenizer, "eos_id", None):
        return None
    if getattr(tokenizer, "name", "") == "bytes":
        return bytes([token_id]) if token_id < 256 else None
    tok = getattr(tokenizer, "tok", None)
    if tok is not None:  # byte-level BPE (Hugging Face tokenizers)
        piece, table = tok.id_to_token(token_id), _byte_level_table()
        if piece is not None and all(ch in table for ch in piece):
            return bytes(table[ch] for ch in piece)
    return tokenizer.decode([token_id]).encode("utf-8")


def token_pieces(tokenizer, ids: list[int]) -> list[str]:
    """The text of each token, in order. A character split over several tokens (bytes, byte-level BPE)
    goes to the token that completes it: the tokens before it get "" (they are still shown, as a thin
    mark). Bytes that are not UTF-8 become U+FFFD; control characters their visible symbols."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    pieces = []
    for i in ids:
        b = _token_bytes(tokenizer, int(i))
        if b is None:
            pieces.append(decoder.decode(b"", final=True) + "\u27e8eos\u27e9")
            decoder.reset()
        else:
            pieces.append(decoder.decode(b))
    if pieces:
        pieces[-1] += decoder.decode(b"", final=True)
    return ["".join(_CONTROL.get(ord(ch), ch) for ch in p) for p in pieces]


# ----------------------------------------------------------------------------------------------
# Capture: hooks that read what the layers decide while the model runs

@dataclass
class _Layer:
    key: str  # "layer1.mod"
    index: int  # block index
    kind: str  # mod | moe | peer
    module: torch.nn.Module
    in_mod: MoD | None = None  # the MoD wrapper around this layer's block, if any
    data: dict = field(default_factory=dict)


def routed_layers(model: torch.nn.Module) -> list[_Layer]:
    """Every MoD, MoE and PEER layer of a MixtureLM, by block."""
    found = []
    for i, block in enumerate(model.blocks):
        wrapper = block if isinstance(block, MoD) else None
        for m in block.modules():
            kind = next((k for k, cls in (("mod", MoD), ("moe", MoE), ("peer", PEER)) if isinstance(m, cls)), None)
            if kind is None:
                continue
            key = f"layer{i}.{kind}"
            n = sum(1 for f in found if f.key.startswith(key))
            found.append(_Layer(key if n == 0 else f"{key}{n}", i, kind, m, None if m is wrapper else wrapper))
    return found


class _Recorder:
    """Per pass ("topk" or "causal") and window (offset w0), what each layer decided, in text positions."""

    def __init__(self, layers: list[_Layer]) -> None:
        self.layers, self.mode, self.w0 = layers, "topk", 0
        self.entered: dict[int, torch.Tensor] = {}  # MoD block index -> positions in the window that entered
        self.handles = []
        for layer in layers:
            m = layer.module
            if layer.kind == "mod":
                self.handles.append(m.register_forward_pre_hook(self._mod_hook(layer)))
            elif layer.kind == "moe":
                self.handles.append(m.router.register_forward_hook(self._router_hook(layer)))
                self.handles.append(m.register_forward_hook(self._moe_hook(layer)))
            else:
                self.handles.append(m.register_forward_hook(self._peer_hook(layer)))

    def remove(self) -> None:
        for h in self.handles:
            h.remove()

    def _positions(self, layer: _Layer, n: int) -> torch.Tensor:
        """Window positions of the n tokens a layer saw: all of them, or those its MoD block let in."""
        if layer.in_mod is None:
            return torch.arange(n)
        pos = self.entered[layer.index]
        assert pos.numel() == n, "a routed layer inside a MoD block saw other tokens than the block let in"
        return pos

    def _mod_hook(self, layer: _Layer):
        def hook(mod: MoD, args):
            x_BTD = args[0]
            assert x_BTD.shape[0] == 1, "routing views run one window at a time"
            r_BT = mod.router_weights(x_BTD)
            d = layer.data.setdefault(self.mode, {"scores": [], "entered": []})
            if self.mode == "topk":
                idx = mod.topk_indices(r_BT)[0].cpu()
                self.entered[layer.index] = idx
                enter_T = torch.zeros(r_BT.shape[1], dtype=torch.bool)
                enter_T[idx] = True
                score_T = r_BT[0]
            else:
                enter_T = mod.causal_enter(x_BTD, r_BT)[0].cpu()
                score_T = mod.causal_scores(x_BTD, r_BT)[0]
            d["entered"].append(enter_T)
            d["scores"].append(score_T.float().cpu())
        return hook

    def _router_hook(self, layer: _Layer):
        def hook(router, args, routing):
            if self.mode != "topk":
                return
            pos = self._positions(layer, routing.scores_TE.shape[0])
            d = layer.data.setdefault("topk", {"token": [], "expert": [], "weight": [], "n_tokens": 0})
            d["token"].append(pos[routing.token_A.cpu()] + self.w0)
            d["expert"].append(routing.expert_A.cpu())
            d["weight"].append(routing.weight_A.float().cpu())
            d["n_tokens"] += int(pos.numel())
        return hook

    def _moe_hook(self, layer: _Layer):
        def hook(moe, args, out):
            if self.mode == "topk" and isinstance(out, tuple):
                d = layer.data.setdefault("stats", {"dropped": 0.0, "n": 0})
                n = args[0].reshape(-1, args[0].shape[-1]).shape[0]
                d["dropped"] += float(out[1]["stat/dropped_fraction"]) * n
                d["n"] += n
        return hook

    def _peer_hook(self, layer: _Layer):
        def hook(peer: PEER, args, out):
            if self.mode != "topk" or not isinstance(out, tuple):
                return
            x_TD = args[0].reshape(-1, args[0].shape[-1])
            ids_THK, _ = peer.retrieve(x_TD)
            d = layer.data.setdefault("topk", {"scores": 0.0, "counts": 0, "n_tokens": 0})
            d["scores"] = d["scores"] + out[1]["stat/expert_scores"].double().cpu()
            d["counts"] = d["counts"] + torch.bincount(ids_THK.reshape(-1).cpu(), minlength=peer.n_experts)
            d["n_tokens"] += x_TD.shape[0]
        return hook


# ----------------------------------------------------------------------------------------------
# Per-layer results

def _favourites(ids: list[int], pieces: list[str], enter: list[bool], most: int = 8) -> list[list]:
    """The tokens a routed block processed most often: [token text, times processed, times in the text]."""
    processed, seen, text = {}, {}, {}
    for token, piece, entered in zip(ids, pieces, enter):
        seen[token] = seen.get(token, 0) + 1
        processed[token] = processed.get(token, 0) + int(entered)
        text[token] = piece
    order = sorted((t for t in processed if processed[t]), key=lambda t: (-processed[t], t))[:most]
    return [[text[t], processed[t], seen[t]] for t in order]


def _mod_summary(layer: _Layer, N: int, ids: list[int], pieces: list[str]) -> dict:
    mod: MoD = layer.module
    res = {"kind": "mod", "layer": layer.index, "capacity": mod.capacity, "causal": mod.causal,
           "threshold": float(mod.threshold), "n_tokens": N}
    for mode in ("topk", "causal"):
        d = layer.data[mode]
        enter_N, score_N = torch.cat(d["entered"]), torch.cat(d["scores"])
        d["enter_N"], d["score_N"] = enter_N, score_N
        res[f"{mode}_fraction"] = enter_N.float().mean().item()
        res[f"{mode}_processed"] = enter_N.nonzero().squeeze(1).tolist()
        res[f"{mode}_favourites"] = _favourites(ids, pieces, enter_N.tolist())
    res["agreement"] = (layer.data["topk"]["enter_N"] == layer.data["causal"]["enter_N"]).float().mean().item()
    return res


def _moe_summary(layer: _Layer, N: int, entered_N: torch.Tensor | None) -> dict:
    """entered_N: for a MoE inside a MoD block, the tokens the block let in (the others never reach it)."""
    moe: MoE = layer.module
    d = layer.data["topk"]
    E = moe.n_experts + moe.n_noop
    token_A, expert_A, weight_A = torch.cat(d["token"]), torch.cat(d["expert"]), torch.cat(d["weight"])
    weight_NE = torch.zeros(N, E).index_put_((token_A, expert_A), weight_A)
    chosen_NE = torch.zeros(N, E, dtype=torch.bool).index_put_((token_A, expert_A), torch.tensor(True))
    top1_N = weight_NE.masked_fill(~chosen_NE, -float("inf")).argmax(1)
    top1_N[~chosen_NE.any(1)] = -1  # expert choice: a token no expert took
    routed_N = torch.ones(N, dtype=torch.bool) if entered_N is None else entered_N.clone()
    load_E = torch.bincount(expert_A, minlength=E).double()
    load_E = load_E / load_E.sum().clamp_min(1)
    real_E = load_E[:moe.n_experts]
    d.update(weight_NE=weight_NE, chosen_NE=chosen_NE, top1_N=top1_N, routed_N=routed_N, load_E=load_E)
    res = {"kind": "moe", "layer": layer.index, "router": moe.router_kind, "n_experts": moe.n_experts,
           "n_noop": moe.n_noop, "top_k": moe.top_k, "in_mod_block": layer.in_mod is not None,
           "n_tokens": d["n_tokens"], "assignments": int(expert_A.numel()),
           "load": load_E.tolist(),  # fraction of the router's assignments per expert (no-op ones last)
           "load_max_over_mean": (real_E.max() / real_E.mean().clamp_min(1e-12)).item(),
           "dropped_fraction": layer.data["stats"]["dropped"] / max(1, layer.data["stats"]["n"]),
           "top1": [int(e) if ok else None for e, ok in zip(top1_N.tolist(), routed_N.tolist())]}
    if moe.n_noop:
        res["noop_share"] = load_E[moe.n_experts:].sum().item()
    return res


def _peer_summary(layer: _Layer) -> dict:
    peer: PEER = layer.module
    d = layer.data["topk"]
    u = usage_from_scores(d["scores"])
    counts = d["counts"]
    return {"kind": "peer", "layer": layer.index, "n_experts": peer.n_experts, "heads": peer.n_heads,
            "top_k": peer.top_k, "n_tokens": d["n_tokens"], "retrievals": int(counts.sum()),
            "usage": u["usage"], "kl_uniform": u["kl_uniform"],
            "experts_retrieved": int((counts > 0).sum()), "max_retrievals": int(counts.max())}


# ----------------------------------------------------------------------------------------------
# Figures

def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight", metadata={"Software": None})
    _pyplot().close(fig)
    return buf.getvalue()


def expert_colour(e: int, n_experts: int) -> str:
    """A light colour per expert id (dark text stays readable on it); hues spread over the experts."""
    hue = (e * 0.618034) % 1.0 if n_experts > 12 else e / max(1, n_experts)
    r, g, b = colorsys.hls_to_rgb(hue, 0.78, 0.75)
    return f"#{int(r * 255):02x}{int(g * 255):02x}{int(b * 255):02x}"


NOOP_COLOUR, NONE_COLOUR, MOD_COLOUR = "#d9d9d9", "#ffffff", "#ffb74d"


def _moe_figure(s: dict) -> bytes:
    plt = _pyplot()
    E, n_noop = s["n_experts"], s["n_noop"]
    load = s["load"]
    fig, ax = plt.subplots(figsize=(min(12, 2.5 + 0.3 * len(load)), 2.8))
    colours = [expert_colour(e, E) for e in range(E)] + [NOOP_COLOUR] * n_noop
    ax.bar(range(len(load)), load, color=colours, edgecolor="#555555", linewidth=0.5)
    ax.axhline(1 / len(load), color="#c62828", linestyle="--", linewidth=1, label=f"uniform 1/{len(load)}")
    ax.set_xlabel("expert" + (f" (ids {E}..{E + n_noop - 1}: no-op)" if n_noop else ""))
    ax.set_ylabel("fraction of assignments")
    ax.set_title(f"layer {s['layer']}: MoE load ({s['router']} top-{s['top_k']}, {s['assignments']} assignments)",
                 fontsize=10)
    if len(load) <= 32:
        ax.set_xticks(range(len(load)))
        ax.tick_params(axis="x", labelsize=7)
    ax.legend(fontsize=8)
    return _png(fig)


def _peer_figure(s: dict, counts) -> bytes:
    import numpy as np

    plt = _pyplot()
    hist = np.bincount(counts.numpy().astype(np.int64))  # hist[c]: experts retrieved c times
    fig, ax = plt.subplots(figsize=(7, 2.8))
    if len(hist) <= 64:
        ax.bar(range(len(hist)), hist, color="#5c6bc0", width=0.85)
        ax.set_xlabel("times retrieved")
    else:  # many distinct counts: log-spaced bins (0 kept apart, as its own bar at x = 0.5)
        edges = np.unique(np.geomspace(1, len(hist), 40).astype(np.int64))
        ax.hist(counts[counts > 0].numpy(), bins=edges, color="#5c6bc0")
        ax.bar([0.5], [hist[0]], width=0.4, color="#9e9e9e")
        ax.set_xscale("log")
        ax.set_xlabel("times retrieved (log; bar at 0.5: never)")
    ax.set_yscale("log")
    ax.set_ylabel("experts")
    ax.set_title(f"layer {s['layer']}: PEER, {s['retrievals']} retrievals over {s['n_experts']} experts: usage "
                 f"{s['usage']:.1%}, KL(usage || uniform) {s['kl_uniform']:.3f}", fontsize=9)
    return _png(fig)


# ----------------------------------------------------------------------------------------------
# HTML

P = CSS_PREFIX
STYLE = f"""<style>
.{P}{{font-family:system-ui,sans-serif;font-size:14px;color:#222;max-width:70em}}
.{P} .{P}-h{{font-size:1.2em;margin:0.8em 0 0.3em}}
.{P} .{P}-h2{{font-size:1.05em;margin:0.8em 0 0.2em}}
.{P} .{P}-note{{color:#555;margin:0.2em 0}}
.{P} .{P}-text{{font-family:ui-monospace,monospace;font-size:12px;white-space:pre-wrap;line-height:1.7;
  border:1px solid #ddd;padding:0.5em;margin:0.3em 0 0.8em;overflow-wrap:anywhere}}
.{P} .{P}-t{{border-radius:2px}}
.{P} .{P}-on{{background:{MOD_COLOUR}}}
.{P} .{P}-part{{display:inline-block;min-width:0.25em;height:1em;vertical-align:middle}}
.{P} .{P}-noop{{background:{NOOP_COLOUR};text-decoration:line-through}}
.{P} .{P}-none{{outline:1px dotted #888}}
.{P} .{P}-skip{{color:#aaa}}
.{P} .{P}-win{{border-left:2px solid #1e88e5;margin:0 1px}}
.{P} .{P}-legend{{display:flex;flex-wrap:wrap;gap:0.3em 0.8em;font-size:12px;margin:0.2em 0}}
.{P} .{P}-sw{{display:inline-block;width:1em;height:1em;vertical-align:middle;margin-right:0.25em;
  border:1px solid #888}}
.{P} .{P}-fig{{max-width:100%;height:auto;display:block;margin:0.3em 0}}
.{P} .{P}-table{{border-collapse:collapse;font-size:13px}}
.{P} .{P}-table td,.{P} .{P}-table th{{border:1px solid #ddd;padding:2px 6px;text-align:left}}
</style>"""


def _esc(s) -> str:
    return html.escape(str(s), quote=True)


def _text_view(pieces: list[str], window: int, spans) -> str:
    """The text, one span per token: spans(i) -> (class, inline style or "", tooltip)."""
    out = []
    for i, piece in enumerate(pieces):
        if i and i % window == 0:
            out.append(f'<span class="{P}-win" title="window {i // window + 1} starts"></span>')
        cls, style, tip = spans(i)
        cls = f"{P}-t {cls}" + (f" {P}-part" if piece == "" else "")
        style = f' style="{style}"' if style else ""
        tip = f"#{i} {piece!r}" + (f" · {tip}" if tip else "") + (" (bytes of a character finished later)"
                                                                  if piece == "" else "")
        out.append(f'<span class="{cls}"{style} title="{_esc(tip)}">{_esc(piece)}</span>')
    return f'<div class="{P}-text">{"".join(out)}</div>'


def _img(name: str, png: bytes, alt: str) -> str:
    return (f'<img class="{P}-fig" alt="{_esc(alt)}" title="{_esc(name)}" '
            f'src="data:image/png;base64,{base64.b64encode(png).decode("ascii")}">')


def _mod_html(layer: _Layer, s: dict, pieces: list[str], window: int) -> str:
    parts = [f'<h3 class="{P}-h2">layer {s["layer"]}: Mixture-of-Depths block, capacity {s["capacity"]:.1%}</h3>']
    for mode, label in (("topk", "training-time routing: the top C tokens of each window by router weight r"),
                        ("causal", f"causal routing (what sampling does): {s['causal']} score above the threshold "
                                   f"{s['threshold']:.3g}, token by token")):
        d = layer.data[mode]
        enter, score = d["enter_N"].tolist(), d["score_N"].tolist()
        name = "r" if mode == "topk" else "score"

        def spans(i, enter=enter, score=score, name=name):
            return (f"{P}-on" if enter[i] else "", "",
                    f"{name} = {score[i]:.4f} · {'processed' if enter[i] else 'skipped'}")

        parts.append(f'<p class="{P}-note">{_esc(label)}: {s[mode + "_fraction"]:.1%} of tokens processed '
                     f'(<span class="{P}-t {P}-on">highlighted</span>).</p>')
        parts.append(_text_view(pieces, window, spans))
        parts.append(f'<p class="{P}-note">processed most: ' + ", ".join(
            f"<code>{_esc(repr(piece))}</code> {n} of {seen}" for piece, n, seen in s[mode + "_favourites"]) + "</p>")
    parts.append(f'<p class="{P}-note">The two routings agree on {s["agreement"]:.1%} of tokens.</p>')
    return "".join(parts)


def _moe_html(layer: _Layer, s: dict, pieces: list[str], window: int, png: bytes, png_name: str) -> str:
    d = layer.data["topk"]
    E, n_noop = s["n_experts"], s["n_noop"]
    top1, routed = d["top1_N"].tolist(), d["routed_N"].tolist()
    chosen, weight = d["chosen_NE"], d["weight_NE"]

    def label(e: int) -> str:
        return f"no-op {e - E}" if e >= E else f"expert {e}"

    def spans(i):
        if not routed[i]:
            return f"{P}-skip", "", "skipped the block (MoD): no expert"
        if top1[i] < 0:
            return f"{P}-none", "", "no expert took this token"
        es = chosen[i].nonzero().squeeze(1).tolist()
        es.sort(key=lambda e: -float(weight[i, e]))
        tip = ", ".join(f"{label(e)} ({float(weight[i, e]):.3f})" for e in es)
        if top1[i] >= E:
            return f"{P}-noop", "", tip
        return "", f"background:{expert_colour(top1[i], E)}", tip

    where = " (inside a Mixture-of-Depths block: only the tokens it let in)" if s["in_mod_block"] else ""
    noop = ""
    if n_noop:
        noop = (f' {n_noop} no-op experts take {s["noop_share"]:.1%} of the assignments '
                f'(<span class="{P}-t {P}-noop">struck out, grey</span> where a no-op is a token\'s first choice).')
    legend = "".join(f'<span><span class="{P}-sw" style="background:{expert_colour(e, E)}"></span>{e}: '
                     f'{s["load"][e]:.1%}</span>' for e in range(E))
    if n_noop:
        legend += (f'<span><span class="{P}-sw" style="background:{NOOP_COLOUR}"></span>no-op: '
                   f'{s["noop_share"]:.1%}</span>')
    return (f'<h3 class="{P}-h2">layer {s["layer"]}: Mixture-of-Experts, {_esc(s["router"])} router, top-{s["top_k"]} '
            f'of {E}{where}</h3>'
            f'<p class="{P}-note">Colour: each token\'s first expert (largest gate); the tooltip lists every chosen '
            f'expert with its gate. Max/mean load {s["load_max_over_mean"]:.2f}, dropped '
            f'{s["dropped_fraction"]:.1%}.{noop}</p>'
            f'<div class="{P}-legend">{legend}</div>'
            + _text_view(pieces, window, spans) + _img(png_name, png, f"layer {s['layer']} MoE load per expert"))


def _peer_html(s: dict, png: bytes, png_name: str) -> str:
    return (f'<h3 class="{P}-h2">layer {s["layer"]}: PEER, {s["n_experts"]:,} experts, {s["heads"]} heads '
            f'x top-{s["top_k"]}</h3>'
            f'<p class="{P}-note">Over {s["n_tokens"]:,} tokens ({s["retrievals"]:,} retrievals): '
            f'{s["experts_retrieved"]:,} experts retrieved at least once, the most-used {s["max_retrievals"]:,} times. '
            f'Usage {s["usage"]:.2%} of experts, KL(usage || uniform) {s["kl_uniform"]:.3f} (He 2024, Table 2: '
            f'usage is the fraction of experts with any router score, KL of the normalised summed scores).</p>'
            + _img(png_name, png, f"layer {s['layer']} PEER: experts by times retrieved"))


def _table(summary: dict) -> str:
    rows = []
    for key, s in summary["layers"].items():
        if s["kind"] == "mod":
            what = f"processed: top-k {s['topk_fraction']:.1%}, causal {s['causal_fraction']:.1%}"
        elif s["kind"] == "moe":
            what = f"max/mean load {s['load_max_over_mean']:.2f}" + (
                f", no-op share {s['noop_share']:.1%}" if s["n_noop"] else "")
        else:
            what = f"usage {s['usage']:.2%}, KL(usage || uniform) {s['kl_uniform']:.3f}"
        rows.append(f"<tr><td>{_esc(key)}</td><td>{s['n_tokens']:,}</td><td>{_esc(what)}</td></tr>")
    return (f'<table class="{P}-table"><tr><th>layer</th><th>tokens</th><th>measured</th></tr>'
            f'{"".join(rows)}</table>')


# ----------------------------------------------------------------------------------------------

def routing_views(model, tokenizer, ids: torch.LongTensor, title: str = "", *,
                  window: int | None = None) -> RoutingViews:
    """The routing views of `model` on the text `ids` (1-D token ids). A text longer than `window`
    (default: the model's max_seq_len) is split into windows of that many tokens, each run alone; the
    views cover all of it. The model is put in eval mode and restored; its numerics are untouched."""
    ids = torch.as_tensor(ids, dtype=torch.long)
    if ids.dim() != 1 or ids.numel() == 0:
        raise UsageError(f"routing_views needs 1-D token ids of a non-empty text, got shape {tuple(ids.shape)}")
    window = min(window or model.config.max_seq_len, model.config.max_seq_len)
    N = ids.numel()
    pieces = token_pieces(tokenizer, ids.tolist())
    layers = routed_layers(model)
    summary = {"format": FORMAT, "title": title, "n_tokens": N, "window": window,
               "n_windows": -(-N // window), "layers": {}}
    texts = any(layer.kind in ("mod", "moe") for layer in layers)
    head = (f'<h2 class="{P}-h">Routing views{": " + _esc(title) if title else ""}</h2>'
            f'<p class="{P}-note">{N:,} tokens, run in {summary["n_windows"]} window(s) of up to {window}, each '
            f'routed on its own' + ('; in the text views a blue bar marks where a window starts. Hover a token '
                                    'for details.</p>' if texts else '.</p>'))
    if not layers:
        note = (f'<p class="{P}-note">This model has no routed layers (dense): there are no routing decisions '
                'to show.</p>')
        return RoutingViews(summary, {}, f'<div class="{P}">{STYLE}{head}{note}</div>')
    device = next(model.parameters()).device
    has_mod = any(layer.kind == "mod" for layer in layers)
    was_training = model.training
    model.eval()
    rec = _Recorder(layers)
    try:
        with torch.no_grad():
            for w0 in range(0, N, window):
                x = ids[w0:w0 + window][None].to(device)
                for mode in ("topk", "causal") if has_mod else ("topk",):
                    rec.mode, rec.w0 = mode, w0
                    model(x, return_aux=mode == "topk", causal_routing=mode == "causal")
    finally:
        rec.remove()
        model.train(was_training)
    figures, sections = {}, []
    for layer in layers:
        if layer.kind == "mod":
            s = _mod_summary(layer, N, ids.tolist(), pieces)
            sections.append(_mod_html(layer, s, pieces, window))
        elif layer.kind == "moe":
            entered_N = None
            if layer.in_mod is not None:  # its MoD layer comes first in `layers`: already summarised
                entered_N = next(m for m in layers if m.module is layer.in_mod).data["topk"]["enter_N"]
            s = _moe_summary(layer, N, entered_N)
            name = f"layer{layer.index}_moe_load.png"
            figures[name] = _moe_figure(s)
            sections.append(_moe_html(layer, s, pieces, window, figures[name], name))
        else:
            s = _peer_summary(layer)
            name = f"layer{layer.index}_peer_usage.png"
            figures[name] = _peer_figure(s, layer.data["topk"]["counts"])
            sections.append(_peer_html(s, figures[name], name))
        summary["layers"][layer.key] = s
    body = head + _table(summary) + "".join(f'<section class="{P}-layer">{x}</section>' for x in sections)
    return RoutingViews(summary, figures, f'<div class="{P}">{STYLE}{body}</div>')


# ----------------------------------------------------------------------------------------------
# The command: checkpoint and text in, a folder with inspect.html, inspect.json and the PNGs out

def check_out(out_dir: str | Path, overwrite: bool) -> Path:
    """--out must be new, empty, or (with overwrite) an earlier inspect output: nothing else is touched."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file, not a folder; choose another --out")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise UsageError(f"--out {out} is not empty; add --overwrite to replace an earlier inspect output "
                             "there, or choose another --out")
        if _previous_files(out) is None:
            raise UsageError(f"--out {out} is not empty and holds no inspect output (no inspect.json of "
                             "`mixturelm inspect`); --overwrite only replaces one, choose another --out")
    return out


def _previous_files(out: Path) -> list[str] | None:
    try:
        prev = json.loads((out / "inspect.json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(prev, dict) or prev.get("format") != FORMAT:
        return None
    return [f for f in prev.get("files", []) if isinstance(f, str) and "/" not in f and f.endswith(".png")]


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def page(fragment: str, title: str) -> str:
    """A complete self-contained page around a fragment."""
    return ('<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            '<meta name="viewport" content="width=device-width, initial-scale=1">'
            f'<link rel="icon" href="data:,"><title>{_esc(title)}</title></head>\n<body>\n{fragment}\n</body></html>\n')


def run_inspect(ckpt: str | Path, text: str, out_dir: Path, max_tokens: int = DEFAULT_MAX_TOKENS, *,
                overwrite: bool = False, device: str = "cpu") -> RoutingViews:
    """Load a checkpoint, tokenize `text` with its run's tokenizer (the first max_tokens tokens), and
    write out_dir/inspect.html (a page around the fragment), out_dir/inspect.json (the summary) and the
    PNGs. Checks every input before writing anything."""
    from . import checkpoint

    if not text:
        raise UsageError("the text is empty; give some text with --text or --text-file")
    if max_tokens < 1:
        raise UsageError(f"--max-tokens must be >= 1, got {max_tokens}")
    out = check_out(out_dir, overwrite)
    model, run_cfg, tokenizer, ckpt_dir = checkpoint.load_model(ckpt, device)
    all_ids = torch.as_tensor(tokenizer.encode(text.encode("utf-8")), dtype=torch.long)
    if all_ids.numel() == 0:
        raise UsageError("the text gives no tokens; give some text with --text or --text-file")
    ids = all_ids[:max_tokens]
    title = f"{run_cfg.get('preset') or ckpt_dir.parent.parent.name} ({ckpt_dir.name})"
    window = min(run_cfg["train"].get("seq_len") or model.config.max_seq_len, model.config.max_seq_len)
    views = routing_views(model, tokenizer, ids, title, window=window)
    views.summary.update(checkpoint=str(ckpt_dir), text_tokens=int(all_ids.numel()),
                         truncated=bool(all_ids.numel() > ids.numel()), files=sorted(views.figures))
    out.mkdir(parents=True, exist_ok=True)
    for name in _previous_files(out) or []:  # an earlier inspect output's figures (only those)
        if name not in views.figures:
            (out / name).unlink(missing_ok=True)
    for name, png in views.figures.items():
        _write_atomic(out / name, png)
    _write_atomic(out / "inspect.html", page(views.html, f"mixturelm inspect: {title}").encode("utf-8"))
    _write_atomic(out / "inspect.json", json.dumps(views.summary, indent=1).encode("utf-8"))
    return views


def describe(summary: dict) -> list[str]:
    """A few lines for the terminal."""
    lines = []
    for key, s in summary["layers"].items():
        if s["kind"] == "mod":
            lines.append(f"{key}: Mixture-of-Depths processed {s['topk_fraction']:.1%} of tokens (top-k), "
                         f"{s['causal_fraction']:.1%} with causal routing; they agree on {s['agreement']:.1%}; "
                         "processed most (top-k): " + ", ".join(f"{piece!r} {n}/{seen}"
                                                               for piece, n, seen in s["topk_favourites"][:5]))
        elif s["kind"] == "moe":
            noop = f", no-op share {s['noop_share']:.1%}" if s["n_noop"] else ""
            lines.append(f"{key}: MoE {s['router']} top-{s['top_k']} of {s['n_experts']}, max/mean load "
                         f"{s['load_max_over_mean']:.2f}{noop}")
        else:
            lines.append(f"{key}: PEER usage {s['usage']:.2%} of {s['n_experts']:,} experts, KL(usage || uniform) "
                         f"{s['kl_uniform']:.3f}")
    return lines or ["no routed layers (a dense model): nothing to show"]
