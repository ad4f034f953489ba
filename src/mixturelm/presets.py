"""The preset catalogue: named model shapes and the training settings that suit them, by "<arch>-<size>".

Sizes (debug, tiny, small, medium, large) fix the dense backbone; every architecture of a size shares it
and changes only what its mechanism changes (the fair-size rule of `mixturelm compare`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .errors import UsageError

# the architectures `mixturelm compare` puts side by side by default (preset prefixes)
DEFAULT_ARCHS = ("dense", "moe", "mod", "mode", "peer")

@dataclass(frozen=True)
class Preset:
    name: str
    description: str
    model: dict[str, Any]
    train: dict[str, Any]


_DENSE_SIZES: dict[str, tuple[dict[str, Any], dict[str, Any], str]] = {
    # size: (model fields, train fields, why)
    "debug": (dict(d_model=64, n_layers=2, n_heads=4, d_ffn=192, max_seq_len=64),
              dict(batch_size=8, seq_len=64, lr=3e-3, warmup_steps=5, eval_every=10, eval_tokens=2048,
                   ckpt_every=10), "trains in seconds: for tests and trying things out"),
    "tiny": (dict(d_model=128, n_layers=4, n_heads=4, d_ffn=352, max_seq_len=256),
             dict(batch_size=16, seq_len=256, lr=3e-3), "~0.9M params, minutes on 2 CPU cores"),
    "small": (dict(d_model=256, n_layers=6, n_heads=4, d_ffn=704, max_seq_len=256),
              dict(batch_size=16, seq_len=256, lr=2e-3), "~4.8M params"),
    "medium": (dict(d_model=512, n_layers=8, n_heads=8, d_ffn=1408, max_seq_len=256),
               dict(batch_size=16, seq_len=256, lr=1e-3), "~25M params, the benchmark shape"),
    "large": (dict(d_model=768, n_layers=12, n_heads=12, d_ffn=2048, max_seq_len=512),
              dict(batch_size=32, seq_len=512, lr=6e-4), "~85M params, for a GPU"),
}

PRESETS: dict[str, Preset] = {
    f"dense-{size}": Preset(f"dense-{size}", why, model, train)
    for size, (model, train, why) in _DENSE_SIZES.items()
}


def _moe_preset(size: str, n_experts: int, top_k: int, n_shared: int = 0, fine: bool = False) -> Preset:
    """Every block MoE, with the same ACTIVE FFN parameters per token as dense-<size>:
    (top_k + n_shared) * d_expert = d_ffn."""
    model, train, _ = _DENSE_SIZES[size]
    d_expert = model["d_ffn"] // (top_k + n_shared)
    moe = {"n_experts": n_experts, "top_k": top_k, "d_expert": d_expert, "n_shared": n_shared}
    blocks = [{"ffn": "moe", "moe": moe} for _ in range(model["n_layers"])]
    kind = "fine-grained, " if fine else ""
    why = (f"{kind}{n_experts} experts top-{top_k}" + (f" + {n_shared} shared" if n_shared else "")
           + f" of hidden {d_expert}: dense-{size}'s active FFN size")
    name = f"moe{'-fg' if fine else ''}-{size}"
    return Preset(name, why, model | {"blocks": blocks}, train)


def _mod_preset(size: str) -> Preset:
    """dense-<size> with every other block (the 2nd, 4th, ...) routed at 12.5 % capacity: the paper's best."""
    model, train, _ = _DENSE_SIZES[size]
    blocks = [{"wrapper": "mod", "mod": {"capacity": 0.125}} if i % 2 else {} for i in range(model["n_layers"])]
    return Preset(f"mod-{size}", f"dense-{size} shape, MoD 12.5 % on every other block", model | {"blocks": blocks},
                  train)


def _mode_preset(size: str, staged: bool) -> Preset:
    """MoDE (section 4.3). Integrated: every FFN a MoE of 8 experts top-2 (moe-<size>) whose router also
    offers 8 no-op experts, so about half of the expert slots are skipped. Staged: moe-<size> with MoD
    12.5 % around every other block, so routed tokens skip attention and the MoE alike."""
    base = _moe_preset(size, 8, 2)
    moe = base.model["blocks"][0]["moe"]
    if staged:
        blocks = [{"ffn": "moe", "moe": moe} | ({"wrapper": "mod", "mod": {"capacity": 0.125}} if i % 2 else {})
                  for i in range(base.model["n_layers"])]
        name, why = f"mode-staged-{size}", f"moe-{size} with MoD 12.5 % on every other block"
    else:
        blocks = [{"ffn": "moe", "moe": moe | {"n_noop": 8}} for _ in range(base.model["n_layers"])]
        name, why = f"mode-{size}", f"moe-{size} whose router also offers 8 no-op experts (integrated MoDE)"
    return Preset(name, why, base.model | {"blocks": blocks}, base.train)


for _size in ("debug", "tiny", "small", "medium"):
    PRESETS[f"moe-{_size}"] = _moe_preset(_size, 8, 2)
    PRESETS[f"moe-fg-{_size}"] = _moe_preset(_size, 64, 6, n_shared=2, fine=True)
    PRESETS[f"mod-{_size}"] = _mod_preset(_size)
    PRESETS[f"mode-{_size}"] = _mode_preset(_size, staged=False)
    PRESETS[f"mode-staged-{_size}"] = _mode_preset(_size, staged=True)


def _peer_preset(size: str, n_experts: int, why: str, train_extra: dict | None = None, **peer: Any) -> Preset:
    """dense-<size> with the FFN of the middle block replaced by PEER, as the paper places it ("in a 12
    block transformer, we replace the FFN in block 6": block (n_layers - 1) // 2, counted from 0)."""
    model, train, _ = _DENSE_SIZES[size]
    middle = (model["n_layers"] - 1) // 2
    # row-sparse table gradients, trained row by row (a dense N x D gradient per step would dominate)
    blocks = [{"ffn": "peer", "peer": {"n_experts": n_experts, "sparse_grad": True} | peer} if i == middle
              else {"ffn": "dense"} for i in range(model["n_layers"])]
    extra = dict(train_extra or {})
    peer_train = {"lr": 1e-2} | extra.pop("peer", {})  # PEER's own training options (mechanisms/peer.py)
    return Preset(f"peer-{size}", why, model | {"blocks": blocks}, train | extra | {"mechanisms": {"peer": peer_train}})


PRESETS["peer-debug"] = _peer_preset("debug", 64 * 64, "PEER in block 0: 64^2 experts, h 4, k 8, d_key 32; seconds",
                                     n_heads=4, top_k=8, d_key=32)
PRESETS["peer-tiny"] = _peer_preset("tiny", 1024 * 1024, "dense-tiny with block 1's FFN a PEER of 1024^2 experts, "
                                    "h 8, k 16, d_key 128 (the paper's N, h, k)",
                                    # evaluation over 2^17 tokens: 16 retrievals per expert, so usage can be near 100 %;
                                    # product keys at a fixed 1e-4, the rate product-key memories train them at (with
                                    # the model: 2.5e-4 in PKM, 1e-4 in Memory Layers at Scale); at tiny's model rate,
                                    # 3e-3, the sub-keys that win early grow and win more. Step 200 (docs/peer.md):
                                    # usage 12.2 % -> 21.2 %, KL 4.31 -> 3.65, val loss 1.4945 -> 1.4737
                                    train_extra={"eval_tokens": 131072, "peer": {"key_lr": 1e-4}})
PRESETS["peer-small"] = _peer_preset("small", 1024 * 1024, "dense-small with block 2's FFN a PEER of 1024^2 experts, "
                                     "h 8, k 16, d_key 128",
                                     train_extra={"eval_tokens": 131072, "peer": {"key_lr": 1e-4}})


def get_preset(name: str) -> Preset:
    if name not in PRESETS:
        raise UsageError(f"unknown preset {name!r}; see `mixturelm train --list-presets` ({', '.join(PRESETS)})")
    return PRESETS[name]


def presets() -> list[str]:
    """Names of the available presets."""
    return list(PRESETS)


def catalogue() -> list[dict]:
    """Every preset with its parameters and forward FLOPs per token (shapes only: nothing is allocated)."""
    import torch

    from .config import ModelConfig
    from .flops import forward_flops_per_token
    from .model import MixtureLM

    rows = []
    for name, p in PRESETS.items():
        cfg = ModelConfig(**p.model)
        with torch.device("meta"):  # peer-tiny's tables alone are 1 GiB
            n = MixtureLM(cfg).num_params()
        fwd = forward_flops_per_token(cfg, p.train["seq_len"])
        rows.append({"name": name, "params": n, "forward_flops_per_token": fwd, "description": p.description})
    return rows
