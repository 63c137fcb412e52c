"""Rank 0 prints where macrun's rendezvous store listens, then every rank waits for a file to appear.

    python store_then_wait.py /tmp/.../release

After the file appears each rank does one all_sum and prints `done rank=R sum=S`; without it, exit 4
after 60 s.
"""

import os
import sys
import time
from pathlib import Path

release = Path(sys.argv[1])
rank = int(os.environ["RANK"])
if rank == 0:
    print(f"store={os.environ['MACRUN_STORE_ADDR']}:{os.environ['MACRUN_STORE_PORT']}", flush=True)
deadline = time.monotonic() + 60
while not release.exists():
    if time.monotonic() > deadline:
        sys.exit(4)
    time.sleep(0.02)

import mlx.core as mx  # noqa: E402  (after the wait: the store check must not depend on MLX)

mx.distributed.init()
total = mx.distributed.all_sum(mx.array([float(rank + 1)]))
mx.eval(total)
print(f"done rank={rank} sum={total.item():g}", flush=True)
