"""An unmodified PyTorch `init_method="env://"` script runs under `macrun run --nproc 2`, torchrun-style.

The env contract promises torchrun's variables (RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE,
MASTER_ADDR, MASTER_PORT), so gloo's TCP store on rank 0 and the collectives must just work. Skips
when torch is not installed (it is an optional, large dependency: the CPU wheel is ~190 MB).
"""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

pytestmark = [
    pytest.mark.integration,
    pytest.mark.timeout(180),
    pytest.mark.skipif(importlib.util.find_spec("torch") is None,
                       reason="torch not installed (pip install torch, CPU build) for the env:// check"),
]

MACRUN = str(Path(sys.executable).with_name("macrun"))

# What a PyTorch user writes; nothing macrun-specific. It reports what it was given and what it computed.
TORCH_SCRIPT = '''
import os
import torch
import torch.distributed as dist

dist.init_process_group(backend="gloo", init_method="env://")
rank, world = dist.get_rank(), dist.get_world_size()
total = torch.tensor([float(rank + 1)])
dist.all_reduce(total)
ranks = [None] * world
dist.all_gather_object(ranks, rank)
env = " ".join(f"{k}={os.environ.get(k, '-')}" for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE",
                                                          "MASTER_ADDR", "MASTER_PORT", "GLOO_SOCKET_IFNAME"))
print(f"torch rank={rank} world={world} sum={total.item():g} gathered={ranks} {env}", flush=True)
dist.destroy_process_group()
'''
LINE = re.compile(r"^\[rank (\d+) (\S+)\] torch rank=(\d+) world=(\d+) sum=(\S+) gathered=(\[.*?\]) (.*)$", re.M)


@dataclass(frozen=True)
class TorchReport:
    """What one rank of TORCH_SCRIPT printed, with the launcher's own rank and host label for it."""

    launcher_rank: int
    host: str
    rank: int
    world: int
    total: str
    gathered: str
    env: dict[str, str]


def torch_reports(stdout: str) -> dict[int, TorchReport]:
    """launcher rank -> its TORCH_SCRIPT report, from macrun's `[rank R host] ...` lines."""
    found = {}
    for m in LINE.finditer(stdout):
        env = dict(item.split("=", 1) for item in m.group(7).split())
        found[int(m.group(1))] = TorchReport(int(m.group(1)), m.group(2), int(m.group(3)), int(m.group(4)),
                                             m.group(5), m.group(6), env)
    return found


def test_unmodified_gloo_env_script_all_reduces(tmp_path: Path, tmp_home: Path) -> None:
    script = tmp_path / "train_torch.py"
    script.write_text(TORCH_SCRIPT)
    env = {"HOME": str(tmp_home), "PATH": "/usr/bin:/bin", "COLUMNS": "200"}
    proc = subprocess.run([MACRUN, "run", "--nproc", "2", "--name", "torch-env", "--", "python", script.name],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=150,
                          stdin=subprocess.DEVNULL)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    reports = torch_reports(proc.stdout)
    assert sorted(reports) == [0, 1], out
    for r in reports.values():
        assert r.rank == r.launcher_rank, f"torch's rank must be the launcher's rank: {r}"
        assert (r.world, r.total, r.gathered) == (2, "3", "[0, 1]"), r
        assert r.env["RANK"] == r.env["LOCAL_RANK"] == str(r.rank)
        assert r.env["WORLD_SIZE"] == r.env["LOCAL_WORLD_SIZE"] == "2"
        assert r.env["MASTER_ADDR"] == "127.0.0.1"
    ports = {r.env["MASTER_PORT"] for r in reports.values()}
    assert len(ports) == 1 and 0 < int(ports.pop()) < 65536, "every rank must get rank 0's one MASTER_PORT"
    assert "Traceback" not in out
