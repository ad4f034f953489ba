"""The experts that `mixturelm ensemble lm` mixes: mixturelm runs or checkpoints, and Hugging Face folders of
causal language models, as long as all of them share one tokenizer.

A path is
- a mixturelm run or checkpoint (what checkpoint.load_model takes): a folder with meta.json (a checkpoint), a
  checkpoints/ folder (a run directory), or a config.json with "model" and "train" (a run not yet checkpointed,
  which load_model then refuses with its own message);
- a Hugging Face folder: config.json naming a `model_type` or `architectures`, and none of the above; it
  needs safetensors weights and tokenizer.json beside it. It is loaded with
  AutoModelForCausalLM.from_pretrained, offline, in float32 and eval mode, and its tokenizer with
  data.tokenizer.from_hf_folder (mixturelm's byte tokenizer when export-hf marked it so).
Anything else is refused in one line, as is a Hugging Face folder whose weights are missing, truncated or
incomplete.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import UsageError

MIXTURELM, HF = "mixturelm", "huggingface"

EXPECTED = ("give a run directory of `mixturelm train` (or one of its checkpoints/step_* folders), or a Hugging "
            "Face model folder (config.json naming its model_type, safetensors weights and tokenizer.json, as "
            "save_pretrained writes them)")


@dataclass
class Expert:
    name: str
    path: str
    kind: str  # MIXTURELM or HF
    tokenizer: object
    model: torch.nn.Module | None = None  # a Hugging Face model is loaded once the tokenizers are known to match
    context: int | None = None  # tokens a window may hold (max_seq_len, max_position_embeddings); None: no limit
    run_config: dict | None = None  # a mixturelm run's config
    width: int | None = None  # columns of the model's logits (its output vocabulary, padding included)

    @property
    def val_fraction(self) -> float | None:
        """The held-out fraction of the run that trained it; None for a Hugging Face model (unknown)."""
        return self.run_config["train"]["val_fraction"] if self.run_config else None

    @property
    def tokenizer_spec(self) -> str:
        return self.run_config["train"]["tokenizer"] if self.run_config else self.tokenizer.name

    def window(self, segment_len: int) -> int:
        """Tokens per window over a segment of `segment_len` inputs: its context, capped by the segment (a
        window never holds more than the segment, so a larger context changes nothing)."""
        return max(1, min(self.context or segment_len, segment_len))

    def __call__(self, x_1T: torch.Tensor):
        """The model's forward: an object with .logits (1, T, width)."""
        if self.kind == HF:  # no key/value cache: every window is scored in one pass
            return self.model(input_ids=x_1T, use_cache=False)
        return self.model(x_1T)


def expert_kind(p: str) -> str:
    """MIXTURELM or HF, from what is in the folder (nothing is loaded); a one-line error for anything else."""
    path = Path(p)
    if not path.exists():
        raise UsageError(f"`experts` {p}: no such file or folder; {EXPECTED}")
    if path.is_dir():
        if (path / "meta.json").is_file() or (path / "checkpoints").is_dir():
            return MIXTURELM
        config = path / "config.json"
        if config.is_file():
            try:
                d = json.loads(config.read_text())
            except (OSError, ValueError):
                raise UsageError(f"`experts` {p}: its config.json is not valid JSON; restore it ({EXPECTED})") from None
            if isinstance(d, dict) and "model" in d and "train" in d:
                return MIXTURELM  # a run directory without a checkpoint: checkpoint.load_model says so
            if isinstance(d, dict) and ("model_type" in d or "architectures" in d):
                return HF
    raise UsageError(f"`experts` {p}: neither a mixturelm run nor a Hugging Face model folder; {EXPECTED}")


def _name(p: str, ckpt: Path | None, names: list[str]) -> str:
    given = Path(p).resolve()
    name = given.name if ckpt is None or given != ckpt.resolve() else f"{ckpt.resolve().parent.parent.name}/{ckpt.name}"
    return name if name not in names else f"{name}#{len(names)}"


def load_experts(paths: list[str], device: str) -> tuple[list[Expert], list[str]]:
    """Every expert, checked to share one tokenizer before any Hugging Face weights are read."""
    from .. import checkpoint
    from ..data.tokenizer import from_hf_folder

    if len(paths) < 2:
        raise UsageError(f"`experts` needs at least two models to mix, got {len(paths)}")
    kinds = [expert_kind(p) for p in paths]  # every path recognised before any is loaded
    experts, names = [], []
    for p, kind in zip(paths, kinds):
        if kind == MIXTURELM:
            model, run_cfg, tok, ckpt = checkpoint.load_model(p, device)
            e = Expert(_name(p, ckpt, names), p, kind, tok, model, model.config.max_seq_len, run_cfg,
                       model.config.vocab_size)
        else:
            try:
                tok = from_hf_folder(Path(p))
            except UsageError as err:  # named as the option that gave the folder
                msg = str(err)
                msg = f"`experts` {msg}" if msg.startswith(str(Path(p))) else f"`experts` {p}: {msg}"
                raise UsageError(msg) from None
            e = Expert(_name(p, None, names), p, kind, tok)
        experts.append(e)
        names.append(e.name)
    fp = [e.tokenizer.fingerprint() for e in experts]
    if len(set(fp)) > 1:
        pairs = {(e.tokenizer.name, f) for e, f in zip(experts, fp)}  # one name, two tokenizers: say which
        shown = [t if sum(n == t for n, _ in pairs) == 1 else f"{t} ({f})"
                 for t, f in zip((e.tokenizer.name for e in experts), fp)]
        raise UsageError("the experts do not share a tokenizer (" + ", ".join(
            f"{n}: {s}" for n, s in zip(names, shown)) + "); mixing next-token distributions "
            "needs one vocabulary: train them with the same `tokenizer` (bytes, or the same BPE file), or give "
            "Hugging Face models of one tokenizer")
    for e in experts:
        if e.kind == HF:
            e.model, e.context, e.width = load_hf_model(Path(e.path), device)
        vocab = e.tokenizer.vocab_size
        if e.width is not None and e.width < vocab:
            raise UsageError(f"`experts` {e.path}: the model has {e.width} tokens in its output but its tokenizer "
                             f"{vocab}; the tokenizer does not belong to this model, restore its own")
    return experts, names


@contextlib.contextmanager
def quiet_transformers():
    """transformers' progress bars and warnings off while it loads (errors come back as one line), then as
    they were."""
    from transformers.utils import logging as hf_logging

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def _first_line(e: BaseException, limit: int = 160) -> str:
    lines = [s.strip() for s in str(e).splitlines() if s.strip()]
    return (lines[0] if lines else type(e).__name__)[:limit]


def context_of(config) -> int | None:
    """Positions the model was built for: max_position_embeddings (GPT-2's n_positions answers to it too),
    or the older names; None when the config gives none (a recurrent model: no limit)."""
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    for key in ("max_position_embeddings", "n_positions", "n_ctx", "seq_length", "max_sequence_length"):
        v = getattr(config, key, None)
        if isinstance(v, int) and not isinstance(v, bool) and v > 0:
            return v
    return None


def _output_width(model) -> int | None:
    head = model.get_output_embeddings()
    weight = getattr(head, "weight", None)
    if weight is not None:
        return int(weight.shape[0])
    vocab = getattr(model.config.get_text_config(), "vocab_size", None)
    return vocab if isinstance(vocab, int) else None


def load_hf_model(path: Path, device: str) -> tuple[torch.nn.Module, int | None, int | None]:
    """(model in float32 and eval mode on `device`, its context, the columns of its logits) from a Hugging
    Face folder, offline; a folder that cannot give a complete model is refused in one line."""
    if not any(path.glob("*.safetensors")) and not (path / "model.safetensors.index.json").is_file():
        raise UsageError(f"`experts` {path}: the Hugging Face folder has no safetensors weights (model.safetensors); "
                         "save the model there with save_pretrained, or copy its weights beside config.json")
    try:
        from safetensors import SafetensorError
        from transformers import AutoModelForCausalLM
    except ImportError as e:
        raise UsageError(f"`experts` {path} is a Hugging Face model, which needs the transformers package "
                         f"({e}); pip install transformers") from None
    try:
        with quiet_transformers():
            model, info = AutoModelForCausalLM.from_pretrained(
                str(path), dtype=torch.float32, local_files_only=True, use_safetensors=True,
                output_loading_info=True)
    except (MemoryError, KeyboardInterrupt, torch.OutOfMemoryError):
        raise
    except SafetensorError as e:
        raise UsageError(f"`experts` {path}: its safetensors weights cannot be read ({_first_line(e)}); the file is "
                         "truncated or damaged: download or save the model again") from None
    except OSError as e:  # a missing shard, an unreadable config
        raise UsageError(f"`experts` {path}: transformers cannot read the folder ({_first_line(e)}); download or "
                         "save the model again") from None
    except RuntimeError as e:
        if "mismatched" in str(e) or "size mismatch" in str(e):
            raise UsageError(f"`experts` {path}: its weights do not fit its config.json (tensor shapes differ); "
                             "the config or the weights belong to another model") from None
        raise UsageError(f"`experts` {path}: transformers cannot load it ({_first_line(e)})") from None
    except Exception as e:  # noqa: BLE001 -- an unknown model_type, a config that is no causal LM, ...
        raise UsageError(f"`experts` {path}: transformers cannot load it as a causal language model "
                         f"({type(e).__name__}: {_first_line(e)}); give a folder of a causal LM "
                         "(AutoModelForCausalLM) that this version of transformers knows") from None
    missing = sorted(info.get("missing_keys") or [])
    if missing or info.get("mismatched_keys"):
        what = (f"lack {len(missing)} tensors of the model (e.g. {missing[0]})" if missing
                else "have tensors of other shapes")
        raise UsageError(f"`experts` {path}: its weights {what} that config.json describes; the weights are "
                         "incomplete or belong to another model: download or save the model again")
    model = model.to(device=device, dtype=torch.float32).eval()
    return model, context_of(model.config), _output_width(model)
