"""``python tests/slow_peer.py ROUND SECONDS peer ...``: the d2ora command with this process's
local steps of round ROUND delayed by SECONDS (a slow organisation, for tests/test_p2p_chaos.py)."""

from __future__ import annotations

import sys
import time

import d2ora.engine.round as round_module

slow_round, delay_s = int(sys.argv[1]), float(sys.argv[2])
_local_steps = round_module.local_steps


def slowed_local_steps(host, plan, round_index, on_step):
    if round_index == slow_round:
        time.sleep(delay_s)
    return _local_steps(host, plan, round_index, on_step)


round_module.local_steps = slowed_local_steps

if __name__ == "__main__":
    from d2ora.cli import app

    sys.argv = ["d2ora", *sys.argv[3:]]
    app()
