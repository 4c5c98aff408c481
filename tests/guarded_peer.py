"""``python tests/guarded_peer.py peer ...``: the d2ora command with every pickle-based path of
torch.distributed (object collectives, torch.load) made to fail loudly, so a run that completes
under it provably never used them."""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist


def _forbidden(name: str):
    def refuse(*args, **kwargs):
        raise AssertionError(f"d2ora called {name}, which unpickles data from peers")

    return refuse


for _name in ("send_object_list", "recv_object_list", "broadcast_object_list", "all_gather_object",
              "gather_object", "scatter_object_list"):
    setattr(dist, _name, _forbidden(f"torch.distributed.{_name}"))
torch.load = _forbidden("torch.load")

if __name__ == "__main__":
    from d2ora.cli import app

    sys.argv[0] = "d2ora"
    app()
