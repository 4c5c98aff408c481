"""d2ora: decentralized DoRA fine-tuning."""

from d2ora.dora.attach import AttachError, AttachReport, attach, detach, dora_layers, merge
from d2ora.dora.config import DoRAConfig
from d2ora.dora.layer import DoRALinear

__all__ = [
    "AttachError",
    "AttachReport",
    "DoRAConfig",
    "DoRALinear",
    "attach",
    "detach",
    "dora_layers",
    "merge",
]
__version__ = "0.1.0"
