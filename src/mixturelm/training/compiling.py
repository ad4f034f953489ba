"""torch.compile for training (`TrainConfig.compile`, `mixturelm train --compile`): the model wrapped from
outside, the graph breaks of each preset listed, and the training step timed eager against compiled.

    python -m mixturelm.training.compiling breaks dense-debug moe-debug mod-debug peer-debug
    python -m mixturelm.training.compiling speed dense-tiny moe-tiny mod-tiny peer-debug --rounds 3

What compile cannot trace is a custom op (torch.library) or left eager on purpose, each said where it is:
the MoE "loop" grouped matmul and PEER's fused kernels are custom ops; PEER's expert-table part runs eagerly
(row-sparse gradients, PEER._experts). docs/training.md lists the breaks that remain.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys

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
    split the graph instead of failing; shapes are static in training, so nothing recompiles. backend
    "aot_eager" traces and differentiates as inductor does but runs the graph eagerly (fast tests)."""
    return torch.compile(model, backend=backend, dynamic=False)


# ----------------------------------------------------------------------------------------------
# Graph breaks

def _tiny_model(preset: str, seed: int = 0):
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

    model, _ = _tiny_model(preset)
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


# ----------------------------------------------------------------------------------------------
# Speed: eager against compiled, alternating in one process

def step_times(preset: str, batch: int, seq_len: int, steps: int, rounds: int) -> dict[str, list[float]]:
    """Seconds per training step (forward, backward, the trainer's optimizers) of the preset's model, eager and
    compiled, two copies with the same weights timed in turn (bench.timing.time_alternating)."""
    from ..bench.timing import time_alternating
    from ..config import TrainConfig
    from .optim import Optimizers

    _, train = _tiny_model(preset)
    contenders = {}
    data = torch.randint(0, 257, (batch, seq_len + 1))
    for name in ("eager", "compiled"):
        model, _ = _tiny_model(preset)
        model.train()
        optim = Optimizers(model, TrainConfig.from_dict(train | {"max_steps": 10**6}), 10**6)
        forward = compiled(model) if name == "compiled" else model
        contenders[name] = _train_step(forward, optim, data)
    return time_alternating(contenders, steps, rounds, warmup=3)


def _train_step(forward, optim, data: torch.Tensor):
    def step() -> None:
        out = forward(data[:, :-1], data[:, 1:])
        (out.loss if out.aux_loss is None else out.loss + out.aux_loss).backward()
        optim.step()
    return step


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m mixturelm.training.compiling", description=__doc__.split("\n")[0])
    p.add_argument("what", choices=("breaks", "speed"))
    p.add_argument("presets", nargs="+")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--steps", type=int, default=5, help="speed: timed steps per contender per round")
    p.add_argument("--rounds", type=int, default=3, help="speed: rounds, alternating eager and compiled")
    args = p.parse_args(argv)
    try:
        for preset in args.presets:
            if args.what == "breaks":
                found = graph_breaks(preset)
                print(f"{preset}: {found['graphs']} graph(s), {len(found['breaks'])} distinct break(s)")
                for reason, where in found["breaks"]:
                    print(f"  {where}: {reason}")
            else:
                times = step_times(preset, args.batch_size, args.seq_len, args.steps, args.rounds)
                eager, comp = statistics.median(times["eager"]), statistics.median(times["compiled"])
                print(f"{preset}: step eager {eager * 1e3:.1f} ms, compiled {comp * 1e3:.1f} ms, "
                      f"speed-up {eager / comp:.2f}x ({args.batch_size} x {args.seq_len} tokens, "
                      f"{torch.get_num_threads()} threads)", flush=True)
    except UsageError as e:
        sys.exit(f"{p.prog}: error: {e}")


if __name__ == "__main__":
    main()
