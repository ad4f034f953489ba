"""How much the routed blocks of a trained MoD model contribute: the mean router weight r of the tokens
that enter each routed block (top-k), and the validation loss with the routed blocks switched off (r = 0).

    python benchmarks/mod_router_weights.py runs/check-mod-tiny [--max-tokens 32768]
"""

import argparse

import torch

from mixturelm import checkpoint
from mixturelm.data.tokens import prepare, val_windows
from mixturelm.layers.mod import MoD, capacity_tokens


@torch.no_grad()
def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("ckpt")
    ap.add_argument("--max-tokens", type=int, default=32768)
    args = ap.parse_args()
    model, run_cfg, tokenizer, _ = checkpoint.load_model(args.ckpt)
    t = run_cfg["train"]
    data = prepare(t["data"], t["tokenizer"], t["val_fraction"], t["text_field"], tokenizer, log=lambda m: None)
    windows = val_windows(data.val, t["seq_len"], args.max_tokens)
    mods = {name: m for name, m in model.named_modules() if isinstance(m, MoD)}
    member_r: dict[str, list[torch.Tensor]] = {name: [] for name in mods}

    def record(name, mod):
        def hook(module, inputs, output):
            r = mod.router_weights(inputs[0])
            idx = r.topk(capacity_tokens(mod.capacity, r.shape[1]), dim=1).indices
            member_r[name].append(r.gather(1, idx).flatten())
        return hook

    handles = [m.register_forward_hook(record(n, m)) for n, m in mods.items()]
    on = sum(model(w[None, :-1], w[None, 1:]).loss.item() for w in windows) / len(windows)
    for h in handles:
        h.remove()
    for m in mods.values():
        m.branch_weights = lambda r: torch.zeros_like(r)  # the routed blocks add nothing
    off = sum(model(w[None, :-1], w[None, 1:]).loss.item() for w in windows) / len(windows)
    for name, rs in member_r.items():
        r = torch.cat(rs)
        print(f"{name}: entering tokens' r mean {r.mean():.4f}, |r| mean {r.abs().mean():.4f}")
    print(f"val loss {on:.4f}; with the routed blocks off {off:.4f} (+{off - on:.4f} nats), "
          f"{len(windows)} windows of {t['seq_len']} tokens")


if __name__ == "__main__":
    main()
