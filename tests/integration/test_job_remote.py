"""Job control for remote ranks: SSHLauncher through a real OpenSSH server on 127.0.0.1 (HOME isolated)."""

from __future__ import annotations

import hashlib
import os
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from launcher.jobs.job import LocalLauncher, RankSpec, RankState, SSHLauncher, run_ranks
from launcher.room.hosts import HostSpec
from launcher.transport import ssh
from tests.integration.test_job import (
    BLOCK,
    FAIL_AFTER_GATE,
    Collector,
    open_gate_when,
    states,
    stop_shim_then_open_gate,
    wait_gone,
)
from tests.support.sshd import SshdHandle, requires_openssh

pytestmark = [
    pytest.mark.integration,
    pytest.mark.timeout(60),
    requires_openssh,
]
ROOT = Path(__file__).resolve().parents[2]
PY = sys.executable


@pytest.fixture
def conn(ssh_home: Path, server: SshdHandle) -> Iterator[ssh.SSHConnection]:
    connection = ssh.connect(HostSpec(name="loop", hostname=server.host, port=server.port), timeout=10)
    yield connection
    connection.close()


def spec(rank: int, host: str, code: str, tmp_path: Path, *args: str, env: dict[str, str] | None = None,
         ) -> RankSpec:
    return RankSpec(rank=rank, host_name=host, local_rank=0, argv=[PY, "-c", code, *args],
                    env={"RANK": str(rank), **(env or {})}, cwd=str(tmp_path), python=PY)


def launchers(conn: ssh.SSHConnection) -> dict[str, object]:
    # The "remote" host is this machine, so its work dir (where `distributed` lives) is the checkout.
    return {"local": LocalLauncher(), "loop": SSHLauncher(conn, str(ROOT))}


def test_remote_rank_gets_env_over_stdin_and_succeeds(tmp_path: Path, conn: ssh.SSHConnection) -> None:
    secret = "s3cret-" + os.urandom(8).hex()
    code = ("import hashlib, os\nprint('rank', os.environ['RANK'], os.getcwd())\n"
            "print(hashlib.sha256(os.environ['MACRUN_SECRET'].encode()).hexdigest())")
    emit = Collector()
    result = run_ranks([spec(0, "local", code, tmp_path, env={"MACRUN_SECRET": secret}),
                        spec(1, "loop", code, tmp_path, env={"MACRUN_SECRET": secret})],
                       launchers=launchers(conn), log_dir=tmp_path / "logs", emit=emit, grace=1.0)

    assert result.exit_code == 0, emit.lines
    assert states(result) == {0: RankState.SUCCEEDED, 1: RankState.SUCCEEDED}
    digest = hashlib.sha256(secret.encode()).hexdigest()
    assert f"[rank 1 loop] rank 1 {tmp_path}" in emit.lines
    assert f"[rank 1 loop] {digest}" in emit.lines
    assert (tmp_path / "logs" / "rank-1.log").read_text().splitlines() == [f"rank 1 {tmp_path}", digest]
    assert secret not in SSHLauncher(conn, str(ROOT)).command(spec(1, "loop", code, tmp_path))


def test_remote_rank_killed_by_sigkill_tears_down_the_others(tmp_path: Path, conn: ssh.SSHConnection) -> None:
    def kill_remote(c: Collector) -> None:
        if len(c.pids) == 3 and not c.all_pids_seen.is_set():
            c.all_pids_seen.set()
            os.kill(c.pids[1][0], signal.SIGKILL)

    emit = Collector(kill_remote)
    specs = [spec(0, "local", BLOCK, tmp_path), spec(1, "loop", BLOCK, tmp_path),
             spec(2, "local", BLOCK, tmp_path)]
    result = run_ranks(specs, launchers=launchers(conn), log_dir=tmp_path / "logs", emit=emit, grace=1.0)

    assert result.exit_code == 1
    first = result.first_failure
    assert first is not None and first.rank == 1 and first.host_name == "loop"
    assert first.state is RankState.FAILED and first.exit_code == 137 and "SIGKILL" in first.reason
    assert states(result) == {0: RankState.KILLED, 1: RankState.FAILED, 2: RankState.KILLED}
    assert first.ended is not None
    assert wait_gone(emit.every_pid(), first.ended + 5.0) == []


def test_local_failure_stops_the_remote_rank(tmp_path: Path, conn: ssh.SSHConnection) -> None:
    gate = tmp_path / "gate"
    os.mkfifo(gate)
    emit = Collector(open_gate_when(gate, lambda c: len(c.pids) == 2))
    specs = [spec(0, "local", FAIL_AFTER_GATE, tmp_path, str(gate)), spec(1, "loop", BLOCK, tmp_path)]
    result = run_ranks(specs, launchers=launchers(conn), log_dir=tmp_path / "logs", emit=emit, grace=1.0)

    assert result.exit_code == 1 and states(result) == {0: RankState.FAILED, 1: RankState.KILLED}
    remote = result.ranks[1]
    assert remote.exit_code == 143 and "SIGTERM" in remote.reason  # "TERM" travelled over the channel
    assert remote.ended is not None
    assert wait_gone(emit.every_pid(), remote.ended + 5.0) == []


def test_lost_connection_is_lost_and_leaves_no_orphans(tmp_path: Path, conn: ssh.SSHConnection) -> None:
    def drop_connection(c: Collector) -> None:
        if len(c.pids) == 2 and not c.all_pids_seen.is_set():
            c.all_pids_seen.set()
            conn.close()  # as if the network went away: the remote shim sees EOF on stdin

    emit = Collector(drop_connection)
    specs = [spec(0, "local", BLOCK, tmp_path), spec(1, "loop", BLOCK, tmp_path)]
    started = time.monotonic()
    result = run_ranks(specs, launchers=launchers(conn), log_dir=tmp_path / "logs", emit=emit, grace=1.0)

    assert result.exit_code == 1 and states(result) == {0: RankState.KILLED, 1: RankState.LOST}
    first = result.first_failure
    assert first is not None and first.rank == 1 and "lost the connection to host loop" in first.reason
    assert time.monotonic() - started < 15
    assert wait_gone(emit.every_pid(), time.monotonic() + 5.0) == []


def test_stuck_remote_shim_is_killed_over_a_separate_exec(tmp_path: Path, conn: ssh.SSHConnection) -> None:
    gate = tmp_path / "gate"
    os.mkfifo(gate)
    emit = Collector(stop_shim_then_open_gate(gate, stuck_rank=1, ranks=2))
    specs = [spec(0, "local", FAIL_AFTER_GATE, tmp_path, str(gate)), spec(1, "loop", BLOCK, tmp_path)]
    result = run_ranks(specs, launchers=launchers(conn), log_dir=tmp_path / "logs", emit=emit, grace=0.3)

    assert result.exit_code == 1 and states(result) == {0: RankState.FAILED, 1: RankState.KILLED}
    stuck = result.ranks[1]
    assert stuck.exit_code == 137 and stuck.ended is not None  # `kill -9` of the shim, via the exit-signal
    assert wait_gone(emit.every_pid(), stuck.ended + 5.0) == []
