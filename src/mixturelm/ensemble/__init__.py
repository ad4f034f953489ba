"""Online mixing of whole models: MoE-F (Saqur et al., ICLR 2025) and the standard aggregators it should be
compared with, on the NIFTY predictions of the paper's LLM experts and on streams of text for language models.

    from mixturelm.ensemble import MoEF, FixedShare, ZeroOne
    agg = MoEF(n_experts)
    w = agg.weights(); agg.update(losses, loss.signal(forecasts))
"""

from .aggregators import (Aggregator, FixedShare, FollowTheLeader, Hedge, MoEF, OnlineTuned, Uniform, WindowSoftmin,
                          mixture_loss, run)
from .losses import CrossEntropy, LogLoss, Squared, ZeroOne

__all__ = ["Aggregator", "CrossEntropy", "FixedShare", "FollowTheLeader", "Hedge", "LogLoss", "MoEF", "OnlineTuned",
           "Squared", "Uniform", "WindowSoftmin", "ZeroOne", "mixture_loss", "run"]
