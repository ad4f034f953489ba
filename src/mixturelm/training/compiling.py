"""torch.compile for training (`TrainConfig.compile`, `mixturelm train --compile`): the model wrapped from
outside, and the graph breaks of a preset's model listed (`mixturelm bench compile` prints them beside the
eager and compiled step times).

What compile cannot trace is a custom op (torch.library) or left eager on purpose, each said where it is in
the layers. docs/training.md lists the breaks that remain.
"""

from __future__ import annotations

import os
import shutil

import torch

from ..errors import UsageError


def check_compiler(device: str) -> None:
    """torch.compile on CPU writes C++ (inductor) and needs a compiler: refuse before any work, not with a
    traceback at the first step."""
    if device.startswith("cpu") and not any(shutil.which(c) for c in (os.environ.get("CXX", "g++"), "g++", "c++",
                                                                      "clang++")):
        raise UsageError("TrainConfig.compile needs a C++ compiler on CPU (torch.compile writes C++); install "
                         "g++ or train without TrainConfig.compile")


def compiled(model: torch.nn.Module, backend: str = "inductor") -> torch.nn.Module:
    """The model through torch.compile. Not fullgraph: the breaks left on purpose (PEER's expert tables)
    split the graph instead of failing. Shapes are static in training, except after a break whose output
    size depends on the data (integrated MoDE's no-op choices): there the default (automatic dynamic
    shapes) recompiles once with a symbolic size, where dynamic=False would recompile at every new size.
    backend "aot_eager" traces and differentiates as inductor does but runs the graph eagerly (fast tests)."""
    return torch.compile(model, backend=backend)


# ----------------------------------------------------------------------------------------------
# Graph breaks

def preset_model(preset: str, seed: int = 0):
    """A preset's model (byte vocabulary) and its training settings."""
    from ..config import ModelConfig
    from ..model import MixtureLM
    from ..presets import get_preset

    p = get_preset(preset)
    torch.manual_seed(seed)
    return MixtureLM(ModelConfig(**(p.model | {"vocab_size": 257}))), p.train


def graph_breaks(preset: str, batch: int = 2, seq_len: int = 32) -> dict:
    """The graphs and breaks torch.compile finds in a training forward (loss + aux loss) of a preset's model:
    {"graphs": n, "breaks": [(reason, where), ...]}, each distinct break once."""
    import torch._dynamo

    model, _ = preset_model(preset)
    model.train()
    idx = torch.randint(0, model.config.vocab_size, (batch, seq_len + 1))

    def loss(inputs, targets):
        out = model(inputs, targets)
        return out.loss if out.aux_loss is None else out.loss + out.aux_loss

    torch._dynamo.reset()
    explained = torch._dynamo.explain(loss)(idx[:, :-1], idx[:, 1:])
    breaks = []
    for b in explained.break_reasons:
        frame = b.user_stack[-1] if b.user_stack else None
        where = f"{os.path.basename(frame.filename)}:{frame.lineno}" if frame else "?"
        item = (b.reason.splitlines()[0], where)
        if item not in breaks:
            breaks.append(item)
    return {"graphs": explained.graph_count, "breaks": breaks}
