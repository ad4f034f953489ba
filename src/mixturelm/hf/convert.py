"""`mixturelm import-hf` and `mixturelm export-hf`: a Hugging Face folder to a mixturelm run directory, and back.

Import reads config.json with transformers' config class (which also reads older key names), maps it to a
ModelConfig (architectures.model_config: options mixturelm lacks are refused, never dropped), reads the
safetensors tensor by tensor into mixturelm's names, loads them strictly (every tensor, every shape), and
writes an ordinary run directory: config.json, the tokenizer, checkpoints/step_0000000 (weights only).
Everything is checked before the output folder is touched.

Export writes the native architecture that computes exactly what the run does (architectures.
export_architecture), or, for what none computes (MoD, MoDE, PEER, routers transformers lacks), mixturelm's
self-contained modeling file loaded with trust_remote_code=True (hf/remote).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .. import checkpoint
from ..config import TrainConfig
from ..data.tokenizer import EOS, BPETokenizer, ByteTokenizer, HFTokenizer, from_hf_folder
from ..errors import UsageError
from ..files import OutputFolder, write_json_atomic
from .architectures import architecture, export_architecture, hf_config, model_config, weight_parts
from .weights import HFWeights, join, split, unused

EXPORT_KIND = "Hugging Face model"
IMPORT_NOTE = "imported.json"  # where an imported run came from


def _transformers():
    try:
        import transformers
    except ImportError:
        raise UsageError("Hugging Face conversion needs transformers: pip install 'mixturelm[hf]'") from None
    return transformers


# ----------------------------------------------------------------------------------------------
# import

def read_hf_folder(hf_dir: str | Path):
    """(architecture, transformers config, ModelConfig, tokenizer, weights) of a Hugging Face folder, all checked."""
    folder = Path(hf_dir)
    if not folder.is_dir():
        raise UsageError(f"{folder} is not a folder; give a Hugging Face model folder (config.json, safetensors, "
                         "tokenizer.json)")
    try:
        raw = json.loads((folder / "config.json").read_text())
    except OSError:
        raise UsageError(f"{folder} has no config.json, so it is not a Hugging Face model folder; give the folder "
                         "save_pretrained wrote") from None
    except ValueError:
        raise UsageError(f"{folder}/config.json is not valid JSON; restore it") from None
    arch = architecture(raw.get("model_type") if isinstance(raw, dict) else None, str(folder))
    transformers = _transformers()
    try:
        hf = getattr(transformers, arch.config_class).from_pretrained(str(folder), local_files_only=True)
    except Exception as e:  # transformers' own validation of the config's values
        raise UsageError(f"{folder}/config.json is not a valid {arch.config_class} ({str(e)[:120]}); fix it") from None
    cfg = model_config(hf, arch, str(folder))
    tokenizer = from_hf_folder(folder)
    if tokenizer.vocab_size > cfg.vocab_size:
        raise UsageError(f"{folder}: the tokenizer has {tokenizer.vocab_size} tokens but the model only "
                         f"{cfg.vocab_size}; the tokenizer belongs to another model")
    weights = HFWeights(folder)
    return arch, hf, cfg, tokenizer, weights


def hf_state_dict(cfg, arch, weights: HFWeights, where: str) -> dict[str, torch.Tensor]:
    """mixturelm's state dict (float32) from the folder's tensors, each read once. A tensor missing is one
    line naming it; so is a tensor of the folder that nothing takes (the model would be another one)."""
    state, used = {}, set()
    for part in weight_parts(cfg, arch):
        state[part.ours] = join(part, [weights.get(name) for name in part.hf]).float()
        used.update(part.hf)
    left = unused(weights, used)
    if left:
        raise UsageError(f"{where}: {len(left)} tensor(s) of the checkpoint fit no part of the model its config.json "
                         f"describes (first: {left[0]}); the checkpoint and its config do not belong together")
    return state


def load_into_model(cfg, state: dict[str, torch.Tensor], where: str):
    """A MixtureLM holding `state` exactly (strict: every tensor, every shape)."""
    from ..model import MixtureLM

    with torch.device("meta"):  # no random initialisation of tensors about to be replaced, no second copy
        model = MixtureLM(cfg)
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as e:
        first = next((line.strip() for line in str(e).splitlines() if "size mismatch" in line or "Missing" in line
                      or "Unexpected" in line), str(e)[:160])
        raise UsageError(f"{where}: the weights do not fit config.json ({first[:200]}); the checkpoint and its "
                         "config do not belong together") from None
    if any(t.is_meta for t in (*model.parameters(), *model.buffers())):  # a buffer that is not in the state dict
        raise UsageError(f"{where}: this architecture's model holds state the checkpoint does not give")
    return model.eval()


def import_hf(hf_dir: str | Path, out: str | Path, overwrite: bool = False, log=print) -> Path:
    """A run directory at `out` holding the Hugging Face model of `hf_dir`; returns its checkpoint."""
    from ..training.run import DEFAULT_MAX_STEPS, RUN_KIND, RunConfig, is_legacy_run

    folder = OutputFolder(out, RUN_KIND, option="--out", overwrite=overwrite, legacy=is_legacy_run,
                          exists_hint="add --overwrite to replace it, or choose another --out").check()
    if _inside(Path(hf_dir), Path(out)):
        raise UsageError(f"--out {out} holds the Hugging Face folder being imported; choose another folder")
    arch, hf, cfg, tokenizer, weights = read_hf_folder(hf_dir)
    state = hf_state_dict(cfg, arch, weights, str(hf_dir))
    model = load_into_model(cfg, state, str(hf_dir))
    seq_len = min(256, cfg.max_seq_len)
    train = TrainConfig(tokenizer=tokenizer.name, seq_len=seq_len, max_steps=DEFAULT_MAX_STEPS)
    run = RunConfig(f"hf:{arch.model_type}", cfg, train)
    path = folder.claim().path
    write_json_atomic(path / checkpoint.CONFIG_FILE, run.to_dict())
    tokenizer.save(path)
    write_json_atomic(path / IMPORT_NOTE, {"from": str(Path(hf_dir).resolve()), "architecture": arch.model_type,
                                           "transformers_class": arch.causal_lm,
                                           "parameters": model.num_params()})
    ckpt = checkpoint.save(path, 0, model, run.to_dict(), tokenizer, None)
    log(f"imported {arch.causal_lm} ({model.num_params():,} parameters, {cfg.n_layers} layers) into {ckpt}")
    folder.release()
    return ckpt


def _inside(path: Path, folder: Path) -> bool:
    """Whether `path` is `folder` or lies inside it (writing `folder` would destroy it)."""
    path, folder = path.resolve(), folder.resolve()
    return path == folder or folder in path.parents


# ----------------------------------------------------------------------------------------------
# export

def export_hf(run_dir: str | Path, out: str | Path, overwrite: bool = False, remote_code: bool = False,
              log=print) -> Path:
    """A Hugging Face folder at `out` from a run directory or checkpoint; returns `out`."""
    from safetensors.torch import save_file

    _transformers()
    model, run_config, tokenizer, ckpt = checkpoint.load_model(run_dir)
    cfg = model.config
    arch = export_architecture(cfg)
    native = not isinstance(arch, str)
    if not native and not remote_code:
        only_dense_and_moe = all(k in ("dense", "moe") for i in range(cfg.n_layers) for k in cfg.block_spec(i).kinds())
        if only_dense_and_moe:
            raise UsageError(f"{run_dir}: no transformers architecture computes this model exactly ({arch}); export "
                             "it with mixturelm's own modeling code instead: add --remote-code (loaded with "
                             "trust_remote_code=True)")
    if _inside(ckpt, Path(out)):
        raise UsageError(f"--out {out} holds the run being exported; choose another folder")
    eos, bos = tokenizer.eos_id, getattr(tokenizer, "bos_id", None)
    remote = None
    if not native:  # every check of the remote export before the folder is touched
        from .remote import prepare_remote, write_remote

        remote = prepare_remote(model, eos_token_id=eos, bos_token_id=bos)
    folder = OutputFolder(out, EXPORT_KIND, option="--out", overwrite=overwrite).check()
    path = folder.claim().path
    if native:
        state = model.state_dict()
        tensors = {}
        for part in weight_parts(cfg, arch):
            tensors.update(zip(part.hf, split(part, state[part.ours].detach().cpu(), cfg)))
        save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
        hf = hf_config(cfg, arch, eos, bos)
        hf.architectures = [arch.causal_lm]
        hf.save_pretrained(str(path))
        _generation_config(eos, bos).save_pretrained(str(path))
        what = arch.causal_lm
    else:
        write_remote(remote, path)
        what = f"mixturelm's own modeling code ({arch}; load with trust_remote_code=True)"
    export_tokenizer(tokenizer, path, cfg.max_seq_len)
    log(f"exported {ckpt} as {what} into {path}")
    folder.release()
    return path


def _generation_config(eos: int | None, bos: int | None):
    from transformers import GenerationConfig

    return GenerationConfig(eos_token_id=eos, bos_token_id=bos)


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's printable stand-in for each byte, the alphabet of byte-level tokenizers."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


def byte_tokenizer_json():
    """mixturelm's byte tokenizer (ids 0-255 the bytes, 256 the end of text) as a `tokenizers` Tokenizer: a
    byte-level BPE without merges, so every byte is its own token with its own id."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    vocab = {ch: b for b, ch in bytes_to_unicode().items()}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(EOS, special=True)])
    return tok


def export_tokenizer(tokenizer, path: Path, max_len: int) -> None:
    """tokenizer.json and tokenizer_config.json, loadable with AutoTokenizer."""
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": EOS, "model_max_length": max_len}
    if isinstance(tokenizer, HFTokenizer):
        tokenizer.save(path)
        config |= json.loads((path / "tokenizer_config.json").read_text())
    elif isinstance(tokenizer, BPETokenizer):
        tokenizer.save(path)
    else:
        byte_tokenizer_json().save(str(path / "tokenizer.json"))
        config["mixturelm_tokenizer"] = ByteTokenizer.name
    (path / "tokenizer_config.json").write_text(json.dumps(config, indent=1))
