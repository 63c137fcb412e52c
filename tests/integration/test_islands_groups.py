"""Two MLX ring groups in one process: the island's ring and the island leaders' ring (docs/islands.md).

MLX 0.32.4's ring has no `Group.split` ("[ring] Group split not supported."), and `mx.distributed.init`
caches one group per backend name, so a second `init(backend="ring")` returns the first group whatever the
environment says. MLX's C++ API has `distributed::clear_backends()` (it empties that cache; Python calls it
only at exit): called through ctypes, the next `init` reads MLX_RANK and MLX_HOSTFILE afresh and builds a
second ring, while the first stays alive in the Python object that holds it. This test pins those facts
with 4 real local ranks in 2 islands of 2: the island all_sum, the leaders' all_sum and the hand-out back to
the island, interleaved for 12 rounds of different sizes, all exact; then the world ring of 4, opened last
as docs/islands.md plans, becomes what `init()` returns, and all three rings still work.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from distributed.probe import free_ports

pytestmark = [pytest.mark.integration, pytest.mark.timeout(90)]

ROOT = Path(__file__).resolve().parents[2]

# One rank of 4: argv out_dir rank. Islands {0, 1} and {2, 3}; ranks 0 and 2 lead.
RANK = r"""
import ctypes, json, os, sys
from pathlib import Path
import mlx.core as mx

lib = Path(mx.__file__).parent / "lib" / ("libmlx.dylib" if sys.platform == "darwin" else "libmlx.so")
clear_backends = ctypes.CDLL(str(lib))._ZN3mlx4core11distributed14clear_backendsEv
out, rank = Path(sys.argv[1]), int(sys.argv[2])
island, local = divmod(rank, 2)
res = {}
os.environ.update(MLX_RANK=str(local), MLX_HOSTFILE=str(out / f"island{island}.json"))
isl = mx.distributed.init(strict=True, backend="ring")
res["island"] = [isl.rank(), isl.size()]
try:
    isl.split(0)
    res["split"] = "ok"
except RuntimeError as exc:
    res["split"] = str(exc)
lead = None
if local == 0:
    os.environ.update(MLX_RANK=str(island), MLX_HOSTFILE=str(out / "leaders.json"))
    cached = mx.distributed.init(strict=True, backend="ring")
    res["second_init_cached"] = cached.rank() == isl.rank() and cached.size() == isl.size()
    clear_backends()
    lead = mx.distributed.init(strict=True, backend="ring")
    res["leaders"] = [lead.rank(), lead.size()]
    res["default_is_leaders"] = mx.distributed.init().rank() == island
ok = True
for it in range(12):
    x = mx.full((1 << (8 + it % 6),), float(rank + 1 + it))
    s = mx.distributed.all_sum(x, group=isl)
    mx.eval(s)  # every member runs it; below a non-leader's input no longer depends on s
    s = mx.distributed.all_sum(s, group=lead) if lead is not None else mx.zeros(s.shape)
    s = mx.distributed.all_sum(s, group=isl)
    mx.eval(s)
    ok = ok and bool(mx.all(s == sum(r + 1 + it for r in range(4))).item())
res["exact"] = ok
clear_backends()
os.environ.update(MLX_RANK=str(rank), MLX_HOSTFILE=str(out / "world.json"))
world = mx.distributed.init(strict=True, backend="ring")
res["default_is_world"] = mx.distributed.init().size() == 4 and mx.distributed.init().rank() == rank
rings = [world, isl] + ([lead] if lead is not None else [])
res["all_rings_after_world"] = []
for g in rings:  # one at a time: every member must run a ring's collectives in the same order
    s = mx.distributed.all_sum(mx.ones((1000,)), group=g)
    mx.eval(s)
    res["all_rings_after_world"].append(int(s[0].item()))
(out / f"rank{rank}.json").write_text(json.dumps(res))
"""


def test_island_ring_and_leaders_ring_coexist_in_one_process(tmp_path: Path) -> None:
    ports = free_ports(10, "127.0.0.1")
    for i in range(2):
        (tmp_path / f"island{i}.json").write_text(json.dumps([[f"127.0.0.1:{p}"] for p in ports[2 * i:2 * i + 2]]))
    (tmp_path / "leaders.json").write_text(json.dumps([[f"127.0.0.1:{p}"] for p in ports[4:6]]))
    (tmp_path / "world.json").write_text(json.dumps([[f"127.0.0.1:{p}"] for p in ports[6:]]))
    (tmp_path / "rank.py").write_text(RANK)
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLX_")}
    procs = [subprocess.Popen([sys.executable, str(tmp_path / "rank.py"), str(tmp_path), str(r)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in range(4)]
    end, outputs = time.monotonic() + 60, []
    try:
        for p in procs:
            outputs.append(p.communicate(timeout=max(1.0, end - time.monotonic()))[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    assert [p.returncode for p in procs] == [0] * 4, "\n".join(outputs)
    res = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(4)]

    assert [r["island"] for r in res] == [[0, 2], [1, 2], [0, 2], [1, 2]]
    for r in res:  # if MLX's ring gains split, docs/islands.md's plan simplifies: use it
        assert r["split"] == "[ring] Group split not supported."
        assert r["exact"]
        assert r["default_is_world"], "the ring opened last is what init() returns"
    assert [r["all_rings_after_world"] for r in res] == [[4, 2, 2], [4, 2], [4, 2, 2], [4, 2]]
    for leader, island in ((res[0], 0), (res[2], 1)):
        assert leader["second_init_cached"], "a second init(backend='ring') should return the cached group"
        assert leader["leaders"] == [island, 2]
        assert leader["default_is_leaders"], "after the second init, group=None means the leaders' ring"
