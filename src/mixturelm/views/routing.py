"""Routing views: capture what the routed layers of a model decide on a text, and put the views together.

Nothing here routes and nothing here names a mechanism: the decisions come from the layers themselves,
read by hooks while the model runs its ordinary forward pass (numerics untouched), and each mechanism's
view (`Mechanism.view()`, in its home) says which hooks to set, what to summarise and how to draw it.

The text is run in windows of the training length, each on its own; a model with a mechanism whose
training routing looks ahead (`Mechanism.causal_eval`) is run twice: "topk" (as trained) and "causal"
(token by token, as sampling routes).

Dimension letters: T tokens of a window, N tokens of the text.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..errors import UsageError
from ..mechanisms import registry
from .html import STYLE, esc, token_pieces

P = "mlmi"
FORMAT = "mixturelm-inspect/1"  # marks inspect.json, so --overwrite only ever replaces an inspect output


@dataclass
class RoutingViews:
    """summary: {"format", "title", "n_tokens", "window", "n_windows", "layers": {"layer{i}.{kind}": {...}}}
    (the inspect command adds "checkpoint", "text_tokens", "truncated", "files"); what each layer's entry
    holds is documented by its mechanism's view."""

    summary: dict  # JSON-able: per routed layer, what was measured
    figures: dict[str, bytes] = field(default_factory=dict)  # file name -> PNG bytes
    html: str = ""  # a self-contained HTML fragment (no <html>/<head>, no JavaScript, no external resource)


@dataclass
class Layer:
    """One routed layer of the model, with what the hooks recorded of it."""

    key: str  # "layer1.mod"
    index: int  # block index
    kind: str  # the mechanism's kind
    module: torch.nn.Module
    view: object  # the mechanism's view
    wrapper: Layer | None = None  # the wrapper layer around this layer's block, if any
    data: dict = field(default_factory=dict)


@dataclass
class Text:
    """The routed text: token ids, their text, its length and the window it was run in."""

    ids: list[int]
    pieces: list[str]
    window: int

    @property
    def n(self) -> int:
        return len(self.ids)


class Recorder:
    """Per pass ("topk" or "causal") and window (offset w0), what each layer decided, in text positions."""

    def __init__(self, layers: list[Layer]) -> None:
        self.layers, self.mode, self.w0 = layers, "topk", 0
        self.entered: dict[int, torch.Tensor] = {}  # wrapped block index -> window positions that entered
        self.handles = [h for layer in layers for h in layer.view.attach(layer, self)]

    def remove(self) -> None:
        for h in self.handles:
            h.remove()

    def positions(self, layer: Layer, n: int) -> torch.Tensor:
        """Window positions of the n tokens a layer saw: all of them, or those its wrapper let in."""
        if layer.wrapper is None:
            return torch.arange(n)
        pos = self.entered[layer.index]
        assert pos.numel() == n, "a routed layer inside a wrapped block saw other tokens than the block let in"
        return pos


def routed_layers(model: torch.nn.Module) -> list[Layer]:
    """Every layer with a routing view, by block: a wrapper before the layers inside its block."""
    found: list[Layer] = []
    for i, block in enumerate(model.blocks):
        wrapper = None
        for m in block.modules():
            mechanism = registry.of_module(m)
            view = mechanism.view() if mechanism is not None else None
            if view is None:
                continue
            key = f"layer{i}.{mechanism.kind}"
            n = sum(1 for f in found if f.key.startswith(key))
            layer = Layer(key if n == 0 else f"{key}{n}", i, mechanism.kind, m, view,
                          wrapper if m is not block else None)
            if m is block and mechanism.role == "wrapper":
                wrapper = layer
            found.append(layer)
    return found


def _table(summary: dict, layers: list[Layer]) -> str:
    rows = [f"<tr><td>{esc(layer.key)}</td><td>{summary['layers'][layer.key]['n_tokens']:,}</td>"
            f"<td>{esc(layer.view.table_cell(summary['layers'][layer.key]))}</td></tr>" for layer in layers]
    return (f'<table class="{P}-table"><tr><th>layer</th><th>tokens</th><th>measured</th></tr>'
            f'{"".join(rows)}</table>')


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
    text = Text(ids.tolist(), token_pieces(tokenizer, ids.tolist()), window)
    layers = routed_layers(model)
    summary = {"format": FORMAT, "title": title, "n_tokens": N, "window": window,
               "n_windows": -(-N // window), "layers": {}}
    texts = any(layer.view.shows_text for layer in layers)
    head = (f'<h2 class="{P}-h">Routing views{": " + esc(title) if title else ""}</h2>'
            f'<p class="{P}-note">{N:,} tokens, run in {summary["n_windows"]} window(s) of up to {window}, each '
            f'routed on its own' + ('; in the text views a blue bar marks where a window starts. Hover a token '
                                    'for details.</p>' if texts else '.</p>'))
    if not layers:
        note = (f'<p class="{P}-note">This model has no routed layers (dense): there are no routing decisions '
                'to show.</p>')
        return RoutingViews(summary, {}, f'<div class="{P}">{STYLE}{head}{note}</div>')
    _record(model, ids, layers, window)
    figures, sections = {}, []
    for layer in layers:  # a wrapper is summarised before the layers of its block, which read what entered
        s = layer.view.summary(layer, text)
        layer_figures = layer.view.figures(layer, s)
        figures.update(layer_figures)
        sections.append(layer.view.html(layer, s, text, layer_figures))
        summary["layers"][layer.key] = s
    body = head + _table(summary, layers) + "".join(f'<section class="{P}-layer">{x}</section>' for x in sections)
    return RoutingViews(summary, figures, f'<div class="{P}">{STYLE}{body}</div>')


def _record(model, ids: torch.Tensor, layers: list[Layer], window: int) -> None:
    """Run the text through the model, window by window and pass by pass, with the hooks set."""
    device = next(model.parameters()).device
    causal = any(registry.get(layer.kind).causal_eval for layer in layers)
    was_training = model.training
    model.eval()
    rec = Recorder(layers)
    try:
        with torch.no_grad():
            for w0 in range(0, ids.numel(), window):
                x = ids[w0:w0 + window][None].to(device)
                for mode in ("topk", "causal") if causal else ("topk",):
                    rec.mode, rec.w0 = mode, w0
                    model(x, causal_routing=mode == "causal")
    finally:
        rec.remove()
        model.train(was_training)


def describe(summary: dict) -> list[str]:
    """A few lines for the terminal, one per routed layer."""
    lines = [registry.get(s["kind"]).view().describe(key, s) for key, s in summary["layers"].items()]
    return lines or ["no routed layers (a dense model): nothing to show"]
