"""Mixture-of-Depths (and, with MoE inside, staged MoDE): what mixturelm must know of it beyond the layer
(layers/mod.py).

Its config (MoDConfig, beside the layer), how it wraps a block, its FLOPs (the block at the share of
tokens that enter, attention at that share squared), its active parameters, the causal predictor as a
side network clipped apart, its options on the command line, its summary in results.json (how the causal
rule of sampling agrees with training's top-k) and its routing view (the tokens each block processed).
"""

from __future__ import annotations

import torch

from ..layers.mod import MoD, MoDConfig, capacity_tokens
from .registry import Mechanism, Option, OptimizerNeeds, layer_stats, register


class MoDMechanism(Mechanism):
    kind = "mod"
    title = "Mixture-of-Depths"
    role = "wrapper"
    config_class = MoDConfig
    module_types = (MoD,)
    # the router's causal BCE 1e-2 (small: it shares the router with the LM objective), the predictor's
    # BCE 1.0 (its input is detached, so it cannot disturb the LM objective)
    loss_weights = {"mod_bce": 1e-2, "mod_predictor": 1.0}
    causal_eval = True  # top-k over a sequence looks at later tokens: score sampling's causal routing too
    block_options = {
        "capacity": Option("capacity", float, "MoD: fraction of each sequence's tokens that enter a routed block "
                                              "(default 0.125)"),
        "mod_causal": Option("causal", str, "MoD: how sampling routes token by token: aux_loss (BCE on the "
                                            "router) or predictor"),
        "mod_gate": Option("gate", str, "MoD: what multiplies the block's output: linear (r, the paper's Eq. 1) "
                                        "or sigmoid (sigmoid(r))"),
    }
    summary_key = "mod_causal"
    presets_hint = "mod-* or mode-staged-*"

    def build(self, config: MoDConfig, d_model: int, inner=None, **_) -> MoD:
        return MoD(inner, d_model, config)

    def token_share(self, config: MoDConfig, seq_len: int) -> float:
        """ceil(capacity x T) of T tokens enter in training."""
        return capacity_tokens(config.capacity, seq_len) / seq_len

    def wrap_flops(self, parts: dict[str, float], config: MoDConfig, model, seq_len: int) -> dict[str, float]:
        """c of the tokens enter, and attend only to each other (scores x c^2); the router and, for the
        causal predictor, the predictor run on every token."""
        c = self.token_share(config, seq_len)
        scaled = {name: value * (c * c if name == "attn_scores" else c) for name, value in parts.items()}
        D = model.d_model
        scaled["mod_router"] = 2.0 * D
        if config.causal == "predictor":
            hidden = config.predictor_hidden or max(1, D // 2)
            scaled["mod_predictor"] = 2.0 * D * hidden + 2.0 * hidden
        return scaled

    def param_shares(self, module: MoD, seq_len: int) -> dict[int, float]:
        """The wrapped block's parameters at the share of tokens that enter; router and predictor in full."""
        share = self.token_share(module.config, seq_len)
        return {id(p): share for p in module.block.parameters()}

    def optimizer_needs(self, modules: list[MoD], options) -> OptimizerNeeds:
        """The causal predictor is a side network (trained on its own loss from stop-gradient inputs): it
        is clipped apart, since in one global norm its gradient would shrink the model's update (mod-tiny
        with the predictor, step 20: by 11 %; benchmarks/mod/predictor_clip_share.py) for no gain."""
        return OptimizerNeeds(side=[p for m in modules if m.predictor is not None for p in m.predictor.parameters()])

    def eval_value(self, aux) -> torch.Tensor | None:
        return aux.causal_counts  # set in the causal pass only

    def eval_metrics(self, name: str, total: torch.Tensor) -> dict[str, float]:
        """The share of the validation tokens the causal rule let in: what sampling would process."""
        return {f"{name}.mod_val_causal_fraction": (total[0] / total[1].clamp_min(1)).item()}

    def summarize(self, record: dict) -> dict:
        accuracy = layer_stats(record, "mod_causal_accuracy")
        fraction = layer_stats(record, "mod_causal_fraction")
        causal = {}
        for i in accuracy:
            causal[f"layer{i}.mod_causal_accuracy"] = accuracy[i]
            causal[f"layer{i}.mod_causal_fraction"] = fraction[i]
        for key, value in record.items():
            if key.endswith(".mod_val_causal_fraction"):
                causal[key] = value
        return {"mod_causal": causal} if causal else {}

    def describe(self, summary: dict) -> list[str]:
        causal = summary.get("mod_causal", {})
        layers = sorted({k.split(".")[0] for k in causal}, key=lambda name: int(name.removeprefix("layer")))
        lines = []
        for n in layers:
            parts = []
            if n + ".mod_causal_fraction" in causal:
                parts.append(f"{causal[n + '.mod_causal_fraction']:.1%} of the tokens of the last training batch "
                             f"(agreeing with top-k on {causal[n + '.mod_causal_accuracy']:.1%})")
            if n + ".mod_val_causal_fraction" in causal:
                parts.append(f"{causal[n + '.mod_val_causal_fraction']:.1%} of the validation tokens")
            lines.append(f"{n} MoD: the causal rule of sampling lets in " + " and ".join(parts))
        return lines

    def view(self):
        return MOD_VIEW


@torch.no_grad()
def calibrate_on_decoding(model, prompt_BT: torch.Tensor, feed_BT: torch.Tensor) -> list[float]:
    """Set every MoD layer's sampling threshold from the causal scores it sees while decoding: after
    prompts prompt_BT, tokens feed_BT fed one at a time; each layer then lets in the capacity's share of the
    fed tokens. Returns the thresholds, in block order.

    Thresholds set in training are quantiles of training batches, all positions, under top-k routing.
    Decoding sees other positions and other sequences, and the share a sequence lets in varies (in an
    untrained model the later routed blocks' scores carry a per-sequence offset as large as their spread
    within a sequence), so a threshold set on a few sequences lets in another share on others.

    Causal routing gives a token the same decisions whether it is prefilled or decoded (it never sees
    later tokens), so one pass over prompt + fed tokens with causal routing stands for the prefill and
    the decoding. In it, each routed layer sets its threshold just before it routes: its scores depend on
    the layers before it (already set), never on its own threshold or later ones, so each threshold is
    the quantile of exactly the scores that decoding these prompts gives it."""
    prompt_len = prompt_BT.shape[1]

    def set_threshold(layer: MoD, args) -> None:
        fed_BTD = args[0][:, prompt_len:]
        layer.set_threshold_from(layer.causal_scores(fed_BTD, layer.router_weights(fed_BTD)))

    mods = [m for m in model.modules() if isinstance(m, MoD)]
    hooks = [m.register_forward_pre_hook(set_threshold) for m in mods]
    was_training = model.training
    try:
        model.eval()(torch.cat([prompt_BT, feed_BT], dim=1), causal_routing=True, last_only=True)
    finally:
        for hook in hooks:
            hook.remove()
        model.train(was_training)
    return [float(m.threshold) for m in mods]


def favourites(ids: list[int], pieces: list[str], enter: list[bool], most: int = 8) -> list[list]:
    """The tokens a routed block processed most often: [token text, times processed, times in the text]."""
    processed, seen, text = {}, {}, {}
    for token, piece, entered in zip(ids, pieces, enter):
        seen[token] = seen.get(token, 0) + 1
        processed[token] = processed.get(token, 0) + int(entered)
        text[token] = piece
    order = sorted((t for t in processed if processed[t]), key=lambda t: (-processed[t], t))[:most]
    return [[text[t], processed[t], seen[t]] for t in order]


class MoDView:
    """Per routed block: the text with the tokens the block processed highlighted, under training-time
    top-k routing and under causal routing (what sampling does); the router score in a tooltip. The
    decisions are read with MoD's own `topk_indices` / `causal_enter` (the methods its forward uses).

    Summary: capacity, causal, threshold, n_tokens, topk_fraction / causal_fraction (share processed),
    topk_processed / causal_processed (token positions), topk_favourites / causal_favourites ([token,
    times processed, times in the text] of the most processed tokens), agreement."""

    shows_text = True

    def attach(self, layer, rec) -> list:
        def before(mod: MoD, args):
            x_BTD = args[0]
            assert x_BTD.shape[0] == 1, "routing views run one window at a time"
            r_BT = mod.router_weights(x_BTD)
            d = layer.data.setdefault(rec.mode, {"scores": [], "entered": []})
            if rec.mode == "topk":
                idx = mod.topk_indices(r_BT)[0].cpu()
                rec.entered[layer.index] = idx
                enter_T = torch.zeros(r_BT.shape[1], dtype=torch.bool)
                enter_T[idx] = True
                score_T = r_BT[0]
            else:
                enter_T = mod.causal_enter(x_BTD, r_BT)[0].cpu()
                score_T = mod.causal_scores(x_BTD, r_BT)[0]
            d["entered"].append(enter_T)
            d["scores"].append(score_T.float().cpu())

        return [layer.module.register_forward_pre_hook(before)]

    def summary(self, layer, text) -> dict:
        mod: MoD = layer.module
        res = {"kind": "mod", "layer": layer.index, "capacity": mod.capacity, "causal": mod.causal,
               "threshold": float(mod.threshold), "n_tokens": text.n}
        for mode in ("topk", "causal"):
            d = layer.data[mode]
            enter_N, score_N = torch.cat(d["entered"]), torch.cat(d["scores"])
            d["enter_N"], d["score_N"] = enter_N, score_N
            res[f"{mode}_fraction"] = enter_N.float().mean().item()
            res[f"{mode}_processed"] = enter_N.nonzero().squeeze(1).tolist()
            res[f"{mode}_favourites"] = favourites(text.ids, text.pieces, enter_N.tolist())
        layer.data["entered_N"] = layer.data["topk"]["enter_N"]  # what the layers inside the block saw
        res["agreement"] = (layer.data["topk"]["enter_N"] == layer.data["causal"]["enter_N"]).float().mean().item()
        return res

    def figures(self, layer, s: dict) -> dict[str, bytes]:
        return {}

    def html(self, layer, s: dict, text, figures) -> str:
        from ..views.html import P, esc, text_view

        parts = [f'<h3 class="{P}-h2">layer {s["layer"]}: Mixture-of-Depths block, capacity {s["capacity"]:.1%}</h3>']
        for mode, label in (("topk", "training-time routing: the top C tokens of each window by router weight r"),
                            ("causal", f"causal routing (what sampling does): {s['causal']} score above the "
                                       f"threshold {s['threshold']:.3g}, token by token")):
            d = layer.data[mode]
            enter, score = d["enter_N"].tolist(), d["score_N"].tolist()
            name = "r" if mode == "topk" else "score"

            def spans(i, enter=enter, score=score, name=name):
                return (f"{P}-on" if enter[i] else "", "",
                        f"{name} = {score[i]:.4f} · {'processed' if enter[i] else 'skipped'}")

            share = ("exactly its capacity of each window" if mode == "topk" else
                     "a threshold set on training batches, so the share differs from text to text")
            parts.append(f'<p class="{P}-note">{esc(label)}: {s[mode + "_fraction"]:.1%} of this text\'s tokens '
                         f'processed ({share}; <span class="{P}-t {P}-on">highlighted</span>).</p>')
            parts.append(text_view(text.pieces, text.window, spans))
            parts.append(f'<p class="{P}-note">processed most: ' + ", ".join(
                f"<code>{esc(repr(piece))}</code> {n} of {seen}" for piece, n, seen in s[mode + "_favourites"])
                + "</p>")
        parts.append(f'<p class="{P}-note">The two routings agree on {s["agreement"]:.1%} of tokens.</p>')
        return "".join(parts)

    def table_cell(self, s: dict) -> str:
        return f"processed: top-k {s['topk_fraction']:.1%}, causal {s['causal_fraction']:.1%}"

    def describe(self, key: str, s: dict) -> str:
        return (f"{key}: Mixture-of-Depths processed {s['topk_fraction']:.1%} of tokens (top-k), "
                f"{s['causal_fraction']:.1%} with causal routing; they agree on {s['agreement']:.1%}; "
                "processed most (top-k): " + ", ".join(f"{piece!r} {n}/{seen}"
                                                      for piece, n, seen in s["topk_favourites"][:5]))


MOD_VIEW = MoDView()
MOD = register(MoDMechanism())
