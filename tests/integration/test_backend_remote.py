"""The backend choice in a real remote launch: two Linux "hosts" behind a real OpenSSH server on 127.0.0.1.

Linux hosts have no RDMA over Thunderbolt, so `--backend auto` must keep MLX's TCP ring, say why in the
launch log, and give the ranks the ring's env (MLX_HOSTFILE, no MLX_IBV_DEVICES); an unmodified
`mx.distributed.init()` then forms the two-rank ring. `--backend jaccl` must refuse before any rank starts.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from distributed.errors import HostError
from launcher.jobs.api import LaunchSpec, launch
from launcher.room.hosts import HostSpec
from tests.support.sshd import SshdHandle, requires_openssh

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180), requires_openssh]

SCRIPT = """\
import json, os
import mlx.core as mx
group = mx.distributed.init()
total = mx.distributed.all_sum(mx.array([float(group.rank() + 1)]))
keys = ("MLX_HOSTFILE", "MLX_IBV_DEVICES", "MLX_JACCL_COORDINATOR", "MLX_JACCL_RING", "MACRUN_BACKEND")
print("RESULT", json.dumps({"size": group.size(), "sum": total.item(), "env": {k: k in os.environ for k in keys}}))
"""


def hosts(server: SshdHandle, tmp_path: Path) -> list[HostSpec]:
    return [HostSpec(name=f"linux{i}", hostname=server.host, port=server.port, python=sys.executable,
                     workdir=str(tmp_path / f"linux{i}")) for i in range(2)]


def test_auto_on_linux_hosts_keeps_the_ring_and_says_why(ssh_home: Path, server: SshdHandle,
                                                         tmp_path: Path) -> None:
    lines: list[str] = []
    result = launch(LaunchSpec(argv=["python", "-c", SCRIPT], run_dir=tmp_path / "run", hosts=hosts(server, tmp_path),
                               min_battery=0.0, backend="auto"), emit=lines.append)
    assert result.exit_code == 0, "\n".join(lines)
    assert "backend ring: linux0 runs Linux, and RDMA over Thunderbolt needs macOS 26.2+ (also: linux1)" in lines
    results = [json.loads(line.split("RESULT ", 1)[1]) for line in lines if "RESULT " in line]
    assert len(results) == 2
    for r in results:
        assert r["size"] == 2 and r["sum"] == 3.0
        assert r["env"] == {"MLX_HOSTFILE": True, "MLX_IBV_DEVICES": False, "MLX_JACCL_COORDINATOR": False,
                            "MLX_JACCL_RING": False, "MACRUN_BACKEND": False}
    assert not (tmp_path / "run" / "mlx_ibv_devices.json").exists()


def test_explicit_jaccl_on_linux_hosts_refuses_before_any_rank_starts(ssh_home: Path, server: SshdHandle,
                                                                      tmp_path: Path) -> None:
    lines: list[str] = []
    with pytest.raises(HostError) as err:
        launch(LaunchSpec(argv=["python", "-c", "print('RAN')"], run_dir=tmp_path / "run",
                          hosts=hosts(server, tmp_path), min_battery=0.0, backend="jaccl"), emit=lines.append)
    assert err.value.message.startswith("--backend jaccl cannot run: linux0 runs Linux")
    assert not any("RAN" in line for line in lines)
