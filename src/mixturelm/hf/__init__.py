"""Hugging Face in and out: import checkpoints of transformers' architectures as mixturelm runs, export
runs as folders transformers loads (native architectures where one computes exactly the same function,
else mixturelm's own modeling file), and upcycle dense runs into MoE, PEER or MoD runs.

    from mixturelm.hf import import_hf, export_hf, upcycle, UpcycleOptions
"""

from .convert import export_hf, import_hf
from .upcycle import UpcycleOptions, upcycle

__all__ = ["UpcycleOptions", "export_hf", "import_hf", "upcycle"]
