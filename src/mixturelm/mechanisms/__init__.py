"""One home per mechanism, and the registry through which the rest of mixturelm reaches them.

`registry` defines what a mechanism tells the system (`Mechanism`) and how it is found; `dense`, `moe`,
`mod` and `peer` are the built-in mechanisms (MoDE is MoE and MoD together: staged, a MoE block inside a
MoD wrapper; integrated, a MoE with no-op experts). A new mechanism is one more module like them, with one
call of `registry.register`.
"""

from . import registry
from . import dense, moe, mod, peer  # noqa: F401  (each registers itself)
from .registry import Mechanism, OptimizerNeeds, Option, get, kinds, of_aux, of_module, present, register

__all__ = ["Mechanism", "OptimizerNeeds", "Option", "get", "kinds", "of_aux", "of_module", "present", "register",
           "registry"]
