"""Training: run set-up and budget (run), the optimizer (optim), evaluation (evaluation), metrics
(metrics), processes (distributed), the loop (loop) and what a run reports (summary)."""

from .distributed import Dist, finish_distributed, resolve_device
from .evaluation import evaluate, loss_metrics
from .loop import Trainer
from .optim import lr_factor, param_groups
from .run import RunConfig, new_run_config, resumed_run_config, steps_in_budget

__all__ = ["Dist", "RunConfig", "Trainer", "evaluate", "finish_distributed", "loss_metrics", "lr_factor",
           "new_run_config", "param_groups", "resolve_device", "resumed_run_config", "steps_in_budget"]
