"""PEER (He 2024, a million single-neuron experts): what mixturelm must know of it beyond the layer
(layers/peer.py).

Its config (PEERConfig, beside the layer), how a block builds it (in the FFN slot or beside the FFN), its
FLOPs (sub-key scores without a backward pass) and active parameters (h x k of N table rows), what its
training needs (expert tables at their own learning rate, row-sparse gradients for the row-wise Adam, product keys
at their own rate, neither decayed; precise-BN calibration of the query norm before each evaluation), its
expert usage over an evaluation (the paper's Table 2), its options on the command line and its routing view.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch

from ..errors import UsageError
from ..layers.peer import PEER, PEERAux, PEERConfig, usage_from_scores
from .registry import Mechanism, Option, OptimizerNeeds, register


@dataclass(kw_only=True)
class PEERTrainOptions:
    """How a run trains its PEER layers (TrainConfig.mechanisms["peer"])."""

    # learning rate of the expert tables, held constant (product-key memories train their values at a fixed,
    # higher rate: Lample et al. 2019, Berges et al. 2024); None: the run's lr and its schedule
    lr: float | None = None
    # learning rate of the product keys, held constant; None: the run's lr and its schedule (as PKM trains them)
    key_lr: float | None = None
    # before each evaluation and checkpoint, recompute the query norm's running statistics over the last
    # this-many training batches at the current weights (precise BN); 0: keep the momentum-0.1 averages,
    # which lag far behind a fast-moving query network (eval usage 1.6 % against 8.6 % at step 50 of peer-tiny)
    bn_calibration: int = 4

    def __post_init__(self) -> None:
        for name in ("lr", "key_lr"):
            value = getattr(self, name)
            if value is not None and not 0 < value < math.inf:
                raise UsageError(f"PEERTrainOptions.{name} must be a finite number > 0 (or None: the run's lr), "
                                 f"got {value}")
        if not isinstance(self.bn_calibration, int) or self.bn_calibration < 0:
            raise UsageError(f"PEERTrainOptions.bn_calibration must be an integer >= 0, got {self.bn_calibration!r}")


def peer_flops(p: PEERConfig, d_model: int) -> dict[str, float]:
    """Query network 2*D*H*Q; sub-key scores of both halves against sqrt(N) sub-keys each, 2*sqrt(N)*Q per
    head (forward only); the chosen keys' scores recomputed, 2*K*Q per head; experts u_i . x (and g_i . x
    for GLU) and the weighted sum of v_i, 2*D per expert and table, H*K experts. Whitened queries add a
    Q x Q matrix per head, 2*Q*Q*H (its per-step eigendecomposition, independent of tokens, is not counted)."""
    D = d_model
    H, K, Q, S = p.n_heads, p.top_k, p.d_key, math.isqrt(p.n_experts)
    query = 2.0 * D * H * Q + (2.0 * Q * Q * H if p.query_norm == "whiten" else 0.0)
    return {"peer_query": query, "peer_subkey_scores": 2.0 * S * Q * H,
            "peer_key_scores": 2.0 * K * Q * H, "peer_experts": (3 if p.glu else 2) * 2.0 * H * K * D}


class PEERMechanism(Mechanism):
    kind = "peer"
    title = "PEER"
    config_class = PEERConfig
    module_types = (PEER,)
    # the top-k of the sub-key scores has no gradient; the chosen keys' scores are recomputed (counted apart)
    forward_only_flops = ("peer_subkey_scores",)
    block_options = {
        "peer_experts": Option("n_experts", int, "PEER: experts N, a perfect square (peer-tiny: 1024^2)"),
        "peer_heads": Option("n_heads", int, "PEER: retrieval heads h"),
        "peer_top_k": Option("top_k", int, "PEER: experts per head k"),
        "peer_query_norm": Option("query_norm", str, "PEER: query normalisation: batch (the paper's), layer, none, "
                                                     "or whiten (decorrelates each head's query: more experts used, "
                                                     "some loss lost; docs/peer.md)"),
    }
    train_options_class = PEERTrainOptions
    train_flags = {
        "peer_lr": Option("lr", float, "PEER: fixed learning rate of the expert tables (default: the preset's; none "
                                       "given: --lr and its schedule)"),
        "peer_key_lr": Option("key_lr", float, "PEER: fixed learning rate of the product keys (default: the preset's, "
                                               "peer-tiny 1e-4; none given: --lr and its schedule)"),
        "peer_bn_calibration": Option("bn_calibration", int,
                                      "PEER: training batches that re-estimate the query norm's statistics (BatchNorm "
                                      "or whitening) before each evaluation and checkpoint (0: keep the running "
                                      "averages)"),
    }
    summary_key = "peer_usage"
    presets_hint = "peer-*"

    def build(self, config: PEERConfig, d_model: int, **_) -> PEER:
        return PEER(d_model, config)

    def flops(self, config: PEERConfig, model, d_hidden: int) -> dict[str, float]:
        return peer_flops(config, model.d_model)

    def param_shares(self, module: PEER, seq_len: int) -> dict[int, float]:
        """The expert tables count at the h x k rows of N one token retrieves."""
        share = module.n_heads * module.top_k / module.n_experts
        return {id(p): share for p in module.expert_tables()}

    # -- training ---------------------------------------------------------------------------------
    def optimizer_needs(self, modules: list[PEER], options: PEERTrainOptions) -> OptimizerNeeds:
        """Expert tables with sparse gradients go to the optimizer's row_sparse group (lazy Adam on the touched rows: no N x d work
        per step); with dense gradients they form an AdamW group; the product keys another. Neither decays.
        A given lr / key_lr is held fixed (no schedule)."""
        sparse = [t for m in modules if m.sparse_grad for t in m.expert_tables()]
        tables = [t for m in modules if not m.sparse_grad for t in m.expert_tables()]
        keys = [m.sub_keys for m in modules]
        groups = [{"params": params, "weight_decay": 0.0, "fixed_lr": lr is not None}
                  | ({"lr": lr} if lr is not None else {})
                  for params, lr in ((tables, options.lr), (keys, options.key_lr)) if params]
        return OptimizerNeeds(groups=groups, sparse=sparse, sparse_lr=options.lr)

    def use_row_sparse_gradients(self, modules: list[PEER]) -> None:
        for m in modules:
            m.sparse_grad = True

    def calibration_batches(self, options: PEERTrainOptions) -> int:
        return options.bn_calibration

    @torch.no_grad()
    def calibrate(self, model, batches, autocast=contextlib.nullcontext, all_reduce_mean=None) -> int:
        """Precise BN for the query norms that keep running statistics (BatchNorm; whitening, a mean and a
        covariance per head): reset them and re-estimate them as the plain average over `batches` (token
        windows, (B, T + 1)) at the current weights, the rest of the model in eval mode. The momentum-0.1
        running averages of training trail the query network, which moves fast early in training;
        evaluation with them retrieves from stale, off-centre queries (few experts, high loss). Training
        itself is unchanged (it normalises with batch statistics). all_reduce_mean: averages a tensor over
        processes, in place. Returns the number of norms set."""
        norms = [m.query_norm for m in model.modules()
                 if isinstance(m, PEER) and getattr(m.query_norm, "track_running_stats", False)]
        if not norms:
            return 0
        was_training = model.training
        model.eval()
        saved = [(bn.momentum, bn.num_batches_tracked.clone()) for bn in norms]
        for bn in norms:
            bn.reset_running_stats()
            bn.momentum = None  # cumulative average over the calibration batches
            bn.train()
        try:
            for w in batches:
                with autocast():
                    model(w[:, :-1])
        finally:
            for bn, (momentum, tracked) in zip(norms, saved):
                bn.momentum = momentum
                bn.num_batches_tracked.copy_(tracked)
            model.train(was_training)
        if all_reduce_mean is not None:
            for bn in norms:
                for name, buf in bn.named_buffers():
                    if name.startswith("running_"):  # mean and var (BatchNorm) or cov (whitening)
                        all_reduce_mean(buf)
        return len(norms)

    # -- evaluation and summaries ------------------------------------------------------------------
    def eval_value(self, aux: PEERAux) -> torch.Tensor:
        return aux.expert_scores.double()

    def eval_metrics(self, name: str, total: torch.Tensor) -> dict[str, float]:
        """Expert usage over the evaluation tokens (the paper's Table 2)."""
        u = usage_from_scores(total.cpu())
        return {f"{name}.peer_usage": u["usage"], f"{name}.peer_kl": u["kl_uniform"]}

    def summarize(self, record: dict) -> dict:
        usage = {k.split(".")[0]: {"usage": v, "kl_uniform": record[k.replace("peer_usage", "peer_kl")]}
                 for k, v in record.items() if k.endswith(".peer_usage")}
        return {"peer_usage": usage} if usage else {}

    def describe(self, summary: dict) -> list[str]:
        return [f"{layer} PEER: {u['usage']:.1%} of experts used over the validation tokens, KL(usage || uniform) "
                f"{u['kl_uniform']:.3f}" for layer, u in summary.get("peer_usage", {}).items()]

    def view(self):
        return PEER_VIEW


class PEERView:
    """A histogram of how often each expert was retrieved, and the usage and KL(usage || uniform) of the
    paper's Table 2 (as evaluation reports them), from PEER's own `retrieve` on the layer's input.

    Summary: n_experts, heads, top_k, n_tokens, retrievals, usage, kl_uniform, experts_retrieved,
    max_retrievals."""

    shows_text = False

    def attach(self, layer, rec) -> list:
        def after(peer: PEER, args, out):
            if rec.mode != "topk":
                return
            x_TD = args[0].reshape(-1, args[0].shape[-1])
            ids_THK, _ = peer.retrieve(x_TD)
            d = layer.data.setdefault("topk", {"scores": 0.0, "counts": 0, "n_tokens": 0})
            d["scores"] = d["scores"] + out[1].expert_scores.double().cpu()
            d["counts"] = d["counts"] + torch.bincount(ids_THK.reshape(-1).cpu(), minlength=peer.n_experts)
            d["n_tokens"] += x_TD.shape[0]

        return [layer.module.register_forward_hook(after)]

    def summary(self, layer, text) -> dict:
        peer: PEER = layer.module
        d = layer.data["topk"]
        u = usage_from_scores(d["scores"])
        counts = d["counts"]
        return {"kind": "peer", "layer": layer.index, "n_experts": peer.n_experts, "heads": peer.n_heads,
                "top_k": peer.top_k, "n_tokens": d["n_tokens"], "retrievals": int(counts.sum()),
                "usage": u["usage"], "kl_uniform": u["kl_uniform"],
                "experts_retrieved": int((counts > 0).sum()), "max_retrievals": int(counts.max())}

    def figures(self, layer, s: dict) -> dict[str, bytes]:
        import numpy as np

        from ..plotting import pyplot
        from ..views.html import png

        counts = layer.data["topk"]["counts"]
        plt = pyplot()
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
        return {f"layer{layer.index}_peer_usage.png": png(fig)}

    def html(self, layer, s: dict, text, figures) -> str:
        from ..views.html import P, img

        (name, data), = figures.items()
        return (f'<h3 class="{P}-h2">layer {s["layer"]}: PEER, {s["n_experts"]:,} experts, {s["heads"]} heads '
                f'x top-{s["top_k"]}</h3>'
                f'<p class="{P}-note">Over {s["n_tokens"]:,} tokens ({s["retrievals"]:,} retrievals): '
                f'{s["experts_retrieved"]:,} experts retrieved at least once, the most-used {s["max_retrievals"]:,} '
                f'times. Usage {s["usage"]:.2%} of experts, KL(usage || uniform) {s["kl_uniform"]:.3f} (He 2024, '
                f'Table 2: usage is the fraction of experts with any router score, KL of the normalised summed '
                f'scores).</p>' + img(name, data, f"layer {s['layer']} PEER: experts by times retrieved"))

    def table_cell(self, s: dict) -> str:
        return f"usage {s['usage']:.2%}, KL(usage || uniform) {s['kl_uniform']:.3f}"

    def describe(self, key: str, s: dict) -> str:
        return (f"{key}: PEER usage {s['usage']:.2%} of {s['n_experts']:,} experts, KL(usage || uniform) "
                f"{s['kl_uniform']:.3f}")


PEER_VIEW = PEERView()
PEER_MECHANISM = register(PEERMechanism())
