"""How much MoD's causal predictor would shrink the model's update if it shared the model's gradient clip.

    python benchmarks/mod/predictor_clip_share.py [STEPS]

Trains mod-tiny --mod-causal predictor (default corpus) for STEPS steps (default 60) with the Trainer as
it is (predictor clipped apart) and prints, at some steps, the gradient norms of the predictor and of the
rest of the model before clipping, and the factor one global norm would have put on the model's update:
min(1, c / total) / min(1, c / rest), c the clip limit (1.0)."""
import sys
import tempfile

import torch

from mixturelm.training import Trainer, new_run_config

steps = int(sys.argv[1]) if len(sys.argv) > 1 else 60
cfg = new_run_config("mod-tiny", {"max_steps": steps}, block_overrides={"mod": {"causal": "predictor"}})
with tempfile.TemporaryDirectory() as out:
    trainer = Trainer(cfg, out, overwrite=True, progress=False, device="cpu")
    trainer._build()
    rows = []

    def norm(params) -> float:
        return torch.sqrt(sum((p.grad.double() ** 2).sum() for p in params if p.grad is not None)).item()

    clip = torch.nn.utils.clip_grad_norm_

    def recording_clip(params, max_norm, *args, **kwargs):  # called first, on the model's parameters
        rows.append((norm(trainer.optim.side_params), norm(trainer.optim.clipped_params), max_norm))
        return clip(params, max_norm, *args, **kwargs)

    torch.nn.utils.clip_grad_norm_ = recording_clip
    for step in range(steps):
        trainer._train_step(step)
for i in sorted({0, 4, 9, 19, 29, 39, 49, steps - 1} & set(range(steps))):
    side, rest, c = rows[i]
    total = (side ** 2 + rest ** 2) ** 0.5
    print(f"step {i + 1:>3}: predictor {side:.4f}, rest of the model {rest:.4f}, "
          f"one global clip would scale the model's update by {min(1, c / total) / min(1, c / rest):.4f}")
