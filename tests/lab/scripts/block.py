"""A rank that proves the ring works, prints its pid, then blocks until it is stopped from outside.

    python block.py wait   # after the first all_sum, sleep (only a signal ends it)
    python block.py ring   # keep doing small all_sums (a signal arrives while inside a collective)

It gives up on its own after 60 s (exit 4) so a broken test can never leave it behind for long.
"""

import os
import sys
import time

import mlx.core as mx

mode = sys.argv[1] if len(sys.argv) > 1 else "wait"
group = mx.distributed.init()
mx.eval(mx.distributed.all_sum(mx.array([1.0])))
print(f"pid={os.getpid()} rank={group.rank()} world={group.size()} mode={mode}", flush=True)
deadline = time.monotonic() + 60
while time.monotonic() < deadline:
    if mode == "ring":
        mx.eval(mx.distributed.all_sum(mx.array([1.0])))
    time.sleep(0.05)
sys.exit(4)
