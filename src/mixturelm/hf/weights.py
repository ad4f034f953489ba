"""Reading a Hugging Face folder's safetensors (one file, or shards with an index) tensor by tensor, and
turning its tensors into mixturelm's and back (architectures.Part says which into which)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from ..config import ModelConfig
from ..errors import UsageError
from .architectures import Part

INDEX, SINGLE = "model.safetensors.index.json", "model.safetensors"
# transformers 5 keeps a layer's experts fused; a folder saved in that form names them so
_PER_EXPERT = re.compile(r"^(model\.layers\.\d+)\.(?:mlp|block_sparse_moe)\.experts\.(\d+)\.(\w+)\.weight$")
_GATE, _UP = ("gate_proj", "w1"), ("up_proj", "w3")
FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# tensors a checkpoint may carry that are computed, not learned
DERIVED = re.compile(r"rotary_emb\.inv_freq$")


class HFWeights:
    """The tensors of a folder's safetensors, opened lazily; every shard checked when opened."""

    def __init__(self, folder: Path) -> None:
        from safetensors import safe_open

        self.folder = folder
        if (folder / INDEX).is_file():
            try:
                weight_map = json.loads((folder / INDEX).read_text())["weight_map"]
                files = sorted(set(weight_map.values()))
                if not all(isinstance(f, str) for f in files):
                    raise TypeError
            except (OSError, ValueError, KeyError, TypeError, AttributeError):
                raise UsageError(f"{folder / INDEX} is not a readable safetensors index; restore it") from None
        elif (folder / SINGLE).is_file():
            files, weight_map = [SINGLE], None
        else:
            other = sorted(p.name for p in folder.glob("*.bin")) or sorted(p.name for p in folder.glob("*.pt*"))
            hint = (f"it holds {other[0]} (pickle weights): save the model with safe_serialization (the default of "
                    "save_pretrained)" if other else "save the model with save_pretrained")
            raise UsageError(f"{folder} has no {SINGLE} or {INDEX}; {hint}")
        self.files = {}
        for name in files:
            path = folder / name
            if not path.is_file():
                raise UsageError(f"{folder}: shard {name} named by {INDEX} is missing; copy every shard of the model")
            try:
                self.files[name] = safe_open(str(path), "pt")
            except Exception as e:  # safetensors' own error: truncated or not a safetensors file
                raise UsageError(f"{folder}: shard {name} cannot be read ({str(e)[:100]}); it is truncated or "
                                 "damaged, copy it again") from None
        self.where = {k: f for f, h in self.files.items() for k in h.keys()}
        self._last: tuple[str, torch.Tensor] | None = None  # the fused tensor read last (read once, sliced E times)
        if weight_map is not None:
            lost = sorted(k for k, f in weight_map.items() if self.where.get(k) != f)
            if lost:
                raise UsageError(f"{folder}: {lost[0]} is listed in {INDEX} but not found in {weight_map[lost[0]]}; "
                                 "the shards and the index do not belong together")

    def has(self, name: str) -> bool:
        return name in self.where or self._fused(name) is not None

    def get(self, name: str) -> torch.Tensor:
        if name in self.where:
            if self._last is not None and self._last[0] == name:
                return self._last[1]
            try:
                tensor = self.files[self.where[name]].get_tensor(name)
            except Exception as e:
                raise UsageError(f"{self.folder}: tensor {name} cannot be read ({str(e)[:100]}); its shard "
                                 f"{self.where[name]} is damaged") from None
            if tensor.dtype not in FLOATS:
                raise UsageError(f"{self.folder}: tensor {name} is {str(tensor.dtype).removeprefix('torch.')}; "
                                 "mixturelm imports float16, bfloat16 and float32 weights (dequantize the model first)")
            if name.endswith(("gate_up_proj", "down_proj")) and ".experts." in name:
                self._last = (name, tensor)
            return tensor
        fused = self._fused(name)
        if fused is None:
            raise UsageError(f"{self.folder}: tensor {name} is missing; the checkpoint is incomplete or of "
                             "another architecture than its config.json says")
        return fused()

    def _fused(self, name: str):
        """A per-expert tensor read out of transformers 5's fused layout, or None."""
        m = _PER_EXPERT.match(name)
        if m is None:
            return None
        layer, e, which = m.group(1), int(m.group(2)), m.group(3)
        gate_up, down = f"{layer}.mlp.experts.gate_up_proj", f"{layer}.mlp.experts.down_proj"
        if which in _GATE + _UP and gate_up in self.where:
            def read():
                w = self.get(gate_up)[e]  # (2F, D): gate rows, then up rows
                half = w.shape[0] // 2
                return w[:half] if which in _GATE else w[half:]
            return read
        if which in ("down_proj", "w2") and down in self.where:
            return lambda: self.get(down)[e]
        return None


def unused(weights: HFWeights, used: set[str]) -> list[str]:
    """Tensors of the folder that no part of the model takes (a fused expert tensor counts as used when its
    per-expert names are); derived tensors (RoPE frequencies) are ignored."""
    fused = {re.sub(r"\.(?:mlp|block_sparse_moe)\.experts\.\d+\.(\w+)\.weight$", "", n) for n in used
             if _PER_EXPERT.match(n)}
    left = []
    for name in weights.where:
        if name in used or DERIVED.search(name):
            continue
        layer = name.split(".mlp.experts.")[0]
        if name.endswith((".mlp.experts.gate_up_proj", ".mlp.experts.down_proj")) and layer in fused:
            continue
        left.append(name)
    return sorted(left)


def join(part: Part, tensors: list[torch.Tensor]) -> torch.Tensor:
    """mixturelm's tensor from the Hugging Face tensors of `part` (import)."""
    if part.how == "same":
        return tensors[0]
    if part.how == "rows":
        return torch.cat(tensors, 0)
    if part.how == "experts_gate_up":  # per expert (F, D) gate and (F, D) up -> (E, D, 2F)
        return torch.stack([torch.cat(tensors[i:i + 2], 0).t() for i in range(0, len(tensors), 2)])
    if part.how == "experts_down":  # per expert (D, F) -> (E, F, D)
        return torch.stack([t.t() for t in tensors])
    raise ValueError(part.how)


def split(part: Part, tensor: torch.Tensor, cfg: ModelConfig) -> list[torch.Tensor]:
    """The Hugging Face tensors of `part` from mixturelm's tensor (export); each contiguous."""
    if part.how == "same":
        out = [tensor]
    elif part.how == "rows":
        if ".attn.qkv." in part.ours:
            K = cfg.head_dim
            sizes = [cfg.n_heads * K, cfg.kv_heads * K, cfg.kv_heads * K]
        else:  # gate and up of a SwiGLU
            sizes = [tensor.shape[0] // 2] * 2
        out = list(torch.split(tensor, sizes, 0))
    elif part.how == "experts_gate_up":
        out = [half for w in tensor for half in torch.chunk(w.t(), 2, 0)]
    elif part.how == "experts_down":
        out = [w.t() for w in tensor]
    else:
        raise ValueError(part.how)
    return [t.contiguous() for t in out]
