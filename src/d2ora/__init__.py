"""d2ora: decentralized DoRA fine-tuning."""

from d2ora.dora.attach import AttachError, AttachReport, attach, detach, dora_layers, merge
from d2ora.dora.config import DoRAConfig
from d2ora.dora.files import AdapterFileError, load_adapter, merge_and_save, read_adapter, save_adapter
from d2ora.dora.layer import DoRALinear

__all__ = [
    "AdapterFileError",
    "load_adapter",
    "merge_and_save",
    "read_adapter",
    "save_adapter",
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
