"""Mixture-of-Experts: what mixturelm must know of it beyond the layer (layers/moe.py).

Its config (MoEConfig, defined beside the layer that takes it), how a block builds it, its FLOPs and active
parameters, the FLOPs its no-op experts really saved (integrated MoDE), its options on the command line,
its summary in results.json and its routing view (each token's expert, the load per expert).
"""

from __future__ import annotations

import torch

from ..layers.moe import MoE, MoEConfig
from ..layers.routing import ROUTERS
from .registry import Mechanism, Option, layer_stats, register


def moe_flops(m: MoEConfig, d_model: int) -> dict[str, float]:
    """Router, routed experts (k per token; capacity_factor per token for expert choice; with token
    dropping this is the upper bound; with no-op experts the real share under balanced routing), shared
    experts. The noisy router's noise projection is counted."""
    D = d_model
    router = 2.0 * D * (m.n_experts + m.n_noop) * (2 if m.router == "noisy" else 1)
    parts = {"router": router, "experts": m.experts_per_token() * 6.0 * D * m.d_expert}
    if m.n_shared:
        parts["shared_experts"] = 6.0 * D * m.shared_hidden + (2.0 * D if m.shared_gate else 0.0)
    return parts


class MoEMechanism(Mechanism):
    kind = "moe"
    title = "Mixture-of-Experts"
    config_class = MoEConfig
    module_types = (MoE,)
    # Switch balance 1e-2 (Fedus et al.), ST-MoE z-loss 1e-3, the noisy gate's importance and load 1e-2,
    # and the small complementary balance loss of the aux-loss-free sigmoid_bias router 1e-4 (DeepSeek-V3)
    loss_weights = {"balance": 1e-2, "z": 1e-3, "importance": 1e-2, "load": 1e-2, "complementary_balance": 1e-4}
    block_options = {
        "router": Option("router", str, f"MoE router: {', '.join(ROUTERS)}"),
        "n_experts": Option("n_experts", int, "MoE experts per layer"),
        "top_k": Option("top_k", int, "MoE experts per token"),
        "d_expert": Option("d_expert", int, "hidden size of each MoE expert"),
        "n_shared": Option("n_shared", int, "always-on shared experts"),
        "capacity_factor": Option("capacity_factor", float, "token dropping above this capacity (default: dropless)"),
    }
    summary_key = "load_max_over_mean"
    presets_hint = "moe-* or mode-*"

    def build(self, config: MoEConfig, d_model: int, **_) -> MoE:
        return MoE(d_model, config)

    def flops(self, config: MoEConfig, model, d_hidden: int) -> dict[str, float]:
        return moe_flops(config, model.d_model)

    def param_shares(self, module: MoE, seq_len: int) -> dict[int, float]:
        """The routed experts count at experts per token / experts; router and shared experts in full."""
        share = module.config.experts_per_token() / module.n_experts
        return {id(module.w_gate_up): share, id(module.w_down): share}

    def realized_flops_correction(self, model, seq_len: int, record: dict) -> float | None:
        """Integrated MoDE: the budget counts no-op experts chosen at the balanced share Z / (E + Z); a
        training record holds each layer's measured share f. The routed experts' FLOPs scale by realized /
        assumed experts per token (negative when no-ops were chosen more often)."""
        from ..flops import block_flops

        fractions = layer_stats(record, "noop_fraction")
        if not fractions:
            return None
        extra = 0.0
        for layer, f in fractions.items():
            spec = model.block_spec(layer)
            m = spec.configs[self.kind]
            assumed = m.experts_per_token()
            extra += block_flops(spec, model, seq_len)["experts"] * (m.top_k * (1.0 - f) / assumed - 1.0)
        return extra

    def sampling_warning(self, module: MoE) -> str | None:
        if module.router_kind == "expert_choice":
            return ("expert-choice routing is not causal (an expert picks among all tokens of a call); one token "
                    "at a time it routes differently from training")
        return None

    def summarize(self, record: dict) -> dict:
        loads = {f"layer{i}.load_max_over_mean": v for i, v in layer_stats(record, "load_max_over_mean").items()}
        return {"load_max_over_mean": loads} if loads else {}

    def describe(self, summary: dict) -> list[str]:
        loads = summary.get("load_max_over_mean")
        if not loads:
            return []
        return ["max/mean expert load per layer (last step): "
                + ", ".join(f"{k.split('.')[0]} {v:.2f}" for k, v in loads.items())]

    def view(self):
        return MOE_VIEW


class MoEView:
    """Per MoE layer: the text coloured by each token's top-1 expert (every chosen expert and its gate in
    the tooltip), and a load histogram; integrated MoDE's no-op experts shown apart.

    Summary: router, n_experts, n_noop, top_k, in_mod_block (inside a wrapped block), n_tokens (that
    reached it), assignments, load (share of assignments per expert, no-op ones last), load_max_over_mean
    (real experts), dropped_fraction, top1 (per token position: first expert, -1 none, null for a token
    its wrapped block skipped), [noop_share]."""

    shows_text = True

    def attach(self, layer, rec) -> list:
        def on_routing(router, args, routing):
            if rec.mode != "topk":
                return
            pos = rec.positions(layer, routing.scores_TE.shape[0])
            d = layer.data.setdefault("topk", {"token": [], "expert": [], "weight": [], "n_tokens": 0})
            d["token"].append(pos[routing.token_A.cpu()] + rec.w0)
            d["expert"].append(routing.expert_A.cpu())
            d["weight"].append(routing.weight_A.float().cpu())
            d["n_tokens"] += int(pos.numel())

        def on_output(moe, args, out):
            if rec.mode == "topk":
                d = layer.data.setdefault("stats", {"dropped": 0.0, "n": 0})
                n = args[0].reshape(-1, args[0].shape[-1]).shape[0]
                d["dropped"] += float(out[1].dropped) * n
                d["n"] += n

        return [layer.module.router.register_forward_hook(on_routing),
                layer.module.register_forward_hook(on_output)]

    def summary(self, layer, text) -> dict:
        moe: MoE = layer.module
        N = text.n
        d = layer.data["topk"]
        E = moe.n_experts + moe.n_noop
        token_A, expert_A, weight_A = torch.cat(d["token"]), torch.cat(d["expert"]), torch.cat(d["weight"])
        weight_NE = torch.zeros(N, E).index_put_((token_A, expert_A), weight_A)
        chosen_NE = torch.zeros(N, E, dtype=torch.bool).index_put_((token_A, expert_A), torch.tensor(True))
        top1_N = weight_NE.masked_fill(~chosen_NE, -float("inf")).argmax(1)
        top1_N[~chosen_NE.any(1)] = -1  # expert choice: a token no expert took
        # inside a wrapped block, only the tokens it let in reach the layer
        routed_N = torch.ones(N, dtype=torch.bool) if layer.wrapper is None else layer.wrapper.data["entered_N"].clone()
        load_E = torch.bincount(expert_A, minlength=E).double()
        load_E = load_E / load_E.sum().clamp_min(1)
        real_E = load_E[:moe.n_experts]
        d.update(weight_NE=weight_NE, chosen_NE=chosen_NE, top1_N=top1_N, routed_N=routed_N, load_E=load_E)
        res = {"kind": "moe", "layer": layer.index, "router": moe.router_kind, "n_experts": moe.n_experts,
               "n_noop": moe.n_noop, "top_k": moe.top_k, "in_mod_block": layer.wrapper is not None,
               "n_tokens": d["n_tokens"], "assignments": int(expert_A.numel()),
               "load": load_E.tolist(),  # fraction of the router's assignments per expert (no-op ones last)
               "load_max_over_mean": (real_E.max() / real_E.mean().clamp_min(1e-12)).item(),
               "dropped_fraction": layer.data["stats"]["dropped"] / max(1, layer.data["stats"]["n"]),
               "top1": [int(e) if ok else None for e, ok in zip(top1_N.tolist(), routed_N.tolist())]}
        if moe.n_noop:
            res["noop_share"] = load_E[moe.n_experts:].sum().item()
        return res

    def figures(self, layer, s: dict) -> dict[str, bytes]:
        from ..views.html import NOOP_COLOUR, expert_colour, png
        from ..plotting import pyplot

        plt = pyplot()
        E, n_noop = s["n_experts"], s["n_noop"]
        load = s["load"]
        fig, ax = plt.subplots(figsize=(min(12, 2.5 + 0.3 * len(load)), 2.8))
        colours = [expert_colour(e, E) for e in range(E)] + [NOOP_COLOUR] * n_noop
        ax.bar(range(len(load)), load, color=colours, edgecolor="#555555", linewidth=0.5)
        ax.axhline(1 / len(load), color="#c62828", linestyle="--", linewidth=1, label=f"uniform 1/{len(load)}")
        ax.set_xlabel("expert" + (f" (ids {E}..{E + n_noop - 1}: no-op)" if n_noop else ""))
        ax.set_ylabel("fraction of assignments")
        ax.set_title(f"layer {s['layer']}: MoE load ({s['router']} top-{s['top_k']}, {s['assignments']} "
                     "assignments)", fontsize=10)
        if len(load) <= 32:
            ax.set_xticks(range(len(load)))
            ax.tick_params(axis="x", labelsize=7)
        ax.legend(fontsize=8)
        return {f"layer{layer.index}_moe_load.png": png(fig)}

    def html(self, layer, s: dict, text, figures: dict[str, bytes]) -> str:
        from ..views.html import NOOP_COLOUR, P, esc, expert_colour, img, text_view

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
        (name, data), = figures.items()
        return (f'<h3 class="{P}-h2">layer {s["layer"]}: Mixture-of-Experts, {esc(s["router"])} router, '
                f'top-{s["top_k"]} of {E}{where}</h3>'
                f'<p class="{P}-note">Colour: each token\'s first expert (largest gate); the tooltip lists every '
                f'chosen expert with its gate. Max/mean load {s["load_max_over_mean"]:.2f}, dropped '
                f'{s["dropped_fraction"]:.1%}.{noop}</p>'
                f'<div class="{P}-legend">{legend}</div>'
                + text_view(text.pieces, text.window, spans)
                + img(name, data, f"layer {s['layer']} MoE load per expert"))

    def table_cell(self, s: dict) -> str:
        return f"max/mean load {s['load_max_over_mean']:.2f}" + (
            f", no-op share {s['noop_share']:.1%}" if s["n_noop"] else "")

    def describe(self, key: str, s: dict) -> str:
        noop = f", no-op share {s['noop_share']:.1%}" if s["n_noop"] else ""
        return (f"{key}: MoE {s['router']} top-{s['top_k']} of {s['n_experts']}, max/mean load "
                f"{s['load_max_over_mean']:.2f}{noop}")


MOE_VIEW = MoEView()
MOE = register(MoEMechanism())
