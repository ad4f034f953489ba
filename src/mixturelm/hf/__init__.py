"""Hugging Face in and out: import checkpoints of transformers' architectures as mixturelm runs, export
runs as folders transformers loads (native architectures where one computes exactly the same function,
else mixturelm's own modeling file), and upcycle dense runs into MoE, PEER or MoD runs.

    from mixturelm.hf import import_hf, export_hf, upcycle
"""

from .convert import export_hf, import_hf

__all__ = ["export_hf", "import_hf"]
