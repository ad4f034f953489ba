"""`mixturelm upcycle`: a dense run made into a MoE, PEER or MoD run that training continues.

- dense -> MoE (sparse upcycling, Komatsuzaki et al. 2022): every expert a copy of the block's FFN, the
  router drawn at random. With gates that sum to one over the chosen experts (softmax top-k renormalised,
  noisy top-k, sigmoid_bias with route_scale 1) the layer computes sum_e g_e FFN(x) = FFN(x): the dense
  function, up to float rounding, at step 0. `noise` perturbs each copy (w + noise * std(w) * N(0, 1));
  `reinit_share` re-draws that share of each expert's hidden units from a normal with the FFN matrix's mean
  and std (Drop-Upcycling, Nakamura et al. 2025); `granularity` G cuts the FFN's hidden units into G slices,
  each slice an expert (fine-grained experts: E / G copies of G slices). These three trade the exact start
  for diversity among experts: what the model computes at step 0 is measured and printed.
- dense -> PEER beside the FFN: the experts' output vectors start at zero, so the block computes FFN(x) + 0.
- dense -> dense (`to="dense"`): the same weights under a new schedule, the control that an upcycled run
  is compared with at equal further compute.
- dense -> MoD around the chosen blocks: a router is added; at step 0 only the top `capacity` of each
  sequence's tokens enter such a block and its branch is scaled by the router's weight r = w . x, near 0
  with a fresh router, so the routed blocks are nearly skipped: not the dense function (measured, printed).

The continued run draws its batches with the source's seed + 1 + `seed` (batches are drawn by seed and step:
the source's seed would repeat its first batches; `seed` varies the routers, the noise and the batches). The new run directory holds the target config, the source's tokenizer and data record, and a step-0
checkpoint of weights only; `mixturelm train --resume --out NEW` trains it like any run.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
from dataclasses import replace
from pathlib import Path

import torch

from .. import checkpoint
from ..config import ModelConfig
from ..errors import UsageError, positive_ints
from ..files import OutputFolder, write_json_atomic
from ..presets import get_preset

KINDS = ("moe", "peer", "mod")
CONTROL = "dense"  # the same dense model with a new schedule: the control an upcycled run is compared with
NOTE = "upcycled.json"
PRESERVING_ROUTERS = ("softmax", "noisy", "sigmoid_bias")  # gates sum to one over the chosen experts


@dataclasses.dataclass(kw_only=True)
class UpcycleOptions:
    to: str  # a preset (its mechanism configs are the template) or a kind: moe, peer, mod
    n_experts: int | None = None
    top_k: int | None = None
    router: str | None = None
    granularity: int = 1
    noise: float = 0.0
    reinit_share: float = 0.0
    capacity: float | None = None  # MoD
    layers: list[int] | None = None  # the blocks to change (default: every block for MoE, every other for
    # MoD, the middle one for PEER)
    seed: int = 0  # of the new routers and noise, and added to the continued run's data seed

    def __post_init__(self) -> None:
        positive_ints(self, *(n for n in ("n_experts", "top_k") if getattr(self, n) is not None))
        if self.capacity is not None and not 0 < self.capacity <= 1:
            raise UsageError(f"`capacity` must be in (0, 1], got {self.capacity}")
        if not isinstance(self.granularity, int) or self.granularity < 1:
            raise UsageError(f"`granularity` must be an integer >= 1, got {self.granularity!r}")
        if not 0 <= self.noise < math.inf:
            raise UsageError(f"`noise` must be a finite number >= 0, got {self.noise}")
        if not 0 <= self.reinit_share <= 1:
            raise UsageError(f"`reinit_share` must be in [0, 1], got {self.reinit_share}")


def _template(to: str, source_preset: str) -> tuple[str, dict[str, object]]:
    """(kind, {kind: config of that kind}) from a preset or a kind (then the preset of the source's size)."""
    if to in KINDS:
        size = source_preset.split("-")[-1] if source_preset.startswith("dense-") else "tiny"
        to = f"{to}-{size}" if f"{to}-{size}" in _preset_names() else f"{to}-tiny"
    try:
        preset = get_preset(to)
    except UsageError:
        raise UsageError(f"`to` {to!r} is neither a preset nor one of {', '.join(KINDS)}; give e.g. moe, "
                         "moe-tiny, peer-debug or mod-tiny") from None
    found: dict[str, object] = {}
    for b in preset.model.get("blocks", []):
        for kind in KINDS:
            if b.get(kind) and kind not in found:
                found[kind] = b[kind]
    if not found:
        raise UsageError(f"`to` {to}: the preset has no MoE, PEER or MoD blocks; give one that does")
    return to, found


def _preset_names() -> list[str]:
    from ..presets import presets

    return presets()


def target_config(source: ModelConfig, source_preset: str, o: UpcycleOptions) -> tuple[ModelConfig, str]:
    """The upcycled model's config (and the preset it follows)."""
    specs = [source.block_spec(i) for i in range(source.n_layers)]
    if any(s.kinds() != ["dense"] for s in specs):
        raise UsageError("the run to upcycle is not dense (its blocks use "
                         f"{', '.join(sorted({k for s in specs for k in s.kinds()} - {'dense'}))}); upcycle a dense run")
    if o.to == CONTROL:
        return source, source_preset
    preset, template = _template(o.to, source_preset)
    layers = o.layers
    if layers is not None and any(not 0 <= i < source.n_layers for i in layers):
        raise UsageError(f"`layers` {layers} are not all blocks of this {source.n_layers}-block model "
                         f"(0..{source.n_layers - 1})")
    blocks = [s.to_dict() for s in specs]
    for kind, config in template.items():
        chosen = layers if layers is not None else _default_layers(kind, source.n_layers)
        for i in chosen:
            blocks[i] = _upcycled_block(blocks[i], kind, dict(_as_dict(config)), source, o)
    return ModelConfig(**(source.to_dict() | {"blocks": blocks})), preset


def _default_layers(kind: str, n_layers: int) -> list[int]:
    return {"moe": list(range(n_layers)), "mod": list(range(1, n_layers, 2)), "peer": [(n_layers - 1) // 2]}[kind]


def _as_dict(config) -> dict:
    return config if isinstance(config, dict) else dataclasses.asdict(config)


def _upcycled_block(block: dict, kind: str, config: dict, source: ModelConfig, o: UpcycleOptions) -> dict:
    d_ffn = block.get("ffn_hidden") or source.d_ffn
    if kind == "moe":
        if d_ffn % o.granularity:
            raise UsageError(f"`granularity` {o.granularity} does not divide the FFN's {d_ffn} hidden units")
        n = o.n_experts or config.get("n_experts", 8)
        if n % o.granularity:
            raise UsageError(f"`n_experts` {n} is not a multiple of `granularity` {o.granularity} (each copy of the "
                             "FFN is cut into that many experts)")
        config |= {"n_experts": n, "top_k": o.top_k or config.get("top_k", 2), "d_expert": d_ffn // o.granularity,
                   "n_shared": 0, "d_shared": None, "shared_gate": False, "capacity_factor": None,
                   "n_noop": config.get("n_noop", 0)}
        if o.router:
            config["router"] = o.router
        return block | {"ffn": "moe", "moe": config}
    if kind == "peer":
        if o.n_experts:
            config["n_experts"] = o.n_experts
        if o.top_k:
            config["top_k"] = o.top_k
        return block | {"beside": list(block.get("beside", [])) + ["peer"], "peer": config}
    if kind == "mod":
        if o.capacity is not None:
            config["capacity"] = o.capacity
        return block | {"wrapper": "mod", "mod": config}
    raise ValueError(kind)


@torch.no_grad()
def upcycled_model(source_model, cfg: ModelConfig, o: UpcycleOptions):
    """The target model: every tensor the source has copied, each FFN turned into its experts, the new
    parts as the target's own initialisation (PEER's output vectors zero)."""
    from ..model import MixtureLM

    torch.manual_seed(o.seed)
    model = MixtureLM(cfg)
    src, dst = source_model.state_dict(), model.state_dict()  # dst aliases the model's tensors: copies land there
    for name in ("embed.weight", "norm.weight", "head.weight"):
        if name in src:
            dst[name].copy_(src[name])
    for i in range(cfg.n_layers):
        spec = cfg.block_spec(i)
        prefix = _block_prefix(model, i)  # block i's own Block, one level down inside a MoD wrapper
        for name, value in src.items():
            rest = name.removeprefix(f"blocks.{i}.")
            if rest != name and not (spec.ffn == "moe" and rest.startswith("ffn.")):
                dst[prefix + rest].copy_(value)
        if spec.ffn == "moe":
            gate_up, down = _experts(src[f"blocks.{i}.ffn.gate_up.weight"], src[f"blocks.{i}.ffn.down.weight"],
                                     spec.moe.n_experts, o)
            dst[f"{prefix}ffn.w_gate_up"].copy_(gate_up)
            dst[f"{prefix}ffn.w_down"].copy_(down)
        if "peer" in spec.beside:  # v_i = 0: the experts add nothing until trained
            dst[f"{prefix}beside.{spec.beside.index('peer')}.w_up"].zero_()
    return model.eval()


def _block_prefix(model, i: int) -> str:
    """The state-dict prefix of block i's own Block (inside a MoD wrapper it is one level down)."""
    names = [n for n in model.state_dict() if n.startswith(f"blocks.{i}.") and n.endswith("attn.qkv.weight")]
    return names[0].removesuffix("attn.qkv.weight")


def _experts(gate_up_FD: torch.Tensor, down_DF: torch.Tensor, n_experts: int, o: UpcycleOptions):
    """(E, D, 2F/G) and (E, F/G, D) expert tensors from a SwiGLU's (2F, D) and (D, F): copies of the FFN (or
    of its slices), then noise and re-drawn units if asked."""
    F = down_DF.shape[1]
    G = o.granularity
    f = F // G
    gate, up = gate_up_FD[:F], gate_up_FD[F:]
    slices = [(torch.cat((gate[j * f:(j + 1) * f], up[j * f:(j + 1) * f])).t(), down_DF[:, j * f:(j + 1) * f].t())
              for j in range(G)]
    w_in = torch.stack([slices[e % G][0] for e in range(n_experts)]).clone()  # (E, D, 2f)
    w_out = torch.stack([slices[e % G][1] for e in range(n_experts)]).clone()  # (E, f, D)
    if o.noise:
        w_in += o.noise * gate_up_FD.std() * torch.randn_like(w_in)
        w_out += o.noise * down_DF.std() * torch.randn_like(w_out)
    if o.reinit_share:
        n_units = round(o.reinit_share * f)
        for e in range(n_experts):
            units = torch.randperm(f)[:n_units]
            cols = torch.cat((units, units + f))
            w_in[e][:, cols] = torch.normal(gate_up_FD.mean().item(), gate_up_FD.std().item(),
                                            (w_in.shape[1], len(cols)), dtype=w_in.dtype)
            w_out[e][units] = torch.normal(down_DF.mean().item(), down_DF.std().item(), (n_units, w_out.shape[2]),
                                           dtype=w_out.dtype)
    return w_in, w_out


def preserves_function(cfg: ModelConfig, o: UpcycleOptions) -> bool:
    """Whether the upcycled model computes the source's function at step 0 (up to float rounding)."""
    for i in range(cfg.n_layers):
        s = cfg.block_spec(i)
        if s.wrapper == "mod":
            return False
        if s.ffn == "moe":
            m = s.moe
            if m.router not in PRESERVING_ROUTERS or m.n_noop or m.capacity_factor is not None:
                return False
            if m.router == "softmax" and not (m.renormalize and m.top_k > 1):
                return False
            if m.router == "sigmoid_bias" and m.route_scale != 1.0:
                return False
            if o.granularity > 1 or o.noise or o.reinit_share:
                return False
    return True


@torch.no_grad()
def probe_difference(a, b, vocab: int, seq_len: int, seed: int = 0) -> float:
    """Largest |logit difference| of two models on a probe batch of random tokens (eval mode)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (2, min(seq_len, 64)), generator=g)
    return float((a(ids).logits.float() - b(ids).logits.float()).abs().max())


def upcycle(run_dir: str | Path, out: str | Path, options: UpcycleOptions, train_overrides: dict | None = None,
            overwrite: bool = False, log=print) -> dict:
    """Write the upcycled run into `out`; returns what upcycled.json records."""
    from ..config import TrainConfig
    from ..training.run import RUN_KIND, RunConfig, is_legacy_run

    source_model, run_config, tokenizer, ckpt = checkpoint.load_model(run_dir)
    source_dir = ckpt.parent.parent  # the run directory the checkpoint belongs to
    if any(p.resolve() == Path(out).resolve() or Path(out).resolve() in p.resolve().parents
           for p in (ckpt, source_dir)):
        raise UsageError("--out holds the run being upcycled; choose another folder (the dense run is kept)")
    cfg, preset = target_config(source_model.config, run_config.get("preset", ""), options)
    folder = OutputFolder(out, RUN_KIND, option="--out", overwrite=overwrite, legacy=is_legacy_run,
                          exists_hint="add --overwrite to replace it, or choose another --out").check()
    source_step = json.loads((ckpt / checkpoint.META_FILE).read_text())["step"]
    train = TrainConfig.from_dict(run_config["train"])
    # another data seed: with the source's, the continued run would draw the very batches of the source's
    # first steps again (batches are drawn by seed and step); `seed` also varies it, for repeats
    train = replace(train, seed=train.seed + 1 + options.seed)
    if train_overrides:
        budget = {k: None for k in ("max_steps", "max_tokens", "max_flops")} if any(
            k in train_overrides for k in ("max_steps", "max_tokens", "max_flops")) else {}
        train = TrainConfig.from_dict(train.to_dict() | budget | train_overrides)
    train = _with_mechanism_defaults(train, preset)
    model = upcycled_model(source_model, cfg, options)
    preserved = preserves_function(cfg, options)
    diff = probe_difference(source_model, model, cfg.vocab_size, train.seq_len, options.seed)
    run = RunConfig(f"upcycled:{preset}", cfg, train)
    path = folder.claim().path
    write_json_atomic(path / checkpoint.CONFIG_FILE, run.to_dict())
    tokenizer.save(path)
    if (source_dir / "data.json").is_file():
        shutil.copyfile(source_dir / "data.json", path / "data.json")
    note = {"from": str(ckpt.resolve()), "source_step": source_step,
            "to": preset, "options": dataclasses.asdict(options), "preserves_function": preserved,
            "probe_max_abs_logit_difference": diff,
            "parameters": {"source": source_model.num_params(), "upcycled": model.num_params()}}
    write_json_atomic(path / NOTE, note)
    saved = checkpoint.save(path, 0, model, run.to_dict(), tokenizer, None)
    log(f"upcycled {ckpt} to {preset} ({source_model.num_params():,} -> {model.num_params():,} parameters) in {saved}")
    log(f"at step 0 it {'computes the dense function' if preserved else 'differs from the dense function'}: largest "
        f"|logit difference| on a probe batch {diff:.3g}; train it with: mixturelm train --resume --out {path}")
    folder.release()
    return note


def _with_mechanism_defaults(train, preset: str):
    """The target preset's own training options for its mechanisms (PEER's table and key rates), unless the
    source run set them."""
    from ..config import TrainConfig

    try:
        options = get_preset(preset).train.get("mechanisms", {})
    except UsageError:  # the control (--to dense) of an imported or upcycled run: no preset
        return train
    if not options:
        return train
    merged = {k: v for k, v in options.items() if k not in train.mechanisms}
    return replace(train, mechanisms=TrainConfig(mechanisms=merged).mechanisms | train.mechanisms)
