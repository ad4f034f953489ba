"""torch.distributed around single-device model code: expert parallelism (`expert_parallel`)."""

from .expert import ExpertParallelMoE, expert_parallel

__all__ = ["ExpertParallelMoE", "expert_parallel"]
