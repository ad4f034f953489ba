"""Export a mixturelm model as Hugging Face remote code: `save_remote(model, folder)` writes config.json,
generation_config.json, modeling_mixturelm.py and model.safetensors, which transformers loads with

    AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)

For the models transformers has no architecture for (MoD, MoDE, PEER, MoE routers it lacks); what the remote
model computes, supports and refuses is said in modeling_mixturelm.py, the one file it runs. The tokenizer
is the caller's to write. Needs transformers (and safetensors).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from ...errors import UsageError

MODELING_FILE = Path(__file__).with_name("modeling_mixturelm.py")
AUTO_MAP = {"AutoConfig": "modeling_mixturelm.MixtureLMConfig",
            "AutoModelForCausalLM": "modeling_mixturelm.MixtureLMForCausalLM"}


def save_remote(model, out_dir: Path, eos_token_id: int | None = None, bos_token_id: int | None = None) -> None:
    """Write `model` (a MixtureLM) into out_dir as remote code: its config under the key "mixturelm", its
    state dict (buffers included: the sigmoid_bias router's bias, MoD thresholds, query-norm statistics) with
    `model.` prepended, the modeling file, and a generation config without cache. Those four files are
    replaced if present; nothing else in out_dir is touched. Raises UsageError, before writing anything, for a
    model the remote code cannot reproduce (expert-choice MoE, token dropping, a mechanism it does not know)."""
    write_remote(prepare_remote(model, eos_token_id, bos_token_id), out_dir)


def prepare_remote(model, eos_token_id: int | None = None, bos_token_id: int | None = None):
    """(Hugging Face config, state dict) of the remote export, every check done: nothing is written."""
    try:
        from .modeling_mixturelm import MixtureLMConfig, MixtureLMForCausalLM, check_supported
    except ImportError as e:
        raise UsageError(f"exporting to Hugging Face needs transformers ({e}); pip install transformers") from None
    cfg = model.config.to_dict()
    try:
        check_supported(cfg)
    except ValueError as e:
        raise UsageError(str(e)) from None
    state = {f"model.{k}": v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    dtype = next(model.parameters()).dtype
    hf_config = MixtureLMConfig(mixturelm=cfg, bos_token_id=bos_token_id, eos_token_id=eos_token_id,
                                dtype=str(dtype).removeprefix("torch."))
    hf_config.auto_map = dict(AUTO_MAP)
    hf_config.architectures = [MixtureLMForCausalLM.__name__]
    _check_names(MixtureLMForCausalLM, hf_config, state)
    return hf_config, state


def write_remote(prepared, out_dir: Path) -> None:
    """The files of a prepared remote export (prepare_remote) into out_dir."""
    from safetensors.torch import save_file
    from transformers import GenerationConfig

    hf_config, state = prepared
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    hf_config.save_pretrained(out_dir)
    GenerationConfig(bos_token_id=hf_config.bos_token_id, eos_token_id=hf_config.eos_token_id,
                     use_cache=False).save_pretrained(out_dir)
    shutil.copyfile(MODELING_FILE, out_dir / MODELING_FILE.name)
    save_file(state, str(out_dir / "model.safetensors"), metadata={"format": "pt"})


def _check_names(model_class, hf_config, state: dict[str, torch.Tensor]) -> None:
    """The remote model, built on the meta device, must hold exactly these tensors with these shapes: a
    mixturelm change the modeling file does not mirror is caught here, not by a user's failed load."""
    with torch.device("meta"):
        want = {k: tuple(v.shape) for k, v in model_class(hf_config).state_dict().items()}
    have = {k: tuple(v.shape) for k, v in state.items()}
    if want != have:
        missing, extra = sorted(set(want) - set(have)), sorted(set(have) - set(want))
        shapes = sorted(k for k in set(want) & set(have) if want[k] != have[k])
        raise UsageError("the remote model does not mirror this mixturelm model's state dict; "
                         f"missing: {missing[:5]}, unexpected: {extra[:5]}, other shapes: {shapes[:5]}")
