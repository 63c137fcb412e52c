"""An unmodified PyTorch `env://` script across three emulated hosts: gloo finds rank 0 and its peers.

The lab's hosts normally run a Python with MLX only; here the hosts file points them at this very
interpreter (the file system is shared, so the hosts see it), which has torch when this test runs.
The lab's hostnames (h0, h1, ...) resolve to nothing, as on many real networks, so gloo only finds its
peers because macrun names the interface holding each host's address in GLOO_SOCKET_IFNAME.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

from tests.integration import test_torch_env as torch_env
from tests.lab.labnet import Lab
from tests.lab.scripts.macrun_proc import run_macrun

pytestmark = [
    pytest.mark.timeout(180),
    pytest.mark.skipif(importlib.util.find_spec("torch") is None,
                       reason="torch not installed (pip install torch, CPU build) for the env:// check"),
]


def test_unmodified_gloo_env_script_runs_across_hosts(lab: Lab, tmp_path: Path) -> None:
    hosts = lab.write_hosts_file(tmp_path / "hosts.json", python=sys.executable)
    script = tmp_path / "train_torch.py"
    script.write_text(torch_env.TORCH_SCRIPT)
    proc = run_macrun(["run", "--hosts", str(hosts), "--name", "torch", "--", "python", str(script)],
                      home=lab.ssh_home, cwd=tmp_path, timeout=150)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    reports = torch_env.torch_reports(proc.stdout)
    assert sorted(reports) == [0, 1, 2], out
    for r in reports.values():
        assert r.rank == r.launcher_rank and r.host == f"h{r.rank}", r
        assert (r.world, r.total, r.gathered) == (3, "6", "[0, 1, 2]"), r
        assert r.env["RANK"] == str(r.rank) and r.env["WORLD_SIZE"] == "3"
        assert r.env["LOCAL_RANK"] == "0" and r.env["LOCAL_WORLD_SIZE"] == "1"
        assert r.env["MASTER_ADDR"] == lab.hosts[0].wifi_ip, "MASTER_ADDR must be rank 0's address"
        assert r.env["GLOO_SOCKET_IFNAME"] == "wifi0", "the interface holding the host's address"
    ports = {r.env["MASTER_PORT"] for r in reports.values()}
    assert len(ports) == 1, "every rank must get rank 0's one MASTER_PORT"
