"""torch.distributed around single-device model code: expert parallelism (`expert_parallel`) and PEER's
expert tables sharded over processes (`peer_sharded`)."""

from .expert import ExpertParallelMoE, expert_parallel
from .peer import ShardedPEER, peer_sharded

__all__ = ["ExpertParallelMoE", "ShardedPEER", "expert_parallel", "peer_sharded"]
